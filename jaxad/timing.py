"""Wall-clock timing of jitted work, the one way every benchmark in jaxad measures."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (the first
    compiles); results are waited for, so asynchronous dispatch is not mistaken for speed."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of a jitted square matmul (full precision): the yardstick that
    benchmarks set their own achieved rates against."""
    a = jnp.asarray(np.random.default_rng(0).random((size, size), dtype=np.float32))
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    return 2 * size**3 / median_seconds(lambda: f(a), repeats) / 1e9
