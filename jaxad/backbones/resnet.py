"""ResNet-18/50 and Wide ResNet-50-2/101-2 exactly as torchvision builds them (v1.5: the stride sits
on the 3×3 convolution), for torchvision's or timm's ImageNet weights.

Torch pads symmetrically, so every convolution and the stem's max-pool get explicit ``(p, p)``
padding (Flax's 'SAME' would pad asymmetrically at stride 2). Taps use torchvision's module names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxad.backbones import hub, port
from jaxad.backbones.layers import FrozenConv
from jaxad.backbones.port import Layer
from jaxad.backbones.registry import Entry, TapInfo, register

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WIDTHS = (64, 128, 256, 512)  # planes per stage


def imagenet_normalise(x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """[0, 1] pixels → torchvision's ImageNet normalisation."""
    return ((x - jnp.asarray(MEAN, x.dtype)) / jnp.asarray(STD, x.dtype)).astype(dtype)


def conv_bn(x, features: int, kernel: int, stride: int, name: str, dtype: Any, relu: bool = True,
            bn_name: str | None = None):
    """Conv (symmetric padding k//2, no bias) → frozen BN (eps 1e-5) → optional ReLU."""
    x = FrozenConv(features, kernel, stride, dtype, name=name)(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=bn_name or f"{name}_bn")(x)
    return nn.relu(x) if relu else x


class BasicBlock(nn.Module):
    planes: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = conv_bn(x, self.planes, 3, self.stride, "conv1", self.dtype, bn_name="bn1")
        y = conv_bn(y, self.planes, 3, 1, "conv2", self.dtype, relu=False, bn_name="bn2")
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = conv_bn(x, self.planes, 1, self.stride, "downsample_conv", self.dtype, relu=False,
                        bn_name="downsample_bn")
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    planes: int
    stride: int
    width: int  # channels of the 3×3 convolution: planes, or 2·planes for the wide variants
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = self.planes * 4
        y = conv_bn(x, self.width, 1, 1, "conv1", self.dtype, bn_name="bn1")
        y = conv_bn(y, self.width, 3, self.stride, "conv2", self.dtype, bn_name="bn2")
        y = conv_bn(y, out, 1, 1, "conv3", self.dtype, relu=False, bn_name="bn3")
        if self.stride != 1 or x.shape[-1] != out:
            x = conv_bn(x, out, 1, self.stride, "downsample_conv", self.dtype, relu=False, bn_name="downsample_bn")
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Returns ``{tap: NHWC map}`` for taps among ``conv1``, ``maxpool``, ``layer1``…``layer4``.

    Input: NHWC pixels in [0, 1]. Stages after the deepest requested tap are never built.
    """

    depths: Sequence[int]
    bottleneck: bool
    width_factor: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str]) -> dict:
        wanted, out = set(taps), {}

        def done(name: str, y) -> bool:
            if name in wanted:
                out[name] = y
            return len(out) == len(wanted)

        x = conv_bn(imagenet_normalise(x, self.dtype), 64, 7, 2, "conv1", self.dtype, bn_name="bn1")
        if done("conv1", x):
            return out
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, as torch
        if done("maxpool", x):
            return out
        for stage, (depth, planes) in enumerate(zip(self.depths, WIDTHS)):
            for i in range(depth):
                stride = 2 if i == 0 and stage > 0 else 1
                name = f"layer{stage + 1}_{i}"
                if self.bottleneck:
                    x = Bottleneck(planes, stride, planes * self.width_factor, self.dtype, name=name)(x)
                else:
                    x = BasicBlock(planes, stride, self.dtype, name=name)(x)
            if done(f"layer{stage + 1}", x):
                return out
        return out


def tap_info(bottleneck: bool) -> dict[str, TapInfo]:
    expansion = 4 if bottleneck else 1
    taps = {"conv1": TapInfo(2, 64), "maxpool": TapInfo(4, 64)}
    for stage, planes in enumerate(WIDTHS):
        taps[f"layer{stage + 1}"] = TapInfo(4 * 2**stage, planes * expansion)
    return taps


def key_map(depths: Sequence[int], bottleneck: bool) -> dict[str, Layer]:
    """torchvision (and timm: the same names) state-dict prefixes → Flax module paths."""
    layers = {"conv1": Layer("conv", ("conv1",)), "bn1": Layer("bn", ("bn1",))}
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    for stage, depth in enumerate(depths):
        for i in range(depth):
            torch_block, block = f"layer{stage + 1}.{i}", f"layer{stage + 1}_{i}"
            for j, conv in enumerate(convs, start=1):
                layers[f"{torch_block}.{conv}"] = Layer("conv", (block, conv))
                layers[f"{torch_block}.bn{j}"] = Layer("bn", (block, f"bn{j}"))
            layers[f"{torch_block}.downsample.0"] = Layer("conv", (block, "downsample_conv"))
            layers[f"{torch_block}.downsample.1"] = Layer("bn", (block, "downsample_bn"))
    return layers


def ignored(key: str) -> bool:
    """The classifier and BN step counters have no place in the feature extractor."""
    return key.endswith("num_batches_tracked") or key.startswith("fc.")


def _convert(state: Mapping[str, np.ndarray], target: Mapping, source: str, *, layers: Mapping[str, Layer]) -> dict:
    return port.convert(state, target, source, layers=layers, ignore=ignored)


VARIANTS = {
    "resnet18": dict(depths=(2, 2, 2, 2), bottleneck=False),
    "resnet50": dict(depths=(3, 4, 6, 3), bottleneck=True),
    "wide_resnet50_2": dict(depths=(3, 4, 6, 3), bottleneck=True, width_factor=2),
    "wide_resnet101_2": dict(depths=(3, 4, 23, 3), bottleneck=True, width_factor=2),
}

for _name, _variant in VARIANTS.items():
    register(_name, Entry(
        module=partial(ResNet, **_variant),
        taps=tap_info(_variant["bottleneck"]),
        convert=partial(_convert, layers=key_map(_variant["depths"], _variant["bottleneck"])),
        bundled=hub.finder(_name),
    ))
