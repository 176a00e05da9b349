"""SimpleNet: the loss against numpy, fresh noise, training, the CLI, resuming, model selection."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_pipeline import CONFIGS_DIR, SMALL, run_script

from jaxad import backbones, checkpoint
from jaxad.config import apply_overrides, config_path, load_config
from jaxad.data import iterate_batches, open_dataset, synthetic
from jaxad.errors import ConfigError
from jaxad.methods import simplenet
from jaxad.runtime import parallel
from jaxad.train import loop


def _config(**overrides) -> ml_collections.ConfigDict:
    base = load_config(config_path("simplenet", CONFIGS_DIR))
    small = {"image_size": 64, "batch_size": 4, "hidden_dim": 32, "train_batch_size": 2, **overrides}
    return apply_overrides(base, [f"--config.{k}={v}" for k, v in small.items()])


@pytest.fixture(scope="module")
def gear(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "d", seed=1, categories=["gear"], image_size=64,
                              n_train=8, n_test_good=3, n_per_defect=2) / "gear"


@pytest.fixture(scope="module")
def backbone():
    return backbones.load("efficientnet_lite0")


# ---------------------------------------------------------------- numpy references


def _np_adaptive_pool(x: np.ndarray, size: int) -> np.ndarray:
    length = x.shape[-1]
    out = [x[..., (i * length) // size: -((-(i + 1) * length) // size)].mean(-1) for i in range(size)]
    return np.stack(out, -1)


def _np_loss(params, batch_stats, f, noise, th):
    """Adaptor, discriminator (BatchNorm in training mode over the normal+anomalous batch), hinge."""
    a, d = params["adaptor"], params["discriminator"]
    q = f @ np.asarray(a["kernel"]) + np.asarray(a["bias"])
    both = np.concatenate([q, q + noise]).astype(np.float64)
    h = both @ np.asarray(d["Dense_0"]["kernel"], np.float64) + np.asarray(d["Dense_0"]["bias"])
    mean, var = h.mean(0), h.var(0)
    bn = d["BatchNorm_0"]
    h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    h = np.where(h > 0, h, 0.2 * h)
    s = (h @ np.asarray(d["Dense_1"]["kernel"], np.float64))[:, 0]
    true, fake = s[: len(f)], s[len(f):]
    loss = np.maximum(th - true, 0).mean() + np.maximum(fake + th, 0).mean()
    old = batch_stats["BatchNorm_0"]
    stats = {"mean": 0.9 * np.asarray(old["mean"]) + 0.1 * mean, "var": 0.9 * np.asarray(old["var"]) + 0.1 * var}
    return loss, stats


def test_adaptive_pool_matches_the_window_formula():
    x = np.random.default_rng(0).normal(size=(3, 37)).astype(np.float32)
    for size in (37, 10, 5, 1):
        np.testing.assert_allclose(simplenet.pool_channels(jnp.asarray(x), size), _np_adaptive_pool(x, size),
                                   rtol=1e-5, atol=1e-6)
    m = simplenet.adaptive_pool_matrix(4608, 1536)  # WRN50 layer2, 3×3 patch → 1536: groups of 3
    assert np.all(m.sum(0) == pytest.approx(1.0)) and np.all((m > 0).sum(0) == 3)


def test_unfold_embedding_matches_numpy(backbone):
    config = _config(taps=("stage2",), embedding="unfold", target_dim=64)
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 64, 64, 3)), jnp.float32)
    got = simplenet.embed(config, backbone, backbone.variables, images, simplenet.embedding_dim(config, backbone))
    x = np.asarray(backbone(images, ("stage2",))["stage2"])
    h, w, c = x.shape[1:]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)  # [B,h,w,C,9]
    expected = _np_adaptive_pool(patches.reshape(*x.shape[:3], c * 9), c)  # torch unfold order: (C, ky, kx)
    assert got.shape == (2, h, w, 40)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_training_loss_and_batch_stats_match_numpy():
    config = _config(hidden_dim=24)
    params, batch_stats = simplenet.init_heads(config, 12, jax.random.key(0))
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 12)).astype(np.float32)
    noise = (0.3 * rng.normal(size=(50, 12))).astype(np.float32)
    loss, (stats, metrics) = simplenet.training_loss(config, params, batch_stats, jnp.asarray(f), jnp.asarray(noise))
    expected, expected_stats = _np_loss(params, batch_stats, f, noise, config.margin)
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    for k in ("mean", "var"):
        np.testing.assert_allclose(stats["BatchNorm_0"][k], expected_stats[k], rtol=1e-4, atol=1e-6)
    assert 0.0 <= float(metrics["p_true"]) <= 1.0


def test_inference_uses_the_running_averages():
    config = _config(hidden_dim=16)
    params, _ = simplenet.init_heads(config, 6, jax.random.key(1))
    rng = np.random.default_rng(2)
    stats = {"BatchNorm_0": {"mean": rng.normal(size=16).astype(np.float32),
                             "var": rng.uniform(0.5, 2.0, size=16).astype(np.float32)}}
    f = rng.normal(size=(3, 5, 6)).astype(np.float32)
    a, d = params["adaptor"], params["discriminator"]
    h = (f @ np.asarray(a["kernel"]) + np.asarray(a["bias"])) @ np.asarray(d["Dense_0"]["kernel"]) + np.asarray(d["Dense_0"]["bias"])
    h = (h - stats["BatchNorm_0"]["mean"]) / np.sqrt(stats["BatchNorm_0"]["var"] + 1e-5)
    h = h * np.asarray(d["BatchNorm_0"]["scale"]) + np.asarray(d["BatchNorm_0"]["bias"])
    expected = (np.where(h > 0, h, 0.2 * h) @ np.asarray(d["Dense_1"]["kernel"]))[..., 0]
    np.testing.assert_allclose(simplenet.normality(config, params, stats, jnp.asarray(f)), expected, rtol=1e-4, atol=1e-5)


def test_hinge_sign_convention():
    true, fake = jnp.array([0.7, 0.5, 0.2]), jnp.array([-0.9, -0.5, 0.1])
    # normal scores must exceed +th, anomalous ones stay below −th
    assert float(simplenet.hinge_loss(true, fake, 0.5)) == pytest.approx(0.3 / 3 + 0.6 / 3)
    assert float(simplenet.hinge_loss(true + 1, fake - 1, 0.5)) == 0.0


# ---------------------------------------------------------------- training


def _toy(config, n=6, d=8):
    """Normal features on a 2-D plane in d dimensions: the noise leaves the plane, so the heads can
    learn to tell the two apart (SimpleNet's premise)."""
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(2, d))
    train = jnp.asarray((rng.normal(size=(n * 16, 2)) @ plane).reshape(n, 4, 4, d), jnp.float32)
    val = jnp.asarray((rng.normal(size=(32, 2)) @ plane).reshape(2, 16, d), jnp.float32)
    mesh = parallel.batch_mesh(jax.devices()[:1])
    return simplenet.make_step(config, train, val, mesh), simplenet.init_state(config, d, jax.random.key(0))


def test_noise_is_fresh_every_step():
    a = simplenet.anomalous_noise(jax.random.key(1), (4000,), 0.015)
    b = simplenet.anomalous_noise(jax.random.key(2), (4000,), 0.015)
    assert not np.allclose(a, b) and float(jnp.std(a)) == pytest.approx(0.015, rel=0.05)
    config = _config(train_steps=10, validate_every=5)
    step, state = _toy(config)
    base = jax.random.key(3)
    keys = [jax.random.fold_in(base, i) for i in range(2)]  # what loop.train passes to steps 0 and 1
    one, _ = step(state, None, keys[0])
    again, _ = step(state, None, keys[0])
    other, _ = step(state, None, keys[1])
    leaves = lambda s: jax.tree.leaves(s["params"])
    assert all(np.array_equal(x, y) for x, y in zip(leaves(one), leaves(again)))
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(one), leaves(other)))


def test_each_epoch_visits_every_image_once():
    config = _config(train_batch_size=3)
    seen = np.concatenate([np.asarray(simplenet.batch_indices(config, jnp.int32(s), 7)) for s in range(4)])
    assert sorted(seen[:6].tolist()) == sorted(set(seen[:6].tolist())) and len(set(seen[6:].tolist())) == 6
    assert not np.array_equal(seen[:6], seen[6:])  # a new permutation each epoch


def test_training_decreases_the_loss_and_tracks_the_best_validation():
    config = _config(train_steps=200, validate_every=40, dsc_lr=3e-3, adaptor_lr=3e-3, noise_std=0.1)
    step, state = _toy(config)
    losses, val = [], []
    for i in range(config.train_steps):
        state, m = step(state, None, jax.random.fold_in(jax.random.key(0), i))
        losses.append(float(m["loss"]))
        if (i + 1) % config.validate_every == 0:
            val.append(float(m["val_loss"]))
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])
    assert val[-1] < val[0] and float(state["best_loss"]) == pytest.approx(min(val))
    assert int(state["last_step"]) == 200 and int(state["best_step"]) == 40 * (1 + int(np.argmin(val)))


# ---------------------------------------------------------------- through fit and the CLI


def _fit(config, gear, backbone, workdir):
    config = ml_collections.ConfigDict(config.to_dict())
    config.workdir = str(workdir)
    batches = iterate_batches(open_dataset(gear).train, (64, 64), config.batch_size)
    return simplenet.fit(config, batches, backbone)


def test_resume_from_a_checkpoint_equals_a_straight_run(tmp_path):
    """Batches, noise and the best-so-far heads all survive a restart (orbax checkpoints)."""
    config = _config(train_steps=12, validate_every=3, noise_std=0.1)
    step, state = _toy(config)
    key = jax.random.key(5)
    straight, _ = loop.train(step, state, itertools.repeat(None), 12, key, log_every=3)
    loop.train(step, state, itertools.repeat(None), 7, key, checkpoint_dir=tmp_path, checkpoint_every=5, log_every=3)
    resumed, _ = loop.train(step, state, itertools.repeat(None), 12, key, checkpoint_dir=tmp_path,
                                checkpoint_every=5, log_every=3)
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert int(resumed["step"]) == 12 and int(resumed["last_step"]) == 12


def test_fit_records_the_selection(gear, backbone, tmp_path):
    state = _fit(_config(train_steps=4, validate_every=2, select="last"), gear, backbone, tmp_path)
    assert int(state["validation"]["selected_step"]) == 4 == int(state["validation"]["last_step"])
    record = json.loads((tmp_path / "train_history.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 4] and record["n_validation"] == 1 and record["n_train"] == 7
    assert record["best_loss"] == pytest.approx(min(h["val_loss"] for h in record["history"]))
    assert record["last_loss"] == pytest.approx(record["history"][-1]["val_loss"])


def test_bad_settings_are_config_errors(gear, backbone, tmp_path):
    with pytest.raises(ConfigError, match="select"):
        _fit(_config(select="median"), gear, backbone, tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        _fit(_config(val_fraction=0.0), gear, backbone, tmp_path)
    with pytest.raises(ConfigError, match="embedding"):
        _fit(_config(embedding="pool"), gear, backbone, tmp_path)


@pytest.mark.slow
def test_cli_fits_evaluates_and_reloads(gear, tmp_path, capsys):
    workdir = tmp_path / "w"
    code, _out, err = run_script("fit.py", "--method", "simplenet", "--data", gear, "--workdir", workdir, *SMALL,
                                "--config.train_steps=6", "--config.validate_every=3", "--config.hidden_dim=32",
                                capsys=capsys)
    assert code == 0, err
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["method"] == "simplenet" and metrics["n_train"] == 8 and 0.0 <= metrics["image_auroc"] <= 1.0
    _, saved = checkpoint.load(workdir)
    assert set(saved) == {"adaptor", "discriminator", "batch_stats", "validation"}
    code, _, err = run_script("evaluate.py", "--workdir", workdir, capsys=capsys)
    assert code == 0, err
    again = json.loads((workdir / "metrics.json").read_text())
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert again["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-6)


@pytest.mark.slow  # test_training checks the rule (another run's checkpoints are not resumed) in a second
def test_a_refit_with_another_config_trains_afresh(gear, tmp_path, capsys):
    """The workdir's checkpoints of a first fit are not resumed by a second with other settings
    (resuming them returned the first model, or failed on the changed shapes)."""
    workdir, common = tmp_path / "w", ("--config.train_steps=4", "--config.validate_every=2")
    code, _, err = run_script("fit.py", "--method", "simplenet", "--data", gear, "--workdir", workdir, *SMALL, *common,
                              "--config.hidden_dim=32", capsys=capsys)
    assert code == 0, err
    code, _, err = run_script("fit.py", "--method", "simplenet", "--data", gear, "--workdir", workdir, *SMALL, *common,
                              "--config.hidden_dim=16", capsys=capsys)
    assert code == 0, err
    assert "not resuming" in err
    _, saved = checkpoint.load(workdir)
    assert saved["discriminator"]["Dense_0"]["kernel"].shape[-1] == 16
