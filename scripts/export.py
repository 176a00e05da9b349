"""Export a fitted workdir as one file that predicts with jax and numpy alone.

    python scripts/export.py --workdir DIR --out model.jaxad [--batch-size N] [--input-size H W] [--platform cpu ...]

The file holds the whole decision (decoding, resize, backbone, method, maps, the calibrated
normalisation and threshold) as a ``jax.export`` program and its weights. Load it anywhere with
``jaxad.deploy.load("model.jaxad")(images) -> (scores, labels, maps)`` on uint8 images of the
input size (default: the config's image size), any number of them; ``--batch-size N`` fixes the
program to N images per call instead (the loader pads the last batch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxad import cli, deploy, export


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, help="fix the program to N images per call (default: any number)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="size of the images it takes (default: the config's image size)")
    parser.add_argument("--platform", action="append", dest="platforms",
                        help="cpu, cuda, rocm or tpu; repeat for several (default: this machine's)")
    args = parser.parse_args()
    out = export.export(args.workdir, args.out, args.batch_size, args.input_size,
                        tuple(args.platforms) if args.platforms else None)
    model = deploy.load(out)
    batch = "any number of" if model.batch_size is None else f"batches of {model.batch_size}"
    print(f"{out}: {model.meta['method']}, {batch} uint8 images "
          f"{model.input_size[0]}x{model.input_size[1]}, platforms {', '.join(model.meta['platforms'])}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
