"""Choose a training schedule on the validation curve: held-out training images with synthetic anomalies.

A grid (``image_size=128,256 lr=1e-4,3e-4``) crossed with a number of steps gives one fit per
point, each with ``validate_every`` set, so its ``train_history.json`` holds validation image and
pixel AUROC every few steps. Each validated step of each fit is a candidate schedule (image size,
lr, steps); the one with the best validation image + pixel AUROC wins (detection and localisation
both count, as for CRD's λ), and candidates within ``tie`` of the best count as tied, the cheapest
(steps × pixels per image) winning. Only the training split is
read: the test images and masks are never opened.

A prefix of a long fit stands in for a shorter fit only approximately: lr drops ×0.1 at 95 % of
``train_steps``, so a shorter schedule would have had its drop earlier.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxad import pipeline
from jaxad.bench import harness
from jaxad.config import apply_overrides
from jaxad.data import open_dataset
from jaxad.errors import ConfigError
from jaxad.eval import report

HISTORY = "train_history.json"
RUN_FILE = "schedule.json"  # the overrides a run was fitted with, so a finished run is reused
TIE = 0.005  # validation image + pixel AUROCs closer than this to the best count as equal (cheaper wins)


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["image_size=128,256", "lr=1e-4"]`` → ``{"image_size": ["128", "256"], "lr": ["1e-4"]}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, values = harness.parse_values("--schedule", spec)
        if key in grid:
            raise ConfigError(f"--schedule {spec}: {key} is given twice")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[str]], steps: int, validate_every: int) -> list[dict[str, str]]:
    """Every combination of the grid's values, each with ``train_steps`` and ``validate_every``."""
    keys = sorted(grid)
    fixed = {"train_steps": str(steps), "validate_every": str(validate_every)}
    return [{**dict(zip(keys, values)), **fixed} for values in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict[str, str]) -> str:
    return "_".join(f"{k}={v}" for k, v in sorted(point.items()) if k not in ("validate_every",))


def fit_training_split(config: ml_collections.ConfigDict, category: Path, workdir: Path) -> dict:
    """Fit on the category's training images as a benchmark fit would (same held-out images), write
    the run's ``train_history.json`` into ``workdir`` and return it; nothing is evaluated."""
    dataset, _, _ = pipeline.split_for_calibration(config, open_dataset(category))
    config = ml_collections.ConfigDict(config.to_dict())
    config.data, config.workdir = str(Path(category).resolve()), str(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline.check_shared_settings(config)
    _, seconds = pipeline.fit(config, dataset, pipeline.load_backbone(config))
    record = json.loads((workdir / HISTORY).read_text())
    record["fit_seconds"] = seconds
    (workdir / HISTORY).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_points(base: ml_collections.ConfigDict, points: list[dict[str, str]], category: Path,
               runs_dir: Path) -> dict[str, dict]:
    """Fit each grid point one after the other into ``runs_dir/NAME``; a run already finished with the
    same settings (its ``schedule.json`` and ``train_history.json``) is read instead of fitted again."""
    records = {}
    for point in points:
        workdir = runs_dir / run_name(point)
        settings = {"category": str(Path(category).resolve()), "overrides": point}
        done = workdir / RUN_FILE
        if done.is_file() and (workdir / HISTORY).is_file() and json.loads(done.read_text()) == settings:
            records[run_name(point)] = json.loads((workdir / HISTORY).read_text())
            continue
        shutil.rmtree(workdir, ignore_errors=True)
        config = apply_overrides(base, [f"--config.{k}={v}" for k, v in point.items()])
        records[run_name(point)] = fit_training_split(config, category, workdir)
        done.write_text(json.dumps(settings, indent=2) + "\n")
    return records


def candidates(points: list[dict[str, str]], records: dict[str, dict]) -> list[dict[str, Any]]:
    """One candidate schedule per validated step of each run, with its cost (steps × pixels)."""
    out = []
    for point in points:
        size = int(point.get("image_size", 0)) or None
        for h in records[run_name(point)]["history"]:
            if "val_image_auroc" not in h:
                continue
            out.append({"run": run_name(point), "image_size": size, "lr": point.get("lr"), "steps": h["step"],
                        "val_image_auroc": h["val_image_auroc"], "val_pixel_auroc": h["val_pixel_auroc"],
                        "val_auroc_sum": h["val_image_auroc"] + h["val_pixel_auroc"], "cost": h["step"] * (size or 1) ** 2})
    return out


def choose(found: list[dict[str, Any]], tie: float = TIE) -> dict[str, Any]:
    """The cheapest candidate among those within ``tie`` of the best validation image + pixel AUROC."""
    if not found:
        raise ConfigError("no validated step in any run: set --steps to at least validate_every")
    best = max(c["val_auroc_sum"] for c in found)
    return min((c for c in found if c["val_auroc_sum"] >= best - tie), key=lambda c: (c["cost"], -c["val_auroc_sum"]))


def section(title: str, command: str, points: list[dict[str, str]], records: dict[str, dict],
            found: list[dict[str, Any]], chosen: dict[str, Any], plots: list[Path], link_root: Path,
            note: str) -> str:
    """Markdown: what ran, each run's final validation numbers and fit time, the curves, the choice."""
    runs = [{"run": run_name(p), "fit_seconds": records[run_name(p)].get("fit_seconds"),
             **{k: v for k, v in records[run_name(p)]["history"][-1].items() if k.startswith("val_")}}
            for p in points]
    lines = [f"## {title}", "", *report.provenance(command, harness.machine()), "",
             ("Validation: the method's held-out training images and a copy of each with a synthetic anomaly "
             "(never the test split). Each validated step of a run is a candidate schedule; the best validation "
             f"image + pixel AUROC wins, ties (within {TIE}) going to the fewest steps × pixels. lr drops ×0.1 at 95 % of "
             "a run's steps, so an earlier step of a run approximates a shorter schedule."), "",
             report.markdown_table(runs, ["run", "val_image_auroc", "val_pixel_auroc", "fit_seconds"]), "",
             "Every candidate (a run's validated step):", "",
             report.markdown_table(found, ["run", "steps", "val_image_auroc", "val_pixel_auroc", "val_auroc_sum"]), "",
             (f"**Chosen:** image_size={chosen['image_size']}, lr={chosen['lr']}, train_steps={chosen['steps']} "
             f"(validation image AUROC {chosen['val_image_auroc']:.4f}, pixel {chosen['val_pixel_auroc']:.4f}; "
             f"{len(found)} candidates)."), ""]
    if note:
        lines += [note, ""]
    lines += [f"![{p.stem}]({p.relative_to(link_root).as_posix()})" for p in plots]
    return "\n".join(lines)


def save_curves(points: list[dict[str, str]], records: dict[str, dict], plots_dir: Path) -> list[Path]:
    """One PNG of validation image AUROC against step for every run, one of pixel AUROC."""
    paths = []
    for metric in ("image", "pixel"):
        series = {}
        for point in points:
            history = [h for h in records[run_name(point)]["history"] if f"val_{metric}_auroc" in h]
            series[run_name(point)] = ([h["step"] for h in history], [h[f"val_{metric}_auroc"] for h in history])
        paths.append(report.save_line_plot(plots_dir / f"validation_{metric}_auroc.png", series, "step",
                                           f"validation {metric} AUROC (synthetic anomalies)",
                                           f"{metric} AUROC on held-out training images"))
    return paths


def write_schedule(out: Path, section_name: str, command: str, base: ml_collections.ConfigDict, category: Path,
                   grid_specs: Sequence[str], steps: int, validate_every: int, runs_dir: Path,
                   note: str = "") -> dict[str, Any]:
    """Fit the grid, choose the schedule on the validation curves, write section ``section_name`` of
    ``out`` with the curves under ``benchmarks/SECTION``; returns the chosen candidate."""
    points = grid_points(parse_grid(grid_specs), steps, validate_every)
    records = run_points(base, points, category, runs_dir)
    found = candidates(points, records)
    chosen = choose(found)
    plots = save_curves(points, records, Path(out).parent / "benchmarks" / section_name)
    title = f"{base.method} schedule on {Path(category).resolve().name} (validation only)"
    harness.write_section(out, section_name, section(title, command, points, records, found, chosen, plots,
                                                     Path(out).parent, note))
    return chosen
