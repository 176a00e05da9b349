"""PAAP (feature-matching groups + patch-adaptive average pooling) with the bundled EfficientNet-Lite0.

Features: the paper takes the last stage of a ResNet-50-class net (WRN50 layer4: stride 32, 2048
channels). Lite0's counterpart is ``stage6`` (its last MBConv stage: stride 32, 320 channels);
``head`` (the 1×1 conv to 1280 channels after it, same stride) is the alternative. Any backbone and
taps work: ``--config.backbone=wide_resnet50_2 --config.taps="('layer4',)"`` is the paper's setup.
Adapted features keep C' = min(num_channels, patch_size²·C) values per location (stage6: 700 of
9·320 = 2880); ``feature_sigma`` (in image pixels, σ/stride cells of each tap, at most
image_size/8) smooths them over the grid.

Two resolutions: the image score comes from ``taps`` (stride 32, the paper's), the pixel map from
``pixel_taps`` (``stage2``: stride 8, 40 channels, C' = 360) with the same groups, pooling and
per-group Gaussians; ``pixel_taps=()`` maps from ``taps`` too (the paper's one resolution).

Matching: ``matcher='dense_mnn'`` counts mutual nearest neighbours between the unit-norm
``match_tap`` patches of two images (stage4: stride 16, 112 channels, 16×16 = 256 "keypoints" at
256 px); ``match_min_similarity`` (cosine, -1 = off) and ``match_ratio`` (Lowe, 1 = off) filter
them. ``'sift'``/``'orb'`` use OpenCV (pip install opencv-python-headless) with ``match_ratio``
(0.8 is Lowe's value) and optional ``match_ransac`` homography inliers.

Grouping: ``grouping='size'`` picks the count threshold per category so groups hold on average
``group_size`` images (the paper's 20–30); ``grouping='threshold'`` uses ``group_threshold`` as
given (the paper's DeDoDe counts: >1000 textures, >700 objects; dense_mnn counts are at most the
number of match patches). Groups under ``min_group_size`` images are merged into the best-matching
kept group.

Covariance: ``shrinkage='ledoit_wolf'`` (default, scale-free) or ``'ridge'`` (S + ridge·I).

``feature_sigma = 0`` was chosen without test images, by ``python scripts/bench.py --method paap
--select feature_sigma=0,4,8,16 --data-root ../shared/data/mvtec_bottle`` (:mod:`jaxad.bench.select`):
fitted on a seeded 80 % of the training images, scored on the other 20 % clean and with synthetic
anomalies pasted in, held-out AUPRO fell as σ grew — bottle 0.670 / 0.664 / 0.649 / 0.619 at
σ = 0 / 4 / 8 / 16 px with image AUROC 1.0 throughout (BENCHMARKS.md,
``select-feature_sigma-paap-mvtec_bottle-cpu``).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "paap"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.compute_dtype = "float32"  # or "bfloat16": backbone compute only (BENCHMARKS.md gives its error)
    c.taps = ("stage6",)  # stride 32, 320 ch: the last stage, as WRN50 layer4 in the paper; image score
    c.pixel_taps = ("stage2",)  # stride 8, 40 ch: the pixel map; () = the map from `taps`
    c.patch_size = 3
    c.num_channels = 700
    c.feature_sigma = 0.0  # pixels (σ/stride cells per tap); 0 = no smoothing, chosen on synthetic anomalies (above)
    c.shrinkage = "ledoit_wolf"
    c.ridge = 0.01
    c.matcher = "dense_mnn"
    c.match_tap = "stage4"
    c.match_min_similarity = -1.0
    c.match_ratio = 1.0
    c.match_ransac = False
    c.match_chunk = 8  # images per block in the all-pairs matching (8: the [8·P, 8·P] similarities stay in cache)
    c.grouping = "size"
    c.group_size = 25
    c.group_threshold = 0.0
    c.min_group_size = 5
    c.image_size = 256
    c.blur_sigma = 4.0
    c.batch_size = 16
    c.num_overlays = 16
    return c
