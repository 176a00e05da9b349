"""Image-to-image local feature matching and greedy grouping of images by match count.

The PAAP method (Dini & Rahtu) groups normal images by how many keypoints two images share and
routes a test image to the group whose lead image it matches best. The paper's matcher is DeDoDe,
whose weights cannot be loaded here, so the matcher is pluggable:

- ``dense_mnn`` (pure JAX, the default): every backbone patch of an image is a "keypoint" with its
  L2-normalised feature as descriptor; a match is a mutual nearest neighbour under cosine
  similarity (optionally above a similarity floor and passing Lowe's ratio test in both
  directions). All pairs of a block of images are matched by one batched matmul.
- ``sift`` / ``orb`` (OpenCV, optional): classical detector + descriptor, brute-force 2-NN with
  Lowe's ratio test, optionally only the RANSAC-homography inliers counted. Runs on the host.

A ported DeDoDe would be one more name in ``MATCHERS`` producing a count matrix.

Grouping (``group``) is the paper's greedy rule: the first ungrouped image leads a new group and
every ungrouped image whose count with the lead exceeds the threshold joins it.
``threshold_for_size`` picks that threshold so groups hold about a target number of images.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxad.errors import ConfigError
from jaxad.runtime import compilation

DENSE = "dense_mnn"
KEYPOINT_MATCHERS = ("sift", "orb")
MATCHERS = (DENSE, *KEYPOINT_MATCHERS)


# --- dense mutual nearest neighbours (pure JAX) ----------------------------------------------


def normalise(desc: jax.Array) -> jax.Array:
    """L2-normalise descriptors along the last axis (a zero vector stays zero)."""
    norm = jnp.linalg.norm(desc, axis=-1, keepdims=True)
    return desc / jnp.maximum(norm, 1e-12)


def _passes_ratio(sim: jax.Array, ratio: float) -> tuple[jax.Array, jax.Array]:
    """Best index along the last axis and whether it beats the second best by Lowe's ratio.

    On unit vectors the Euclidean distance is √(2 − 2·cos); the test is d₁ < ratio·d₂.
    """
    top, idx = jax.lax.top_k(sim, 2)
    dist = jnp.sqrt(jnp.maximum(2.0 - 2.0 * top, 0.0))
    return idx[..., 0], dist[..., 0] < ratio * dist[..., 1]


def mutual_nn_counts(a: jax.Array, b: jax.Array, min_similarity: float = -1.0, ratio: float = 1.0) -> jax.Array:
    """Number of mutual nearest-neighbour matches between every image of ``a`` and of ``b``.

    a [A, P, D], b [B, Q, D]: unit-norm descriptors → [A, B] int32. Patch p of a and q of b match
    when q is p's most similar patch in b, p is q's most similar patch in a, their cosine
    similarity is at least ``min_similarity`` and, when ``ratio`` < 1, both directions pass the
    ratio test. The count is symmetric: counts(a, b) = counts(b, a)ᵀ. All similarities come from
    one [A·P, D] × [D, B·Q] matmul, kept in that [A, P, B, Q] layout (no transpose of the big array).
    """
    (n_a, p, d), (n_b, q, _) = a.shape, b.shape
    sim = jnp.dot(a.reshape(n_a * p, d), b.reshape(n_b * q, d).T, precision=jax.lax.Precision.HIGHEST)
    sim = sim.reshape(n_a, p, n_b, q)
    if ratio < 1.0:
        fwd, fwd_ok = _passes_ratio(sim, ratio)  # [A, P, B]
        bwd, bwd_ok = _passes_ratio(jnp.moveaxis(sim, 1, 3), ratio)  # [A, B, Q]
        fwd, fwd_ok = jnp.swapaxes(fwd, 1, 2), jnp.swapaxes(fwd_ok, 1, 2)  # [A, B, P]
        ok = fwd_ok & jnp.take_along_axis(bwd_ok, fwd, axis=2)
    else:
        fwd, bwd = jnp.swapaxes(jnp.argmax(sim, axis=3), 1, 2), jnp.argmax(sim, axis=1)
        ok = True
    mutual = jnp.take_along_axis(bwd, fwd, axis=2) == jnp.arange(p)  # p's best q has p as its best
    best = jnp.swapaxes(jnp.max(sim, axis=3), 1, 2)
    return jnp.sum(mutual & (best >= min_similarity) & ok, axis=2, dtype=jnp.int32)


def pairwise_dense_counts(desc: np.ndarray, min_similarity: float, ratio: float, chunk: int = 8) -> np.ndarray:
    """[N, N] mutual-NN counts between all training images (diagonal = patches per image).

    Images are matched block against block (``chunk`` images each, one compiled shape); only
    blocks on or above the diagonal are computed, the rest is their transpose.
    """
    n = len(desc)
    chunk = max(1, min(chunk, n))
    blocks = -(-n // chunk)
    padded = np.zeros((blocks * chunk, *desc.shape[1:]), np.float32)
    padded[:n] = desc
    padded = jnp.asarray(padded)
    count = compilation.jit(partial(mutual_nn_counts, min_similarity=min_similarity, ratio=ratio))
    out = np.zeros((blocks * chunk, blocks * chunk), np.int32)
    for i in range(blocks):
        rows = slice(i * chunk, (i + 1) * chunk)
        for j in range(i, blocks):
            cols = slice(j * chunk, (j + 1) * chunk)
            block = np.asarray(count(padded[rows], padded[cols]))
            out[rows, cols], out[cols, rows] = block, block.T
    return out[:n, :n]


# --- keypoint matchers (OpenCV, host) ----------------------------------------------------------


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError("--config.matcher=sift/orb needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def grey_uint8(images: jax.Array) -> jax.Array:
    """[B, H, W, 3] floats in [0, 1] → [B, H, W] uint8 luminance (ITU-R 601), the keypoint matchers' input."""
    luma = images @ jnp.asarray([0.299, 0.587, 0.114], images.dtype)
    return jnp.clip(jnp.round(luma * 255.0), 0, 255).astype(jnp.uint8)


def _detect(cv2, kind: str, image: np.ndarray):
    detector = cv2.SIFT_create() if kind == "sift" else cv2.ORB_create(nfeatures=2000)
    return detector.detectAndCompute(np.ascontiguousarray(image), None)


def _match_count(cv2, kind: str, a, b, ratio: float, ransac: bool) -> int:
    (kp_a, des_a), (kp_b, des_b) = a, b
    if des_a is None or des_b is None or len(des_a) < 2 or len(des_b) < 2:
        return 0
    norm = cv2.NORM_L2 if kind == "sift" else cv2.NORM_HAMMING
    pairs = cv2.BFMatcher(norm).knnMatch(des_a, des_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if not ransac or len(good) < 4:
        return len(good)
    src = np.float32([kp_a[m.queryIdx].pt for m in good])
    dst = np.float32([kp_b[m.trainIdx].pt for m in good])
    _, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
    return 0 if inliers is None else int(inliers.sum())


def keypoint_counts(images_a: np.ndarray, images_b: np.ndarray, kind: str, ratio: float, ransac: bool) -> np.ndarray:
    """[A, B] int32 match counts between grey uint8 images [A, H, W] and [B, H, W] with OpenCV.

    Host code (also called from inside ``jax.jit`` through ``jax.pure_callback``): OpenCV works
    image by image, so detection runs once per image and matching once per pair.
    """
    cv2 = _cv2()
    feats_a = [_detect(cv2, kind, im) for im in np.asarray(images_a)]
    feats_b = [_detect(cv2, kind, im) for im in np.asarray(images_b)]
    return np.array([[_match_count(cv2, kind, fa, fb, ratio, ransac) for fb in feats_b] for fa in feats_a], np.int32)


def pairwise_keypoint_counts(images: np.ndarray, kind: str, ratio: float, ransac: bool) -> np.ndarray:
    """[N, N] keypoint match counts between all training images; the count of (i, j), i < j, is mirrored."""
    cv2 = _cv2()
    feats = [_detect(cv2, kind, im) for im in images]
    n = len(images)
    out = np.zeros((n, n), np.int32)
    for i in range(n):
        out[i, i] = 0 if feats[i][1] is None else len(feats[i][1])
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = _match_count(cv2, kind, feats[i], feats[j], ratio, ransac)
    return out


def check_matcher(name: str) -> None:
    """ConfigError for an unknown matcher or a keypoint matcher without OpenCV installed."""
    if name not in MATCHERS:
        raise ConfigError(f"--config.matcher={name}: choose one of {', '.join(MATCHERS)}")
    if name in KEYPOINT_MATCHERS:
        _cv2()


def keypoint_router(kind: str, ratio: float, ransac: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(grey test images [B, H, W], grey lead images [G, H, W]) -> counts [B, G]``, usable under jit."""

    def host(a, b):
        return keypoint_counts(a, b, kind, ratio, ransac)

    def route(test: jax.Array, leads: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct((test.shape[0], leads.shape[0]), jnp.int32)
        return jax.pure_callback(host, shape, test, leads)

    return route


# --- greedy grouping ---------------------------------------------------------------------------


def group(counts: np.ndarray, threshold: float, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Greedy grouping of N images by their [N, N] match counts → (group id [N], lead index [G]).

    In index order, the first ungrouped image leads a new group and every ungrouped image whose
    count with the lead exceeds ``threshold`` joins it (the paper's rule). Groups smaller than
    ``min_size`` are then dissolved and each of their images joins the kept group whose lead it
    matches best: a per-location Gaussian needs a few images. When no group reaches ``min_size``
    all images form one group led by image 0.
    """
    counts = np.asarray(counts)
    n = len(counts)
    group_id = np.full(n, -1, np.int64)
    leads = []
    while (group_id < 0).any():
        lead = int(np.argmax(group_id < 0))
        joins = (group_id < 0) & (counts[lead] > threshold)
        joins[lead] = True
        group_id[joins] = len(leads)
        leads.append(lead)
    leads = np.asarray(leads)
    sizes = np.bincount(group_id, minlength=len(leads))
    kept = np.flatnonzero(sizes >= min_size)
    if len(kept) == 0:
        return np.zeros(n, np.int32), np.zeros(1, np.int32)
    if len(kept) < len(leads):
        small = ~np.isin(group_id, kept)
        best = kept[np.argmax(counts[np.ix_(small, leads[kept])], axis=1)]
        group_id[small] = best
        group_id = np.searchsorted(kept, group_id)  # renumber 0..len(kept)-1, order kept
        leads = leads[kept]
    return group_id.astype(np.int32), leads.astype(np.int32)


def threshold_for_size(counts: np.ndarray, size: int, min_size: int = 1) -> float:
    """The grouping threshold whose groups hold on average closest to ``size`` images.

    The grouping only changes where the threshold crosses a count, so the candidates are every
    distinct off-diagonal count c, as the threshold c − ½ (join when the count is ≥ c). Among
    thresholds that give the same number of groups the strictest (highest) one is taken: it
    admits only the closest matches to each lead.
    """
    counts = np.asarray(counts)
    n = len(counts)
    if n < 2:
        return 0.0
    candidates = np.unique(counts[~np.eye(n, dtype=bool)]).astype(np.float64) - 0.5
    mean_sizes = np.array([n / len(group(counts, t, min_size)[1]) for t in candidates])
    miss = np.abs(mean_sizes - size)
    return float(candidates[np.flatnonzero(miss == miss.min())[-1]])
