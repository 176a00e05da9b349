"""Schedule selection on the validation curve: the grid, the choice, and that the test split stays unread."""

import json
from pathlib import Path

import pytest

from jaxad.bench import schedule
from jaxad.config import load_config
from jaxad.data import synthetic
from jaxad.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_grid_crosses_every_value_and_fixes_the_steps():
    points = schedule.grid_points(schedule.parse_grid(["lr=1e-4,3e-4", "image_size=128,256"]), 600, 100)
    assert len(points) == 4 and {p["train_steps"] for p in points} == {"600"}
    assert {(p["image_size"], p["lr"]) for p in points} == {("128", "1e-4"), ("128", "3e-4"), ("256", "1e-4"),
                                                            ("256", "3e-4")}
    assert len({schedule.run_name(p) for p in points}) == 4


@pytest.mark.parametrize("spec", ["lr", "lr=", "=1", "lr=,"])
def test_malformed_grid_is_refused_by_name(spec):
    with pytest.raises(ConfigError, match=f"--schedule {spec}"):
        schedule.parse_grid([spec])


def test_repeated_key_is_refused():
    with pytest.raises(ConfigError, match="lr is given twice"):
        schedule.parse_grid(["lr=1e-4", "lr=3e-4"])


def _candidate(run: str, size: int, steps: int, image: float, pixel: float = 0.5) -> dict:
    return {"run": run, "image_size": size, "lr": "1e-4", "steps": steps, "val_image_auroc": image,
            "val_pixel_auroc": pixel, "val_auroc_sum": image + pixel, "cost": steps * size**2}


def test_best_validation_auroc_wins_and_ties_go_to_the_cheaper():
    found = [_candidate("a", 128, 300, 0.90), _candidate("a", 128, 600, 0.95), _candidate("b", 256, 300, 0.97)]
    assert schedule.choose(found)["run"] == "b"
    localises = [_candidate("a", 128, 300, 0.99, 0.70), _candidate("a", 128, 600, 0.97, 0.78)]
    assert schedule.choose(localises)["steps"] == 600  # image + pixel AUROC
    tied = [_candidate("a", 128, 600, 0.968), _candidate("b", 256, 300, 0.97), _candidate("a", 128, 300, 0.90)]
    assert schedule.choose(tied)["steps"] == 600 and schedule.choose(tied)["image_size"] == 128
    assert schedule.choose(tied, tie=0.0)["image_size"] == 256
    with pytest.raises(ConfigError, match="no validated step"):
        schedule.choose([])


@pytest.mark.slow
def test_schedule_is_chosen_without_reading_the_test_split(tmp_path, monkeypatch):
    """Every file opened while the grid is fitted and the section written is recorded (builtins.open
    and PIL): the training images are, no test image or mask is."""
    from helpers import record_opened_files

    from jaxad.data import open_dataset

    root = synthetic.generate(tmp_path / "data", seed=5, categories=["gear"], image_size=64, n_train=8,
                              n_test_good=2, n_per_defect=1)
    dataset = open_dataset(root / "gear")
    base = load_config(CONFIGS / "efficientad.py")
    base.batch_size, base.val_fraction, base.num_overlays = 4, 0.25, 2
    opened = record_opened_files(monkeypatch)
    out = tmp_path / "BENCHMARKS.md"
    chosen = schedule.write_schedule(out, "sched", "cmd", base, root / "gear", ["image_size=64", "lr=1e-3,1e-4"],
                                     steps=4, validate_every=2, runs_dir=tmp_path / "runs")
    monkeypatch.undo()
    test_files = {str(s.path) for s in dataset.test} | {str(m) for s in dataset.test for m in s.mask_paths}
    assert {str(s.path) for s in dataset.train} <= set(opened)  # the recording sees the reads
    assert not test_files & set(opened), sorted(test_files & set(opened))
    histories = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/train_history.json")}
    assert len(histories) == 2 and all(h["train_steps"] == 4 for h in histories.values())
    best = max(h["val_image_auroc"] + h["val_pixel_auroc"] for r in histories.values() for h in r["history"]
               if "val_image_auroc" in h)
    assert chosen["val_auroc_sum"] >= best - schedule.TIE and chosen["steps"] in (2, 4)
    text = out.read_text()
    assert "<!-- begin sched -->" in text and f"train_steps={chosen['steps']}" in text
    assert (tmp_path / "benchmarks" / "sched" / "validation_image_auroc.png").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/train_history.json")}
    schedule.write_schedule(out, "sched", "cmd", base, root / "gear", ["image_size=64", "lr=1e-3,1e-4"],
                            steps=4, validate_every=2, runs_dir=tmp_path / "runs")
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # finished runs are read, not fitted again
