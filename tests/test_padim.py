"""PaDiM: streamed per-location Gaussians against numpy, sharding, the method and its CLI."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import calibration_split
from test_pipeline import CONFIGS_DIR, ROOT, SMALL, run_script

from jaxad import backbones, features
from jaxad.config import apply_overrides, config_path, load_config
from jaxad.data import iterate_batches, open_dataset, synthetic
from jaxad.distances import mahalanobis, protocol
from jaxad.errors import ConfigError
from jaxad.methods import padim

GAUSSIAN = ml_collections.ConfigDict({"position": "location", "position_blocks": 1, "reg": 0.01})


def _streamed(f: np.ndarray, valid: np.ndarray, batch: int) -> mahalanobis.Stats:
    stats = mahalanobis.init(GAUSSIAN, jnp.asarray(f[:batch][valid[:batch]]))
    total = protocol.zero_sums(stats)
    for s in range(0, len(f), batch):
        inc = mahalanobis.update(protocol.zero_sums(stats), jnp.asarray(f[s : s + batch]), jnp.asarray(valid[s : s + batch]))
        total = protocol.add(total, inc.sums)
    return total


def test_streamed_gaussians_and_distances_match_numpy():
    rng = np.random.default_rng(0)
    # a large common offset: plain float32 sums of squares would cancel badly here
    f = (100.0 + 0.5 * rng.normal(size=(11, 3, 4, 6))).astype(np.float32)
    valid = np.array([True] * 9 + [False] * 2)  # the last batch is padded
    stats = _streamed(f, valid, batch=4)
    mean, chol = mahalanobis.gaussians(stats, 0.01)
    x = f[valid].reshape(9, 12, 6).astype(np.float64)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-4)
    covs = np.stack([np.cov(x[:, l].T) + 0.01 * np.eye(6) for l in range(12)])
    np.testing.assert_allclose(chol @ np.swapaxes(chol, 1, 2), covs, atol=2e-4)
    params = mahalanobis.finalize(stats, GAUSSIAN)
    whiten = np.swapaxes(np.asarray(params["whiten_t"], np.float64), 1, 2)
    np.testing.assert_allclose(whiten @ covs @ np.swapaxes(whiten, 1, 2), np.broadcast_to(np.eye(6), covs.shape), atol=2e-3)
    q = (100.0 + 0.5 * rng.normal(size=(2, 3, 4, 6))).astype(np.float32)
    r = q.reshape(2, 12, 6) - x.mean(0)
    ref = np.sqrt(np.einsum("bld,bld->bl", r, np.stack([np.linalg.solve(covs, r[b][..., None])[..., 0] for b in range(2)])))
    np.testing.assert_allclose(np.asarray(mahalanobis.score(params, jnp.asarray(q))).reshape(2, 12), ref, rtol=1e-4)


def test_fewer_images_than_channels_still_factorises():
    f = np.random.default_rng(1).normal(size=(3, 2, 2, 20)).astype(np.float32)
    _, chol = mahalanobis.gaussians(_streamed(f, np.ones(3, bool), batch=3), 0.01)
    assert np.isfinite(chol).all()


def test_resize_nearest_follows_the_floor_rule():
    x = np.arange(2 * 3 * 5).reshape(1, 3, 5, 2).astype(np.float32)
    out = np.asarray(features.resize_nearest(jnp.asarray(x), (7, 4)))
    rows, cols = (np.arange(7) * 3) // 7, (np.arange(4) * 5) // 4
    np.testing.assert_array_equal(out, x[:, rows][:, :, cols])


def test_sharded_moments_over_eight_devices_equal_one_device():
    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 8)
        import jax.numpy as jnp
        import ml_collections
        from jaxad.runtime import parallel
        from jaxad.distances import mahalanobis, protocol
        f = np.random.default_rng(0).normal(size=(16, 2, 3, 5)).astype(np.float32)
        valid = np.arange(16) < 13
        config = ml_collections.ConfigDict({"position": "location", "position_blocks": 1})
        zero = mahalanobis.init(config, jnp.asarray(f[:4]))
        fn = lambda ctx, b: mahalanobis.update(protocol.Stats(ctx, zero.sums), b[0], b[1]).sums
        mesh = parallel.batch_mesh()
        m8 = jax.jit(parallel.summed_over_batch(fn, mesh))(zero.context, parallel.shard_batch((f, valid), mesh))
        m1 = mahalanobis.update(zero, jnp.asarray(f), jnp.asarray(valid)).sums
        for a, b in zip(jax.tree.leaves(m8), jax.tree.leaves(m1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        print("OK", len(jax.devices()))
        """
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 8" in out.stdout


@pytest.fixture(scope="module")
def gear(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "d", seed=1, categories=["gear"], image_size=64,
                              n_train=6, n_test_good=2, n_per_defect=1)
    return open_dataset(root / "gear")


def _config(**overrides):
    base = load_config(config_path("padim", CONFIGS_DIR))
    return apply_overrides(base, [f"--config.{k}={v}" for k, v in {"image_size": 64, "batch_size": 4, **overrides}.items()])


def test_fit_state_is_the_gaussian_of_the_training_features(gear):
    config = _config(num_channels=30)
    bb = backbones.load(config.backbone)
    state = padim.fit(config, iterate_batches(gear.train, (64, 64), 4), bb)
    channels = np.asarray(state["channels"])
    assert len(set(channels.tolist())) == 30 and np.array_equal(channels, padim.channel_subset(config, bb))
    images = np.concatenate([b.images[np.asarray(b.valid)] for b in iterate_batches(gear.train, (64, 64), 6)])
    f = np.asarray(padim.patch_features(config, bb, bb.variables, images, channels), np.float64)
    assert f.shape == (6, 16, 16, 30)  # stride 4 at 64 px
    x = f.reshape(6, -1, 30)
    np.testing.assert_allclose(np.asarray(state["mean"]), x.mean(0), rtol=1e-4, atol=1e-4)
    l = 37
    cov = np.cov(x[:, l].T) + config.reg * np.eye(30)
    whiten = np.asarray(state["whiten_t"][l], np.float64).T  # L⁻¹: whitens the location's covariance
    np.testing.assert_allclose(whiten @ cov @ whiten.T, np.eye(30), atol=1e-2)


def test_too_many_channels_is_a_config_error(gear):
    with pytest.raises(ConfigError, match="num_channels"):
        padim.fit(_config(num_channels=1000), iterate_batches(gear.train, (64, 64), 4), backbones.load("efficientnet_lite0"))


@pytest.mark.slow
def test_fit_script_with_padim(gear, tmp_path, capsys):
    code, _, err = run_script("fit.py", "--method", "padim", "--data", gear.root, "--workdir", tmp_path / "w",
                              *SMALL, capsys=capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["n_train"] == calibration_split(tmp_path / "w", gear.root)[0] and 0 <= metrics["image_auroc"] <= 1
