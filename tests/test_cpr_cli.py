"""CPR end to end through scripts/fit.py on a tiny synthetic object category."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_pipeline import run_cli

from jaxad import backbones, checkpoint
from jaxad.config import load_config
from jaxad.data import iterate_batches, open_dataset, synthetic
from jaxad.methods import cpr

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.image_size=64", "--config.batch_size=4", "--config.num_overlays=2", "--config.procedural_textures=4",
         "--config.calibration_fraction=0.0"]  # every training image in the bank: the tests below rebuild it


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=1, categories=["gear"],
                              image_size=64, n_train=8, n_test_good=3, n_per_defect=2)
    return root / "gear"


def fit(method: str, category: Path, workdir: Path, *overrides: str) -> dict:
    assert run_cli("fit.py", "--method", method, "--data", category, "--workdir", workdir, *SMALL, *overrides) == 0
    return json.loads((workdir / "metrics.json").read_text())


def _check_metrics(metrics: dict) -> None:
    for key in ["image_auroc", "pixel_auroc", "aupro", "pixel_ap"]:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_train"] == 8 and metrics["predict_images_per_second"] > 0


@pytest.fixture(scope="module")
def untrained(category, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("untrained") / "w"
    _check_metrics(fit("cpr_faster", category, workdir, "--config.use_lrb=false"))
    return workdir


def test_untrained_cascade_runs_and_never_retrieves_the_query_itself(untrained, category):
    config, saved = checkpoint.load(untrained)
    assert "params" not in saved and saved["bank"]["scale0"].shape == (8, 16, 16, 24)
    backbone = backbones.load(config.backbone)
    images = next(iterate_batches(open_dataset(category).train, (64, 64), 8)).images
    first = backbone(images, (config.taps[0],))[config.taps[0]]
    neighbours = np.asarray(cpr.retrieve(config, jax.tree.map(jnp.asarray, saved), first))
    assert neighbours.shape == (8, 7)
    assert all(i not in row for i, row in enumerate(neighbours))  # training images used as queries


def test_ablations_of_the_untrained_cascade_predict(untrained, category):
    """The saved state serves every predict-time ablation: no GRB (search all training images),
    stride-4 scale only, no foreground gating."""
    config, saved = checkpoint.load(untrained)
    state = {**jax.tree.map(jnp.asarray, saved), "backbone": backbones.load(config.backbone).variables}
    images = next(iterate_batches(open_dataset(category).test, (64, 64), 4)).images
    backbone = backbones.load(config.backbone)
    results = {}
    variants = {"full": {}, "single_scale": {"multi_scale": False}, "no_feb": {"use_feb": False},
                "no_grb_no_feb": {"use_grb": False, "use_feb": False}}
    for name, change in variants.items():
        variant = ml_collections.ConfigDict({**config.to_dict(), **change})
        scores, maps = jax.jit(lambda s, x: cpr.predict(variant, backbone, s, x))(state, images)
        assert scores.shape == (4,) and maps.shape == (4, 64, 64) and np.isfinite(np.asarray(maps)).all()
        results[name] = np.asarray(maps)
    # searching all training images can only find closer references than the top K
    assert (results["no_grb_no_feb"] <= results["no_feb"] + 1e-5).all()
    assert (results["no_grb_no_feb"] < results["no_feb"] - 1e-4).any()
    assert not np.allclose(results["single_scale"], results["full"])
    assert (results["no_feb"] >= results["full"] - 1e-5).all()  # the gate F* is in [0, 1]


def test_a_batch_scores_like_its_images_one_by_one(untrained, category):
    """Whether predict takes the batch at once or one image at a time (CPU), each image's score and
    map are its own, in order."""
    config, saved = checkpoint.load(untrained)
    backbone = backbones.load(config.backbone)
    state = {**jax.tree.map(jnp.asarray, saved), "backbone": backbone.variables}
    images = next(iterate_batches(open_dataset(category).test, (64, 64), 4)).images
    run = jax.jit(lambda s, x: cpr.predict(config, backbone, s, x))
    scores, maps = run(state, images)
    for i in range(4):
        one_score, one_map = run(state, images[i:i + 1])
        np.testing.assert_allclose(np.asarray(scores[i]), np.asarray(one_score[0]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(maps[i]), np.asarray(one_map[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trained_local_branch_end_to_end(category, tmp_path, caplog):
    workdir = tmp_path / "w"
    with jax.log_compiles(), caplog.at_level("WARNING", logger="jax._src.dispatch"):
        _check_metrics(fit("cpr_faster", category, workdir, "--config.train_steps=4", "--config.validate_every=2"))
    # validation between steps must not change what the step is compiled for
    assert sum("compilation of jit(update)" in r.getMessage() for r in caplog.records) == 1
    history = json.loads((workdir / "train_history.json").read_text())
    assert history["n_train"] == 7 and history["selected_step"] in (2, 4)  # 1 of 8 held out for selection
    assert np.isfinite(history["best_auroc"]) and (workdir / "train").is_dir()
    _, saved = checkpoint.load(workdir)
    assert saved["bank"]["scale0"].shape == (8, 16, 16, 16) and saved["bank"]["scale1"].shape == (8, 8, 8, 16)
    norms = np.linalg.norm(saved["bank"]["scale1"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)


def test_variants_differ_only_in_width():
    widths = {m: load_config(ROOT / "configs" / f"{m}.py") for m in ("cpr", "cpr_fast", "cpr_faster")}
    assert {m: c.lrb_width for m, c in widths.items()} == {"cpr": 384, "cpr_fast": 64, "cpr_faster": 16}
    assert all(c.method == "cpr" for c in widths.values())
