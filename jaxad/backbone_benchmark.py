"""How fast a backbone extracts the feature maps a method taps, and what bfloat16 costs in accuracy.

Timings use random weights (speed does not depend on their values), at the taps and input size of
the method that uses each backbone, and the forward stops at the deepest tap just as in a fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import backbones
from jaxad.backbones import winograd

# backbone → (taps, input size) of the method that uses it
SETTINGS: dict[str, tuple[tuple[str, ...], int]] = {
    "efficientnet_lite0": (("stage2", "stage4"), 256),  # CRD / PatchCore default
    "resnet18": (("layer1", "layer2", "layer3"), 256),  # PaDiM
    "wide_resnet50_2": (("layer2", "layer3"), 256),  # CRD, PatchCore, SimpleNet
    "wide_resnet101_2": (("layer2", "layer3"), 256),  # EfficientAD teacher target
    "densenet201": (("features.denseblock1", "features.denseblock2"), 320),  # CPR
    "efficientnet_b0": (("features.2", "features.3"), 320),  # CPR-Faster
}
BATCHES = (1, 16)
STAGE_BATCH, STAGE_ROUNDS = 1, 15  # per-tap timings: batch 1, where per-layer costs weigh most; more
# rounds, since a stage's time is a difference of two medians
ROUNDS, PER_ROUND = 5, 2  # alternating timing rounds per row, calls per side per round


def extraction(name: str, taps: tuple[str, ...], size: int, batch: int, dtype: Any = jnp.float32,
               xla_defaults: bool = False) -> Callable[[], dict[str, jax.Array]]:
    """One jitted extraction by random-weight ``name`` of fixed [batch, size, size, 3] images, as a
    call (for :func:`jaxad.timing.interleaved_median_seconds`, which waits for its result).
    ``xla_defaults``: compiled by plain ``jax.jit``, without jaxad's CPU options
    (:mod:`jaxad.compilation`), to measure what they give."""
    bb = backbones.random_init(name, dtype=dtype, taps=taps)
    images = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32))
    if xla_defaults:
        forward = jax.jit(bb.features_fn(taps))
        return lambda: forward(bb.variables, images)
    return lambda: bb(images, taps)


def weight_bytes(name: str, taps: tuple[str, ...]) -> int:
    """Bytes of the variables a backbone loaded for ``taps`` holds: parameters and BatchNorm
    statistics of the layers up to the deepest tap and, on CPU, the transformed Winograd kernels."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(backbones.random_init(name, taps=taps).variables))


def stages(name: str, deepest: str) -> tuple[str, ...]:
    """``name``'s taps in network order up to ``deepest``: where a per-stage timing cuts the forward."""
    return tuple(backbones.taps_up_to(name, (deepest,)))


def gflop_per_image(name: str, taps: tuple[str, ...], size: int) -> float:
    """Floating-point operations of one image's forward as XLA counts them (a multiply-add is 2),
    with the 3×3 convolutions direct (no Winograd kernels passed): the model's nominal work."""
    bb = backbones.random_init(name, taps=taps)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    direct = {k: v for k, v in bb.variables.items() if k != winograd.COLLECTION}
    cost = jax.jit(bb.features_fn(taps)).lower(direct, images).compile().cost_analysis()
    return float(cost["flops"]) / 1e9


def bfloat16_error(name: str, taps: tuple[str, ...], size: int) -> dict[str, float]:
    """Per tap: max |bf16 − f32| over max |f32| on the same random weights and images."""
    full, half = backbones.random_init(name, taps=taps), backbones.random_init(name, dtype=jnp.bfloat16, taps=taps)
    images = jnp.asarray(np.random.default_rng(1).random((2, size, size, 3), dtype=np.float32))
    a, b = full(images, taps), half.apply(full.variables, images, taps)
    return {t: float(jnp.max(jnp.abs(a[t] - b[t])) / jnp.max(jnp.abs(a[t]))) for t in taps}
