"""CRD as in its paper: WideResNet50-2 layer2 + layer3 (d = 1536), 3×3 average, λ = 5, 256 px.

Needs torchvision's ImageNet weights once:
    python scripts/port_weights.py wide_resnet50_2 --from wide_resnet50_2-95faca4d.pth
"""

from pathlib import Path

import ml_collections

from jaxad.config import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(Path(__file__).parents[1] / "crd.py")
    c.backbone = "wide_resnet50_2"
    c.taps = ("layer2", "layer3")
    c.lam, c.lam_mode = "5.0", "absolute"  # the paper's λ, on Σ f fᵀ of raw features
    c.image_size = 256
    return c
