"""PatchCore with the bundled EfficientNet-Lite0: memory bank of patch features, nearest neighbour.

``coreset_ratio``: 1.0 keeps every training patch (exact bank), 0.1 / 0.01 the greedy coreset.
``score``: ``'reweighted'`` is the paper (L2 distance, image score re-weighted by eq. 7 with
``num_neighbours`` = b = 9); ``'max'`` is the reference code (squared L2, image score = max).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "patchcore"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.compute_dtype = "float32"  # or "bfloat16": backbone compute only (BENCHMARKS.md gives its error)
    c.taps = ("stage2", "stage4")  # stride 8 (40 ch) and stride 16 (112 ch): d = 152
    c.aggregate = 3
    c.image_size = 256
    c.coreset_ratio = 0.1
    c.projection_dim = 128
    c.score = "reweighted"
    c.num_neighbours = 9
    c.chunk_size = 4096  # bank rows per matmul in the nearest-neighbour scan
    c.blur_sigma = 4.0
    c.batch_size = 16
    c.seed = 0
    c.num_overlays = 16
    return c
