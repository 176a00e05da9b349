"""Benchmark methods on every dataset under a root and write the results into BENCHMARKS.md.

    python scripts/bench.py --method crd [--data-root ../shared/data] \
        [--variant NAME:KEY=VALUE,KEY=VALUE ...] [--out BENCHMARKS.md] [--section NAME]

Each dataset folder under --data-root (a category in MVTec layout) is fitted and evaluated with
every variant; the table (accuracy, fit time, predict throughput, state size) replaces the
section NAME of --out. Without --data-root: ../shared/data when present, else the synthetic set
(also chosen by --data-root synthetic).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from jaxad import benchmark, cli
from jaxad.config import config_path, load_config
from jaxad.data import find_categories, synthetic

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="crd")
    parser.add_argument("--data-root", help="folder of datasets, one category, or 'synthetic'")
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--section", help="section name in --out (default: METHOD-DATAROOTNAME)")
    args = parser.parse_args()
    shared = ROOT.parent / "shared" / "data"
    if args.data_root == "synthetic" or (args.data_root is None and not shared.is_dir()):
        root = synthetic.ensure()
    else:
        root = Path(args.data_root) if args.data_root else shared
    datasets = [c for d in sorted(p for p in root.iterdir() if p.is_dir()) for c in find_categories(d)] \
        if not (root / "train").is_dir() else [root]
    configs = benchmark.variants(load_config(config_path(args.method, ROOT / "configs")), args.variant)
    rows = benchmark.run(configs, datasets)
    command = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = args.section or f"{args.method}-{root.resolve().name}"
    title = f"{args.method} on {root.resolve().name}"
    benchmark.write_section(args.out, section, benchmark.accuracy_section(title, command, rows))
    print(f"wrote section {section!r} of {args.out}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
