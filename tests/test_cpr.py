"""CPR building blocks against independent numpy references (and torch's grid_sample)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxad import backbones, features
from jaxad.config import load_config
from jaxad.data import Batch, anomalies
from jaxad.distances import windowed
from jaxad.methods import cpr
from jaxad.methods.cpr import foreground, neighbour_table, retrieval
from jaxad.methods.cpr import train as lrb_training
from jaxad.nets import cpr_local


def _np_robust_kl(p, q, drop, eps=1e-8):
    out = np.zeros((len(p), len(q)))
    for i in range(len(p)):
        for j in range(len(q)):
            blocks = [np.sum((p[i, b] + eps) * np.log((p[i, b] + eps) / (q[j, b] + eps))) for b in range(p.shape[1])]
            out[i, j] = np.sum(sorted(blocks)[: len(blocks) - drop])
    return out


def _random_hists(rng, n, blocks=25, k=12):
    h = rng.random((n, blocks, k)) ** 3
    h[h < 0.2] = 0.0  # empty bins, as real block histograms have
    h[:, :, 0] += 1e-3
    return (h / h.sum(-1, keepdims=True)).astype(np.float32)


def test_robust_kl_and_top_k_match_numpy():
    rng = np.random.default_rng(0)
    p, q = _random_hists(rng, 3), _random_hists(rng, 7)
    got = np.asarray(jax.jit(retrieval.robust_kl, static_argnums=2)(jnp.asarray(p), jnp.asarray(q), 5))
    want = _np_robust_kl(p, q, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    idx = np.asarray(retrieval.top_k(jnp.asarray(got), 4))
    np.testing.assert_array_equal(idx, np.argsort(want, axis=1)[:, :4])


def test_self_is_excluded_from_training_neighbours():
    rng = np.random.default_rng(1)
    h = _random_hists(rng, 6)
    d = np.asarray(retrieval.robust_kl(jnp.asarray(h), jnp.asarray(h), 5))
    assert np.allclose(np.diag(d), 0.0, atol=1e-5)  # without exclusion every image would find itself
    table = neighbour_table(d, np.arange(6), k=3, exclude_self=True)
    for i in range(6):
        order = [j for j in np.argsort(d[i]) if j != i]
        np.testing.assert_array_equal(table[i], order[:3])
    # only candidates are returned (a held-out split): rows 4, 5 are not candidates
    table = neighbour_table(d, np.arange(4), k=2, exclude_self=True)
    assert set(table.ravel()) <= {0, 1, 2, 3} and all(i not in table[i] for i in range(6))


def test_same_image_fingerprints_tolerate_float_noise_only():
    rng = np.random.default_rng(2)
    refs = rng.random((5, 24)).astype(np.float32)
    query = np.stack([refs[3] * (1 + 1e-6), refs[1] + 0.01])
    same = np.asarray(retrieval.same_image(jnp.asarray(query), jnp.asarray(refs)))
    assert same[0].tolist() == [False, False, False, True, False] and not same[1].any()


def test_block_histograms_match_numpy_counts():
    rng = np.random.default_rng(3)
    words = rng.integers(0, 4, (2, 10, 10))
    got = np.asarray(retrieval.block_histograms(jnp.asarray(words), 4, 5))
    for b in range(2):
        for by in range(5):
            for bx in range(5):
                cell = words[b, 2 * by: 2 * by + 2, 2 * bx: 2 * bx + 2].ravel()
                np.testing.assert_allclose(got[b, by * 5 + bx], np.bincount(cell, minlength=4) / 4, atol=1e-6)


def test_lloyd_step_matches_numpy_and_kmeans_finds_blobs():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    c = x[:6].copy()
    c[5] = 100.0  # an empty cluster keeps its centre
    assign = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), 1)
    want = np.stack([x[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(6)])
    got = np.asarray(jax.jit(retrieval.lloyd_step)(jnp.asarray(x), jnp.asarray(c)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    true = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    blobs = np.concatenate([t + 0.1 * rng.normal(size=(100, 2)) for t in true]).astype(np.float32)
    found = np.asarray(retrieval.kmeans(jnp.asarray(blobs), 3, jax.random.key(0), n_init=3, iterations=10))
    assert np.abs(np.sort(found, axis=0) - np.sort(true, axis=0)).max() < 0.1


def _brute_force_search(query, bank, neighbours, r):
    B, h, w, _ = query.shape
    out = np.full((B, h, w), np.inf)
    half = r // 2
    for b in range(B):
        for y in range(h):
            for x in range(w):
                for k in neighbours[b]:
                    for dy in range(-half, half + 1):
                        for dx in range(-half, half + 1):
                            if 0 <= y + dy < h and 0 <= x + dx < w:
                                d = 1 - float(query[b, y, x] @ bank[k, y + dy, x + dx])
                                out[b, y, x] = min(out[b, y, x], d)
    return out


@pytest.mark.parametrize("r,chunk", [(3, 1), (3, 2), (1, 3), (5, 2)])
def test_windowed_search_matches_brute_force(r, chunk):
    rng = np.random.default_rng(5)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    query = unit(rng.normal(size=(2, 5, 6, 4))).astype(np.float32)
    bank = unit(rng.normal(size=(4, 5, 6, 4))).astype(np.float32)
    neighbours = np.array([[2, 0, 3], [1, 1, 2]], np.int32)
    search = jax.jit(windowed.windowed_min_distance, static_argnums=(3, 4))
    got = np.asarray(search(jnp.asarray(query), jnp.asarray(bank), jnp.asarray(neighbours), r, chunk))
    np.testing.assert_allclose(got, _brute_force_search(query, bank, neighbours, r), atol=1e-5)


def test_lda_matches_numpy_and_separates():
    rng = np.random.default_rng(6)
    pos = rng.normal(1.0, 1.0, (400, 6)).astype(np.float32)
    neg = rng.normal(-1.0, 1.5, (300, 6)).astype(np.float32)
    pos[:, 5] = neg[:, 5] = 0.0  # a dead channel: singular covariance, as ReLU features have
    w, b = jax.jit(foreground.fit_lda)(jnp.asarray(pos), jnp.asarray(neg))
    mp, mn = pos.mean(0), neg.mean(0)
    cov = ((pos - mp).T @ (pos - mp) + (neg - mn).T @ (neg - mn)) / (len(pos) + len(neg) - 2)
    w_np = np.linalg.pinv(cov) @ (mp - mn)
    b_np = -0.5 * (mp + mn) @ w_np + np.log(len(pos) / len(neg))
    np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(b), b_np, rtol=1e-3, atol=1e-4)
    w_log, b_log = foreground.fit_logistic(jnp.asarray(pos), jnp.asarray(neg), 200, 1e-2, jax.random.key(0))
    separated = (np.concatenate([pos, neg]) @ np.asarray(w_log) + float(b_log) > 0) == (np.arange(700) < 400)
    assert separated.mean() > 0.85  # the optax-trained 1×1 conv alternative also separates the classes
    model = foreground.calibrate(foreground.decision(jnp.asarray(np.concatenate([pos, neg])), w, b), w, b)
    fg_pos, fg_neg = foreground.foreground(jnp.asarray(pos), model), foreground.foreground(jnp.asarray(neg), model)
    assert float(fg_neg.min()) >= 0 and float(fg_pos.max()) <= 1
    assert float(fg_pos.mean()) - float(fg_neg.mean()) > 0.3


def test_pseudo_labels_pick_the_border_cluster():
    words = np.zeros((2, 20, 20), int)
    words[:, 5:15, 5:15] = 1  # object in the middle
    pos, neg = foreground.pseudo_labels(words)
    edge, inner = foreground.regions(20, 20)
    assert pos.sum() == 2 * inner.sum() and neg.sum() == 2 * edge.sum()
    assert not (pos & neg).any()


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(7)
    cp, cn = rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 80)
    v, w = (rng.random(50) > 0.3).astype(float), rng.random(80) * (rng.random(80) > 0.5)
    want = (np.sum((np.maximum(0, 0.8 - cp) * v) ** 3) / max(1, (v > 0).sum())
            + np.sum((np.maximum(0, cn + 0.2) * w) ** 3) / max(1, (w > 0).sum()))
    got = jax.jit(lrb_training.contrastive_loss, static_argnums=(4, 5, 6))(
        *map(jnp.asarray, (cp, v, cn, w)), 0.8, -0.2, 3.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_point_pairs_sample_where_each_pair_type_belongs():
    size, n = 16, 4000
    config = ml_collections.ConfigDict({"pairs_per_type": n, "remote_distance": 5.656854})
    mask = np.zeros((size, size), np.float32)
    mask[4:8, 2:10] = 1.0
    fg = np.ones((size, size), np.float32)
    fg[:, 12:] = 0.0  # background on both images: positives avoid it
    pairs = jax.jit(lambda k, m, f: lrb_training.point_pairs(config, k, m, f, f))(
        jax.random.key(0), jnp.asarray(mask), jnp.asarray(fg))
    pos, anom, rq = (np.asarray(pairs[k]) for k in ("pos", "anom", "remote_q"))
    assert mask[anom[:, 0], anom[:, 1]].all()
    assert not mask[pos[:, 0], pos[:, 1]].any() and fg[pos[:, 0], pos[:, 1]].all()
    counts = np.bincount(rq[:, 0] * size + rq[:, 1], minlength=size * size)  # remote queries: uniform
    expected = n / size ** 2
    assert rq.min() >= 0 and rq.max() < size and counts.min() > 0
    assert np.sum((counts - expected) ** 2 / expected) < size ** 2 + 5 * np.sqrt(2 * size ** 2)


@pytest.mark.port
def test_bilinear_sample_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    fmap = rng.normal(size=(7, 9, 3)).astype(np.float32)
    size = 36
    points = rng.integers(0, size, (40, 2))
    points[:4] = [[0, 0], [35, 35], [0, 35], [35, 0]]
    got = np.asarray(lrb_training.bilinear_sample(jnp.asarray(fmap), jnp.asarray(points), size))
    grid = torch.tensor(points[:, ::-1] / (size - 1) * 2 - 1, dtype=torch.float32).reshape(1, 1, -1, 2)
    want = torch.nn.functional.grid_sample(torch.tensor(fmap).permute(2, 0, 1)[None], grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=False)[0, :, 0].T.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_perlin_mask_is_binary_nonempty_and_inside_the_foreground():
    allowed = np.zeros((64, 64), bool)
    allowed[8:56, 8:56] = True
    mask = np.asarray(jax.jit(anomalies.perlin_mask, static_argnums=1)(jax.random.key(3), 64, jnp.asarray(allowed)))
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    assert mask.mean() >= 1e-3 and not mask[~allowed].any()


def test_synthesis_blends_only_inside_the_mask_and_tiles_are_a_permutation():
    image = jax.random.uniform(jax.random.key(0), (32, 32, 3))
    textures = anomalies.texture_bank(jax.random.key(2), 3, 32)
    out, mask = jax.jit(anomalies.synthesize)(jax.random.key(1), image, jnp.ones((32, 32), bool), textures, 1.0, 1.0)
    out, mask, image_np = np.asarray(out), np.asarray(mask), np.asarray(image)
    assert mask.any()
    np.testing.assert_allclose(out[mask == 0], image_np[mask == 0])
    assert np.abs(out[mask == 1] - image_np[mask == 1]).mean() > 1e-3
    textures = np.asarray(textures)
    assert textures.min() >= 0 and textures.max() <= 1 and textures.std(axis=(1, 2, 3)).min() > 0.01
    shuffled = np.asarray(anomalies.shuffle_tiles(jax.random.key(4), image, 16))
    tiles = lambda a: sorted(a.reshape(16, 2, 16, 2, 3).transpose(0, 2, 1, 3, 4).reshape(256, -1).tolist())  # noqa: E731
    assert tiles(shuffled) == tiles(image_np) and not np.array_equal(shuffled, image_np)


def test_lrb_layout_and_unit_descriptors():
    net = cpr_local.LocalRetrievalBranch(16)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 24))
    variables = net.init(jax.random.key(1), x, train=False)
    counts = {"/".join(str(getattr(k, "key", k)) for k in path): v.shape
              for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])}
    n_params = sum(int(np.prod(s)) for s in counts.values())
    # conv 24→192 + BN(192) + 4 branches (BN each) + 3×3 48→64 + conv 256→16
    want = (24 * 192 + 192) + 2 * 192 + (192 * 64 + 128) + (192 * 48 + 96 + 9 * 48 * 64 + 128) + (192 * 64 + 128) \
        + (192 * 64 + 128) + (256 * 16 + 16)
    assert n_params == want
    out, updated = net.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 6, 6, 16) and "batch_stats" in updated
    np.testing.assert_allclose(np.linalg.norm(np.asarray(windowed.normalise(out)), axis=-1), 1.0, atol=1e-5)


def test_fit_and_predict_read_the_same_aggregated_maps():
    """With every training image a candidate reference (no GRB, self not excluded) an untrained
    cascade finds each training image in its own bank: a zero map only if fit and predict read
    the same maps. The maps are the in-image k×k means."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "cpr_faster.py")
    config.update(image_size=64, use_lrb=False, use_grb=False, use_feb=False, exclude_self=False, blur_sigma=0.0,
                  aggregate=3, kmeans_samples=500, kmeans_restarts=1, batch_size=2)
    backbone = backbones.load(config.backbone)
    images = np.random.default_rng(0).random((4, 64, 64, 3)).astype(np.float32)
    state = cpr.fit(config, [Batch(images, None, np.zeros(4, np.int32), np.ones(4, bool), tuple("abcd"))], backbone)
    state = {**state, "backbone": backbone.variables}
    _, maps = jax.jit(lambda s, x: cpr.predict(config, backbone, s, x))(state, jnp.asarray(images[:2]))
    np.testing.assert_allclose(np.asarray(maps), 0.0, atol=1e-5)
    got = lrb_training.cascade_maps(config, backbone, backbone.variables, jnp.asarray(images[:1]))
    raw = backbone.apply(backbone.variables, jnp.asarray(images[:1]), tuple(config.taps))
    for tap in config.taps:
        want = features.local_average(raw[tap], 3, count_padding=False)
        np.testing.assert_allclose(np.asarray(got[tap]), np.asarray(want), rtol=1e-6)
        assert not np.allclose(np.asarray(got[tap]), np.asarray(raw[tap]))
