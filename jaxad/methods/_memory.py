"""Sizes of the arrays a fit holds, known from the config, the backbone and the number of training
images before any image is read: what :func:`jaxad.config.require_memory` compares with the memory
the process may take, so that a fit too large for it stops at once instead of halfway."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxad.backbones import Backbone
from jaxad.runtime import compilation

FLOAT32 = 4
PROBE = 64  # side of the image the backbone's working memory per pixel is measured on
_per_pixel: dict[tuple, float] = {}  # (backbone, taps, dtype) → bytes of XLA buffers per input pixel


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


def forward_bytes(config: ml_collections.ConfigDict, backbone: Backbone, taps: tuple[str, ...],
                  images: int | None = None) -> int:
    """Host memory of one batch (``images``, default ``batch_size``) through the backbone on a CPU: XLA's temporary and
    output buffers, which grow with the pixel count. They are measured once per backbone and taps by
    compiling (not running) the forward on one PROBE×PROBE image (EfficientNet-Lite0: about 100
    bytes per pixel at any size); 0 on an accelerator, where they take device memory."""
    if jax.default_backend() != "cpu":
        return 0
    key = (backbone.name, tuple(taps), str(getattr(backbone.module, "dtype", "")))
    if key not in _per_pixel:
        forward = jax.jit(lambda v, x: backbone.apply(v, x, tuple(taps)), compiler_options=compilation.cpu_options() or None)
        probe = jax.ShapeDtypeStruct((1, PROBE, PROBE, 3), jnp.float32)
        analysis = forward.lower(backbone.variables, probe).compile().memory_analysis()
        used = 0 if analysis is None else analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        _per_pixel[key] = used / PROBE**2
    h, w = image_hw(config)
    return int(_per_pixel[key] * (config.batch_size if images is None else images) * h * w)
