"""Score new images with a fitted workdir: one line "SCORE PATH" per image, maps as PNGs.

    python scripts/predict.py --workdir DIR [--out DIR] IMAGE_OR_FOLDER [...]

A folder stands for every image under it. ``--out`` must be a new or empty folder, or one that
predict wrote before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxad import cli, pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="where maps go (default: WORKDIR/predictions)")
    parser.add_argument("images", type=Path, nargs="+", help="image files, or folders of them")
    args = parser.parse_args()
    out = args.out if args.out is not None else args.workdir / "predictions"
    images = pipeline.input_images(args.images)
    for path, score in zip(images, pipeline.predict_files(args.workdir, images, out)):
        print(f"{score:.6g} {path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
