"""Fit CRD-method variants (JSON ``{name: [--config.KEY=VALUE, ...]}``) through the pipeline on one
dataset, each into WORKDIR/PROCESS/NAME (PROCESS: this process's index; only 0 may write anything), in one
process or as one of several (the flags of scripts/fit.py):

    python tests/fit_distances.py DATA WORKDIR VARIANTS_JSON [--coordinator HOST:PORT --num-processes N --process-id I]

Run by tests/test_distributed.py to compare the same fits on different device and process counts.
"""

import argparse
import json
from pathlib import Path

import jax

from jaxad import cli, pipeline
from jaxad.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("variants", type=json.loads)
    cli.add_distributed_arguments(parser)
    args = parser.parse_args()
    cli.join_processes(args)
    base = load_config(ROOT / "configs" / "crd.py")
    for name, overrides in args.variants.items():
        pipeline.run(apply_overrides(base, overrides), args.data, args.workdir / str(jax.process_index()) / name)


if __name__ == "__main__":
    main()
