"""CRD with the bundled EfficientNet-Lite0 (real ImageNet weights, no setup).

λ: ``lam_mode='absolute'`` is the paper (λ=5 on G = Σ f fᵀ of raw features). Because G grows
with the number of training patches, the same λ regularises a 50-image and a 500-image category
differently; ``lam_mode='trace'`` (λ · trace(G)/d) and ``'per_patch'`` (λ · n) are scale-free
alternatives, e.g. ``--config.lam_mode=trace --config.lam=1e-3``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "crd"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.compute_dtype = "float32"  # or "bfloat16": backbone compute only (BENCHMARKS.md gives its error)
    c.taps = ("stage2", "stage4")  # stride 8 (40 ch) and stride 16 (112 ch): d = 152
    c.aggregate = 3  # k×k local average of each tap before concatenation (1 = off)
    c.image_size = 256
    c.lam = 5.0
    c.lam_mode = "absolute"
    c.blur_sigma = 4.0
    c.batch_size = 16
    c.seed = 0
    c.num_overlays = 16
    return c
