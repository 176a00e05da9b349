"""DenseNet-121 and DenseNet-201 exactly as torchvision builds them, for torchvision's or timm's weights.

torchvision's published files still use the pre-0.3 key spelling (``norm.1``, ``conv.2`` inside a
dense layer) that torchvision renames with a regex on load; the same renaming happens here, so
both spellings load. Taps are torchvision's module names under ``features``; a dense block's tap
is its output before the transition (what CPR reads).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxad.backbones import hub, port
from jaxad.backbones.layers import FrozenConv
from jaxad.backbones.port import Layer
from jaxad.backbones.registry import Entry, TapInfo, register
from jaxad.backbones.resnet import imagenet_normalise

GROWTH, BOTTLENECK, STEM = 32, 4, 64
_LEGACY = re.compile(r"(denselayer\d+)\.(norm|relu|conv)\.([12])\.")


def _bn(x, name: str, dtype: Any):
    return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=name)(x)


def _conv(x, features: int, kernel: int, name: str, dtype: Any, stride: int = 1):
    return FrozenConv(features, kernel, stride, dtype, name=name)(x)


class DenseLayer(nn.Module):
    """BN-ReLU-1×1 conv to 4·growth, BN-ReLU-3×3 conv to growth: the layer's new maps."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = _conv(nn.relu(_bn(x, "norm1", self.dtype)), BOTTLENECK * GROWTH, 1, "conv1", self.dtype)
        return _conv(nn.relu(_bn(y, "norm2", self.dtype)), GROWTH, 3, "conv2", self.dtype)


def dense_block(x, depth: int, name: str, dtype: Any):
    """``depth`` dense layers, each reading every map before it, as ``{name}_denselayer{i}``.

    The block's output width is known up front, so one buffer of that width is filled in place:
    each layer reads the filled prefix and writes only its ``GROWTH`` new maps, where a chain of
    concatenations would copy the whole prefix again after every layer. (Jitted on CPU the buffer
    is ~2% faster for DenseNet-201 up to denseblock2 at 256²: the convolutions dominate.)
    """
    width = x.shape[-1]
    buffer = jnp.zeros((*x.shape[:-1], width + depth * GROWTH), x.dtype)
    buffer = jax.lax.dynamic_update_slice(buffer, x, (0, 0, 0, 0))
    for i in range(depth):
        filled = width + i * GROWTH
        y = DenseLayer(dtype, name=f"{name}_denselayer{i + 1}")(buffer[..., :filled])
        buffer = jax.lax.dynamic_update_slice(buffer, y.astype(buffer.dtype), (0, 0, 0, filled))
    return buffer


class DenseNet(nn.Module):
    """Returns ``{tap: NHWC map}`` for taps among ``features.pool0``, ``features.denseblockN``,
    ``features.transitionN`` and ``features.norm5``. Input: NHWC pixels in [0, 1]; blocks after
    the deepest requested tap are never built."""

    blocks: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str]) -> dict:
        wanted, out = set(taps), {}

        def done(name: str, y) -> bool:
            if f"features.{name}" in wanted:
                out[f"features.{name}"] = y
            return len(out) == len(wanted)

        x = _conv(imagenet_normalise(x, self.dtype), STEM, 7, "conv0", self.dtype, stride=2)
        x = nn.relu(_bn(x, "norm0", self.dtype))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if done("pool0", x):
            return out
        for b, depth in enumerate(self.blocks, start=1):
            x = dense_block(x, depth, f"denseblock{b}", self.dtype)
            if done(f"denseblock{b}", x):
                return out
            if b == len(self.blocks):
                break
            x = _conv(nn.relu(_bn(x, f"transition{b}_norm", self.dtype)), x.shape[-1] // 2, 1,
                      f"transition{b}_conv", self.dtype)
            x = nn.avg_pool(x, (2, 2), (2, 2))
            if done(f"transition{b}", x):
                return out
        done("norm5", _bn(x, "norm5", self.dtype))
        return out


def tap_info(blocks: Sequence[int]) -> dict[str, TapInfo]:
    """Tap name → (stride, channels), in network order: each block adds growth·depth channels,
    each transition halves channels and resolution."""
    taps = {"features.pool0": TapInfo(4, STEM)}
    channels, stride = STEM, 4
    for b, depth in enumerate(blocks, start=1):
        channels += depth * GROWTH
        taps[f"features.denseblock{b}"] = TapInfo(stride, channels)
        if b < len(blocks):
            channels, stride = channels // 2, stride * 2
            taps[f"features.transition{b}"] = TapInfo(stride, channels)
    taps["features.norm5"] = TapInfo(stride, channels)
    return taps


def key_map(blocks: Sequence[int]) -> dict[str, Layer]:
    """torchvision/timm state-dict prefixes (current spelling) → Flax module paths."""
    layers = {"features.conv0": Layer("conv", ("conv0",)), "features.norm0": Layer("bn", ("norm0",)),
              "features.norm5": Layer("bn", ("norm5",))}
    for b, depth in enumerate(blocks, start=1):
        for i in range(1, depth + 1):
            torch_layer, layer = f"features.denseblock{b}.denselayer{i}", f"denseblock{b}_denselayer{i}"
            for part in ("norm1", "norm2"):
                layers[f"{torch_layer}.{part}"] = Layer("bn", (layer, part))
            for part in ("conv1", "conv2"):
                layers[f"{torch_layer}.{part}"] = Layer("conv", (layer, part))
        if b < len(blocks):
            layers[f"features.transition{b}.norm"] = Layer("bn", (f"transition{b}_norm",))
            layers[f"features.transition{b}.conv"] = Layer("conv", (f"transition{b}_conv",))
    return layers


def modern_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``denselayerN.norm.1.weight`` → ``denselayerN.norm1.weight`` (torchvision's own renaming)."""
    return {_LEGACY.sub(r"\1.\2\3.", k): v for k, v in state.items()}


def ignored(key: str) -> bool:
    """State-dict entries with no place in the feature extractor (the classifier, BN counters)."""
    return key.endswith("num_batches_tracked") or key.startswith("classifier.")


def _convert(state: Mapping[str, np.ndarray], target: Mapping, source: str, *, layers: Mapping[str, Layer]) -> dict:
    """torchvision's files in either spelling, or timm's (it uses torchvision's current names)."""
    return port.convert(modern_keys(state), target, source, layers=layers, ignore=ignored)


VARIANTS = {"densenet121": (6, 12, 24, 16), "densenet201": (6, 12, 48, 32)}

for _name, _blocks in VARIANTS.items():
    register(_name, Entry(
        module=partial(DenseNet, blocks=_blocks),
        taps=tap_info(_blocks),
        convert=partial(_convert, layers=key_map(_blocks)),
        bundled=hub.finder(_name),
    ))
