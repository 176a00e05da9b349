"""Accuracy and speed of methods over datasets, written as sections of BENCHMARKS.md.

Every number in BENCHMARKS.md comes from here. Each run rewrites only its own section (between
``<!-- begin NAME -->`` and ``<!-- end NAME -->``), so benchmarks of different kinds live in one
file and can be refreshed independently; the command that produced a section is printed in it.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxad import backbones, checkpoint, pipeline, report
from jaxad.config import apply_overrides

COLUMNS = [
    "dataset", "method", "variant", "image_auroc", "pixel_auroc", "aupro", "pixel_ap",
    "n_train", "n_test", "fit_seconds", "predict_images_per_second", "state_bytes",
]


def machine() -> str:
    """One line saying where the numbers were measured."""
    devices = jax.devices()
    return (f"{platform.machine()} with {os.cpu_count()} CPU cores, {len(devices)}× {devices[0].device_kind} "
            f"({jax.default_backend()}), jax {jax.__version__}")


def state_bytes(workdir: Path) -> int:
    """Bytes of the saved state (what a deployment must keep)."""
    return sum(p.stat().st_size for p in (workdir / "state").rglob("*") if p.is_file())


def run(
    configs: dict[str, ml_collections.ConfigDict],
    datasets: Sequence[Path],
    workroot: Path | None = None,
) -> list[dict[str, Any]]:
    """Fit and evaluate every (variant, dataset); returns one row each."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workroot) if workroot is not None else Path(tmp)
        for variant, config in configs.items():
            bb = backbones.load(config.backbone, config.weights or None)
            for data in datasets:
                workdir = root / f"{variant}-{data.name}"
                result = pipeline.run_category(config, data, workdir, bb)
                rows.append({
                    **result, "dataset": data.name, "variant": variant,
                    "state_bytes": state_bytes(checkpoint.prepare_workdir(workdir)),
                })
    return rows


def variants(base: ml_collections.ConfigDict, specs: Sequence[str]) -> dict[str, ml_collections.ConfigDict]:
    """``NAME:KEY=VALUE,KEY=VALUE`` strings → named configs (``default`` when none are given)."""
    if not specs:
        return {"default": base}
    out = {}
    for spec in specs:
        name, _, body = spec.partition(":")
        overrides = [f"--config.{kv}" for kv in body.split(",") if kv]
        out[name] = apply_overrides(base, overrides)
    return out


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of the markdown file ``path``."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery section below is written by `scripts/bench.py`; rerun the command it shows to reproduce it.\n"
    block = f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def accuracy_section(title: str, command: str, rows: list[dict[str, Any]], notes: str = "") -> str:
    """Markdown for one benchmark run: what ran where, the table, per-defect AUROCs."""
    lines = [
        f"## {title}", "",
        f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Date: {time.strftime('%Y-%m-%d')}", "",
        report.markdown_table(rows, COLUMNS), "",
    ]
    per_defect = [
        {"dataset": r["dataset"], "variant": r["variant"], **{k: v for k, v in r["per_defect_image_auroc"].items()}}
        for r in rows if "per_defect_image_auroc" in r
    ]
    if per_defect:
        groups = sorted({k for r in per_defect for k in r} - {"dataset", "variant"})
        lines += ["Image AUROC per defect type (each type against all good test images):", "",
                  report.markdown_table(per_defect, ["dataset", "variant", *groups]), ""]
    if notes:
        lines += [notes, ""]
    return "\n".join(lines)

