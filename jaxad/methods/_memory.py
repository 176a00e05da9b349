"""Sizes of the arrays a fit holds, known from the config, the backbone and the number of training
images before any image is read: what :func:`jaxad.config.require_memory` compares with the memory
the process may take, so that a fit too large for it stops at once instead of halfway."""

from __future__ import annotations

import ml_collections

from jaxad.backbones import Backbone

FLOAT32 = 4


def image_hw(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """The (H, W) the images are resized to."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def cells(config: ml_collections.ConfigDict, backbone: Backbone, tap: str) -> int:
    """Grid cells of a tap's feature map (its stride rounds up, as the convolutions pad)."""
    stride = backbone.taps[tap].stride
    h, w = image_hw(config)
    return -(-h // stride) * -(-w // stride)


def channels(backbone: Backbone, taps: tuple[str, ...]) -> int:
    """Channels of the taps concatenated."""
    return sum(backbone.taps[t].channels for t in taps)
