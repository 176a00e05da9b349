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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxad.bench import harness, timing
from jaxad.distances import coreset, crd, knn
from jaxad.eval import report
from jaxad.runtime import compilation

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
        coreset.greedy_coreset(points, c, key, projection_dim).block_until_ready()  # compile
        start = time.perf_counter()
        coreset.greedy_coreset(points, c, key, projection_dim).block_until_ready()
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


def write_distances(out: Path, command: str, section: str | None = None, max_n: float = 1e7,
                    flop_budget: float = 2e11) -> str:
    """Times CRD against exact and 1%-coreset NN for d = 152 up to ``max_n`` patches and d = 1536 up
    to a tenth of that, plots both, and writes the section (default ``distances``) of ``out``."""
    peak = timing.matmul_gflops()
    rows = []
    for d, largest in ((152, max_n), (1536, max_n / 10)):
        sizes = sorted({int(n) for n in (1e3, 1e4, 1e5, 1.6e5, 1e6, 1e7) if n <= largest})
        for n in sizes:
            rows.append(measure(d, n, flop_budget=flop_budget))
            print(f"d={d} n={n}: CRD {rows[-1]['crd_s']:.4f} s, NN {rows[-1]['nn_s']:.3f} s", flush=True)
    section = section or "distances"
    plots = []
    for d in (152, 1536):
        sub = [r for r in rows if r["d"] == d]
        name = f"benchmarks/{section}_d{d}.png"
        (out.parent / "benchmarks").mkdir(exist_ok=True)
        report.save_line_plot(
            out.parent / name,
            {k: ([r["n"] for r in sub], [r[f"{k}_s"] for r in sub]) for k in ("crd", "nn", "coreset_nn")},
            "training patches n", "seconds per 10^4 queries", f"distance cost, d={d}", logx=True, logy=True,
        )
        plots.append(name)
    body = section(rows, peak, command, harness.machine(), plots)
    harness.write_section(out, section, body)
    return section


def write_coreset(out: Path, command: str, section: str | None = None, budget_s: float = 300.0) -> str:
    """Times the greedy coreset for 10^5 and 10^6 patches at 1% and 10% and writes the section
    (default ``coreset``) of ``out``."""
    rows = []
    for n in (100_000, 1_000_000):
        for ratio in (0.01, 0.1):
            rows.append(coreset_speed(n, ratio, budget_s=budget_s))
            print(f"n={n} ratio={ratio}: {rows[-1]['seconds']:.1f} s ({rows[-1]['how']})", flush=True)
    section = section or "coreset"
    body = "\n".join([
        "## Greedy coreset subsampling (d=152 projected to 128, on device)", "",
        *report.provenance(command, harness.machine()), "",
        report.markdown_table(rows, ["n", "ratio", "coreset", "seconds", "how", "ms_per_step", "gb_per_s"]), "",
        "Each greedy step reads every projected point once, so it is memory-bound: gb_per_s is the "
        "achieved read bandwidth. 'extrapolated' rows were not run to the end: setup plus per-step cost "
        f"from two short runs, because the full run was predicted to exceed {budget_s:.0f} s.",
    ])
    harness.write_section(out, section, body)
    return section
