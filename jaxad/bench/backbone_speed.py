"""How fast a backbone extracts the feature maps a method taps, against torchvision/timm, and what
bfloat16 costs in accuracy (``bench.py --backbones``).

Timings use random weights (speed does not depend on their values), at the taps and input size of
the method that uses each backbone, and the forward stops at the deepest tap just as in a fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import backbones
from jaxad.backbones import registry, winograd
from jaxad.bench import harness, timing
from jaxad.errors import ConfigError
from jaxad.eval import report
from jaxad.runtime import compilation

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
    call (for :func:`jaxad.bench.timing.interleaved_median_seconds`, which waits for its result).
    ``xla_defaults``: compiled by plain ``jax.jit``, without jaxad's CPU options
    (:mod:`jaxad.runtime.compilation`), to measure what they give."""
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


def selected(only: Sequence[str] = ()) -> list[tuple[str, tuple[str, ...], int]]:
    """(name, taps, input size) of every benchmarked backbone in ``only`` (default: all)."""
    unknown = sorted(set(only) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"--backbone {unknown}: not benchmarked; choose from {sorted(SETTINGS)}")
    return [(name, taps, size) for name, (taps, size) in SETTINGS.items()
            if name in backbones.names() and (not only or name in only)]


def _torch_calls(compile_torch: bool, name: str, taps: tuple[str, ...], size: int,
                 batch: int) -> tuple[dict, str | None]:
    """The torch side's calls (eager, and compiled unless --no-compile) and, when there is no
    compiled call, why: 'skipped' or torch.compile's failure."""
    from jaxad.bench import torch_reference  # needs the port extra: imported only here

    device = "cpu" if jax.default_backend() == "cpu" else "cuda"
    calls = {"torch_eager": torch_reference.extraction(name, taps, size, batch, device=device)}
    if not compile_torch:
        return calls, "skipped"
    try:
        compiled = torch_reference.extraction(name, taps, size, batch, compiled=True, device=device)
        compiled()  # torch.compile fails, if it does, on the first call
    except Exception as e:  # noqa: BLE001  (torch.compile's failures are reported, not fatal)
        return calls, f"failed: {type(e).__name__}"
    return {**calls, "torch_compile": compiled}, None


def write_speed(out: Path, command: str, section: str | None = None, only: Sequence[str] = (),
                compile_torch: bool = True, note: str = "") -> str:
    """Times every selected backbone against torch (each in a process of its own) and writes the
    section (default ``backbones-BACKEND``) of ``out``; returns the section's name."""
    rows, errors = [], []
    section = section or f"backbones-{jax.default_backend()}"
    reference = timing.matmul_gflops()
    for name, taps, size in selected(only):
        timed, error = timing.in_own_process(_speed_rows, compile_torch, name, taps, size, reference)
        rows += timed
        errors.append(error)
        # rewritten after every backbone, so a run cut short still leaves what it measured
        harness.write_section(out, section, _speed_section(rows, errors, reference, command, note))
    return section


def _speed_rows(compile_torch: bool, name: str, taps: tuple[str, ...], size: int,
                   reference: float) -> tuple[list[dict], dict]:
    """One backbone's rows of ``--backbones`` (one per batch size) and its row of bfloat16 errors."""
    from jaxad.bench import torch_reference

    rows = []
    gflop = gflop_per_image(name, taps, size)
    mib = {"jaxad_mib": weight_bytes(name, taps) / 2**20,
           "torch_mib": torch_reference.weight_bytes(name, taps) / 2**20}
    for batch in BATCHES:
        torch_calls, no_compile = _torch_calls(compile_torch, name, taps, size, batch)
        calls = {"jaxad": extraction(name, taps, size, batch),
                 "jaxad_bf16": extraction(name, taps, size, batch, jnp.bfloat16),
                 **torch_calls}
        if compilation.cpu_options():
            calls["jaxad_xla_defaults"] = extraction(name, taps, size, batch, xla_defaults=True)
        row = {"backbone": name, "taps": "+".join(taps), "size": size, "batch": batch, "gflop": gflop,
               "torch_compile": no_compile, **mib}
        seconds = timing.interleaved_median_seconds(calls, ROUNDS, PER_ROUND)
        row.update({side: batch / s for side, s in seconds.items()})
        row["jaxad_gflops"] = row["jaxad"] * gflop
        row["of_matmul"] = row["jaxad_gflops"] / reference
        row["jaxad_over_torch"] = row["jaxad"] / row["torch_eager"]
        row["jaxad_over_xla_defaults"] = row["jaxad"] / row["jaxad_xla_defaults"] if "jaxad_xla_defaults" in row else "–"
        compiled = row["torch_compile"]
        row["jaxad_over_compile"] = row["jaxad"] / compiled if isinstance(compiled, float) else "–"
        rows.append(row)
        print(row, flush=True)
    errors = bfloat16_error(name, taps, size)
    return rows, {"backbone": name, **{f"max_rel_err {t}": e for t, e in errors.items()}}


def write_stages(out: Path, command: str, section: str | None = None, only: Sequence[str] = (),
                 compile_torch: bool = True, note: str = "") -> str:
    """Times forwards that stop at each tap in turn; a stage's time is the difference between the
    forward to its tap and the forward to the tap before."""
    rows = []
    section = section or f"backbone-stages-{jax.default_backend()}"
    for name, taps, size in selected(only):
        rows += timing.in_own_process(_stage_rows, compile_torch, name, taps, size)
        harness.write_section(out, section, _stage_section(rows, command, note))
    return section


def _stage_rows(compile_torch: bool, name: str, taps: tuple[str, ...], size: int) -> list[dict]:
    """One backbone's rows of ``--backbones --per-tap``: the forward to each of its taps in turn."""
    from jaxad.bench import torch_reference

    rows, previous = [], {}
    batch = STAGE_BATCH
    for tap in stages(name, taps[-1]):
        if not torch_reference.reaches(name, tap):
            continue
        torch_calls, no_compile = _torch_calls(compile_torch, name, (tap,), size, batch)
        calls = {"jaxad": extraction(name, (tap,), size, batch), **torch_calls}
        seconds = timing.interleaved_median_seconds(calls, STAGE_ROUNDS,
                                                    PER_ROUND)
        row: dict = {"backbone": name, "size": size, "tap": tap, "torch_compile_ms": no_compile}
        for side, s in seconds.items():
            row[f"{side}_ms"] = 1e3 * s
            row[f"{side}_stage_ms"] = 1e3 * (s - previous.get(side, 0.0))
        for side, ratio in (("torch_eager", "stage_jaxad_over_torch"), ("torch_compile", "stage_jaxad_over_compile")):
            mine, theirs = row["jaxad_stage_ms"], row.get(f"{side}_stage_ms")
            row[ratio] = theirs / mine if theirs is not None and theirs > 0 and mine > 0 else "–"
        previous = seconds
        rows.append(row)
        print(row, flush=True)
    return rows


def _stage_section(rows: list[dict], command: str, note: str = "") -> str:
    columns = ["backbone", "size", "tap", "jaxad_ms", "torch_eager_ms", "torch_compile_ms", "jaxad_stage_ms",
               "torch_eager_stage_ms", "torch_compile_stage_ms", "stage_jaxad_over_torch", "stage_jaxad_over_compile"]
    return "\n".join([
        f"## Feature extraction per stage: jaxad (jit) against torchvision/timm, batch {STAGE_BATCH}, milliseconds", "",
        *report.provenance(command, f"{harness.machine()}, torch threads = CPU cores"), "",
        report.markdown_table(rows, columns), "",
        "Each row times forwards that stop at `tap` (random weights; the backbone's input size in the "
        "methods' settings) on every side, each backbone in a Python process of its own, in "
        f"{STAGE_ROUNDS} alternating rounds of {PER_ROUND} calls each. "
        "`*_stage_ms`: that forward's median time less the previous row's, i.e. the stage that ends at "
        "`tap` (the first row: input to its tap); `stage_jaxad_over_*`: the other side's stage time over "
        "jaxad's, above 1 where jaxad's stage is faster. Differences of medians carry the noise of both; "
        "a stage of a few milliseconds or less can come out negative, and then has no ratio (–). "
        "timm's EfficientNet-Lite stops only at the ends of its stride stages, so Lite rows skip the taps in between.",
        *(["", note] if note else []),
    ])


def _options_text() -> str:
    """jaxad's compile options on this backend, as the section names them."""
    options = compilation.cpu_options()
    return ", ".join(f"`{k}={v}`" for k, v in options.items()) if options else "none on this backend"


def _verdict(rows: list[dict], ratio: str, against: str) -> str:
    """Which rows have jaxad at least as fast as ``against`` (by the ``ratio`` column), which not."""
    timed = [(f"{r['backbone']} b{r['batch']}", r[ratio]) for r in rows if isinstance(r[ratio], float)]
    wins = ", ".join(name for name, x in timed if x >= 1) or "none"
    losses = ", ".join(name for name, x in timed if x < 1) or "none"
    return f"jaxad ≥ {against} in: {wins}; below it in: {losses}."


def _speed_section(rows: list[dict], errors: list[dict], matmul_gflops: float, command: str,
                      note: str = "") -> str:
    columns = ["backbone", "taps", "size", "batch", "gflop", "jaxad", "jaxad_gflops", "of_matmul", "jaxad_bf16",
               "jaxad_xla_defaults", "torch_eager", "torch_compile", "jaxad_over_torch", "jaxad_over_compile",
               "jaxad_over_xla_defaults", "jaxad_mib", "torch_mib"]
    return "\n".join([
        "## Feature extraction: jaxad (jit) against torchvision/timm, images per second", "",
        *report.provenance(command, f"{harness.machine()}, torch threads = CPU cores"), "",
        report.markdown_table(rows, columns), "",
        "Random weights; the forward stops at the deepest tap on both sides (torchvision's "
        "create_feature_extractor; timm's features_only model, which would run all its blocks, cut after the "
        "deepest tap's). Each backbone is timed in a Python process of its own. Each row times its sides in "
        f"{ROUNDS} alternating rounds of {PER_ROUND} calls each and "
        "takes each side's median call, so a slow phase of the machine slows every side alike. `gflop`: XLA's count of floating-point "
        "operations per image; `jaxad_gflops`: the rate the jaxad forward achieves; `of_matmul`: that "
        f"rate over the rate of a 2048×2048 float32 matmul on the same machine in the same run "
        f"({matmul_gflops:.0f} GFLOP/s). `jaxad_mib`: the backbone's variables loaded for the row's taps "
        "(the layers up to the deepest tap; on CPU plus the transformed Winograd kernels, 4× the size of the "
        "3×3 kernels they stand for); `torch_mib`: the torch extractor's parameters and buffers. "
        f"`jaxad_xla_defaults`: the same forward compiled by plain `jax.jit`, without the XLA:CPU options "
        f"jaxad compiles its programs with ({_options_text()}; `jaxad.runtime.compilation`); "
        "`jaxad_over_xla_defaults`: what those options give.", "",
        _verdict(rows, "jaxad_over_torch", "torch_eager") + " " + _verdict(rows, "jaxad_over_compile", "torch_compile"), "",
        "What limits the ratio. A row with a large `of_matmul` is bound by the arithmetic of its "
        "convolutions, which XLA:CPU hands to Eigen's kernels and torch to oneDNN's; where oneDNN's "
        "kernel is faster for a shape, fusion cannot make it up, and only doing fewer or cheaper "
        "operations does. So on CPU jaxad runs 1×1 convolutions as matmuls (XLA:CPU's dot is faster "
        "than its convolution) and stride-1 3×3 convolutions over small inputs as Winograd "
        "F(4×4, 3×3) (4× fewer multiplies, kernels transformed once at load; `backbones.winograd`); "
        "`gflop` counts the direct convolutions' operations, so `jaxad_gflops` is an effective rate. "
        "A row with a small `of_matmul` spends its time on memory traffic (dense concatenations, "
        "depthwise convolutions) and per-layer overhead; there XLA fuses BatchNorm, activations and "
        "the depthwise convolutions and 3×3 stems over RGB (shifted multiply-adds on CPU) into few "
        "passes, which pays most "
        "against eager dispatch, while torch.compile fuses too. On CPU jaxad runs a batch as a loop "
        f"over pairs of images (`registry.CPU_MICRO_BATCH` = {registry.CPU_MICRO_BATCH}) "
        "so that each pair's maps stay in the cache; torch takes the batch of 16 at once.", "",
        "bfloat16 computes in bf16 with float32 parameters and outputs; it gains nothing on a CPU "
        "without native bf16 arithmetic. Its error on the tapped maps (max |bf16 − f32| / max |f32|):", "",
        report.markdown_table(errors, sorted({k for e in errors for k in e}, key=lambda k: (k != "backbone", k))),
        *(["", note] if note else []),
    ])
