"""Exact nearest-neighbour search, PatchCore re-weighting and the greedy coreset."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.distances import coreset, knn

ROOT = Path(__file__).resolve().parents[1]


def _brute(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((q[:, None].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1))


@pytest.mark.parametrize("n, k, chunk", [(1000, 1, 300), (1000, 5, 300), (50, 3, 4096), (257, 2, 64)])
def test_nearest_matches_brute_force(n, k, chunk):
    rng = np.random.default_rng(n + k)
    bank = rng.normal(size=(n, 12)).astype(np.float32)
    queries = rng.normal(size=(2, 3, 5, 12)).astype(np.float32)
    dist, idx = jax.jit(lambda q, b: knn.nearest(q, b, k=k, chunk_size=chunk))(queries, bank)
    assert dist.shape == idx.shape == (2, 3, 5, k)
    ref = _brute(queries.reshape(-1, 12), bank)
    np.testing.assert_allclose(np.asarray(dist).reshape(-1, k), np.sort(ref, 1)[:, :k], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1, k), np.argsort(ref, 1)[:, :k])
    assert int(np.asarray(idx).max()) < n  # padding rows are never returned


def test_squared_distances():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(100, 4)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    d, _ = knn.nearest(q, bank, k=2)
    d2, _ = knn.nearest(q, bank, k=2, squared=True)
    np.testing.assert_allclose(np.asarray(d2), np.asarray(d) ** 2, rtol=1e-4, atol=1e-5)


def test_reweighting_follows_eq7():
    rng = np.random.default_rng(1)
    bank_np = rng.normal(size=(200, 6)).astype(np.float32)
    feats = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)
    bank = knn.make_bank(bank_np)
    dist, idx = knn.nearest(feats, bank, k=1)
    got = np.asarray(knn.reweighted_scores(jnp.asarray(feats), dist[..., 0], idx[..., 0], bank, 9))
    for b in range(3):
        f = feats[b].reshape(-1, 6)
        nn = _brute(f, bank_np)
        s = nn.min(1)
        worst = s.argmax()
        m_star = nn[worst].argmin()
        support = np.argsort(_brute(bank_np[m_star][None], bank_np)[0])[:9]
        d = np.linalg.norm(bank_np[support].astype(np.float64) - f[worst], axis=1)
        w = 1 - np.exp(np.linalg.norm(bank_np[m_star] - f[worst])) / np.exp(d).sum()
        assert got[b] == pytest.approx(w * s[worst], rel=1e-4)


def _numpy_coreset(points: np.ndarray, count: int, start: int) -> np.ndarray:
    chosen = [start]
    min_d = ((points - points[start]) ** 2).sum(1)
    for _ in range(count - 1):
        nxt = int(min_d.argmax())
        chosen.append(nxt)
        min_d = np.minimum(min_d, ((points - points[nxt]) ** 2).sum(1))
    return np.array(chosen)


def test_coreset_equals_numpy_farthest_point_sampling():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(500, 200)).astype(np.float32)
    key = jax.random.key(3)
    got = np.asarray(coreset.greedy_coreset(jnp.asarray(feats), 50, key))
    project_key, start_key = jax.random.split(key)
    points = np.asarray(coreset.project(jnp.asarray(feats), project_key, 128), dtype=np.float64)
    start = int(jax.random.randint(start_key, (), 0, 500, dtype=jnp.int32))
    np.testing.assert_array_equal(got, _numpy_coreset(points, 50, start))
    assert len(set(got.tolist())) == 50 and got[0] == start


def test_coreset_rejects_bad_sizes():
    with pytest.raises(ValueError):
        coreset.greedy_coreset(jnp.zeros((10, 3)), 11, jax.random.key(0))


def _run_on_eight_devices(body: str) -> None:
    code = "import jax, numpy as np\njax.config.update('jax_num_cpu_devices', 8)\n" + textwrap.dedent(body) + "\nprint('OK', len(jax.devices()))\n"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 8" in out.stdout


@pytest.mark.parametrize("n", [8 * 130, 8 * 130 + 5])
def test_sharded_search_over_eight_devices_equals_one_device(n):
    """The bank split over 8 devices (padded when 8 does not divide it), each searching its slice,
    the devices' k best merged: the distances and indices of one device's search."""
    _run_on_eight_devices(f"""
        from jaxad.runtime import parallel
        from jaxad.distances import knn
        rng = np.random.default_rng(0)
        bank = rng.normal(size=({n}, 16)).astype(np.float32)
        q = rng.normal(size=(3, 9, 16)).astype(np.float32)
        search = jax.jit(lambda q, b: knn.nearest_sharded(q, b, 4, parallel.batch_mesh(), chunk_size=50))
        d8, i8 = search(q, bank)
        d1, i1 = knn.nearest(q, bank, 4, chunk_size=50)
        np.testing.assert_allclose(np.asarray(d8), np.asarray(d1), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(i8), np.asarray(i1))
        assert int(np.asarray(i8).max()) < {n}
    """)


@pytest.mark.slow
def test_patchcore_predicts_with_the_bank_split_over_eight_devices():
    """PatchCore's prediction on 8 devices (sharded search, re-weighting included) equals its
    prediction with the whole bank on one device."""
    _run_on_eight_devices("""
        from unittest import mock
        from jaxad import backbones
        from jaxad.config import apply_overrides, config_path, load_config
        from jaxad.methods import patchcore
        config = apply_overrides(load_config(config_path("patchcore", "configs")),
                                 ["--config.image_size=64", "--config.chunk_size=100"])
        bb = backbones.load(config.backbone)
        rng = np.random.default_rng(0)
        bank = rng.normal(size=(8 * 50 + 3, 152)).astype(np.float32)
        images = rng.random((2, 64, 64, 3)).astype(np.float32)
        state = {"backbone": bb.variables, "bank": bank}
        run = lambda: [np.asarray(x) for x in jax.jit(lambda s, x: patchcore.predict(config, bb, s, x))(state, images)]
        sharded = run()
        with mock.patch.object(jax, "local_device_count", return_value=1):
            single = run()
        for a, b in zip(sharded, single):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    """)
