"""Fit a method on normal images, save it, and evaluate it when there is a test split.

    python scripts/fit.py --method crd [--data DIR] [--workdir DIR] [--config.KEY=VALUE ...]

DIR is one category (DIR/train/good, MVTec AD or LOCO layout, or a plain folder of normal images)
or a folder of categories. Without --data the built-in synthetic dataset is generated (cached)
and used.

The same command fits over several processes (hosts of a TPU pod slice, or processes on one
machine) when each is started with --coordinator HOST:PORT --num-processes N --process-id I (or
--coordinator auto on a TPU pod slice): each reads its share of the training images, a step's
batch is --config.batch_size images per process, and process 0 writes the workdir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from jaxad import cli, pipeline
from jaxad.data import synthetic
from jaxad.eval import report

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    argv, overrides = cli.split_overrides(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(parser)
    parser.add_argument("--data", type=Path, help="dataset folder (default: the synthetic dataset)")
    parser.add_argument("--workdir", type=Path, help="output folder (default: runs/METHOD-DATANAME)")
    cli.add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    cli.join_processes(args)
    config = cli.resolve_config(args, overrides, ROOT / "configs")
    data = args.data if args.data is not None else synthetic.ensure()
    workdir = args.workdir if args.workdir is not None else ROOT / "runs" / f"{config.method}-{data.resolve().name}"
    results = pipeline.run(config, data, workdir)
    if jax.process_index() > 0:
        return 0
    columns = ["category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "n_train", "fit_seconds", "predict_images_per_second"]
    print(report.markdown_table(results, [c for c in columns if any(c in r for r in results)]))
    print(f"written to {workdir}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
