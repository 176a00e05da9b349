"""EfficientNet-B0…B4 exactly as torchvision builds them, for torchvision's or timm's weights.

MBConv blocks with squeeze-excitation and SiLU; widths scaled and rounded to multiples of 8, depths
scaled and rounded up, as torchvision does; symmetric k//2 padding. Taps are torchvision's
``features.0`` (stem, stride 2) … ``features.8`` (1×1 head); CPR-Faster reads ``features.2``
(stride 4) and ``features.3`` (stride 8). timm's ``efficientnet_b*`` is the same network under
other names, and loads too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxad.backbones import hub, port
from jaxad.backbones.layers import DepthwiseConv, FrozenConv
from jaxad.backbones.port import Layer
from jaxad.backbones.registry import Entry, TapInfo, register
from jaxad.backbones.resnet import imagenet_normalise

# Per stage (features.1 … features.7): expand ratio, kernel, stride, output channels, blocks (B0).
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM = 32
SCALES = {"efficientnet_b0": (1.0, 1.0), "efficientnet_b1": (1.0, 1.1), "efficientnet_b2": (1.1, 1.2),
          "efficientnet_b3": (1.2, 1.4), "efficientnet_b4": (1.4, 1.8)}  # (width, depth) multipliers


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor``, never more than 10% below ``channels`` (torchvision's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """Scaled (expand, kernel, stride, channels, blocks) per stage."""
    return [(e, k, s, round_channels(c * width), int(math.ceil(n * depth))) for e, k, s, c, n in STAGES]


def _bn(x, name: str, dtype: Any):
    return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=name)(x)


def _conv(x, features: int, kernel: int, stride: int, name: str, dtype: Any, bias: bool = False):
    return FrozenConv(features, kernel, stride, dtype, use_bias=bias, name=name)(x)


class MBConv(nn.Module):
    """1×1 expand → k×k depthwise → squeeze-excite → 1×1 project, identity skip when shapes allow."""

    features: int
    expand: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        inputs, channels = x, x.shape[-1]
        if self.expand != 1:
            x = nn.silu(_bn(_conv(x, channels * self.expand, 1, 1, "expand_conv", self.dtype), "expand_bn", self.dtype))
        x = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, symmetric=True, name="dw_conv")(x)
        x = nn.silu(_bn(x, "dw_bn", self.dtype))
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        squeezed = nn.silu(_conv(squeezed, max(1, channels // 4), 1, 1, "se_reduce", self.dtype, bias=True))
        gate = nn.sigmoid(_conv(squeezed, x.shape[-1], 1, 1, "se_expand", self.dtype, bias=True))[:, 0, 0]
        x = FrozenConv(self.features, 1, 1, self.dtype, name="project_conv")(x, gate)
        x = _bn(x, "project_bn", self.dtype)
        return x + inputs if self.stride == 1 and channels == self.features else x


class EfficientNet(nn.Module):
    """Returns ``{tap: NHWC map}`` for taps ``features.0`` … ``features.8``. Input: NHWC pixels in
    [0, 1]; stages after the deepest requested tap are never built."""

    width: float
    depth: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str]) -> dict:
        wanted, out = set(taps), {}

        def done(index: int, y) -> bool:
            if f"features.{index}" in wanted:
                out[f"features.{index}"] = y
            return len(out) == len(wanted)

        x = _conv(imagenet_normalise(x, self.dtype), round_channels(STEM * self.width), 3, 2, "stem_conv", self.dtype)
        x = nn.silu(_bn(x, "stem_bn", self.dtype))
        if done(0, x):
            return out
        for stage, (expand, kernel, stride, channels, blocks) in enumerate(plan(self.width, self.depth), start=1):
            for i in range(blocks):
                x = MBConv(channels, expand, kernel, stride if i == 0 else 1, self.dtype, name=f"stage{stage}_{i}")(x)
            if done(stage, x):
                return out
        x = _conv(x, 4 * x.shape[-1], 1, 1, "head_conv", self.dtype)
        done(8, nn.silu(_bn(x, "head_bn", self.dtype)))
        return out


def tap_info(width: float, depth: float) -> dict[str, TapInfo]:
    """Tap name → (stride, channels), in network order; the head has 4× the last stage's channels."""
    taps, stride = {"features.0": TapInfo(2, round_channels(STEM * width))}, 2
    for stage, (_, _, s, channels, _) in enumerate(plan(width, depth), start=1):
        stride *= s
        taps[f"features.{stage}"] = TapInfo(stride, channels)
    taps["features.8"] = TapInfo(stride, 4 * plan(width, depth)[-1][3])
    return taps


def key_map(width: float, depth: float) -> dict[str, Layer]:
    """torchvision state-dict prefixes → Flax module paths (classifier left out).

    A block is ``features.S.I.block.J``: J counts expand (absent at expand ratio 1), depthwise,
    squeeze-excite (``fc1``/``fc2``, 1×1 convs with bias) and projection, each conv at ``.0``, BN at ``.1``.
    """
    layers = {"features.0.0": Layer("conv", ("stem_conv",)), "features.0.1": Layer("bn", ("stem_bn",)),
              "features.8.0": Layer("conv", ("head_conv",)), "features.8.1": Layer("bn", ("head_bn",))}
    for stage, (expand, _, _, _, blocks) in enumerate(plan(width, depth), start=1):
        parts = ("expand", "dw", "se", "project") if expand != 1 else ("dw", "se", "project")
        for i in range(blocks):
            block = f"stage{stage}_{i}"
            for j, part in enumerate(parts):
                prefix = f"features.{stage}.{i}.block.{j}"
                if part == "se":
                    layers[f"{prefix}.fc1"] = Layer("conv", (block, "se_reduce"))
                    layers[f"{prefix}.fc2"] = Layer("conv", (block, "se_expand"))
                else:
                    layers[f"{prefix}.0"] = Layer("conv", (block, f"{part}_conv"))
                    layers[f"{prefix}.1"] = Layer("bn", (block, f"{part}_bn"))
    return layers


def timm_key_map(width: float, depth: float) -> dict[str, Layer]:
    """timm ``efficientnet_b*`` prefixes → Flax module paths (timm's blocks.S-1.I is stage S)."""
    layers = {"conv_stem": Layer("conv", ("stem_conv",)), "bn1": Layer("bn", ("stem_bn",)),
              "conv_head": Layer("conv", ("head_conv",)), "bn2": Layer("bn", ("head_bn",))}
    for stage, (expand, _, _, _, blocks) in enumerate(plan(width, depth), start=1):
        for i in range(blocks):
            t, block = f"blocks.{stage - 1}.{i}", f"stage{stage}_{i}"
            names = {"se.conv_reduce": "se_reduce", "se.conv_expand": "se_expand"}
            if expand != 1:
                names |= {"conv_pw": "expand_conv", "bn1": "expand_bn", "conv_dw": "dw_conv", "bn2": "dw_bn",
                          "conv_pwl": "project_conv", "bn3": "project_bn"}
            else:  # timm's depthwise-separable block: its conv_pw is the projection
                names |= {"conv_dw": "dw_conv", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"}
            for torch_name, ours in names.items():
                layers[f"{t}.{torch_name}"] = Layer("bn" if ours.endswith("_bn") else "conv", (block, ours))
    return layers


def ignored(key: str) -> bool:
    """State-dict entries with no place in the feature extractor (both namings call the classifier so)."""
    return key.endswith("num_batches_tracked") or key.startswith("classifier.")


def _convert(state: Mapping[str, np.ndarray], target: Mapping, source: str, *, width: float, depth: float) -> dict:
    """One converter for both namings: timm's files are recognised by their ``conv_stem``."""
    layers = timm_key_map(width, depth) if "conv_stem.weight" in state else key_map(width, depth)
    return port.convert(state, target, source, layers=layers, ignore=ignored)


for _name, (_width, _depth) in SCALES.items():
    register(_name, Entry(
        module=partial(EfficientNet, width=_width, depth=_depth),
        taps=tap_info(_width, _depth),
        convert=partial(_convert, width=_width, depth=_depth),
        bundled=hub.finder(_name),
    ))
