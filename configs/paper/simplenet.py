"""SimpleNet as in its paper: WideResNet50-2 layer2 + layer3 pooled to 1536, σ = 0.015 noise,
288 px (the reference resizes to 329 and centre-crops 288), 160 passes over the training set
(40 meta-epochs × 4; for a 209-image category at batch 8: 3680 steps).

Needs torchvision's ImageNet weights once:
    python scripts/port_weights.py wide_resnet50_2 --from wide_resnet50_2-95faca4d.pth
"""

from pathlib import Path

import ml_collections

from jaxad.config import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(Path(__file__).parents[1] / "simplenet.py")
    c.backbone = "wide_resnet50_2"
    c.taps = ("layer2", "layer3")
    c.embedding = "unfold"
    c.target_dim = 1536
    c.noise_std = 0.015
    c.image_size = 288
    c.train_steps = 3680
    c.validate_every = 92
    return c
