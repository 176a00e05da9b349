"""Wall-clock timing of jitted work, the one way every benchmark in jaxad measures."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxad.runtime import compilation


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (the first
    compiles); results are waited for, so asynchronous dispatch is not mistaken for speed."""
    return interleaved_median_seconds({"fn": fn}, repeats, per_round=1, warmup=warmup, pause=0.0)["fn"]


def interleaved_median_seconds(fns: Mapping[str, Callable[[], Any]], rounds: int, per_round: int = 2,
                               warmup: int = 2, pause: float = 0.2) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed in ``rounds`` rounds that take every
    function in turn (``per_round`` calls each) after ``warmup`` untimed calls of each.

    Contenders timed one after the other each meet a different phase of a shared machine's load;
    alternating them lets a slow phase hit all alike, so their ratio holds even when their
    absolute times wander. ``pause`` seconds pass untimed before each contender's turn, so worker
    threads that the previous one leaves spinning (OpenMP's, Eigen's) are asleep by then."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause)
            for _ in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def in_own_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run in a new Python process (``fn`` and its arguments must pickle), so that what
    one measurement leaves behind in a process (allocators' heaps, idle thread pools, compiled
    programs, torch's and XLA's alike) cannot favour or slow the next one."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of a jitted square matmul (full precision): the yardstick that
    benchmarks set their own achieved rates against."""
    a = jnp.asarray(np.random.default_rng(0).random((size, size), dtype=np.float32))
    f = compilation.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    return 2 * size**3 / median_seconds(lambda: f(a), repeats) / 1e9
