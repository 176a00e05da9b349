"""PatchCore as in its paper: WideResNet50-2 layer2 + layer3 (d = 1536), 10% greedy coreset, L2 with
the eq. 7 re-weighting (b = 9), 256 px (anomalib's resize; the paper centre-crops 224 of 256).

Needs torchvision's ImageNet weights once:
    python scripts/port_weights.py wide_resnet50_2 --from wide_resnet50_2-95faca4d.pth
"""

from pathlib import Path

import ml_collections

from jaxad.config import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(Path(__file__).parents[1] / "patchcore.py")
    c.backbone = "wide_resnet50_2"
    c.taps = ("layer2", "layer3")
    c.coreset_ratio = 0.1
    c.score, c.num_neighbours = "reweighted", 9
    c.image_size = 256
    return c
