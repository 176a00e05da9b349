"""Streaming at scale: fit throughput, peak memory and score time against the number of training
patches n, for memory-free distances and for exact / 1%-coreset nearest neighbour.

Features come from a generator, not a dataset: batches [B, h, w, d] cycled from a few batches
drawn once on the device, so what is timed is the distance's own work (a backbone would supply
the features in a real fit). A memory-free distance is any object with these four functions (a
:class:`StreamingDistance`, a module, or a distance of another protocol with the same calls),
passed to :func:`measure` under a name::

    init(config, sample) -> stats            # sample: one batch of features
    update(stats, features, valid) -> stats  # pure, jit-able, additive
    finalize(stats, config) -> params        # once
    score(params, features) -> patch scores  # [B, h, w]

Its statistics stay on the device between batches (``update`` is compiled with the running
statistics donated), so host memory must not grow with n; the nearest-neighbour bank, by
contrast, holds n·d floats. Peak host memory is the process's resident-set high-water mark,
reset before each measurement; device memory is the backend's peak where it reports one (GPU,
TPU), else the bytes of live JAX arrays after the fit (CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.bench import distance_speed, harness, timing
from jaxad.distances import crd, knn, protocol
from jaxad.errors import ConfigError
from jaxad.eval import report
from jaxad.runtime import compilation
from jaxad.runtime.memory import peak_rss, reset_peak_rss

GRID = (16, 16)  # patches per feature map of the stream
BATCH_IMAGES = 32  # 8192 patches per batch
POOL = 4  # distinct batches drawn once and cycled
QUERIES = 10_000  # score time is given per 10^4 query patches


@dataclass(frozen=True)
class StreamingDistance:
    """A memory-free distance: streaming statistics, then parameters, then one batched score;
    ``flops_per_patch(d)`` (optional on other objects) gives the achieved FLOP rate of a fit."""

    init: Callable[[ml_collections.ConfigDict, jax.Array], Any]
    update: Callable[[Any, jax.Array, jax.Array], Any]
    finalize: Callable[[Any, ml_collections.ConfigDict], Any]
    score: Callable[[Any, jax.Array], jax.Array]
    flops_per_patch: Callable[[int], float]


def _crd_init(config: ml_collections.ConfigDict, sample: jax.Array) -> dict[str, jax.Array]:
    d = sample.shape[-1]
    return {"G": jnp.zeros((d, d), jnp.float32), "n": jnp.zeros((), jnp.float32)}


def _crd_update(stats: dict[str, jax.Array], features: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    f = features * valid[:, None, None, None].astype(features.dtype)  # padded images add nothing
    n = jnp.sum(valid) * features.shape[1] * features.shape[2]
    return {"G": stats["G"] + crd.gram(f), "n": stats["n"] + n.astype(jnp.float32)}


def _crd_finalize(stats: dict[str, jax.Array], config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    G = np.asarray(stats["G"], np.float64)
    return {"M": crd.matrix(G, crd.effective_lambda(G, float(stats["n"]), config.lam, config.lam_mode))}


GLOBAL_CRD = StreamingDistance(
    init=_crd_init, update=_crd_update, finalize=_crd_finalize,
    score=lambda params, features: crd.score(params["M"], features), flops_per_patch=lambda d: 2.0 * d * d,
)
# the options a protocol distance reads beyond λ; blocks: 4×4 tiles of the 16×16 grid
PROTOCOL_SETTINGS = {"position": "global", "position_blocks": 4, "rff_dim": 1024, "rff_scale": 1.0, "seed": 0, "reg": 0.01}


def protocol_distance(name: str, flops_per_patch: Callable[[int], float], **settings: Any) -> StreamingDistance:
    """Distance ``name`` of :mod:`jaxad.distances` (its own init, update, finalize and score) with
    :data:`PROTOCOL_SETTINGS` and ``settings`` fixed, under the four calls :func:`measure` makes."""
    distance = protocol.get(name)

    def configured(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({**PROTOCOL_SETTINGS, **config.to_dict(), **settings})

    return StreamingDistance(init=lambda config, sample: distance.init(configured(config), sample),
                             update=distance.update,
                             finalize=lambda stats, config: distance.finalize(stats, configured(config)),
                             score=distance.score, flops_per_patch=flops_per_patch)


def _gram_flops(d: int) -> float:
    return 2.0 * d * d


def _kernel_flops(d: int) -> float:
    rff = PROTOCOL_SETTINGS["rff_dim"]
    return 2.0 * d * rff + 2.0 * rff * rff  # the random projection, then the Gram of the features


DISTANCES = {
    "crd": GLOBAL_CRD,
    "crd-blocks": protocol_distance("crd", _gram_flops, position="blocks"),  # 16 Grams
    "crd-location": protocol_distance("crd", _gram_flops, position="location"),  # 256 Grams
    "kernel_crd": protocol_distance("kernel_crd", _kernel_flops),  # one 1024² Gram of random Fourier features
    "mahalanobis": protocol_distance("mahalanobis", _gram_flops),  # one Gaussian
}
NEAREST_NEIGHBOUR = "nn"  # the name that asks for exact and 1%-coreset NN
DEFAULT_NAMES = ("crd", NEAREST_NEIGHBOUR)


def chosen(names: Sequence[str]) -> dict[str, Any]:
    """The streaming distances named (``nn`` aside), refusing an unknown name."""
    unknown = sorted(set(names) - {*DISTANCES, NEAREST_NEIGHBOUR})
    if unknown:
        raise ConfigError(f"--scale-distances: unknown {', '.join(unknown)}; "
                          f"available: {', '.join([*DISTANCES, NEAREST_NEIGHBOUR])}")
    return {name: DISTANCES[name] for name in names if name != NEAREST_NEIGHBOUR}


def feature_stream(n: int, d: int, seed: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
    """``n`` patches (rounded up to whole feature maps) as (features [B, h, w, d], valid [B]),
    cycling through :data:`POOL` batches of standard normal features drawn once on the device."""
    keys = jax.random.split(jax.random.key(seed), POOL)
    pool = [jax.random.normal(k, (BATCH_IMAGES, *GRID, d), jnp.float32) for k in keys]
    per_map = GRID[0] * GRID[1]
    maps = -(-n // per_map)
    full, tail = divmod(maps, BATCH_IMAGES)
    everything = jnp.ones(BATCH_IMAGES, bool)
    for i in range(full):
        yield pool[i % POOL], everything
    if tail:
        yield pool[full % POOL], jnp.arange(BATCH_IMAGES) < tail


def streamed_patches(n: int) -> int:
    """How many patches :func:`feature_stream` yields for ``n``."""
    per_map = GRID[0] * GRID[1]
    return -(-n // per_map) * per_map


def device_bytes() -> int:
    """Peak bytes in use on the first device where the backend says; else bytes of live arrays."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return sum(a.nbytes for a in jax.live_arrays())


def _queries(d: int, count: int) -> jax.Array:
    maps = -(-count // (GRID[0] * GRID[1]))
    return jax.random.normal(jax.random.key(7), (maps, *GRID, d), jnp.float32)


def _gflops(distance: Any, d: int, patches_per_s: float) -> dict[str, float]:
    flops = getattr(distance, "flops_per_patch", None)
    return {} if flops is None else {"gflops": flops(d) * patches_per_s / 1e9}


def fit_streaming(distance: Any, config: ml_collections.ConfigDict, n: int, d: int
                  ) -> tuple[Any, dict[str, float]]:
    """Stream ``n`` patches through ``distance``; returns (params, measurements)."""
    stream = feature_stream(n, d)
    first, valid = next(stream)
    update = compilation.jit(distance.update, donate_argnums=0)
    stats = distance.init(config, first)
    warm = jax.block_until_ready(update(distance.init(config, first), first, valid))  # compiles
    del warm
    reset_peak_rss()
    start = time.perf_counter()
    stats = update(stats, first, valid)
    for features, valid in stream:
        stats = update(stats, features, valid)
    stats = jax.block_until_ready(stats)
    seconds = time.perf_counter() - start
    held = device_bytes()
    params = jax.block_until_ready(distance.finalize(stats, config))
    patches = streamed_patches(n)
    return params, {
        "n": patches, "fit_s": seconds, "patches_per_s": patches / seconds, **_gflops(distance, d, patches / seconds),
        "peak_rss_bytes": peak_rss(), "device_bytes": held,
    }


def score_seconds(score: Callable[[Any, jax.Array], jax.Array], params: Any, d: int) -> float:
    """Seconds to score 10⁴ query patches (median of 5, compiled)."""
    fn = compilation.jit(score)
    q = _queries(d, QUERIES)
    return timing.median_seconds(lambda: fn(params, q), 5)


def fit_bank(n: int, d: int) -> tuple[np.ndarray, dict[str, float]]:
    """Nearest neighbour's fit: every streamed patch copied into a host bank of n·d floats."""
    patches = streamed_patches(n)
    reset_peak_rss()
    start = time.perf_counter()
    bank = np.empty((patches, d), np.float32)
    row = 0
    for features, valid in feature_stream(n, d):
        f = np.asarray(features)[np.asarray(valid)].reshape(-1, d)
        bank[row:row + len(f)] = f
        row += len(f)
    seconds = time.perf_counter() - start
    return bank, {"n": patches, "fit_s": seconds, "patches_per_s": patches / seconds,
                  "peak_rss_bytes": peak_rss(), "device_bytes": device_bytes()}


def nn_score_seconds(bank: np.ndarray, flop_budget: float) -> tuple[float, int]:
    """Seconds to search 10⁴ queries in ``bank`` (timed on as many as fit ``flop_budget``, at least
    100, and scaled linearly); returns (seconds, queries timed)."""
    n, d = bank.shape
    count = int(np.clip(flop_budget // (2 * n * d), 100, QUERIES))
    q = _queries(d, count).reshape(-1, d)[:count]
    device_bank = knn.make_bank(jnp.asarray(bank))
    search = compilation.jit(lambda q, b: knn.nearest(q, b, k=1, chunk_size=10_000)[0])
    seconds = timing.median_seconds(lambda: search(q, device_bank), 3) * QUERIES / count
    return seconds, count


def sizes_up_to(max_n: float) -> list[int]:
    """Powers of ten from 10⁴ to ``max_n``."""
    return [10**e for e in range(4, int(np.floor(np.log10(max_n) + 1e-9)) + 1)]


def measure(max_n: float = 1e9, d: int = 152, budget_s: float = 1500.0, nn_gb: float = 4.0,
            coreset_budget_s: float = 120.0, flop_budget: float = 2e11,
            distances: Mapping[str, Any] | None = None, nn: bool = True,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per (distance, n). A streaming fit whose time, predicted from the previous size,
    exceeds ``budget_s`` is not run: its row is extrapolated linearly and says so. With ``nn``, exact
    and 1%-coreset NN stop at the first n whose bank exceeds ``nn_gb`` GB; the coreset's greedy
    selection is timed to ``coreset_budget_s`` and extrapolated beyond (as in ``--coreset``)."""
    config = ml_collections.ConfigDict({"lam": 5.0, "lam_mode": "absolute"})
    distances = {"crd": GLOBAL_CRD} if distances is None else distances
    rows: list[dict[str, Any]] = []
    for name, distance in distances.items():
        rate = None
        for n in sizes_up_to(max_n):
            if rate is not None and streamed_patches(n) / rate > budget_s:
                rows.append({"distance": name, "n": streamed_patches(n), "how": "extrapolated",
                             "fit_s": streamed_patches(n) / rate, "patches_per_s": rate, **_gflops(distance, d, rate)})
                log(f"{name} n={n}: predicted {rows[-1]['fit_s']:.0f} s > {budget_s:.0f} s, extrapolated")
                continue
            params, row = fit_streaming(distance, config, n, d)
            rate = row["patches_per_s"]
            rows.append({"distance": name, "how": "measured", **row,
                         "score_s": score_seconds(distance.score, params, d)})
            log(f"{name} n={n}: {row['fit_s']:.1f} s, {rate:.3g} patches/s, "
                f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB")
    for n in sizes_up_to(max_n) if nn else []:
        if streamed_patches(n) * d * 4 > nn_gb * 2**30:
            why = f"not run: bank {streamed_patches(n) * d * 4 / 2**30:.3g} GiB > {nn_gb:g} GiB"
            rows += [{"distance": k, "n": streamed_patches(n), "how": why} for k in ("exact NN", "1%-coreset NN")]
            log(f"nearest neighbour stops at n={n}: {why}")
            break
        bank, row = fit_bank(n, d)
        seconds, count = nn_score_seconds(bank, flop_budget)
        rows.append({"distance": "exact NN", "how": "measured", **row, "score_s": seconds, "queries_timed": count})
        small = bank[: max(1, len(bank) // 100)]
        seconds, count = nn_score_seconds(small, flop_budget)
        selection = distance_speed.coreset_speed(len(bank), 0.01, d, budget_s=coreset_budget_s)
        rows.append({"distance": "1%-coreset NN", "how": f"selection {selection['how']}", "n": row["n"],
                     "fit_s": row["fit_s"] + selection["seconds"],
                     "patches_per_s": row["n"] / (row["fit_s"] + selection["seconds"]),
                     "peak_rss_bytes": row["peak_rss_bytes"], "device_bytes": row["device_bytes"],
                     "score_s": seconds, "queries_timed": count})
        del bank, small
        log(f"NN n={n}: fit {row['fit_s']:.1f} s, coreset selection {selection['seconds']:.1f} s "
            f"({selection['how']}), exact score {rows[-2]['score_s']:.2f} s / 10^4 queries")
    return rows


V5E_BF16_TFLOPS = 197.0  # peak bf16 matmul TFLOP/s of one TPU v5e chip (Google Cloud's published figure)
F32_PASSES = 6  # bf16 passes of a float32 product at Precision.HIGHEST on a TPU


def projections(rows: Sequence[dict[str, Any]], d_from: int, d_to: int = 1536, n: float = 1e9) -> list[str]:
    """Lines projecting the measured Gram rate to d = ``d_to`` here, and to a TPU v5e-8 from its peak."""
    measured = [r for r in rows if r["distance"] == "crd" and r["how"] == "measured"]
    if not measured:
        return []
    largest = max(measured, key=lambda r: r["n"])
    flops = 2.0 * d_to * d_to * n
    cpu_s = flops / (largest["gflops"] * 1e9)
    slice_f32 = 8 * V5E_BF16_TFLOPS / F32_PASSES * 1e12
    slice_bf16 = 8 * V5E_BF16_TFLOPS * 1e12
    return [
        (f"- Projection to d = {d_to} (the paper backbone), n = {n:.0e}: the Gram costs 2·d²·n = {flops:.2e} FLOP; "
         f"at the rate measured here for d = {d_from} (n = {largest['n']:.2e}: {largest['gflops']:.1f} GFLOP/s) "
         f"that is {cpu_s:.3g} s ({cpu_s / 3600:.2f} h) on this CPU, assuming the rate holds at the larger d."),
        (f"- TPU v5e-8 (not measured; assumed peak {V5E_BF16_TFLOPS:.0f} TFLOP/s bf16 per chip, 8 chips, float32 "
         f"at Precision.HIGHEST taken as {F32_PASSES} bf16 passes): at least {flops / slice_f32:.3g} s in float32 "
         f"and {flops / slice_bf16:.3g} s in bf16, at full peak; the backbone producing the features is not counted."),
        (f"- Exact NN at n = {n:.0e} would hold a bank of {n * d_from * 4 / 1e9:.0f} GB (d = {d_from}) or "
         f"{n * d_to * 4 / 1e12:.1f} TB (d = {d_to}) in float32; a v5e-8 has 128 GB of HBM in all."),
    ]


def stops(rows: Sequence[dict[str, Any]], budget_s: float) -> list[str]:
    """One line per streaming distance: the largest n measured, and why it went no further."""
    lines = []
    for name in dict.fromkeys(r["distance"] for r in rows if "NN" not in r["distance"]):
        mine = [r for r in rows if r["distance"] == name]
        measured = [r for r in mine if r["how"] == "measured"]
        beyond = [r for r in mine if r["how"] == "extrapolated"]
        top = max(measured, key=lambda r: r["n"])
        line = f"- {name}: measured to n = {top['n']:.3g} ({top['fit_s']:.3g} s at {top['patches_per_s']:.3g} patches/s)"
        if beyond:
            first = min(beyond, key=lambda r: r["n"])
            line += (f"; stops there because n = {first['n']:.3g} was predicted to take {first['fit_s']:.3g} s, "
                     f"more than the {budget_s:.0f} s budget of one fit (its rows are extrapolated)")
        else:
            line += "; the largest n asked for"
        lines.append(line + ".")
    return lines


def section(rows: Sequence[dict[str, Any]], d: int, command: str, plots: Sequence[str], budget_s: float,
            nn_gb: float, note: str = "") -> str:
    """Markdown of the scale benchmark."""
    table = [{**r, "peak_rss_mib": r.get("peak_rss_bytes", float("nan")) / 2**20,
              "device_mib": r.get("device_bytes", float("nan")) / 2**20,
              "score_ms": 1e3 * r["score_s"] if "score_s" in r else float("nan")} for r in rows]
    nn = any("NN" in r["distance"] for r in rows)
    streaming = [k for k in dict.fromkeys(r["distance"] for r in rows) if "NN" not in k]
    title = "Streaming at scale" + ("" if streaming == ["crd"] else f" ({', '.join(streaming)})")
    lines = [
        f"## {title}: fit throughput, memory and score time against n (d = {d})", "",
        *report.provenance(command, harness.machine()), "",
        (f"Features streamed from a generator ({BATCH_IMAGES} maps of {GRID[0]}×{GRID[1]} patches per batch, "
         f"cycled from {POOL} batches drawn once on the device): timed is the distance's update alone. "
         "peak_rss: the process's resident-set high-water mark during the fit (reset before it); device: bytes of "
         "live JAX arrays after the fit (the CPU backend reports no peak). score_ms: 10⁴ query patches"
         + (" (NN timed on queries_timed and scaled)" if nn else "") + ". 'extrapolated' rows were not run: their "
         "time is n over the rate of the largest measured n, because it was predicted to exceed "
         f"{budget_s:.0f} s." + (f" Nearest neighbour stops where its bank would exceed {nn_gb:g} GiB; its fit is the "
                                 "copy into the bank (1% coreset: plus the greedy selection, measured or extrapolated "
                                 "as in --coreset)." if nn else "")), "",
        *([] if streaming == ["crd"] else [
            "Distances: " + "; ".join(_describe(k) for k in streaming) + ". gflops counts "
            + "; ".join(f"{k}: {_flops_text(k)}" for k in streaming) + " per patch.", ""]),
        report.markdown_table(table, ["distance", "n", "how", "fit_s", "patches_per_s", "gflops", "peak_rss_mib",
                                      "device_mib", "score_ms", *(["queries_timed"] if nn else [])], floatfmt=".4g"), "",
        *stops(rows, budget_s), "",
        *projections(rows, d), "",
        *[f"![{Path(p).stem}]({p})" for p in plots], "",
        *([note, ""] if note else []),
    ]
    return "\n".join(lines)


DESCRIPTIONS = {
    "crd": "global CRD (one Gram)",
    "crd-blocks": f"CRD with one Gram per tile of {PROTOCOL_SETTINGS['position_blocks']}×"
                  f"{PROTOCOL_SETTINGS['position_blocks']} tiles of the grid",
    "crd-location": f"CRD with one Gram per grid cell ({GRID[0] * GRID[1]})",
    "kernel_crd": f"kernel CRD on {PROTOCOL_SETTINGS['rff_dim']} random Fourier features (one Gram of that size)",
    "mahalanobis": "one Gaussian (moments about a shift, whitening at finalize)",
}


def _describe(name: str) -> str:
    return f"{name} = {DESCRIPTIONS.get(name, 'as given')}"


def _flops_text(name: str) -> str:
    return "2·d·D + 2·D² (D random features)" if name == "kernel_crd" else "2·d²"


def write_scale(out: Path, command: str, section_name: str | None = None, max_n: float = 1e9, d: int = 152,
                budget_s: float = 1500.0, nn_gb: float = 4.0, coreset_budget_s: float = 120.0,
                names: Sequence[str] = DEFAULT_NAMES, note: str = "") -> str:
    """Measure ``names`` (keys of :data:`DISTANCES`, and ``nn``; see :func:`measure`), plot and write
    the section (default ``scale``) of ``out``."""
    out = Path(out)
    name = section_name or "scale"
    rows = measure(max_n, d, budget_s, nn_gb, coreset_budget_s, distances=chosen(names),
                   nn=NEAREST_NEIGHBOUR in names)
    folder = out.parent / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    kinds = sorted({r["distance"] for r in rows}, key=[r["distance"] for r in rows].index)

    def series(key: str, scale: float = 1.0) -> dict[str, tuple[list, list]]:
        kept = [r for r in rows if key in r and r["how"] != "extrapolated"]
        return {k: ([r["n"] for r in kept if r["distance"] == k], [r[key] * scale for r in kept if r["distance"] == k])
                for k in kinds}

    plots = []
    for key, label, scale in (("patches_per_s", "fit throughput (patches/s, measured)", 1.0),
                              ("peak_rss_bytes", "peak host RSS (MiB)", 2.0**-20),
                              ("score_s", "seconds per 10^4 query patches", 1.0)):
        path = folder / f"{name}_{key}.png"
        found = {k: v for k, v in series(key, scale).items() if v[0]}
        report.save_line_plot(path, found, "training patches n", label, f"{label}, d={d}", logx=True, logy=True)
        plots.append(os.path.relpath(path, out.parent))
    harness.write_section(out, name, section(rows, d, command, plots, budget_s, nn_gb, note))
    return name
