"""Benchmark methods on every dataset under a root and write the results into BENCHMARKS.md.

    python scripts/bench.py --method crd [--method padim ...] [--data-root ../shared/data]
        [--variant [METHOD/]NAME:KEY=VALUE,KEY=VALUE ...] [--no-default] [--out BENCHMARKS.md] [--section NAME]
    python scripts/bench.py --distances [--max-n 10000000] [--section NAME]
    python scripts/bench.py --coreset [--coreset-budget 300] [--section NAME]
    python scripts/bench.py --backbones [--per-tap] [--backbone NAME ...] [--no-compile] [--section NAME]
    python scripts/bench.py --import-from OTHER/BENCHMARKS.md --section NAME [--out BENCHMARKS.md]

--distances times CRD against exact and 1%-coreset nearest neighbour on synthetic features for
d in {152, 1536} and growing bank sizes, with a log-log plot beside --out. --coreset times the
greedy coreset (10^5 and 10^6 patches of d=152, 1% and 10%). --backbones times jitted feature
extraction per backbone against torchvision/timm (eager and torch.compile; needs the `port` extra)
and measures the error of bfloat16 compute on the tapped maps; with --per-tap it times batch-1
forwards that stop at each tap in turn, so each stage's share of the time shows on both sides.

Each dataset folder under --data-root (a category in MVTec layout) is fitted and evaluated with
every method's default config and every variant (a METHOD/ prefix limits a variant to one
method); the table (accuracy, fit time, predict latency at batch 1 and throughput at batch 16,
state size) replaces the section NAME of --out. Without --data-root: ../shared/data when
present, else the synthetic set (also chosen by --data-root synthetic).

--import-from copies section NAME of a BENCHMARKS.md written on another machine (a GPU, a TPU VM),
with the plots folder benchmarks/NAME beside it, into --out as it is.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxad import backbone_benchmark, backbones, benchmark, cli, compilation, distance_benchmark, report, timing
from jaxad.data import find_categories, synthetic

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", help="method to benchmark (repeatable; default crd)")
    parser.add_argument("--data-root", help="folder of datasets, one category, or 'synthetic'")
    parser.add_argument("--variant", action="append", default=[], help="[METHOD/]NAME:KEY=VALUE,... (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--section", help="section name in --out (default: METHOD-DATAROOTNAME)")
    parser.add_argument("--no-default", action="store_true",
                        help="run only the --variant configs, not each method's default config too")
    parser.add_argument("--note", default="", help="sentence printed under the tables (e.g. the schedule used)")
    parser.add_argument("--few-shot", help="comma-separated training-set sizes, e.g. 5,10,25,50,all: "
                        "image AUROC against the number of normal training images, plotted per dataset")
    parser.add_argument("--distances", action="store_true", help="run the distance micro-benchmark instead")
    parser.add_argument("--max-n", type=float, default=1e7, help="largest bank for d=152 (d=1536 stops 10x lower)")
    parser.add_argument("--flop-budget", type=float, default=2e11, help="NN FLOPs timed per measurement (raise on accelerators)")
    parser.add_argument("--coreset", action="store_true", help="time greedy coreset subsampling instead")
    parser.add_argument("--coreset-budget", type=float, default=300.0, help="seconds a timed coreset run may take")
    parser.add_argument("--backbones", action="store_true", help="time feature extraction per backbone instead")
    parser.add_argument("--no-compile", action="store_true", help="with --backbones: skip torch.compile")
    parser.add_argument("--backbone", action="append", help="with --backbones: only this one (repeatable)")
    parser.add_argument("--per-tap", action="store_true",
                        help="with --backbones: time batch-1 forwards to each tap in turn (time per stage)")
    parser.add_argument("--import-from", type=Path,
                        help="copy --section from this BENCHMARKS.md (written on another machine) into --out")
    args = parser.parse_args()
    command = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.import_from:
        if not args.section:
            raise SystemExit("--import-from needs --section NAME: the section to copy")
        benchmark.import_section(args.import_from, args.out, args.section)
        print(f"imported section {args.section!r} of {args.import_from} into {args.out}")
        return 0
    if args.distances:
        return distances(args, command)
    if args.coreset:
        return coreset(args, command)
    if args.backbones:
        return backbone_stages(args, command) if args.per_tap else backbone_speed(args, command)
    shared = ROOT.parent / "shared" / "data"
    if args.data_root == "synthetic" or (args.data_root is None and not shared.is_dir()):
        root = synthetic.ensure()
    else:
        root = Path(args.data_root) if args.data_root else shared
    datasets = [c for d in sorted(p for p in root.iterdir() if p.is_dir()) for c in find_categories(d)] \
        if not (root / "train").is_dir() else [root]
    methods = args.method or ["crd"]
    configs = benchmark.variants(methods, args.variant, ROOT / "configs", with_default=not args.no_default)
    section = args.section or f"{'-'.join(methods)}-{root.resolve().name}"
    if args.few_shot:
        return few_shot(args, command, configs, datasets, section)
    rows = benchmark.run(configs, datasets, plots_dir=args.out.parent / "benchmarks" / section)
    title = f"{', '.join(methods)} on {root.resolve().name}"
    body = benchmark.accuracy_section(title, command, rows, args.note, link_root=args.out.parent)
    benchmark.write_section(args.out, section, body)
    print(f"wrote section {section!r} of {args.out}")
    return 0


def few_shot(args: argparse.Namespace, command: str, configs: dict, datasets: list[Path], section: str) -> int:
    sizes = [0 if s.strip() == "all" else int(s) for s in args.few_shot.split(",")]
    rows = benchmark.run(benchmark.few_shot(configs, sizes), datasets, timed=False)
    plots = []
    for data in datasets:
        sub = [r for r in rows if r["dataset"] == data.name]
        series = {}
        for r in sorted(sub, key=lambda r: r["n_train"]):
            label = " ".join(filter(None, [r["method"], benchmark.few_shot_base(r["variant"])]))
            xs, ys = series.setdefault(label, ([], []))
            xs.append(r["n_train"])
            ys.append(r["image_auroc"])
        plots.append(args.out.parent / "benchmarks" / section / f"{data.name}_image_auroc.png")
        plots[-1].parent.mkdir(parents=True, exist_ok=True)
        report.save_line_plot(plots[-1], series, "normal training images", "image AUROC",
                              f"few-shot: {data.name}", logx=True)
    title = f"Few-shot: {', '.join(sorted({m for m, _ in configs}))} against training-set size"
    body = benchmark.few_shot_section(title, command, rows, plots, args.out.parent, args.note)
    benchmark.write_section(args.out, section, body)
    print(f"wrote section {section!r} of {args.out}")
    return 0


def distances(args: argparse.Namespace, command: str) -> int:
    peak = timing.matmul_gflops()
    rows = []
    for d, largest in ((152, args.max_n), (1536, args.max_n / 10)):
        sizes = sorted({int(n) for n in (1e3, 1e4, 1e5, 1.6e5, 1e6, 1e7) if n <= largest})
        for n in sizes:
            rows.append(distance_benchmark.measure(d, n, flop_budget=args.flop_budget))
            print(f"d={d} n={n}: CRD {rows[-1]['crd_s']:.4f} s, NN {rows[-1]['nn_s']:.3f} s", flush=True)
    section = args.section or "distances"
    plots = []
    for d in (152, 1536):
        sub = [r for r in rows if r["d"] == d]
        name = f"benchmarks/{section}_d{d}.png"
        (args.out.parent / "benchmarks").mkdir(exist_ok=True)
        report.save_line_plot(
            args.out.parent / name,
            {k: ([r["n"] for r in sub], [r[f"{k}_s"] for r in sub]) for k in ("crd", "nn", "coreset_nn")},
            "training patches n", "seconds per 10^4 queries", f"distance cost, d={d}", logx=True, logy=True,
        )
        plots.append(name)
    body = distance_benchmark.section(rows, peak, command, benchmark.machine(), plots)
    benchmark.write_section(args.out, section, body)
    print(f"wrote section {section!r} of {args.out}")
    return 0


def _benchmarked_backbones(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...], int]]:
    """(name, taps, input size) of every backbone ``--backbone`` selects (default: all)."""
    unknown = sorted(set(args.backbone or ()) - set(backbone_benchmark.SETTINGS))
    if unknown:
        raise SystemExit(f"--backbone {unknown}: not benchmarked; choose from {sorted(backbone_benchmark.SETTINGS)}")
    return [(name, taps, size) for name, (taps, size) in backbone_benchmark.SETTINGS.items()
            if name in backbones.names() and (not args.backbone or name in args.backbone)]


def _torch_calls(args: argparse.Namespace, name: str, taps: tuple[str, ...], size: int,
                 batch: int) -> tuple[dict, str | None]:
    """The torch side's calls (eager, and compiled unless --no-compile) and, when there is no
    compiled call, why: 'skipped' or torch.compile's failure."""
    import torch_reference  # the torch side lives beside this script: jaxad never imports torch

    device = "cpu" if jax.default_backend() == "cpu" else "cuda"
    calls = {"torch_eager": torch_reference.extraction(name, taps, size, batch, device=device)}
    if args.no_compile:
        return calls, "skipped"
    try:
        compiled = torch_reference.extraction(name, taps, size, batch, compiled=True, device=device)
        compiled()  # torch.compile fails, if it does, on the first call
    except Exception as e:  # noqa: BLE001  (torch.compile's failures are reported, not fatal)
        return calls, f"failed: {type(e).__name__}"
    return {**calls, "torch_compile": compiled}, None


def backbone_speed(args: argparse.Namespace, command: str) -> int:
    rows, errors = [], []
    section = args.section or f"backbones-{jax.default_backend()}"
    reference = timing.matmul_gflops()
    for name, taps, size in _benchmarked_backbones(args):
        timed, error = timing.in_own_process(_backbone_rows, args, name, taps, size, reference)
        rows += timed
        errors.append(error)
        # rewritten after every backbone, so a run cut short still leaves what it measured
        benchmark.write_section(args.out, section, _backbone_section(rows, errors, reference, command, args.note))
    print(f"wrote section {section!r} of {args.out}")
    return 0


def _backbone_rows(args: argparse.Namespace, name: str, taps: tuple[str, ...], size: int,
                   reference: float) -> tuple[list[dict], dict]:
    """One backbone's rows of ``--backbones`` (one per batch size) and its row of bfloat16 errors."""
    import torch_reference

    rows = []
    gflop = backbone_benchmark.gflop_per_image(name, taps, size)
    mib = {"jaxad_mib": backbone_benchmark.weight_bytes(name, taps) / 2**20,
           "torch_mib": torch_reference.weight_bytes(name, taps) / 2**20}
    for batch in backbone_benchmark.BATCHES:
        torch_calls, no_compile = _torch_calls(args, name, taps, size, batch)
        calls = {"jaxad": backbone_benchmark.extraction(name, taps, size, batch),
                 "jaxad_bf16": backbone_benchmark.extraction(name, taps, size, batch, jnp.bfloat16),
                 **torch_calls}
        if compilation.cpu_options():
            calls["jaxad_xla_defaults"] = backbone_benchmark.extraction(name, taps, size, batch, xla_defaults=True)
        row = {"backbone": name, "taps": "+".join(taps), "size": size, "batch": batch, "gflop": gflop,
               "torch_compile": no_compile, **mib}
        seconds = timing.interleaved_median_seconds(calls, backbone_benchmark.ROUNDS, backbone_benchmark.PER_ROUND)
        row.update({side: batch / s for side, s in seconds.items()})
        row["jaxad_gflops"] = row["jaxad"] * gflop
        row["of_matmul"] = row["jaxad_gflops"] / reference
        row["jaxad_over_torch"] = row["jaxad"] / row["torch_eager"]
        row["jaxad_over_xla_defaults"] = row["jaxad"] / row["jaxad_xla_defaults"] if "jaxad_xla_defaults" in row else "–"
        compiled = row["torch_compile"]
        row["jaxad_over_compile"] = row["jaxad"] / compiled if isinstance(compiled, float) else "–"
        rows.append(row)
        print(row, flush=True)
    errors = backbone_benchmark.bfloat16_error(name, taps, size)
    return rows, {"backbone": name, **{f"max_rel_err {t}": e for t, e in errors.items()}}


def backbone_stages(args: argparse.Namespace, command: str) -> int:
    """Times forwards that stop at each tap in turn; a stage's time is the difference between the
    forward to its tap and the forward to the tap before."""
    rows = []
    section = args.section or f"backbone-stages-{jax.default_backend()}"
    for name, taps, size in _benchmarked_backbones(args):
        rows += timing.in_own_process(_stage_rows, args, name, taps, size)
        benchmark.write_section(args.out, section, _stage_section(rows, command, args.note))
    print(f"wrote section {section!r} of {args.out}")
    return 0


def _stage_rows(args: argparse.Namespace, name: str, taps: tuple[str, ...], size: int) -> list[dict]:
    """One backbone's rows of ``--backbones --per-tap``: the forward to each of its taps in turn."""
    import torch_reference

    rows, previous = [], {}
    batch = backbone_benchmark.STAGE_BATCH
    for tap in backbone_benchmark.stages(name, taps[-1]):
        if not torch_reference.reaches(name, tap):
            continue
        torch_calls, no_compile = _torch_calls(args, name, (tap,), size, batch)
        calls = {"jaxad": backbone_benchmark.extraction(name, (tap,), size, batch), **torch_calls}
        seconds = timing.interleaved_median_seconds(calls, backbone_benchmark.STAGE_ROUNDS,
                                                    backbone_benchmark.PER_ROUND)
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
        f"## Feature extraction per stage: jaxad (jit) against torchvision/timm, batch {backbone_benchmark.STAGE_BATCH}, milliseconds", "",
        *report.provenance(command, f"{benchmark.machine()}, torch threads = CPU cores"), "",
        report.markdown_table(rows, columns), "",
        "Each row times forwards that stop at `tap` (random weights; the backbone's input size in the "
        "methods' settings) on every side, each backbone in a Python process of its own, in "
        f"{backbone_benchmark.STAGE_ROUNDS} alternating rounds of {backbone_benchmark.PER_ROUND} calls each. "
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


def _backbone_section(rows: list[dict], errors: list[dict], matmul_gflops: float, command: str,
                      note: str = "") -> str:
    columns = ["backbone", "taps", "size", "batch", "gflop", "jaxad", "jaxad_gflops", "of_matmul", "jaxad_bf16",
               "jaxad_xla_defaults", "torch_eager", "torch_compile", "jaxad_over_torch", "jaxad_over_compile",
               "jaxad_over_xla_defaults", "jaxad_mib", "torch_mib"]
    return "\n".join([
        "## Feature extraction: jaxad (jit) against torchvision/timm, images per second", "",
        *report.provenance(command, f"{benchmark.machine()}, torch threads = CPU cores"), "",
        report.markdown_table(rows, columns), "",
        "Random weights; the forward stops at the deepest tap on both sides (torchvision's "
        "create_feature_extractor; timm's features_only model, which would run all its blocks, cut after the "
        "deepest tap's). Each backbone is timed in a Python process of its own. Each row times its sides in "
        f"{backbone_benchmark.ROUNDS} alternating rounds of {backbone_benchmark.PER_ROUND} calls each and "
        "takes each side's median call, so a slow phase of the machine slows every side alike. `gflop`: XLA's count of floating-point "
        "operations per image; `jaxad_gflops`: the rate the jaxad forward achieves; `of_matmul`: that "
        f"rate over the rate of a 2048×2048 float32 matmul on the same machine in the same run "
        f"({matmul_gflops:.0f} GFLOP/s). `jaxad_mib`: the backbone's variables loaded for the row's taps "
        "(the layers up to the deepest tap; on CPU plus the transformed Winograd kernels, 4× the size of the "
        "3×3 kernels they stand for); `torch_mib`: the torch extractor's parameters and buffers. "
        f"`jaxad_xla_defaults`: the same forward compiled by plain `jax.jit`, without the XLA:CPU options "
        f"jaxad compiles its programs with ({_options_text()}; `jaxad.compilation`); "
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
        f"over pairs of images (`backbones.registry.CPU_MICRO_BATCH` = {backbones.registry.CPU_MICRO_BATCH}) "
        "so that each pair's maps stay in the cache; torch takes the batch of 16 at once.", "",
        "bfloat16 computes in bf16 with float32 parameters and outputs; it gains nothing on a CPU "
        "without native bf16 arithmetic. Its error on the tapped maps (max |bf16 − f32| / max |f32|):", "",
        report.markdown_table(errors, sorted({k for e in errors for k in e}, key=lambda k: (k != "backbone", k))),
        *(["", note] if note else []),
    ])


def coreset(args: argparse.Namespace, command: str) -> int:
    rows = []
    for n in (100_000, 1_000_000):
        for ratio in (0.01, 0.1):
            rows.append(distance_benchmark.coreset_speed(n, ratio, budget_s=args.coreset_budget))
            print(f"n={n} ratio={ratio}: {rows[-1]['seconds']:.1f} s ({rows[-1]['how']})", flush=True)
    section = args.section or "coreset"
    body = "\n".join([
        "## Greedy coreset subsampling (d=152 projected to 128, on device)", "",
        *report.provenance(command, benchmark.machine()), "",
        report.markdown_table(rows, ["n", "ratio", "coreset", "seconds", "how", "ms_per_step", "gb_per_s"]), "",
        "Each greedy step reads every projected point once, so it is memory-bound: gb_per_s is the "
        "achieved read bandwidth. 'extrapolated' rows were not run to the end: setup plus per-step cost "
        f"from two short runs, because the full run was predicted to exceed {args.coreset_budget:.0f} s.",
    ])
    benchmark.write_section(args.out, section, body)
    print(f"wrote section {section!r} of {args.out}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
