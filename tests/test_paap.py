"""PAAP: patch-adaptive pooling, shrunk per-group Gaussians, routing, and the method through its CLI."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_pipeline import SMALL, run_cli, run_script

from jaxad import backbones, checkpoint, features, postprocess
from jaxad.data import iterate_batches, open_dataset, synthetic
from jaxad.methods import paap


def _paap_reference(x: np.ndarray, p: int, out: int) -> np.ndarray:
    """Eq. 2 literally: zero-padded p×p neighbourhood, flattened (c, dy, dx), adaptive average pool."""
    b, h, w, c = x.shape
    r = p // 2
    padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    length = c * p * p
    res = np.zeros((b, h, w, out))
    for i in range(b):
        for y in range(h):
            for xx in range(w):
                vec = padded[i, y : y + p, xx : xx + p, :].transpose(2, 0, 1).reshape(-1)
                for o in range(out):
                    lo, hi = math.floor(o * length / out), math.ceil((o + 1) * length / out)
                    res[i, y, xx, o] = vec[lo:hi].mean()
    return res


@pytest.mark.parametrize("p, out", [(3, 7), (3, 20), (3, 45), (1, 4), (5, 33)])
def test_patch_adaptive_pool_matches_the_definition(p, out):
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)
    got = np.asarray(paap.patch_adaptive_pool(jnp.asarray(x), p, out))
    np.testing.assert_allclose(got, _paap_reference(x, p, out), rtol=1e-5, atol=1e-6)


def test_patch_adaptive_pool_is_local_mean_then_channel_mean_when_channels_divide():
    x = np.random.default_rng(1).normal(size=(1, 5, 4, 6)).astype(np.float32)
    got = np.asarray(paap.patch_adaptive_pool(jnp.asarray(x), 3, 3))
    local = np.asarray(features.local_average(jnp.asarray(x), 3))
    np.testing.assert_allclose(got, local.reshape(1, 5, 4, 3, 2).mean(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.port
def test_patch_adaptive_pool_matches_torch_unfold_and_adaptive_avg_pool1d():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(2, 4, 3, 10)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    patches = torch.nn.functional.unfold(t, 3, padding=1)  # [B, C·9, h·w]
    pooled = torch.nn.functional.adaptive_avg_pool1d(patches.permute(0, 2, 1).reshape(-1, 1, 90), 23)
    want = pooled.reshape(2, 4, 3, 23).numpy()
    np.testing.assert_allclose(np.asarray(paap.patch_adaptive_pool(jnp.asarray(x), 3, 23)), want, rtol=1e-5, atol=1e-6)


def test_output_channel_rule():
    assert paap.out_channels(320, 3, 700) == 700
    assert paap.out_channels(40, 3, 700) == 360
    assert paap.out_channels(2048, 3, 700) == 700


def test_ledoit_wolf_shrinkage_equals_sklearn():
    covariance = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(3).normal(size=(6, 3, 10)) * np.linspace(0.5, 3, 10)
    xc = x - x.mean(0)
    a, b = paap.shrinkage(xc, "ledoit_wolf", 0.0, 0.0)
    for l in range(3):
        want, _ = covariance.ledoit_wolf(x[:, l])
        np.testing.assert_allclose(a[l] * xc[:, l].T @ xc[:, l] + b[l] * np.eye(10), want, rtol=1e-10, atol=1e-12)


def _numpy_mahalanobis(feats, group_id, test, groups, mode):
    """Per group and location: np.cov (+ ridge) or sklearn's Ledoit-Wolf, then a solve."""
    want = np.zeros(test.shape[:2])
    for i, g in enumerate(groups):
        x = feats[group_id == g].astype(np.float64)
        for l in range(test.shape[1]):
            if mode == "ridge":
                cov = np.cov(x[:, l].T) + 0.05 * np.eye(test.shape[2])
            else:
                cov = pytest.importorskip("sklearn.covariance").ledoit_wolf(x[:, l])[0]
            v = test[i, l] - x[:, l].mean(0)
            want[i, l] = np.sqrt(v @ np.linalg.solve(cov, v))
    return want


def _score(feats, group_id, test, groups, mode, chunk_bytes=paap.CHUNK_BYTES):
    members = paap.group_members(group_id)
    stats = jax.tree.map(jnp.asarray, paap.group_gaussians(feats, members, mode, ridge=0.05))
    return np.asarray(paap.mahalanobis(jnp.asarray(test), jnp.asarray(groups), jnp.asarray(members), stats, chunk_bytes))


@pytest.mark.parametrize("mode", ["ledoit_wolf", "ridge"])
def test_group_mahalanobis_matches_numpy_solve(mode):
    rng = np.random.default_rng(4)
    n_loc, d = 4, 12
    feats = (5.0 + rng.normal(size=(9, n_loc, d)) * rng.uniform(0.5, 2, size=d)).astype(np.float32)
    group_id = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0])  # sizes 4 and 5: group 1 is padded
    test = (5.0 + rng.normal(size=(3, n_loc, d))).astype(np.float32)
    groups = np.array([1, 0, 1])
    got = _score(feats, group_id, test, groups, mode)
    np.testing.assert_allclose(got, _numpy_mahalanobis(feats, group_id, test, groups, mode), rtol=2e-4)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 5 * 12 * 4 * 3])  # one location per block; blocks of 3 (7 = 3+3+1)
def test_scoring_in_blocks_of_locations_equals_scoring_at_once(chunk_bytes):
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(9, 7, 12)).astype(np.float32)
    group_id = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0])
    test = rng.normal(size=(3, 7, 12)).astype(np.float32)
    groups = np.array([0, 1, 0])
    whole = _score(feats, group_id, test, groups, "ledoit_wolf", chunk_bytes=2**40)
    np.testing.assert_allclose(_score(feats, group_id, test, groups, "ledoit_wolf", chunk_bytes), whole, rtol=1e-6)
    np.testing.assert_allclose(whole, _numpy_mahalanobis(feats, group_id, test, groups, "ledoit_wolf"), rtol=2e-4)


def test_the_gathered_rows_stay_within_the_chunk_budget():
    """The scoring program holds no [B, m, L, d] array: the largest intermediate is one block's rows."""
    b, n_loc, d, n_img = 4, 256, 32, 40
    group_id = np.arange(n_img) % 2  # two groups of 20
    members = paap.group_members(group_id)
    stats = {"rows": jnp.zeros((n_loc, n_img + 1, d)), "mean": jnp.zeros((n_loc, 2, d)),
             "whiten": jnp.broadcast_to(jnp.eye(20), (n_loc, 2, 20, 20)), "iso": jnp.ones((n_loc, 2))}
    budget = 2**18  # 64 KiB·4: 12 locations of [B, m, d] = 10 KiB each
    hlo = jax.jit(lambda f, g: paap.mahalanobis(f, g, jnp.asarray(members), stats, budget)).lower(
        jnp.zeros((b, n_loc, d)), jnp.zeros(b, jnp.int32)).compile().as_text()
    assert f"f32[{b},20,{n_loc},{d}]" not in hlo and f"f32[{n_loc},{b},20,{d}]" not in hlo
    assert f"f32[{budget // (b * 20 * d * 4)},{b},20,{d}]" in hlo
    # no LAPACK call inside the loop: a batched triangular solve there deadlocked XLA's CPU thread pool
    assert "custom_call_target=\"lapack" not in hlo and "trsm" not in hlo


def test_routing_picks_the_group_whose_lead_matches():
    rng = np.random.default_rng(5)
    leads = rng.normal(size=(3, 20, 8))
    test = np.stack([leads[2][rng.permutation(20)], leads[0][rng.permutation(20)]]) + 0.05 * rng.normal(size=(2, 20, 8))
    unit = lambda v: jnp.asarray(v / np.linalg.norm(v, axis=-1, keepdims=True), jnp.float32)
    config = ml_collections.ConfigDict({"matcher": "dense_mnn", "match_min_similarity": -1.0, "match_ratio": 1.0})
    route = jax.jit(lambda s, t: paap.route(config, s, None, t))
    np.testing.assert_array_equal(np.asarray(route({"lead_desc": unit(leads)}, unit(test))), [2, 0])


@pytest.fixture(scope="module")
def gear(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=1, categories=["gear"],
                              image_size=64, n_train=8, n_test_good=3, n_per_defect=2)
    return root / "gear"


@pytest.fixture(scope="module")
def fitted(gear, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "w"
    args = ["--method", "paap", "--data", str(gear), "--workdir", str(workdir), *SMALL, "--config.min_group_size=3",
            "--config.group_size=4", "--config.calibration_fraction=0.0"]  # fit on all 8: the state is recomputed below
    assert run_cli("fit.py", *args) == 0
    return workdir


@pytest.mark.slow
def test_fit_script_end_to_end(fitted, gear, capsys):
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["n_train"] == 8 and 0 <= metrics["image_auroc"] <= 1 and metrics["predict_images_per_second"] > 0
    config, state = checkpoint.load(fitted)
    assert state["group_id"].shape == (8,) and state["members"].shape[0] == len(state["leads"])
    assert len(state["leads"]) == state["image"]["mean"].shape[1] and (np.bincount(state["group_id"]) >= 3).all()
    assert all(state["group_id"][lead] == g for g, lead in enumerate(state["leads"]))
    # two resolutions at 64 px: stage6 (stride 32) is 2×2 with C' = 700, stage2 (stride 8) 8×8 with C' = 9·40
    assert state["image"]["rows"].shape == (4, 9, 700) and state["pixel"]["rows"].shape == (64, 9, 360)
    # the stored means are the group means of the adapted features of the training images
    bb = backbones.load(config.backbone)
    images = np.concatenate([b.images for b in iterate_batches(open_dataset(gear).train, (64, 64), 8)])
    adapted, desc = jax.jit(lambda x: paap.embed(config, bb, bb.variables, x))(images)
    assert desc.shape == (8, 16, 112)  # stage4 is 4×4
    for name, f in adapted.items():
        f = np.asarray(f).reshape(8, -1, f.shape[-1])
        for g in range(len(state["leads"])):
            np.testing.assert_allclose(state[name]["mean"][:, g], f[state["group_id"] == g].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["lead_desc"], np.asarray(desc)[state["leads"]], rtol=1e-5, atol=1e-6)
    code, _, err = run_script("evaluate.py", "--workdir", fitted, capsys=capsys)
    assert code == 0, err
    assert json.loads((fitted / "metrics.json").read_text())["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)


def test_score_from_the_last_stage_map_from_the_stride_8_tap(fitted):
    config, saved = checkpoint.load(fitted)
    bb = backbones.load(config.backbone)
    state = {"backbone": bb.variables, **jax.tree.map(jnp.asarray, saved)}
    images = jnp.asarray(np.random.default_rng(7).random((2, 64, 64, 3)), jnp.float32)
    scores, maps = jax.jit(lambda s, x: paap.predict(config, bb, s, x))(state, images)
    adapted, desc = paap.embed(config, bb, bb.variables, images)
    group = paap.route(config, state, images, desc)
    grids = {name: paap.mahalanobis(f.reshape(2, -1, f.shape[-1]), group, state["members"], state[name]).reshape(2, *f.shape[1:3])
             for name, f in adapted.items()}
    assert grids["image"].shape == (2, 2, 2) and grids["pixel"].shape == (2, 8, 8)
    want = {name: np.asarray(postprocess.anomaly_maps(g, (64, 64), config.blur_sigma)) for name, g in grids.items()}
    np.testing.assert_allclose(np.asarray(maps), want["pixel"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), want["image"].max(axis=(1, 2)), rtol=1e-4)


def test_feature_sigma_is_in_pixels_of_each_taps_stride():
    """σ = 8 px is 1 cell of stride 8 and ¼ cell of stride 32: the blur each grid gets."""
    config = ml_collections.ConfigDict({"patch_size": 1, "num_channels": 1, "feature_sigma": 8.0})
    bb = backbones.load("efficientnet_lite0", taps=("stage6",))
    maps = {t: jnp.asarray(np.random.default_rng(8).normal(size=(1, n, n, 1)), jnp.float32) for t, n in [("stage2", 8), ("stage6", 4)]}
    for tap, cells in [("stage2", 1.0), ("stage6", 0.25)]:
        want = np.asarray(paap.smooth(maps[tap], cells))
        np.testing.assert_allclose(np.asarray(paap.adapt(config, bb, maps, (tap,))), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override, fragment", [
    ("--config.matcher=sift", "pip install opencv-python-headless"),
    ("--config.shrinkage=oas", "shrinkage=oas"),
    ("--config.taps=('layer4',)", "layer4"),
    ("--config.pixel_taps=('layer2',)", "layer2"),
    ("--config.feature_sigma=16.0", "feature_sigma=16.0: it is in pixels and must be at most image_size/8 = 8"),
])
def test_config_errors_are_one_line(gear, tmp_path, capsys, monkeypatch, override, fragment):
    monkeypatch.setitem(sys.modules, "cv2", None)
    code, _, err = run_script("fit.py", "--method", "paap", "--data", gear, "--workdir", tmp_path / "w", *SMALL, override,
                              capsys=capsys)
    assert code == 2 and "Traceback" not in err and fragment in err.strip().splitlines()[-1]


def test_fit_with_opencv_routes_inside_jit(gear, tmp_path, capsys):
    pytest.importorskip("cv2")
    code, _, err = run_script("fit.py", "--method", "paap", "--data", gear, "--workdir", tmp_path / "w", *SMALL,
                              "--config.matcher=orb", "--config.match_ratio=0.9", "--config.min_group_size=2", capsys=capsys)
    assert code == 0, err
    _, state = checkpoint.load(tmp_path / "w")
    assert state["lead_images"].dtype == np.uint8 and state["lead_images"].shape[1:] == (64, 64)
