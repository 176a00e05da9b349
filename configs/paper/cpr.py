"""CPR as in its paper: DenseNet-201 denseblock1 (stride 4, 256 ch) and denseblock2 (stride 8,
512 ch), 384-wide local descriptors, 320 px, the paper's schedule (40,000 steps × 32 for objects;
textures: ``--config.texture=true --config.use_feb=false --config.train_steps=500``).

Needs torchvision's ImageNet weights once:
    python scripts/port_weights.py densenet201 --from densenet201-c1103571.pth
"""

from pathlib import Path

import ml_collections

from jaxad.config import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(Path(__file__).parents[1] / "cpr.py")
    c.backbone = "densenet201"
    c.taps = ("features.denseblock1", "features.denseblock2")
    c.image_size = 320
    c.train_steps, c.train_batch_size, c.validate_every = 40_000, 32, 1000
    return c
