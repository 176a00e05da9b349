"""Score new images with a fitted workdir: one line "SCORE PATH" per image, maps as PNGs.

    python scripts/predict.py --workdir DIR [--out DIR] IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxad import cli, pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="where maps go (default: WORKDIR/predictions)")
    parser.add_argument("images", type=Path, nargs="+")
    args = parser.parse_args()
    out = args.out if args.out is not None else args.workdir / "predictions"
    for path, score in zip(args.images, pipeline.predict_files(args.workdir, args.images, out)):
        print(f"{score:.6g} {path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
