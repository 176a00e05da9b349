"""CPR-Faster as in its reference code: torchvision EfficientNet-B0 features.2 (stride 4) and
features.3 (stride 8), 16-wide local descriptors, 320 px, 40,000 steps × 32 for objects.

Needs torchvision's ImageNet weights once:
    python scripts/port_weights.py efficientnet_b0 --from efficientnet_b0_rwightman-7f5810bc.pth
"""

from pathlib import Path

import ml_collections

from jaxad.config import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(Path(__file__).parents[1] / "cpr_faster.py")
    c.backbone = "efficientnet_b0"
    c.taps = ("features.2", "features.3")
    c.image_size = 320
    c.train_steps, c.train_batch_size, c.validate_every = 40_000, 32, 1000
    return c
