"""PUAD: Ledoit-Wolf against sklearn, Mahalanobis against a numpy solve, the z-score fusion, and
fit → evaluate through scripts/fit.py on a tiny LOCO-layout category with a teacher file."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_pipeline import run_cli

from jaxad.data import synthetic_loco
from jaxad.methods import puad
from jaxad.nets import PDN
from jaxad.train import distillation

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,d", [(10, 30), (200, 12), (50, 50)])
def test_ledoit_wolf_matches_sklearn(n, d):
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
    cov, shrinkage = puad.ledoit_wolf(x)
    ref = covariance.LedoitWolf().fit(x)
    np.testing.assert_allclose(shrinkage, ref.shrinkage_, rtol=1e-8)
    np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-8, atol=1e-10)


def test_mahalanobis_matches_a_numpy_solve():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    mean, f = rng.standard_normal(6), rng.standard_normal((5, 6))
    want = np.sqrt(np.einsum("bi,bi->b", f - mean, np.linalg.solve(cov, (f - mean).T).T))
    precision = np.linalg.pinv(cov, hermitian=True)
    got = puad.mahalanobis(jnp.asarray(f, jnp.float32), jnp.asarray(mean, jnp.float32), jnp.asarray(precision, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_z_stats_are_mean_and_population_std():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    np.testing.assert_allclose(puad.z_stats(v), [3.5, np.sqrt(np.mean((v - 3.5) ** 2))], rtol=1e-6)
    assert puad.z_stats(np.array([2.0]))[1] == 1.0


def test_pooled_features_pick_the_student_half_or_the_teacher():
    t = jnp.arange(2 * 3 * 3 * 384, dtype=jnp.float32).reshape(2, 3, 3, 384)
    s = jnp.concatenate([t + 1, t - 100], axis=-1)
    student = puad.pooled_features(ml_collections.ConfigDict({"feature": "student"}), t, s)
    teacher = puad.pooled_features(ml_collections.ConfigDict({"feature": "teacher"}), t, s)
    np.testing.assert_allclose(np.asarray(student), np.asarray(t).mean((1, 2)) + 1)
    np.testing.assert_allclose(np.asarray(teacher), np.asarray(t).mean((1, 2)))


@pytest.mark.slow
def test_cli_end_to_end_on_a_tiny_loco_category(tmp_path):
    data = synthetic_loco.generate(tmp_path / "data", seed=0, image_size=64, n_train=8, n_val=2, n_test_good=2,
                                   n_per_kind=1)
    net = PDN(384, "s", padded=True)  # an untrained teacher file: exercises --config.teacher=PATH
    params = net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    teacher = distillation.save_teacher(tmp_path / "teacher", distillation.Settings(image_size=64, steps=0),
                                        {"params": params, "mean": np.zeros(384, np.float32),
                                         "std": np.ones(384, np.float32)})
    workdir = tmp_path / "w"
    assert run_cli("fit.py", "--method", "puad", "--data", data, "--workdir", workdir, "--config.image_size=64",
                   "--config.batch_size=4", "--config.num_overlays=2", "--config.train_steps=4",
                   "--config.val_fraction=0.25", f"--config.teacher={teacher}") == 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert set(metrics["per_defect_image_auroc"]) >= {"logical_anomalies", "structural_anomalies"}
    assert 0 <= metrics["image_auroc"] <= 1
    history = json.loads((workdir / "train_history.json").read_text())
    assert history["penalty"].startswith("none") and history["teacher"] == f"file {teacher}"
