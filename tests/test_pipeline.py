"""End to end: fit → save → evaluate → predict through the scripts, and the errors a user sees."""

import json
import os
import runpy
import subprocess
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import calibration_split
from PIL import Image

from jaxad import checkpoint, pipeline
from jaxad.data import loader, synthetic
from jaxad.eval import report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = ROOT / "configs"
SMALL = ["--config.image_size=64", "--config.batch_size=4", "--config.num_overlays=3"]


def run_script(name: str, *args: str, capsys) -> tuple[int, str, str]:
    """Run scripts/NAME.py in-process; returns (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = [str(ROOT / "scripts" / name), *map(str, args)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(name: str, *args: str) -> int:
    """Run scripts/NAME.py in-process, its output left to pytest; returns the exit code."""
    argv = sys.argv
    sys.argv = [str(ROOT / "scripts" / name), *map(str, args)]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return stop.value.code


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=1, categories=["gear"],
                              image_size=64, n_train=8, n_test_good=3, n_per_defect=2)
    return root / "gear"


@pytest.fixture(scope="module")
def calibration_reads() -> list[Path]:
    """Every image file read while the fit of :func:`fitted` calibrated (filled by it)."""
    return []


@pytest.fixture(scope="module")
def fitted(category, tmp_path_factory, calibration_reads) -> Path:
    workdir = tmp_path_factory.mktemp("run") / "w"
    reading, calibrating = loader.load_sample, pipeline.calibrate

    def spy_read(path, *args):
        if calibrating_now:
            calibration_reads.append(Path(path))
        return reading(path, *args)

    def spy_calibrate(*args):
        calibrating_now.append(True)
        try:
            return calibrating(*args)
        finally:
            calibrating_now.clear()

    calibrating_now: list[bool] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "load_sample", spy_read)
        patch.setattr(pipeline, "calibrate", spy_calibrate)
        assert run_cli("fit.py", "--method", "crd", "--data", category, "--workdir", workdir, *SMALL) == 0
    return workdir


def test_calibration_reads_held_out_training_images_only(fitted, category, calibration_reads):
    """Thresholds set on test images would make the reported decisions meaningless: calibration
    may read only the training images the model was not fitted on."""
    held = {Path(p) for p in json.loads((fitted / "calibration.json").read_text())["images"]}
    assert calibration_reads and set(calibration_reads) == held
    train = set((category / "train" / "good").glob("*.png"))
    assert held <= train and not held & set((category / "test").rglob("*"))
    assert json.loads((fitted / "metrics.json").read_text())["n_train"] == len(train) - len(held)


def test_fit_writes_metrics_maps_and_state(fitted, category):
    metrics = json.loads((fitted / "metrics.json").read_text())
    for key in ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "n_train", "fit_seconds", "predict_images_per_second"]:
        assert key in metrics, key
    fit_count, held_count = calibration_split(fitted, category)  # calibration_fraction of the 8 held out
    assert 0 < held_count < 8 and metrics["n_train"] == fit_count == 8 - held_count
    assert metrics["calibration"]["n_images"] == held_count and metrics["calibration"]["rule"] == "max"
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["predict_images_per_second"] > 0
    assert len(list((fitted / "maps").glob("*.png"))) == 3
    assert (fitted / "roc.png").is_file() and (fitted / "state").is_dir()
    state = checkpoint.load(fitted)[1]  # CRD's default lam=auto: the chosen λ and how active it is
    assert metrics["lam"] == float(state["lam"]) and metrics["lam_ratio"] == float(state["lam_ratio"]) > 0
    assert metrics["lam_effective"] == float(state["lam_effective"])


def test_evaluate_reproduces_the_numbers(fitted, category, capsys):
    before = json.loads((fitted / "metrics.json").read_text())
    code, out, err = run_script("evaluate.py", "--workdir", fitted, capsys=capsys)
    assert code == 0, err
    after = json.loads((fitted / "metrics.json").read_text())
    for key in ["image_auroc", "pixel_auroc", "aupro", "pixel_ap"]:
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
    defective = [p for p in (category / "test").rglob("*.png") if p.parent.name != "good"]
    decisions = after["image_decisions"]  # the stored thresholds' decisions on the test images
    assert decisions == before["image_decisions"] and decisions["tp"] + decisions["fn"] == len(defective)
    assert "| accuracy_image | precision_image | recall_image |" in out


def _written_since(folder: Path, since: int) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime_ns >= since}


def test_evaluate_and_predict_write_every_file_by_renaming_a_complete_one(fitted, category, tmp_path, capsys,
                                                                          monkeypatch):
    """A kill mid-write leaves the previous file or the new one: every file evaluate.py and
    predict.py write (metrics, report, plots, overlays) arrives by a rename."""
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(dst)) or replace(src, dst))
    start = time.time_ns()
    code, _, err = run_script("evaluate.py", "--workdir", fitted, capsys=capsys)
    assert code == 0, err
    written = _written_since(fitted, start)
    assert {fitted / "metrics.json", fitted / "report.html", fitted / "roc.png"} <= written
    assert written <= set(renamed) and not [p for p in fitted.rglob("*") if ".tmp" in p.name]
    images = sorted((category / "test").rglob("*.png"))[:3]
    code, _, err = run_script("predict.py", "--workdir", fitted, "--out", tmp_path / "pred", *images, capsys=capsys)
    assert code == 0, err
    overlays = set((tmp_path / "pred").glob("*.png"))
    assert len(overlays) == 3 and overlays <= set(renamed)


def test_predict_prints_one_score_per_image(fitted, category, tmp_path, capsys):
    images = sorted((category / "test").rglob("*.png"))[:3]
    code, out, err = run_script("predict.py", "--workdir", fitted, "--out", tmp_path / "pred", *images, capsys=capsys)
    assert code == 0, err
    header, *lines = out.strip().splitlines()
    assert header.split() == ["score", "decision", "raw", "score", "path"]
    assert len(lines) == 3 and all(0 <= float(line.split()[0]) <= 1 for line in lines)
    assert all(line.split()[1] in ("anomalous", "normal") for line in lines)
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3


def test_evaluate_and_predict_draw_maps_on_the_scale_the_calibration_fixed(fitted, category, tmp_path, capsys):
    """The maps evaluation drew (fit's maps/) and predict.py's overlays of the same test images,
    scored among other images, colour them alike: one scale, set by the stored calibration."""
    drawn = {p.stem: p for p in (fitted / "maps").glob("*.png")}
    tests = [p for p in sorted((category / "test").rglob("*.png")) if f"{p.parent.name}_{p.stem}" in drawn]
    assert len(tests) == len(drawn) == 3
    code, _, err = run_script("predict.py", "--workdir", fitted, "--out", tmp_path / "pred", *tests, capsys=capsys)
    assert code == 0, err
    for path, name in zip(tests, pipeline.distinct_names(tests)):
        evaluated = np.asarray(Image.open(drawn[f"{path.parent.name}_{path.stem}"]), np.float32)
        predicted = np.asarray(Image.open(tmp_path / "pred" / f"{name}.png"), np.float32)
        side = predicted.shape[0] - report._HEADER - report._FOOTER
        assert evaluated.shape[1] == 3 * side + 2 * report._GAP  # input | map | ground truth
        tile = np.s_[report._HEADER + 30:report._HEADER + side, side + report._GAP:2 * side + report._GAP]
        assert np.abs(evaluated[tile] - predicted[tile]).mean() < 0.5  # float rounding of the maps at most


def test_predict_prints_json_and_csv_whose_decisions_match_the_scores(fitted, category, tmp_path, capsys):
    images = sorted((category / "test").rglob("*.png"))
    code, out, err = run_script("predict.py", "--workdir", fitted, "--no-overlays", "--json", *images, capsys=capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["path"] for r in rows] == list(map(str, images)) and not (fitted / "predictions").exists()
    threshold = json.loads((fitted / "calibration.json").read_text())["image_threshold"]
    for r in rows:
        assert 0 <= r["score"] <= 1 and r["decision"] == ("anomalous" if r["raw_score"] >= threshold else "normal")
    assert any(r["decision"] == "anomalous" for r in rows)
    code, out, err = run_script("predict.py", "--workdir", fitted, "--no-overlays", "--csv", *images[:2], capsys=capsys)
    assert code == 0, err
    header, *lines = out.strip().splitlines()
    assert header == "score,decision,raw_score,path" and [line.split(",")[3] for line in lines] == list(map(str, images[:2]))


def test_predict_streams_a_folder_in_batches(fitted, category, tmp_path, monkeypatch):
    """The first decision comes out before the images beyond a few batches have been read."""
    images = sorted((category / "test").rglob("*.png")) * 6  # 42 images, batches of 4
    reads = []
    reading = loader.load_sample
    monkeypatch.setattr(loader, "load_sample", lambda path, *a: reads.append(path) or reading(path, *a))
    predictions = pipeline.predict_files(fitted, images, None)
    first = next(predictions)
    assert first.path == images[0] and len(reads) <= 4 * 4  # a batch, and the prefetched ones
    assert len(list(predictions)) == len(images) - 1 and len(reads) == len(images)


# Runs scripts/predict.py with argv[1:], then prints the process's peak resident memory to stderr.
_MEASURED_PREDICT = """
import atexit, runpy, sys
from jaxad.runtime import memory
atexit.register(lambda: print(f"peak_rss {memory.peak_rss()}", file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _predict_folder(fitted: Path, count: int, tmp_path: Path) -> tuple[list[str], int, str]:
    """(the CSV rows, peak RSS bytes, stderr) of predict.py over a folder of ``count`` small PNGs,
    with their overlays."""
    folder = tmp_path / f"images{count}"
    folder.mkdir()
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    args = [str(ROOT / "scripts" / "predict.py"), "--workdir", str(fitted), "--out", str(tmp_path / f"maps{count}"),
            "--csv", str(folder)]
    done = subprocess.run([sys.executable, "-c", _MEASURED_PREDICT, *args], env=env, capture_output=True, text=True,
                          timeout=3000, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stderr.rsplit("peak_rss ", 1)[1].split()[0])
    return done.stdout.strip().splitlines()[1:], peak, done.stderr


@pytest.mark.slow
def test_predict_over_ten_thousand_images_runs_in_constant_memory(fitted, tmp_path):
    """Every one of 10,000 images gets its row and overlay, with a progress bar, and the peak
    resident memory stays within 48 MiB of a 1,000-image run's: keeping each image's map (16 KiB
    at 64 px) or decoded image would add over 140 MiB."""
    _, small_peak, _ = _predict_folder(fitted, 1000, tmp_path)
    rows, peak, err = _predict_folder(fitted, 10_000, tmp_path)
    assert sorted(Path(r.split(",")[3]).name for r in rows) == [f"{i:05d}.png" for i in range(10_000)]
    assert len(list((tmp_path / "maps10000").glob("*.png"))) == 10_000
    assert "10000/10000" in err  # the progress bar reached the end
    assert peak - small_peak < 48 * 2**20, (peak / 2**20, small_peak / 2**20)


@pytest.mark.slow
def test_predict_takes_folders_and_names_maps_apart(fitted, category, tmp_path, capsys):
    """Every image under a folder is scored; same-named files in different folders keep one map each."""
    code, out, err = run_script("predict.py", "--workdir", fitted, "--out", tmp_path / "pred", category / "test",
                                capsys=capsys)
    assert code == 0, err
    images = sorted(p for p in (category / "test").rglob("*.png"))
    assert [line.split()[3] for line in out.strip().splitlines()[1:]] == list(map(str, images))
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(images)
    assert pipeline.distinct_names([Path("a/good/000.png"), Path("a/crack/000.png"), Path("b/001.png")]) == [
        "good_000", "crack_000", "b_001"]


def test_predict_never_writes_maps_into_a_users_folder(fitted, category, tmp_path, capsys):
    """Maps into the inputs' own folder would replace the inputs; the folder is refused untouched."""
    folder = tmp_path / "mine"
    folder.mkdir()
    image = folder / "000.png"
    image.write_bytes(min((category / "test").rglob("*.png")).read_bytes())
    before = image.read_bytes()
    code, _, err = run_script("predict.py", "--workdir", fitted, "--out", folder, image, capsys=capsys)
    assert code != 0 and "holds files that jaxad did not write; choose an empty or new --out" in err
    assert image.read_bytes() == before and sorted(folder.iterdir()) == [image]


def test_the_predictor_puts_the_fitted_state_on_the_device_once(fitted):
    """The state comes back from disk as numpy; were it passed as such, every call would copy it to
    the device again (the whole reference bank of CPR). After the first call none may."""
    config, saved = checkpoint.load(fitted)
    predictor = pipeline.make_predictor(config, pipeline.load_backbone(config), saved)
    images = jnp.zeros((2, config.image_size, config.image_size, 3), jnp.float32)
    first = predictor(images)
    with jax.transfer_guard_host_to_device("disallow"):
        again = predictor(images)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def _copy_category(src: Path, dst: Path) -> Path:
    for p in src.rglob("*"):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    return dst


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = run_script("fit.py", "--data", tmp_path / "nope", "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    _one_line_error(code, err, str(tmp_path / "nope"))


def test_empty_train_folder(tmp_path, capsys):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    code, _, err = run_script("fit.py", "--data", tmp_path / "cat", "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    _one_line_error(code, err, "train")


def test_truncated_training_image(category, tmp_path, capsys):
    data = _copy_category(category, tmp_path / "cat")
    victim = sorted((data / "train" / "good").glob("*.png"))[2]
    victim.write_bytes(victim.read_bytes()[:200])
    code, _, err = run_script("fit.py", "--data", data, "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    _one_line_error(code, err, str(victim))


def test_mask_size_mismatch(category, tmp_path, capsys):
    data = _copy_category(category, tmp_path / "cat")
    mask = min((data / "ground_truth").rglob("*_mask.png"))
    Image.new("L", (10, 12)).save(mask)
    code, _, err = run_script("fit.py", "--data", data, "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    _one_line_error(code, err, mask.name)


def test_non_finite_pixels_are_reported_with_their_file(category, tmp_path, capsys):
    data = _copy_category(category, tmp_path / "cat")
    bad = data / "train" / "good" / "nan.tiff"
    Image.fromarray(np.full((64, 64), np.nan, np.float32), mode="F").save(bad)
    code, _, err = run_script("fit.py", "--data", data, "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    _one_line_error(code, err, "nan.tiff")


@pytest.mark.slow
def test_odd_but_valid_images_just_work(category, tmp_path, capsys):
    """Greyscale, RGBA, 16-bit and odd-sized training images fit without complaint (a whole fit;
    test_data checks that the loader reads each kind)."""
    data = _copy_category(category, tmp_path / "cat")
    train = sorted((data / "train" / "good").glob("*.png"))
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in train[:4]]
    Image.fromarray(rgb[0]).convert("L").save(train[0])
    Image.fromarray(rgb[1]).convert("RGBA").save(train[1])
    Image.fromarray(rgb[2][..., 0].astype(np.uint16) * 257).save(train[2])  # 16-bit greyscale
    Image.fromarray(rgb[3]).resize((97, 51)).save(train[3])
    code, _, err = run_script("fit.py", "--data", data, "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    assert code == 0, err
    fit_count, _ = calibration_split(tmp_path / "w", data)
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["n_train"] == fit_count


def test_workdir_with_foreign_files_is_refused(category, tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "thesis.tex").write_text("precious")
    code, _, err = run_script("fit.py", "--data", category, "--workdir", tmp_path / "w", *SMALL, capsys=capsys)
    _one_line_error(code, err, str(tmp_path / "w"))
    assert (tmp_path / "w" / "thesis.tex").read_text() == "precious"


def test_unknown_override_is_one_line(category, tmp_path, capsys):
    code, _, err = run_script("fit.py", "--data", category, "--workdir", tmp_path / "w", "--config.lamda=3", capsys=capsys)
    _one_line_error(code, err, "lamda")


def test_wrong_weight_file_is_one_line(category, tmp_path, capsys):
    bogus = tmp_path / "weights.pth"
    bogus.write_text("not a checkpoint")
    code, _, err = run_script("fit.py", "--data", category, "--workdir", tmp_path / "w", f"--config.weights={bogus}",
                              *SMALL, capsys=capsys)
    _one_line_error(code, err, str(bogus))


@pytest.mark.slow
def test_bfloat16_backbone_compute_runs_end_to_end(category, tmp_path, capsys):
    """A whole fit in bfloat16 (the backbone alone: test_backbones checks its features stay close)."""
    args = ["--method", "crd", "--data", category, *SMALL]
    code, _, err = run_script("fit.py", *args, "--workdir", tmp_path / "bf16", "--config.compute_dtype=bfloat16", capsys=capsys)
    assert code == 0, err
    assert 0.0 <= json.loads((tmp_path / "bf16" / "metrics.json").read_text())["image_auroc"] <= 1.0


def test_a_bad_compute_dtype_is_one_line(category, tmp_path, capsys):
    args = ["--method", "crd", "--data", category, *SMALL]
    code, _, err = run_script("fit.py", *args, "--workdir", tmp_path / "f16", "--config.compute_dtype=float16", capsys=capsys)
    assert code == 2 and "compute_dtype=float16" in err and "Traceback" not in err


@pytest.mark.parametrize("method, override, message", [
    ("crd", "--config.batch_size=0", "batch_size=0: must be at least 1"),
    ("crd", "--config.image_size=0", "image_size=0: must be at least 1 pixel"),
    ("crd", "--config.aggregate=4", "aggregate=4: must be odd and positive"),
    ("crd", "--config.blur_sigma=-1.0", "blur_sigma=-1.0: must be at least 0"),
    ("crd", "--config.lam=-1.0", "lam=-1.0: must be in (0.0, inf)"),
    ("crd", "--config.lam_mode=relative", "lam_mode=relative: choose one of absolute"),
    ("patchcore", "--config.coreset_ratio=0.0", "coreset_ratio=0.0: must be in (0.0, 1.0]"),
    ("patchcore", "--config.num_neighbours=0", "num_neighbours=0: must be at least 1"),
    ("padim", "--config.reg=-0.1", "reg=-0.1: must be at least 0"),
    ("simplenet", "--config.dsc_lr=0.0", "dsc_lr=0.0: must be in (0.0, inf)"),
    ("paap", "--config.ridge=-1.0", "ridge=-1.0: must be at least 0"),
    ("efficientad", "--config.q_a=0.999", "q_a=0.999 / q_b=0.995: q_a must be below q_b"),
    ("puad", "--config.validate_every=0", "validate_every=0: must be at least 1"),
    ("cpr_faster", "--config.top_k=0", "top_k=0: must be at least 1"),
    ("cpr_faster", "--config.val_fraction=1.0", "val_fraction=1.0: must be in [0.0, 1.0)"),
])
def test_a_setting_out_of_range_is_refused_by_name(category, tmp_path, capsys, method, override, message):
    code, _, err = run_script("fit.py", "--method", method, "--data", category, "--workdir", tmp_path / "w", *SMALL,
                              override, capsys=capsys)
    assert code != 0 and message in err and "Traceback" not in err


def test_predict_names_the_models_of_a_folder_of_categories(fitted, category, tmp_path, capsys):
    """Given the folder of a multi-category fit, predict asks for one of its models by name."""
    for name in ("a", "b"):
        shutil.copytree(fitted, tmp_path / "w" / name)
    image = min((category / "test").rglob("*.png"))
    code, _, err = run_script("predict.py", "--workdir", tmp_path / "w", "--no-overlays", image, capsys=capsys)
    assert code != 0 and "holds one fitted model per category (a, b); pass one of them" in err
    code, out, err = run_script("predict.py", "--workdir", tmp_path / "w" / "b", "--no-overlays", image, capsys=capsys)
    assert code == 0 and out.splitlines()[1].split()[3] == str(image), err


@pytest.mark.slow
def test_a_folder_of_categories_fits_one_model_each(category, tmp_path, capsys):
    """Each category gets its own workdir; predict names them when given the folder above."""
    data = tmp_path / "data"
    for name in ("a", "b"):
        shutil.copytree(category, data / name)
    workdir = tmp_path / "w"
    code, _, err = run_script("fit.py", "--method", "crd", "--data", data, "--workdir", workdir, *SMALL, capsys=capsys)
    assert code == 0, err
    assert [r["category"] for r in json.loads((workdir / "summary.json").read_text())] == ["a", "b"]
    image = min((category / "test").rglob("*.png"))
    code, _, err = run_script("predict.py", "--workdir", workdir, image, capsys=capsys)
    assert code != 0 and "holds one fitted model per category (a, b); pass one of them" in err
    code, out, err = run_script("predict.py", "--workdir", workdir / "b", image, capsys=capsys)
    assert code == 0 and out.splitlines()[1].split()[3] == str(image), err


@pytest.mark.slow  # ~13 s of compiling; test_export's toy program checks the loader's chunks by default
def test_one_export_decides_on_batches_of_any_size_as_the_fitted_model(fitted, category, tmp_path):
    """The exported program's batch is symbolic: batches of 1 and 3 from one file, as in process."""
    from test_export import in_process

    from jaxad import deploy, export

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((category / "test").rglob("*.png"))[:4]])
    model = deploy.load(export.export(fitted, tmp_path / "m.jaxad"))
    assert model.batch_size is None
    want_scores, want_labels, want_maps = in_process(fitted, images)
    for rows in (slice(0, 1), slice(1, 4)):
        scores, labels, maps = model(images[rows])
        np.testing.assert_allclose(scores, want_scores[rows], atol=1e-4)
        np.testing.assert_allclose(maps, want_maps[rows], atol=1e-4)
        assert labels.tolist() == want_labels[rows].tolist()


@pytest.mark.slow
def test_fit_predict_export_and_load_elsewhere_agree(fitted, category, tmp_path, capsys):
    """The whole path: predict.py's decisions are reproduced by the exported file in a process
    that imports nothing of jaxad but jaxad.deploy."""
    from test_export import load_elsewhere

    images = sorted((category / "test").rglob("*.png"))
    code, out, err = run_script("predict.py", "--workdir", fitted, "--no-overlays", "--json", *images, capsys=capsys)
    assert code == 0, err
    rows = json.loads(out)
    code, out, err = run_script("export.py", "--workdir", fitted, "--out", tmp_path / "m.jaxad", capsys=capsys)
    assert code == 0 and "crd, any number of uint8 images 64x64" in out, err
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])
    scores, labels, _ = load_elsewhere(tmp_path / "m.jaxad", pixels, tmp_path)
    np.testing.assert_allclose(scores, [r["score"] for r in rows], atol=1e-4)
    assert labels.tolist() == [r["decision"] == "anomalous" for r in rows]
