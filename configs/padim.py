"""PaDiM with the bundled EfficientNet-Lite0: a Gaussian per location over a random channel subset.

Taps mirror ResNet layer1-3 (strides 4, 8, 16): stage1 (24 ch), stage2 (40 ch), stage4 (112 ch),
176 channels of which ``num_channels`` are kept (the paper keeps 100 of ResNet18's 448 and 550 of
WRN50's 1792). ``reg`` is the ε·I added to every covariance.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "padim"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.compute_dtype = "float32"  # or "bfloat16": backbone compute only (BENCHMARKS.md gives its error)
    c.taps = ("stage1", "stage2", "stage4")  # strides 4, 8, 16; the first sets the grid
    c.num_channels = 100
    c.reg = 0.01
    c.image_size = 256
    c.blur_sigma = 4.0
    c.batch_size = 16
    c.seed = 0
    c.num_overlays = 16
    return c
