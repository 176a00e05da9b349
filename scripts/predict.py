"""Decide on new images with a fitted workdir: a table of score, decision and raw score per image.

    python scripts/predict.py --workdir DIR [--out DIR | --no-overlays] [--json | --csv] IMAGE_OR_FOLDER [...]

``score`` is normalised by the thresholds stored at fit time (0.5 is the threshold, 0 the lowest
score of a normal calibration image), ``anomalous``/``normal`` is the decision and ``raw`` the
method's own score. A folder stands for every image under it; images stream in batches with a
progress bar on stderr. Overlays (the normalised map on a fixed 0–1 colour scale, the predicted
defect outlined) go to ``--out`` (default DIR/predictions), which must be a new or empty folder or
one that predict wrote before.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from jaxad import cli, pipeline

COLUMNS = ("score", "decision", "raw_score", "path")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="where overlays go (default: WORKDIR/predictions)")
    where.add_argument("--no-overlays", action="store_true", help="write no overlay images")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print one JSON list of objects instead of a table")
    form.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    parser.add_argument("images", type=Path, nargs="+", help="image files, or folders of them")
    args = parser.parse_args()
    out = None if args.no_overlays else args.out if args.out is not None else args.workdir / "predictions"
    images = pipeline.input_images(args.images)
    rows = ({"score": p.score, "decision": "anomalous" if p.anomalous else "normal", "raw_score": p.raw_score,
             "path": str(p.path)} for p in pipeline.predict_files(args.workdir, images, out))
    if args.json:
        json.dump(list(rows), sys.stdout, indent=1)
        print()
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    else:
        print(f"{'score':>6}  {'decision':<9}  {'raw score':>11}  path")
        for row in rows:
            print(f"{row['score']:6.3f}  {row['decision']:<9}  {row['raw_score']:11.5g}  {row['path']}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
