"""PaDiM as in its paper: ResNet18 layer1-3 (64 + 128 + 256 channels), 100 kept at random, 256 px
(the paper centre-crops 224 of 256). For its WRN50-2 row: backbone wide_resnet50_2, num_channels 550.

Needs torchvision's ImageNet weights once:
    python scripts/port_weights.py resnet18 --from resnet18-f37072fd.pth
"""

from pathlib import Path

import ml_collections

from jaxad.config import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(Path(__file__).parents[1] / "padim.py")
    c.backbone = "resnet18"
    c.taps = ("layer1", "layer2", "layer3")
    c.num_channels = 100
    c.reg = 0.01
    c.image_size = 256
    return c
