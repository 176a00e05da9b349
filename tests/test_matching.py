"""Matchers and greedy grouping: dense mutual NN against brute force, grouping on built matrices, OpenCV."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.distances import matching
from jaxad.errors import ConfigError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force(a: np.ndarray, b: np.ndarray, min_similarity: float, ratio: float) -> np.ndarray:
    """Mutual nearest neighbours by explicit loops over image pairs and patches."""
    out = np.zeros((len(a), len(b)), np.int64)
    for i in range(len(a)):
        for j in range(len(b)):
            sim = a[i].astype(np.float64) @ b[j].T.astype(np.float64)
            dist = np.sqrt(np.maximum(2 - 2 * sim, 0))
            for p in range(sim.shape[0]):
                q = int(np.argmax(sim[p]))
                if int(np.argmax(sim[:, q])) != p or sim[p, q] < min_similarity:
                    continue
                if ratio < 1:
                    fwd, bwd = np.sort(dist[p]), np.sort(dist[:, q])
                    if not (fwd[0] < ratio * fwd[1] and bwd[0] < ratio * bwd[1]):
                        continue
                out[i, j] += 1
    return out


@pytest.mark.parametrize("min_similarity, ratio", [(-1.0, 1.0), (0.2, 1.0), (-1.0, 0.9)])
def test_mutual_nn_counts_match_brute_force(min_similarity, ratio):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(14, 6))
    # images share noisy copies of a common pool of patches, so there are real matches to find
    a = _unit(base[rng.integers(0, 14, size=(3, 12))] + 0.4 * rng.normal(size=(3, 12, 6))).astype(np.float32)
    b = _unit(base[rng.integers(0, 14, size=(4, 10))] + 0.4 * rng.normal(size=(4, 10, 6))).astype(np.float32)
    got = np.asarray(matching.mutual_nn_counts(jnp.asarray(a), jnp.asarray(b), min_similarity, ratio))
    want = _brute_force(a, b, min_similarity, ratio)
    np.testing.assert_array_equal(got, want)
    assert want.sum() > 0
    back = np.asarray(matching.mutual_nn_counts(jnp.asarray(b), jnp.asarray(a), min_similarity, ratio))
    np.testing.assert_array_equal(back, got.T)


def test_pairwise_counts_in_blocks_equal_one_big_call():
    desc = _unit(np.random.default_rng(1).normal(size=(7, 9, 5))).astype(np.float32)
    full = np.asarray(matching.mutual_nn_counts(jnp.asarray(desc), jnp.asarray(desc)))
    np.testing.assert_array_equal(matching.pairwise_dense_counts(desc, -1.0, 1.0, chunk=3), full)
    assert (np.diag(full) == 9).all()  # an image matches itself everywhere


def test_normalise_gives_unit_rows():
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(matching.normalise(jnp.asarray(x))), axis=-1), 1.0, rtol=1e-6)


def _blocks(sizes, within=50, across=5, seed=0):
    """A symmetric count matrix with high counts inside each block of images, low across."""
    n = sum(sizes)
    label = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 4, size=(n, n))
    counts = np.where(label[:, None] == label[None, :], within, across) + noise + noise.T
    return counts, label


def test_greedy_grouping_recovers_blocks_with_first_image_as_lead():
    counts, label = _blocks([4, 3, 5])
    order = np.random.default_rng(3).permutation(len(label))  # interleave the blocks
    counts, label = counts[np.ix_(order, order)], label[order]
    group_id, leads = matching.group(counts, threshold=30)
    assert len(leads) == 3
    for g, lead in enumerate(leads):
        np.testing.assert_array_equal(group_id == g, label == label[lead])
    firsts = sorted(int(np.argmax(label == k)) for k in range(3))
    assert sorted(leads.tolist()) == firsts


def test_threshold_means_strictly_more_matches():
    counts = np.array([[9, 5, 4], [5, 9, 5], [4, 5, 9]])
    np.testing.assert_array_equal(matching.group(counts, 4)[0], [0, 0, 1])
    np.testing.assert_array_equal(matching.group(counts, 3)[0], [0, 0, 0])


def test_small_groups_join_the_lead_they_match_best():
    counts, label = _blocks([5, 6, 1, 1])
    counts[11, 0], counts[0, 11] = 20, 20  # image 11 (a singleton) matches group 0's lead best
    counts[12, 5], counts[5, 12] = 20, 20  # image 12 matches group 1's lead best
    group_id, leads = matching.group(counts, threshold=30, min_size=3)
    np.testing.assert_array_equal(leads, [0, 5])
    np.testing.assert_array_equal(group_id, [0] * 5 + [1] * 6 + [0, 1])
    assert matching.group(counts, threshold=1000, min_size=3)[1].tolist() == [0]  # nothing big enough: one group


def test_threshold_for_size_finds_the_block_structure():
    counts, label = _blocks([6, 6, 6], within=40, across=8)
    threshold = matching.threshold_for_size(counts, 6)
    group_id, leads = matching.group(counts, threshold)
    assert len(leads) == 3 and np.bincount(group_id).tolist() == [6, 6, 6]
    assert len(matching.group(counts, matching.threshold_for_size(counts, 18))[1]) == 1


def test_unknown_matcher_and_missing_opencv_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="dense_mnn"):
        matching.check_matcher("dedode")
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(ConfigError, match="pip install opencv-python-headless"):
        matching.check_matcher("sift")
    with pytest.raises(ConfigError, match="pip install opencv-python-headless"):
        matching.pairwise_keypoint_counts(np.zeros((2, 8, 8), np.uint8), "orb", 0.8, False)


def _textures(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 8, size // 8))
    return (np.kron(coarse, np.ones((8, 8))) * 200 + rng.random((size, size)) * 55).astype(np.uint8)


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_opencv_counts_more_matches_for_a_shifted_copy(kind):
    pytest.importorskip("cv2")
    a, other = _textures(0), _textures(1)
    shifted = np.roll(a, (3, 5), axis=(0, 1))
    counts = matching.keypoint_counts(a[None], np.stack([shifted, other]), kind, 0.8, ransac=False)
    assert counts.shape == (1, 2) and counts[0, 0] > counts[0, 1]
    inliers = matching.keypoint_counts(a[None], shifted[None], kind, 0.8, ransac=True)
    assert 0 < inliers[0, 0] <= counts[0, 0]
    pairwise = matching.pairwise_keypoint_counts(np.stack([a, shifted, other]), kind, 0.8, False)
    assert pairwise[0, 1] == pairwise[1, 0] == counts[0, 0]


def test_grey_uint8_is_luminance():
    img = np.zeros((1, 2, 2, 3), np.float32)
    img[0, 0, 0] = [1, 0, 0]
    img[0, 1, 1] = [1, 1, 1]
    np.testing.assert_array_equal(np.asarray(matching.grey_uint8(jnp.asarray(img)))[0], [[76, 0], [0, 255]])
