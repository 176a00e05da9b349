"""Benchmark methods on every dataset under a root and write the results into BENCHMARKS.md.

    python scripts/bench.py --method crd [--method padim ...] [--data-root ../shared/data]
        [--variant [METHOD/]NAME:KEY=VALUE,KEY=VALUE ...] [--no-default] [--out BENCHMARKS.md] [--section NAME]
    python scripts/bench.py --distances [--max-n 10000000] [--section NAME]
    python scripts/bench.py --coreset [--coreset-budget 300] [--section NAME]
    python scripts/bench.py --sweep lam=1e-4,1e-3,... [--method crd] [--variant ...] [--data-root ...] [--section NAME]
    python scripts/bench.py --scale [--scale-distances crd,nn] [--scale-max-n 1e9] [--scale-budget 1500] [--scale-nn-gb 4]
        [--section NAME]
    python scripts/bench.py --backbones [--per-tap] [--backbone NAME ...] [--no-compile] [--section NAME]
    python scripts/bench.py --anomalib-padim --data-root CATEGORY [--train-count 32] [--section NAME]
    python scripts/bench.py --import-from OTHER/BENCHMARKS.md --section NAME [--out BENCHMARKS.md]
    python scripts/bench.py --summary [--section NAME --replaces OLD ...]
    python scripts/bench.py --method paap --select feature_sigma=0,4,8 [--data-root DIR] [--section NAME]
    python scripts/bench.py --method efficientad --data-root CATEGORY --schedule KEY=V1,V2 ... --steps N
        [--validate-every 100] --section NAME

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

--scale streams generated features (no dataset) through global CRD's Gram up to --scale-max-n
patches at d = 152, and through exact and 1%-coreset nearest neighbour as far as their bank fits
--scale-nn-gb: fit throughput, peak host and device memory, score time, plots, and projections to
d = 1536 and a TPU v5e-8 (jaxad/bench/scale.py). --scale-distances picks what runs: any of crd, crd-blocks,
crd-location, kernel_crd, mahalanobis (the protocol distances) and nn; each goes as far as --scale-budget allows.

--sweep scores every candidate λ of CRD (or kernel CRD) from one eigendecomposition per dataset, in one
compiled call for all candidates and datasets (jaxad/bench/sweep.py): image AUROC, pixel AUROC and AUPRO
against λ, a table and a plot per dataset. It reads the test set: a research curve, never a default.

--select KEY=V1,V2,... fits each method once per value on the training images less a held-out
20% and scores those held-out images, clean and with pasted synthetic anomalies, then writes the
curve and the chosen value (jaxad/bench/select.py); the test split is never read.

--schedule fits one method on one category for every combination of the values (each --steps long,
validated every --validate-every steps on held-out training images with synthetic anomalies), and
writes the validation curves and the schedule they choose (jaxad/bench/schedule.py); the test split
is never read.

--anomalib-padim fits jaxad's PaDiM and anomalib's on the same EfficientNet-Lite0 weights, channels and
--train-count training images of one category, and times their predictions interleaved in one process
at batch 1 and 16 (jaxad/bench/anomalib_padim.py; run it where anomalib is installed).

--import-from copies section NAME of a BENCHMARKS.md written on another machine (a GPU, a TPU VM),
with the plots folder benchmarks/NAME beside it, into --out as it is.

Every run regenerates the summary at the top of --out: method x dataset x machine with each one's
latest default-config row (image AUROC, pixel AUROC, AUPRO, latency), an index of the sections,
and the retired ones; --summary regenerates only that. --replaces OLD (repeatable) retires section
OLD, and its plots folder, as replaced by the section this run writes (with --summary: by the
existing section --section NAME); the summary lists it with the section that replaced it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from jaxad import cli
from jaxad.bench import anomalib_padim, backbone_speed, distance_speed, harness, scale, schedule, select, summary, sweep
from jaxad.config import config_path, load_config
from jaxad.data import synthetic

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
    parser.add_argument("--select", metavar="KEY=V1,V2,...",
                        help="choose KEY among the values on held-out training images with synthetic anomalies")
    parser.add_argument("--sweep", metavar="lam=V,V,...", help="accuracy against λ for CRD, all candidates in one program")
    parser.add_argument("--distances", action="store_true", help="run the distance micro-benchmark instead")
    parser.add_argument("--max-n", type=float, default=1e7, help="largest bank for d=152 (d=1536 stops 10x lower)")
    parser.add_argument("--flop-budget", type=float, default=2e11, help="NN FLOPs timed per measurement (raise on accelerators)")
    parser.add_argument("--coreset", action="store_true", help="time greedy coreset subsampling instead")
    parser.add_argument("--coreset-budget", type=float, default=300.0, help="seconds a timed coreset run may take")
    parser.add_argument("--scale", action="store_true", help="fit throughput and memory against n, to 10^9 patches")
    parser.add_argument("--scale-max-n", type=float, default=1e9, help="with --scale: largest number of patches")
    parser.add_argument("--scale-budget", type=float, default=1500.0,
                        help="with --scale: seconds a streaming fit may take; a longer one is extrapolated")
    parser.add_argument("--scale-distances", default=",".join(scale.DEFAULT_NAMES),
                        help="with --scale: comma-separated distances (keys of jaxad.bench.scale.DISTANCES, and nn)")
    parser.add_argument("--scale-nn-gb", type=float, default=4.0, help="with --scale: largest nearest-neighbour bank (GiB)")
    parser.add_argument("--backbones", action="store_true", help="time feature extraction per backbone instead")
    parser.add_argument("--no-compile", action="store_true", help="with --backbones: skip torch.compile")
    parser.add_argument("--backbone", action="append", help="with --backbones: only this one (repeatable)")
    parser.add_argument("--per-tap", action="store_true",
                        help="with --backbones: time batch-1 forwards to each tap in turn (time per stage)")
    parser.add_argument("--anomalib-padim", action="store_true",
                        help="time jaxad's PaDiM against anomalib's on --data-root CATEGORY (needs anomalib)")
    parser.add_argument("--train-count", type=int, default=32,
                        help="with --anomalib-padim: training images both PaDiMs are fitted on")
    parser.add_argument("--schedule", nargs="+", metavar="KEY=V1,V2",
                        help="choose a schedule on the validation curve over these values (one method, one category)")
    parser.add_argument("--steps", type=int, default=600, help="with --schedule: train_steps of every fit")
    parser.add_argument("--validate-every", type=int, default=100, help="with --schedule: steps between validations")
    parser.add_argument("--import-from", type=Path,
                        help="copy --section from this BENCHMARKS.md (written on another machine) into --out")
    parser.add_argument("--summary", action="store_true", help="only regenerate the summary at the top of --out")
    parser.add_argument("--replaces", action="append", default=[], metavar="OLD",
                        help="retire section OLD as replaced by the section written (with --summary: by --section)")
    args = parser.parse_args()
    command = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.section == summary.NAME:
        raise SystemExit(f"--section {summary.NAME}: that name is the generated summary's")
    summary.require_sections(args.out, args.replaces)  # before a run of hours, not after
    if args.summary or args.import_from:
        if not args.section and (args.import_from or args.replaces):
            raise SystemExit("--import-from and --summary --replaces need --section NAME")
        if args.import_from:
            harness.import_section(args.import_from, args.out, args.section)
            print(f"imported section {args.section!r} of {args.import_from} into {args.out}")
        section = args.section
    else:
        section = run_benchmark(args, command)
        print(f"wrote section {section!r} of {args.out}")
    if args.replaces:
        summary.retire(args.out, args.replaces, section)
        print(f"retired {', '.join(args.replaces)} (replaced by {section}) in {args.out}")
    summary.write_summary(args.out, ROOT / "configs")
    print(f"regenerated the summary of {args.out}")
    return 0


def run_benchmark(args: argparse.Namespace, command: str) -> str:
    """Run the benchmark the arguments ask for and write its section; returns the section's name."""
    if args.distances:
        return distance_speed.write_distances(args.out, command, args.section, args.max_n, args.flop_budget)
    if args.scale:
        return scale.write_scale(args.out, command, args.section, args.scale_max_n, budget_s=args.scale_budget,
                                 nn_gb=args.scale_nn_gb, names=[n.strip() for n in args.scale_distances.split(",")], note=args.note)
    if args.coreset:
        return distance_speed.write_coreset(args.out, command, args.section, args.coreset_budget)
    if args.schedule:
        return choose_schedule(args, command)
    if args.anomalib_padim:
        if not args.data_root:
            raise SystemExit("--anomalib-padim needs --data-root CATEGORY")
        config = load_config(config_path("padim", ROOT / "configs"))
        return anomalib_padim.write_comparison(args.out, command, config, Path(args.data_root), args.section,
                                               args.train_count, args.note)
    if args.backbones:
        write = backbone_speed.write_stages if args.per_tap else backbone_speed.write_speed
        return write(args.out, command, args.section, args.backbone or (), not args.no_compile, args.note)
    if args.sweep:
        root = data_root(args)
        configs = harness.variants(args.method or ["crd"], args.variant, ROOT / "configs", with_default=not args.no_default)
        return sweep.write_sweep(args.out, command, args.section or f"sweep-lam-{root.resolve().name}", args.sweep,
                                 configs, harness.datasets_under(root), args.note)
    return methods(args, command)


def data_root(args: argparse.Namespace) -> Path:
    """--data-root, else ../shared/data when present, else the synthetic set."""
    shared = ROOT.parent / "shared" / "data"
    if args.data_root == "synthetic" or (args.data_root is None and not shared.is_dir()):
        return synthetic.ensure()
    return Path(args.data_root) if args.data_root else shared


def methods(args: argparse.Namespace, command: str) -> str:
    """Accuracy and speed (or, with --few-shot, accuracy against training-set size) of each method."""
    root = data_root(args)
    datasets = harness.datasets_under(root)
    names = args.method or ["crd"]
    configs = harness.variants(names, args.variant, ROOT / "configs", with_default=not args.no_default)
    section = args.section or f"{'-'.join(names)}-{root.resolve().name}"
    if args.select:
        section = args.section or f"select-{select.parse(args.select)[0]}-{section}"
        select.write_selection(args.out, section, command, configs, datasets, args.select, args.note)
    elif args.few_shot:
        sizes = [0 if s.strip() == "all" else int(s) for s in args.few_shot.split(",")]
        harness.write_few_shot(args.out, section, command, configs, datasets, sizes, args.note)
    else:
        title = f"{', '.join(names)} on {root.resolve().name}"
        harness.write_methods(args.out, section, title, command, configs, datasets, args.note)
    return section


def choose_schedule(args: argparse.Namespace, command: str) -> str:
    """Fit the --schedule grid on one category and write the validation curves and the choice."""
    if len(args.method or []) != 1 or not args.data_root or not args.section:
        raise SystemExit("--schedule needs one --method, --data-root CATEGORY and --section NAME")
    base = load_config(config_path(args.method[0], ROOT / "configs"))
    chosen = schedule.write_schedule(args.out, args.section, command, base, Path(args.data_root), args.schedule,
                                     args.steps, args.validate_every, ROOT / "runs" / "schedule" / args.section,
                                     args.note)
    print(f"chosen: {chosen}")
    return args.section


if __name__ == "__main__":
    cli.run_main(main)
