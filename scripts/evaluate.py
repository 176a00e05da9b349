"""Reload a fitted workdir and evaluate it again.

    python scripts/evaluate.py --workdir DIR [--data DIR]

Without --data the data the model was fitted on is used; the metrics are printed and written to
DIR/metrics.json: the threshold-free ones (AUROC, AUPRO, AP) and the accuracy, precision and recall
of the decisions the thresholds stored at fit time make (DIR/calibration.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxad import checkpoint, cli, pipeline
from jaxad.checkpoint import fitted_runs
from jaxad.eval import report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="test data (default: the data the model was fitted on)")
    args = parser.parse_args()
    runs = [args.workdir] if (args.workdir / "config.json").is_file() else fitted_runs(args.workdir) or [args.workdir]
    results = []
    for run in runs:
        data = args.data / run.name if args.data is not None and len(runs) > 1 else args.data
        result = pipeline.reevaluate(run, data)
        previous = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        result = {**previous, **result, "category": previous.get("category", run.name)}
        checkpoint.write_text(run / "metrics.json", json.dumps(result, indent=2, default=float) + "\n")
        results.append(result)
    rows = [{**r, **{f"{k}_{side}": r[f"{side}_decisions"][k] for side in ("image", "pixel") if f"{side}_decisions" in r
                     for k in ("accuracy", "precision", "recall")}} for r in results]
    columns = ["category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "accuracy_image", "precision_image",
               "recall_image", "precision_pixel", "recall_pixel", "predict_images_per_second"]
    print(report.markdown_table(rows, [c for c in columns if any(c in r for r in rows)]))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
