"""CRD: closed form against the ridge-regression definition, streaming, sharding, conditioning."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.distances import crd

ROOT = Path(__file__).resolve().parents[1]


def _ridge_residual(F: np.ndarray, y: np.ndarray, lam: float) -> float:
    """||y − Fρ*||² with ρ* = argmin ||y − Fρ||² + λ||ρ||², solved in the n-dimensional form."""
    n = F.shape[1]
    rho = np.linalg.solve(F.T @ F + lam * np.eye(n), F.T @ y)
    return float(np.sum((y - F @ rho) ** 2))


def test_gram_sums_outer_products_over_leading_axes():
    f = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = sum(np.outer(v, v) for v in f.reshape(-1, 5).astype(np.float64))
    np.testing.assert_allclose(np.asarray(jax.jit(crd.gram)(f)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [3, 40])  # fewer and more patches than dimensions
def test_score_is_the_ridge_residual(n):
    rng = np.random.default_rng(n)
    d, lam = 8, 0.7
    F = rng.normal(size=(d, n))
    Y = rng.normal(size=(5, d))
    M = crd.matrix(crd.gram(jnp.asarray(F.T, jnp.float32)), lam)
    got = np.asarray(jax.jit(crd.score)(M, jnp.asarray(Y, jnp.float32)))
    want = np.array([_ridge_residual(F, y, lam) for y in Y])
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_matrix_is_lam_times_inverse_and_symmetric():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(50, 6))
    G = (A.T @ A).astype(np.float32)
    M = np.asarray(crd.matrix(G, 5.0))
    np.testing.assert_allclose(M, 5.0 * np.linalg.inv(G.astype(np.float64) + 5.0 * np.eye(6)), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(M, M.T)


def test_score_accepts_any_leading_shape():
    M = jnp.eye(4) * 0.5
    f = jnp.ones((2, 3, 5, 4))
    assert crd.score(M, f).shape == (2, 3, 5)
    np.testing.assert_allclose(crd.score(M, f), 1.0)


def test_ill_conditioned_gram_stays_finite_and_bounded():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 64)) * 10  # rank 3 in 64 dims: cond(G) = inf
    M = np.asarray(crd.matrix(crd.gram(jnp.asarray(A, jnp.float32)), 5.0))
    assert np.isfinite(M).all()
    eig = np.linalg.eigvalsh(M.astype(np.float64))
    assert eig.min() > -1e-4 and eig.max() < 1 + 1e-4
    # A training patch is explained (tiny distance); an orthogonal direction is not (distance ≈ |y|²).
    y_in = A[0].astype(np.float32)
    y_out = np.linalg.svd(A)[2][-1].astype(np.float32)
    assert float(crd.score(M, y_in)) < 1e-3 * float(y_in @ y_in)
    assert float(crd.score(M, y_out)) == pytest.approx(1.0, rel=0.1)  # float32 eigh gives ~0.2 here


def test_streaming_gram_equals_one_shot():
    f = np.random.default_rng(3).normal(size=(10, 4, 4, 7)).astype(np.float32)
    streamed = sum(np.asarray(crd.gram(f[i : i + 3])) for i in range(0, 10, 3))
    np.testing.assert_allclose(streamed, np.asarray(crd.gram(f)), rtol=1e-5, atol=1e-4)


def test_lambda_modes():
    G = jnp.eye(4) * 10.0
    assert float(crd.effective_lambda(G, 100, 5.0, "absolute")) == 5.0
    assert float(crd.effective_lambda(G, 100, 0.5, "trace")) == pytest.approx(5.0)
    assert float(crd.effective_lambda(G, 100, 0.5, "per_patch")) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        crd.effective_lambda(G, 100, 5.0, "bogus")


def test_fit_sharded_over_eight_devices_equals_one_device():
    """CRD's fit with the batch split over 8 fake CPU devices (one psum) gives the M of one device.

    Runs in a fresh process: the number of CPU devices is fixed when JAX starts.
    """
    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 8)
        from jaxad import backbones
        from jaxad.runtime import parallel
        from jaxad.config import load_config
        from jaxad.data import Batch
        from jaxad.methods import crd
        assert len(jax.devices()) == 8, jax.devices()
        config = load_config("configs/crd.py")
        bb = backbones.load(config.backbone)
        rng = np.random.default_rng(0)
        def batches():
            for _ in range(2):
                images = rng.random((8, 64, 64, 3), dtype=np.float32)
                valid = np.array([True] * 7 + [False])  # a padded last image must not count
                yield Batch(images, None, np.zeros(8, np.int32), valid, tuple(map(str, range(8))))
        data = list(batches())
        eight = crd.fit(config, data, bb, mesh=parallel.batch_mesh())
        one = crd.fit(config, data, bb, mesh=parallel.batch_mesh(jax.devices()[:1]))
        assert eight["n"] == one["n"] == 2 * 7 * 8 * 8, (eight["n"], one["n"])
        scale = np.abs(one["G"]).max()  # float32 partial sums differ in order only
        np.testing.assert_allclose(eight["G"], one["G"], rtol=1e-5, atol=1e-6 * scale)
        # M's eigenvalues lie in (0, 1]; cond(G + λI) ~ 1e4 turns float32 rounding of G into ~1e-4 in M.
        np.testing.assert_allclose(np.asarray(eight["M"]), np.asarray(one["M"]), atol=1e-3)
        print("OK")
        """
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
