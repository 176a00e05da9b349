"""Accuracy and speed of methods over datasets, written as sections of BENCHMARKS.md.

Every number in BENCHMARKS.md comes from here. Each run rewrites only its own section (between
``<!-- begin NAME -->`` and ``<!-- end NAME -->``), so benchmarks of different kinds live in one
file and can be refreshed independently; the command that produced a section is printed in it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxad import checkpoint, pipeline
from jaxad.bench import timing
from jaxad.config import apply_overrides, config_path, load_config
from jaxad.data import find_categories, iterate_batches, open_dataset
from jaxad.errors import ConfigError
from jaxad.eval import report

COLUMNS = [
    "dataset", "method", "variant", "image_auroc", "pixel_auroc", "aupro", "pixel_ap",
    "n_train", "n_test", "fit_seconds", "peak_rss_mb", "latency_ms_b1", "images_per_s_b16", "state_bytes",
]
ROWS_FILE = "rows.json"  # a method section's rows with their configs, in benchmarks/SECTION/
LATENCY_REPEATS = 20
THROUGHPUT_BATCH = 16


def machine() -> str:
    """One line saying where the numbers were measured."""
    devices = jax.devices()
    return (f"{platform.machine()} with {os.cpu_count()} CPU cores, {len(devices)}× {devices[0].device_kind} "
            f"({jax.default_backend()}), jax {jax.__version__}")


def state_bytes(workdir: Path) -> int:
    """Bytes of the saved state (what a deployment must keep)."""
    return sum(p.stat().st_size for p in (workdir / "state").rglob("*") if p.is_file())


def speed(config: ml_collections.ConfigDict, predictor, data: Path) -> dict[str, float]:
    """Predict latency at batch 1 (median of 20 after warm-up) and images/s at batch 16.

    Timed on the category's first test (else training) images, model call only: decoding and
    resizing are the same for every method and left out.
    """
    dataset = open_dataset(data)
    samples = (dataset.test or dataset.train)[:THROUGHPUT_BATCH]
    batch = next(iterate_batches(samples, pipeline.image_size(config), THROUGHPUT_BATCH))
    images = np.asarray(batch.images)
    images = images[np.arange(THROUGHPUT_BATCH) % max(int(np.sum(batch.valid)), 1)]  # fill a padded batch
    one = timing.median_seconds(lambda: predictor(images[:1]), LATENCY_REPEATS)
    many = timing.median_seconds(lambda: predictor(images), max(3, LATENCY_REPEATS // 4))
    return {"latency_ms_b1": 1e3 * one, "images_per_s_b16": THROUGHPUT_BATCH / many}


def keep_plots(workdir: Path, plots_dir: Path, stem: str) -> list[Path]:
    """Copy a run's ROC curve and its most anomalous map overlay to ``plots_dir/STEM_*.png``."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    overlays = sorted((workdir / "maps").glob("*.png"))
    defects = [p for p in overlays if not p.name.startswith("good_")]
    for src, name in ((workdir / "roc.png", "roc"), ((defects or overlays or [None])[0], "map")):
        if src is not None and src.is_file():
            kept.append(plots_dir / f"{stem}_{name}.png")
            shutil.copyfile(src, kept[-1])
    return kept


def run(
    configs: dict[tuple[str, str], ml_collections.ConfigDict],
    datasets: Sequence[Path],
    workroot: Path | None = None,
    plots_dir: Path | None = None,
    timed: bool = True,
) -> list[dict[str, Any]]:
    """Fit, evaluate and time every ((method, variant), dataset); returns one row each.

    With ``plots_dir``, each run's ROC curve and one anomaly-map overlay are kept there (row key
    ``plots``); everything else of the run lives in a temporary workdir unless ``workroot`` is given.
    ``timed=False`` skips the latency and throughput measurement.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workroot) if workroot is not None else Path(tmp)
        for (method, variant), config in configs.items():
            bb = pipeline.load_backbone(config)
            for data in datasets:
                workdir = root / f"{method}-{variant}-{data.name}"
                result = pipeline.run_category(config, data, workdir, bb)
                saved = checkpoint.load(workdir)[1]
                rows.append({
                    **result, "dataset": data.name, "method": method, "variant": variant,
                    **(speed(config, pipeline.make_predictor(config, bb, saved), data) if timed else {}),
                    "state_bytes": state_bytes(checkpoint.prepare_workdir(workdir)),
                })
                if plots_dir is not None:
                    rows[-1]["plots"] = keep_plots(workdir, plots_dir, f"{method}-{variant}-{data.name}")
    return rows


def variants(methods: Sequence[str], specs: Sequence[str], config_dir: Path,
             with_default: bool = True) -> dict[tuple[str, str], ml_collections.ConfigDict]:
    """Configs keyed by (method, variant) from ``[METHOD/]NAME:KEY=VALUE,...`` strings.

    A variant with a ``METHOD/`` prefix applies to that method only, one without to every method;
    each method also runs its ``default`` config unless a variant of its own is named ``default``
    or ``with_default`` is false.
    """
    out = {}
    for method in methods:
        base = load_config(config_path(method, config_dir))
        if with_default:
            out[(method, "default")] = base
        for spec in specs:
            head, _, body = spec.partition(":")
            scope, _, name = head.rpartition("/")
            if scope and scope not in methods:
                raise ConfigError(f"--variant {spec}: {scope!r} is not one of the benchmarked methods {list(methods)}")
            if scope in ("", method):
                out[(method, name)] = apply_overrides(base, [f"--config.{kv}" for kv in split_overrides(body) if kv])
    return out


def parse_values(option: str, spec: str) -> tuple[str, list[str]]:
    """``'feature_sigma=0,4,8'`` → ``('feature_sigma', ['0', '4', '8'])``: the one reader of the
    KEY=V1,V2,... specs of --select, --schedule and --sweep, errors named by ``option``."""
    key, _, body = spec.partition("=")
    values = split_overrides(body)
    if not key.strip() or not values or not all(v.strip() for v in values):
        raise ConfigError(f"{option} {spec}: expected KEY=VALUE,VALUE,... with at least one value")
    return key.strip(), [v.strip() for v in values]


def split_overrides(body: str) -> list[str]:
    """``KEY=VALUE,...`` split at the commas outside brackets and quotes, so a tuple value such as
    ``taps=('stage2','stage4')`` stays one override."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return [*parts, body[start:]]


def few_shot(configs: dict[tuple[str, str], ml_collections.ConfigDict], sizes: Sequence[int]
             ) -> dict[tuple[str, str], ml_collections.ConfigDict]:
    """One config per (method, training-set size): ``train_images`` = size (0: every image)."""
    out = {}
    for (method, variant), config in configs.items():
        for size in sizes:
            name = f"n={size or 'all'}" if variant == "default" else f"{variant} n={size or 'all'}"
            out[(method, name)] = apply_overrides(config, [f"--config.train_images={size}"])  # a load_config key
    return out


def few_shot_base(variant: str) -> str:
    """The variant a few-shot row was swept from ("" for the default): ``"x n=5"`` → ``"x"``."""
    return "" if variant.startswith("n=") else variant.rsplit(" n=", 1)[0]


def few_shot_section(title: str, command: str, rows: list[dict[str, Any]], plots: Sequence[Path],
                     link_root: Path, notes: str = "") -> str:
    """Markdown for a few-shot sweep: accuracy against the number of training images."""
    columns = ["dataset", "method", "n_train", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "fit_seconds"]
    table = sorted(rows, key=lambda r: (r["dataset"], r["method"], few_shot_base(r["variant"]), r["n_train"]))
    lines = [f"## {title}", "", *report.provenance(command, machine()), "", report.markdown_table(table, columns), "",
             "Training images drawn at random (seeded) from the normal training set; the test set is whole. "
             + " ".join(f"![{p.stem}]({os.path.relpath(p, link_root)})" for p in plots), ""]
    if notes:
        lines += [notes, ""]
    return "\n".join(lines)


def datasets_under(root: Path) -> list[Path]:
    """Every category folder below ``root`` (``root`` itself when it is one category)."""
    root = Path(root)
    if (root / "train").is_dir():
        return [root]
    return [c for d in sorted(p for p in root.iterdir() if p.is_dir()) for c in find_categories(d)]


def write_methods(out: Path, section: str, title: str, command: str,
                  configs: dict[tuple[str, str], ml_collections.ConfigDict], datasets: Sequence[Path],
                  note: str = "") -> None:
    """Fits, evaluates and times every config on every dataset and writes the section ``section``
    of ``out``, with each run's plots in ``benchmarks/SECTION`` beside it."""
    folder = Path(out).parent / "benchmarks" / section
    rows = run(configs, datasets, plots_dir=folder)
    write_rows(folder / ROWS_FILE, rows, configs)
    write_section(out, section, accuracy_section(title, command, rows, note, link_root=Path(out).parent))


def plain(obj: Any) -> Any:
    """What ``obj`` reads back as from JSON (tuples become lists), so that configs compare by value."""
    return json.loads(json.dumps(obj, default=str))


def write_rows(path: Path, rows: Sequence[dict[str, Any]],
               configs: dict[tuple[str, str], ml_collections.ConfigDict]) -> None:
    """Each row's numbers (the table's columns) with the full config it ran, as JSON: what the
    summary of BENCHMARKS.md reads to tell today's default config from an older or changed one."""
    records = [{**{k: r[k] for k in COLUMNS if k in r}, "config": configs[(r["method"], r["variant"])].to_dict()}
               for r in rows]
    path.write_text(json.dumps(plain(records), indent=1) + "\n")


def write_few_shot(out: Path, section: str, command: str, configs: dict[tuple[str, str], ml_collections.ConfigDict],
                   datasets: Sequence[Path], sizes: Sequence[int], note: str = "") -> None:
    """Image AUROC against the number of normal training images (``sizes``; 0: all of them), one
    plot per dataset, written as the section ``section`` of ``out``."""
    rows = run(few_shot(configs, sizes), datasets, timed=False)
    plots = []
    for data in datasets:
        series: dict[str, tuple[list, list]] = {}
        for r in sorted((r for r in rows if r["dataset"] == data.name), key=lambda r: r["n_train"]):
            label = " ".join(filter(None, [r["method"], few_shot_base(r["variant"])]))
            xs, ys = series.setdefault(label, ([], []))
            xs.append(r["n_train"])
            ys.append(r["image_auroc"])
        plots.append(Path(out).parent / "benchmarks" / section / f"{data.name}_image_auroc.png")
        plots[-1].parent.mkdir(parents=True, exist_ok=True)
        report.save_line_plot(plots[-1], series, "normal training images", "image AUROC",
                              f"few-shot: {data.name}", logx=True)
    title = f"Few-shot: {', '.join(sorted({m for m, _ in configs}))} against training-set size"
    write_section(out, section, few_shot_section(title, command, rows, plots, Path(out).parent, note))


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of the markdown file ``path``."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery section below is written by `scripts/bench.py`; rerun the command it shows to reproduce it.\n"
    block = f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->"
    pattern = _section_pattern(name)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def _section_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- begin {re.escape(name)} -->\n?(.*?)\n?<!-- end {re.escape(name)} -->", re.S)


def import_section(source: Path, target: Path, name: str) -> None:
    """Copy section ``name`` of the markdown file ``source`` into ``target`` (replacing its own),
    with the plots folder ``benchmarks/NAME`` beside ``source``: how sections measured on another
    machine (a GPU, a TPU VM) join this machine's BENCHMARKS.md unchanged."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ConfigError(f"{source}: no such file to import benchmark sections from")
    found = _section_pattern(name).search(source.read_text())
    if found is None:
        raise ConfigError(f"{source}: has no section {name!r}")
    plots = source.parent / "benchmarks" / name
    dest = target.parent / "benchmarks" / name
    if plots.is_dir() and plots.resolve() != dest.resolve():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(plots, dest)
    write_section(target, name, found.group(1))


def _per_defect_table(rows: list[dict[str, Any]], key: str, value: Callable[[Any], float], title: str) -> list[str]:
    """Markdown lines of one per-defect metric (``value`` of each entry of ``row[key]``), or none."""
    table = [{"dataset": r["dataset"], "method": r.get("method", ""), "variant": r["variant"],
              **{d: value(v) for d, v in r[key].items()}} for r in rows if key in r]
    if not table:
        return []
    groups = sorted({k for r in table for k in r} - {"dataset", "method", "variant"})
    return [title, "", report.markdown_table(table, ["dataset", "method", "variant", *groups]), ""]


def _defect_pixel_shares(rows: list[dict[str, Any]]) -> list[str]:
    """One line per dataset: each defect type's share of the test set's defect pixels, the weight a
    type carries in the pooled pixel AUROC and AP (AUPRO averages over defect regions instead)."""
    counts = {r["dataset"]: {d: v["defect_pixels"] for d, v in r["per_defect_pixel"].items()}
              for r in rows if "per_defect_pixel" in r}
    lines = [f"Share of {dataset}'s defect pixels per type (the types' weights in the pooled pixel AUROC and AP): "
             + ", ".join(f"{d} {n / total:.3f}" for d, n in sorted(types.items()))
             for dataset, types in sorted(counts.items()) if (total := sum(types.values())) > 0]
    return [*lines, ""] if lines else []


def _chosen_lambdas(rows: list[dict[str, Any]]) -> list[str]:
    """One line naming the λ each CRD row ran with (chosen by ``lam=auto`` or given) and its ratio
    to G's smallest eigenvalue, the number that says whether λ changed the score at all."""
    chosen = [f"{r['method']}/{r['variant']} {r['dataset']} {r['lam']:.3g} ({r['lam_ratio']:.2g})"
              for r in rows if "lam" in r and "lam_ratio" in r]
    return ["λ (λ / smallest eigenvalue of G, median over groups): " + ", ".join(chosen), ""] if chosen else []


def accuracy_section(title: str, command: str, rows: list[dict[str, Any]], notes: str = "",
                     link_root: Path | None = None) -> str:
    """Markdown for one benchmark run: what ran where, the table, per-defect image AUROC and pixel
    AP, plot links (relative to ``link_root``, the folder of the markdown file)."""
    lines = [
        f"## {title}", "",
        *report.provenance(command, machine()), "",
        report.markdown_table(rows, COLUMNS), "",
    ]
    lines += _per_defect_table(rows, "per_defect_image_auroc", lambda v: v,
                               "Image AUROC per defect type (each type against all good test images):")
    lines += _per_defect_table(rows, "per_defect_pixel", lambda v: v["pixel_ap"],
                               "Pixel AP per defect type (each type's images with all good test images):")
    lines += _defect_pixel_shares(rows)
    lines += _chosen_lambdas(rows)
    plots = [(r, p) for r in rows for p in r.get("plots", [])]
    if plots and link_root is not None:
        lines += ["Plots: " + " · ".join(
            f"[{r['method']}/{r['variant']} {r['dataset']} {p.stem.rsplit('_', 1)[-1]}]({os.path.relpath(p, link_root)})"
            for r, p in plots), ""]
    if notes:
        lines += [notes, ""]
    return "\n".join(lines)

