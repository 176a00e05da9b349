"""CRD: closed form against the ridge-regression definition, per-position Grams, many λ at once,
streaming, sharding, conditioning, and the method's settings and λ selection."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxad import backbones, distances
from jaxad.config import apply_overrides, load_config
from jaxad.data import Batch, iterate_batches, open_dataset, synthetic
from jaxad.distances import crd, protocol
from jaxad.errors import ConfigError
from jaxad.methods import crd as crd_method

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


def _position(position: str, blocks: int = 2) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"position": position, "position_blocks": blocks, "lam": "0.5",
                                      "lam_mode": "absolute", "rff_dim": 64, "rff_scale": 1.0, "seed": 0, "reg": 0.01})


def _fit(distance: protocol.Distance, config, f: np.ndarray, valid: np.ndarray, batch: int = 3) -> protocol.Stats:
    stats = distance.init(config, jnp.asarray(f[:batch][valid[:batch]]))
    total = protocol.zero_sums(stats)
    for s in range(0, len(f), batch):
        inc = jax.jit(distance.update)(protocol.zero_sums(stats), jnp.asarray(f[s : s + batch]), jnp.asarray(valid[s : s + batch]))
        total = protocol.add(total, inc.sums)
    return total


def test_registry_finds_every_protocol_distance():
    assert {"crd", "kernel_crd", "mahalanobis"} <= set(distances.names())
    assert distances.get("crd") is crd.DISTANCE
    with pytest.raises(ConfigError, match="distance=knn: unknown distance"):
        distances.get("knn")  # a module of the package, but no DISTANCE


@pytest.mark.parametrize("position", ["location", "blocks", "global"])
def test_per_position_matrix_equals_a_numpy_solve_per_group(position):
    rng = np.random.default_rng(5)
    f = rng.normal(size=(7, 4, 4, 5)).astype(np.float32)
    valid = np.array([True] * 6 + [False])  # a padded image adds nothing
    config = _position(position)
    params = crd.DISTANCE.finalize(_fit(crd.DISTANCE, config, f, valid), config)
    group = protocol.cell_groups(config, (4, 4))
    x = f[valid].reshape(6, 16, 5).astype(np.float64)
    q = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
    got = np.asarray(crd.DISTANCE.score(params, jnp.asarray(q))).reshape(2, 16)
    for g in range(params["M"].shape[0]):
        F = x[:, group == g].reshape(-1, 5).T  # the group's training patches, d × n
        want_M = 0.5 * np.linalg.inv(F @ F.T + 0.5 * np.eye(5))
        np.testing.assert_allclose(np.asarray(params["M"][g]), want_M, rtol=1e-4, atol=1e-6)
        for b in range(2):
            for cell in np.flatnonzero(group == g):
                y = q[b].reshape(16, 5)[cell].astype(np.float64)
                assert got[b, cell] == pytest.approx(_ridge_residual(F, y, 0.5), rel=1e-4)
    assert params["M"].shape[0] == {"location": 16, "blocks": 4, "global": 1}[position]


def test_blocks_tile_the_grid():
    g = protocol.cell_groups(_position("blocks", 3), (6, 7)).reshape(6, 7)
    assert g[0, 0] == 0 and g[5, 6] == 8 and g[2, 3] == 4
    assert sorted(np.unique(g, return_counts=True)[1]) == [4, 4, 4, 4, 4, 4, 6, 6, 6]


@pytest.mark.parametrize("position,blocks,grid", [("global", 1, (4, 4)), ("blocks", 2, (4, 4)),
                                                   ("blocks", 3, (6, 7)), ("location", 1, (6, 7))])
def test_grouped_gram_equals_a_numpy_sum_over_each_groups_cells(position, blocks, grid):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3, *grid, 5)).astype(np.float32)
    config = _position(position, blocks)
    group = protocol.cell_groups(config, grid)
    groups = protocol.num_groups(config, grid)
    got = np.asarray(jax.jit(protocol.grouped_outer, static_argnums=1)(jnp.asarray(x), groups))
    cells = x.reshape(3, -1, 5).astype(np.float64)
    want = np.zeros((groups, 5, 5))
    for cell, g in enumerate(group):
        want[g] += cells[:, cell].T @ cells[:, cell]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    table = protocol.cells_of_groups(groups, grid)
    for g in range(groups):  # the gathered layout holds each group's cells once, padding aside
        assert sorted(c for c in table[g] if c < group.size) == list(np.flatnonzero(group == g))


def test_candidate_scores_equal_one_fit_per_lambda():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(6, 4, 4, 5)).astype(np.float32)
    config = _position("blocks")
    stats = _fit(crd.DISTANCE, config, f, np.ones(6, bool))
    w, V = crd.spectrum(stats.sums["G"])
    candidates = [1.0, 0.1, 0.01]
    lams = np.stack([crd.group_lambda(stats, c, "trace") for c in candidates])
    q = jnp.asarray(rng.normal(size=(2, 4, 4, 5)).astype(np.float32))
    together = np.asarray(jax.jit(crd.candidate_scores)(stats.context, jnp.asarray(w, jnp.float32),
                                                        jnp.asarray(V, jnp.float32), jnp.asarray(lams, jnp.float32), q))
    for k, c in enumerate(candidates):
        one = crd.DISTANCE.finalize(stats, ml_collections.ConfigDict({"lam": c, "lam_mode": "trace"}))
        np.testing.assert_allclose(together[k], np.asarray(crd.DISTANCE.score(one, q)), rtol=2e-4)


def test_kernel_crd_explains_training_patches_and_not_outliers():
    from jaxad.distances import kernel_crd

    rng = np.random.default_rng(7)
    f = rng.normal(size=(20, 2, 2, 3)).astype(np.float32)
    config = _position("global")
    config.rff_dim, config.lam = 512, "0.01"
    stats = _fit(kernel_crd.DISTANCE, config, f, np.ones(20, bool), batch=5)
    assert stats.sums["G"].shape == (1, 512, 512)
    # φ(f)·φ(g) ≈ exp(−‖f−g‖²/2σ²) with σ the median patch distance
    a, b = jnp.asarray(f[0, 0, 0]), jnp.asarray(f[1, 0, 0])
    phi = crd.feature_map(stats.context, jnp.stack([a, b]))
    sigma = 1.0 / np.std(np.asarray(stats.context["rff_w"]))
    assert float(phi[0] @ phi[1]) == pytest.approx(float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))), abs=0.1)
    params = kernel_crd.DISTANCE.finalize(stats, config)
    inside = np.asarray(kernel_crd.DISTANCE.score(params, jnp.asarray(f[:2])))
    outside = np.asarray(kernel_crd.DISTANCE.score(params, jnp.asarray(f[:2] + 6.0)))
    assert outside.min() > 10 * inside.max()


def test_global_gaussian_is_the_mahalanobis_distance():
    from jaxad.distances import mahalanobis

    rng = np.random.default_rng(8)
    f = (50.0 + rng.normal(size=(9, 3, 3, 4)) @ rng.normal(size=(4, 4))).astype(np.float32)
    config = _position("global")
    params = mahalanobis.DISTANCE.finalize(_fit(mahalanobis.DISTANCE, config, f, np.ones(9, bool)), config)
    x = f.reshape(-1, 4).astype(np.float64)
    cov = np.cov(x.T) + 0.01 * np.eye(4)
    q = rng.normal(size=(1, 3, 3, 4)).astype(np.float32) + 50.0
    r = q.reshape(-1, 4) - x.mean(0)
    want = np.sqrt(np.einsum("nd,nd->n", r, np.linalg.solve(cov, r.T).T))
    np.testing.assert_allclose(np.asarray(mahalanobis.DISTANCE.score(params, jnp.asarray(q))).reshape(-1), want, rtol=1e-4)


def test_location_statistics_too_large_are_refused():
    config = _position("location")
    with pytest.raises(ConfigError, match="position=location: the statistics need 9.0 GiB.*position=blocks"):
        protocol.check_memory(config, crd.DISTANCE, 1536, (32, 32))  # WRN50 layer2+3 at 256 px
    protocol.check_memory(_position("blocks", 4), crd.DISTANCE, 1536, (32, 32))


@pytest.fixture(scope="module")
def gear(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "d", seed=1, categories=["gear"], image_size=64,
                              n_train=8, n_test_good=2, n_per_defect=1)
    return open_dataset(root / "gear")


def _config(**overrides):
    base = load_config(ROOT / "configs" / "crd.py")
    return apply_overrides(base, [f"--config.{k}={v}" for k, v in {"image_size": 64, "batch_size": 4, **overrides}.items()])


@pytest.mark.parametrize("override, message", [
    ("position=diagonal", "position=diagonal: choose one of global, blocks, location"),
    ("position_blocks=0", "position_blocks=0: must be at least 1"),
    ("position_blocks=17", "position_blocks=17: must be between 1 and 16"),
    ("lam=abc", "lam=abc: expected a positive number or 'auto'"),
    ("lam=-1", "lam=-1: must be in"),
    ("lam_mode=relative", "lam_mode=relative: choose one of absolute"),
    ("lam_mode=absolute", "lam=auto: candidates are relative"),
    ("lam_candidates=(0.1,-1.0)", "lam_candidates=.*expected positive numbers"),
    ("lam_heldout=0.9", "lam_heldout=0.9: must be in"),
    ("image_score=mean", "image_score=mean: choose one of max, topk_mean"),
    ("image_topk=0", "image_topk=0: must be at least 1"),
    ("distance=nearest", "distance=nearest: unknown distance"),
    ("rff_dim=0", "rff_dim=0: must be at least 1"),
    ("image_size=1536", "position=location: the statistics need"),
])
def test_bad_settings_are_refused_by_name(gear, override, message):
    extra = {"image_size": {"position": "location"}, "position_blocks": {"position": "blocks"}}.get(override.split("=")[0], {})
    key, value = override.split("=", 1)
    config = _config(**{**extra, key: value})
    with pytest.raises(ConfigError, match=message):
        crd_method.fit(config, iterate_batches(gear.train, (64, 64), 4), backbones.load(config.backbone))


@pytest.mark.slow
def test_auto_lambda_never_reads_test_data(gear, tmp_path, monkeypatch):
    """Every file opened while λ is chosen is recorded (builtins.open and PIL): none is a test image."""
    from helpers import record_opened_files

    from jaxad import pipeline

    config = _config(position="blocks", position_blocks=2)
    config.data, config.workdir = str(gear.root), str(tmp_path / "w")
    bb = backbones.load(config.backbone)
    opened = record_opened_files(monkeypatch)
    state, _ = pipeline.fit(config, gear, bb)
    monkeypatch.undo()
    test_files = {str(s.path) for s in gear.test} | {str(m) for s in gear.test for m in s.mask_paths}
    assert {str(s.path) for s in gear.train} <= set(opened)  # the recording sees the reads
    assert not test_files & set(opened), sorted(test_files & set(opened))
    assert float(state["lam"]) in config.lam_candidates
    curve = np.asarray(state["lam_curve"])
    assert curve.shape == (len(config.lam_candidates), 3) and (0 <= curve[:, 1:]).all() and (curve[:, 1:] <= 1).all()
    assert float(state["lam"]) == curve[np.argmax(curve[:, 1] + curve[:, 2]), 0]
    assert (tmp_path / "w" / "lam_curve.json").is_file()
    grid = config.image_size // 4  # the default taps' stride-4 grid
    assert state["n"] == 8 * grid * grid  # held-out images were added back: every training patch counts


def test_hold_out_keeps_the_first_image_and_takes_one_of_two():
    images = np.minimum(np.arange(16), 14).astype(np.float32)[:, None, None, None] * np.ones((16, 2, 2, 3), np.float32)
    batches = [Batch(images[s : s + 4], None, np.zeros(4, np.int32), np.arange(s, s + 4) < 15, ()) for s in range(0, 16, 4)]
    kept: list = []
    out = list(crd_method._hold_out(batches, 7, kept))
    trained = np.concatenate([b.images[b.valid][:, 0, 0, 0] for b in out])
    assert [float(k[0, 0, 0]) for k in kept] == [1.0, 8.0]
    assert sorted(trained.tolist()) == [i for i in range(15) if i not in (1, 8)]
    kept2: list = []
    list(crd_method._hold_out(batches[:1], 7, kept2))
    assert len(kept2) == 1


def test_weighted_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(9)
    s = rng.normal(size=40).round(1)  # with ties
    pos, neg = rng.random(40) < 0.3, rng.random(40) < 0.5
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[pos] for b in s[neg]]
    assert float(crd_method.weighted_auroc(jnp.asarray(s), jnp.asarray(pos), jnp.asarray(neg))) == pytest.approx(np.mean(pairs))


@pytest.mark.slow
def test_topk_mean_image_score_and_inactive_lambda_warning(gear):
    config = _config(image_score="topk_mean", image_topk=3, lam="1e-9", lam_mode="absolute")
    bb = backbones.load(config.backbone)
    with pytest.warns(UserWarning, match="changes no ranking"):
        state = crd_method.fit(config, iterate_batches(gear.train, (64, 64), 4), bb)
    assert state["lam_ratio"] < 1e-3
    patch = jnp.asarray(np.random.default_rng(0).random((2, 4, 4)), jnp.float32)
    want = np.sort(np.asarray(patch).reshape(2, -1), axis=1)[:, -3:].mean(1)
    np.testing.assert_allclose(np.asarray(crd_method.image_scores(config, patch)), want, rtol=1e-6)


@pytest.mark.slow
def test_fit_sharded_over_eight_devices_equals_one_device():
    """Every protocol distance (CRD by position, blocks with auto λ, kernel CRD, the Gaussian) fits to the
    same params with the batch split over 8 fake CPU devices (one psum) as on one device.

    M moves by at most ‖ΔG‖/λ when float32 sums are added in another order: on 14 random images G is
    rank-deficient, and a λ of 1e-4 of its mean eigenvalue moved M by 7e-3 of its largest entry
    (measured), so auto λ chooses among candidates ≥ 0.1 here.

    Runs in a fresh process: the number of CPU devices is fixed when JAX starts.
    """
    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 8)
        from jaxad import backbones
        from jaxad.runtime import parallel
        from jaxad.config import apply_overrides, load_config
        from jaxad.data import Batch
        from jaxad.methods import crd
        assert len(jax.devices()) == 8, jax.devices()
        base = load_config("configs/crd.py")
        bb = backbones.load(base.backbone)
        rng = np.random.default_rng(0)
        def batches():
            for _ in range(2):
                images = rng.random((8, 64, 64, 3), dtype=np.float32)
                valid = np.array([True] * 7 + [False])  # a padded last image must not count
                yield Batch(images, None, np.zeros(8, np.int32), valid, tuple(map(str, range(8))))
        data = list(batches())
        for variant in (["position=location", "lam=0.1"], ["position=blocks", "position_blocks=2", "lam_candidates=(1.0,0.3,0.1)"],
                        ["distance=kernel_crd", "rff_dim=256", "lam=0.1"], ["distance=mahalanobis"]):
            config = apply_overrides(base, ["--config.image_size=64", "--config.batch_size=8", *("--config." + v for v in variant)])
            eight = crd.fit(config, data, bb, mesh=parallel.batch_mesh())
            one = crd.fit(config, data, bb, mesh=parallel.batch_mesh(jax.devices()[:1]))
            assert eight["n"] == one["n"], (variant, eight["n"], one["n"])
            assert eight.keys() == one.keys()
            for key in eight:
                if key == "lam_curve":
                    np.testing.assert_allclose(eight[key], one[key], atol=1e-3, err_msg=str(variant))
                else:
                    # M's eigenvalues lie in (0, 1]; cond(G + λI) turns float32 rounding of G into ~1e-4 in M.
                    a, b = np.asarray(eight[key], np.float64), np.asarray(one[key], np.float64)
                    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * max(np.abs(b).max(), 1e-30), err_msg=f"{variant} {key}")
            if "lam" in one:
                assert eight["lam"] == one["lam"], variant
        print("OK")
        """
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
