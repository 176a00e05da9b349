"""How the cost of a patch distance grows with the training set: CRD against nearest neighbour.

CRD scores a query patch with one d×d matmul (2·d² FLOPs) whatever the number n of training
patches; exact nearest neighbour needs 2·n·d FLOPs and n·d floats of memory bank, a 1% coreset a
hundredth of that. This module times both on synthetic features, reports achieved GFLOP/s against
the machine's measured matmul peak (so neither side is a strawman), and finds the n where CRD
starts to win.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import compilation, report, sampling, timing
from jaxad.distances import crd, knn

QUERIES = 10_000


def measure(d: int, n: int, flop_budget: float = 2e11, chunk_size: int = 10_000) -> dict[str, float]:
    """Seconds to score 10⁴ queries with CRD, exact NN and 1%-coreset NN on an n-patch bank.

    NN timings use as many queries as fit the FLOP budget (at least 100) and are scaled to 10⁴:
    the cost is linear in the number of queries.
    """
    rng = np.random.default_rng(d + n)
    bank = jnp.asarray(rng.standard_normal((n, d), dtype=np.float32))
    M = crd.matrix(np.asarray(crd.gram(bank[: min(n, 100_000)])), 5.0)
    q_all = jnp.asarray(rng.standard_normal((QUERIES, d), dtype=np.float32))
    score = compilation.jit(crd.score)
    t_crd = timing.median_seconds(lambda: score(M, q_all), 5)
    row = {"d": d, "n": n, "crd_s": t_crd, "crd_gflops": 2 * QUERIES * d * d / t_crd / 1e9, "crd_bytes": d * d * 4}
    search = compilation.jit(lambda q, b: knn.nearest(q, b, k=1, chunk_size=chunk_size)[0])
    for name, size in (("nn", n), ("coreset_nn", max(1, n // 100))):
        q = int(np.clip(flop_budget // (2 * size * d), 100, QUERIES))
        sub = knn.make_bank(bank if size == n else bank[:size])
        seconds = timing.median_seconds(lambda: search(q_all[:q], sub), 3) * QUERIES / q
        row |= {f"{name}_s": seconds, f"{name}_gflops": 2 * QUERIES * size * d / seconds / 1e9,
                f"{name}_bytes": size * d * 4, f"{name}_queries_timed": q}
    row["speedup_vs_nn"] = row["nn_s"] / t_crd
    row["speedup_vs_coreset"] = row["coreset_nn_s"] / t_crd
    return row


def coreset_speed(n: int, ratio: float, d: int = 152, projection_dim: int = 128, budget_s: float = 300.0) -> dict[str, Any]:
    """Seconds for a greedy coreset of ``ratio``·n from n random d-dim patches.

    Every greedy step is one pass over the n projected points, so the time is a setup cost plus a
    constant per step. Both are measured from two short runs; the full run is timed when that
    predicts it fits ``budget_s``, else the total is reported as extrapolated (and marked so).
    """
    points = jnp.asarray(np.random.default_rng(n).standard_normal((n, d), dtype=np.float32))
    count = max(1, int(round(ratio * n)))
    key = jax.random.key(0)

    def timed(c: int) -> float:
        sampling.greedy_coreset(points, c, key, projection_dim).block_until_ready()  # compile
        start = time.perf_counter()
        sampling.greedy_coreset(points, c, key, projection_dim).block_until_ready()
        return time.perf_counter() - start

    short = min(count, 100)
    t_short, t_long = timed(short), timed(min(count, 4 * short))
    per_step = max(t_long - t_short, 0.0) / max(min(count, 4 * short) - short, 1)
    predicted = t_short + per_step * (count - short)
    measured = predicted <= budget_s
    seconds = timed(count) if measured and count > 4 * short else (t_long if count <= 4 * short else predicted)
    step_bytes = n * min(d, projection_dim) * 4
    return {"n": n, "ratio": ratio, "coreset": count, "seconds": seconds,
            "how": "measured" if measured or count <= 4 * short else "extrapolated",
            "ms_per_step": 1e3 * per_step, "gb_per_s": step_bytes / per_step / 1e9 if per_step > 0 else float("nan")}


def crossover(rows: Sequence[dict[str, float]], key: str = "nn_s") -> float | None:
    """Smallest measured n at which CRD is faster than ``key`` (None if it never is)."""
    wins = [r["n"] for r in sorted(rows, key=lambda r: r["n"]) if r[key] > r["crd_s"]]
    return wins[0] if wins else None


def section(rows: Sequence[dict[str, float]], peak: float, command: str, machine: str, plots: Sequence[str]) -> str:
    """Markdown: per (d, n) timings, GFLOP/s against the peak, bytes kept, speed-ups, crossovers."""
    lines = [
        "## Distance cost: CRD vs exact and 1%-coreset nearest neighbour", "",
        *report.provenance(command, machine), "",
        f"Seconds to score 10⁴ query patches on synthetic features; measured float32 matmul peak: {peak:.1f} GFLOP/s. "
        "CRD costs 2·q·d² FLOPs, exact NN 2·q·n·d (ideal ratio n/d). NN rows timed on fewer queries where "
        "noted and scaled linearly.", "",
        report.markdown_table(list(rows), [
            "d", "n", "crd_s", "nn_s", "coreset_nn_s", "speedup_vs_nn", "speedup_vs_coreset",
            "crd_gflops", "nn_gflops", "coreset_nn_gflops", "crd_bytes", "nn_bytes", "coreset_nn_bytes", "nn_queries_timed",
        ], floatfmt=".4g"), "",
    ]
    for d in sorted({r["d"] for r in rows}):
        sub = [r for r in rows if r["d"] == d]
        lines.append(f"- d={d}: CRD faster than exact NN from n = {crossover(sub, 'nn_s')}, "
                     f"than 1%-coreset NN from n = {crossover(sub, 'coreset_nn_s')} (smallest measured n).")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)
