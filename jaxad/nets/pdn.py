"""EfficientAD's networks: the patch description network (PDN-S, PDN-M) and the autoencoder.

A PDN is a few stride-1 convolutions with two 2×2 average pools. With the paddings of the paper's
table ("padded") a 256×256 image gives a 64×64 map: this is how the teacher is distilled. For
student training and inference every conv and pool padding is set to 0, so each output pixel sees
only its own input patch (33×33 for PDN-S, 33×33 for PDN-M) and a 256×256 image gives 56×56. The
parameters are the same in both modes, so a teacher distilled padded runs unpadded unchanged.

Layers follow torch: average pools count padded zeros (``count_include_pad=True``), bilinear
resizing has half-pixel centres and no antialiasing (``jax.image.resize`` antialiases when
shrinking unless told not to), weights are drawn like ``torch.nn.Conv2d``'s default init.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.features import resize_bilinear
from jaxad.nets.conv import Conv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # kaiming_uniform(a=√5)


def imagenet_normalise(images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [0, 1] → ImageNet-standardised, as torchvision's ``Normalize``."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def avg_pool_2x2(x: jax.Array, pad: int) -> jax.Array:
    """torch ``AvgPool2d(2, 2, padding=pad)`` with padded zeros counted in every window."""
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                   ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return summed / 4.0


def _conv(x: jax.Array, features: int, kernel: int, pad: int, name: str, stride: int = 1) -> jax.Array:
    return Conv(features, kernel, pad, stride, kernel_init=TORCH_CONV_INIT, name=name)(x)


# (out channels or "C", kernel, padding of the padded variant); "pool" = AvgPool(2, 2, padding 1).
# "xs": PDN-S at a quarter of its widths (not in the paper), for a CPU budget.
_LAYERS = {
    "xs": ((32, 4, 3), "pool", (64, 4, 3), "pool", (64, 3, 1), ("C", 4, 0)),
    "s": ((128, 4, 3), "pool", (256, 4, 3), "pool", (256, 3, 1), ("C", 4, 0)),
    "m": ((256, 4, 3), "pool", (512, 4, 3), "pool", (512, 1, 0), (512, 3, 1), ("C", 4, 0), ("C", 1, 0)),
}


PDN_SIZES = tuple(_LAYERS)


class PDN(nn.Module):
    """Patch description network: images [B, H, W, 3] (already normalised) → [B, h, w, out_channels].

    ``size``: "xs", "s" or "m". ``padded``: the paper's paddings (teacher distillation) or none (training
    and inference). ReLU follows every conv except the last.
    """

    out_channels: int
    size: str = "s"
    padded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = _LAYERS[self.size]
        convs = [layer for layer in layers if layer != "pool"]
        n = 0
        for layer in layers:
            if layer == "pool":
                x = avg_pool_2x2(x, 1 if self.padded else 0)
                continue
            features, kernel, pad = layer
            x = _conv(x, self.out_channels if features == "C" else features, kernel, pad if self.padded else 0,
                      f"conv{n + 1}")
            n += 1
            if n < len(convs):
                x = nn.relu(x)
        return x


pdn_s = partial(PDN, size="s")
pdn_m = partial(PDN, size="m")


def pdn_output_size(image_size: int, padded: bool = False) -> int:
    """Side of a PDN's output map for a square input (the same for every size)."""
    n = image_size + (6 if padded else 0) - 3  # conv k4 (p3)
    n = (n + (2 if padded else 0) - 2) // 2 + 1  # pool
    n = n + (6 if padded else 0) - 3  # conv k4 (p3)
    n = (n + (2 if padded else 0) - 2) // 2 + 1  # pool
    n = n + (2 if padded else 0) - 2  # conv k3 (p1); PDN-M's extra 1×1 convs keep the size
    return n - 3  # conv k4, never padded


def decoder_sizes(image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The autoencoder's resize targets: 3, 8, 15, 32, 63, 127 for 256 (in general H//64 − 1, H//32,
    H//16 − 1, H//8, H//4 − 1, H//2 − 1, each at least 1), then the PDN's unpadded output H//4 − 8."""
    def at(h: int) -> list[int]:
        return [max(s, 1) for s in (h // 64 - 1, h // 32, h // 16 - 1, h // 8, h // 4 - 1, h // 2 - 1, h // 4 - 8)]

    return list(zip(at(image_hw[0]), at(image_hw[1])))


class Autoencoder(nn.Module):
    """EfficientAD's autoencoder: images (normalised) [B, H, W, 3] → [B, H/4 − 8, W/4 − 8, out_channels].

    Encoder: 5 × (conv k4 s2 p1, ReLU), 3→32→32→64→64→64, then one conv over the whole H/32 × W/32
    grid (k8 at 256 px) to a 1×1×64 code. Decoder: 6 × (bilinear resize, conv k4 p2, ReLU,
    dropout), a resize to the PDN's output grid, conv k3 p1, ReLU, conv k3 p1 to ``out_channels``.
    ``train`` enables dropout (needs the 'dropout' rng).
    """

    out_channels: int = 384
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        sizes = decoder_sizes(x.shape[1:3])
        for i, c in enumerate((32, 32, 64, 64, 64)):
            x = nn.relu(_conv(x, c, 4, 1, f"enc{i + 1}", stride=2))
        x = nn.Conv(64, x.shape[1:3], padding="VALID", kernel_init=TORCH_CONV_INIT, name="enc6")(x)  # → 1×1
        for i, hw in enumerate(sizes[:-1]):
            x = resize_bilinear(x, hw)
            x = nn.relu(_conv(x, 64, 4, 2, f"dec{i + 1}"))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = resize_bilinear(x, sizes[-1])
        x = nn.relu(_conv(x, 64, 3, 1, "dec7"))
        return _conv(x, self.out_channels, 3, 1, "dec8")
