"""Feature-matching groups + patch-adaptive average pooling (Dini & Rahtu): training-free.

Fit ("pre-testing phase"): match every pair of training images (``jaxad.distances.matching``), group them
greedily by match count, and model each group's adapted features by one Gaussian per location.
Predict: match the test image to every group's lead image, take the best-matching group and score
each location by the Mahalanobis distance to that group's Gaussian.

Two resolutions, one grouping. The image score is the maximum of the map made from ``taps`` (the
last stage, stride 32, as in the paper, which reports image AUROC only). A stride-32 grid is too
coarse to localise, so the pixel map comes from ``pixel_taps`` (stride 8): the same pooling,
smoothing and per-group, per-location Gaussians on a 4× finer grid. ``pixel_taps=()`` makes the map
from ``taps`` as well (the paper's single resolution).

Adapted features: a backbone map → patch-adaptive average pooling (below) → Gaussian smoothing of
every adapted channel over the grid (the paper's "Gaussian filter σ = 2 smooths the adapted feature
maps"). ``feature_sigma`` is in image pixels and becomes σ / stride grid cells of each tap, so one
value means the same image area at both resolutions; it is capped at image_size / 8 so that the
kernel's ±2σ core never spans more than half the image (σ = 2 cells on a stride-32 grid,
64 px at 256 px, left a cell ~4 % of its own feature).

Patch-adaptive average pooling (eq. 2): the p×p neighbourhood of a location (zero padded at the
border) is flattened channel-major, (c, dy, dx) as torch's ``Unfold``, into one vector of p²·C
values, and that vector is adaptive-average-pooled (torch's ``adaptive_avg_pool1d`` bins) to C'
values. When C is a multiple of C' this equals a p×p mean followed by averaging groups of C/C'
channels; otherwise bins straddle channel boundaries, and when C' > C a bin covers only part of a
channel's p×p window, so the output keeps some of the window's spatial layout. Rule for C':
``min(num_channels, p²·C)`` (more bins than values would only repeat values).

Per-group Gaussians: with ~25 images and 700 dimensions the sample covariance S is singular, so it
is shrunk: Ledoit-Wolf Σ = (1−ρ)S + ρ·(tr S/d)·I (ρ from the data, sklearn's estimator) or
``ridge`` Σ = S_unbiased + εI. Both are a·XcᵀXc + b·I for the group's centred features Xc [n, d],
so Σ⁻¹ follows from Woodbury with one n×n Cholesky factor per location,
    (x−μ)ᵀΣ⁻¹(x−μ) = (‖v‖² − ‖L⁻¹X̃v‖²) / b,   v = x − μ, X̃ = √a·Xc, LLᵀ = bI + X̃X̃ᵀ,
computed in float64 on the host at fit time. The state grows with N·d per location instead of
groups·d², and Σ is never inverted: L⁻¹ (m×m, triangular) comes from a triangular solve at fit time,
so scoring is batched contractions only. (A batched triangular solve inside the scoring loop
deadlocked on CPU: jax's LAPACK kernel waits for the thread pool that runs the loop.) Scoring runs
over blocks of locations so that the gathered group rows, [B, m, d] per location, stay under
``CHUNK_BYTES`` whatever the grid.

State (``G`` groups, ``m`` images in the largest group, ``N`` training images), and per resolution
('image', and 'pixel' when ``pixel_taps`` is set) the Gaussians, location-major (``L`` locations):
    'rows'    [L, N+1, d]  √a·(x − μ_group) of every training image, plus one zero row for padding
    'mean'    [L, G, d]    per-group, per-location mean
    'whiten'  [L, G, m, m] L⁻¹, the inverse lower Cholesky factor of bI + X̃X̃ᵀ (identity on padding)
    'iso'     [L, G]       b, the isotropic part of Σ
    'members' [G, m] row indices of each group's images, padded with N; 'group_id' [N], 'leads' [G]
    (training-image index of each lead), 'threshold' (match count used),
    'lead_desc' [G, P, D] (dense_mnn: the leads' unit-norm patch descriptors) or
    'lead_images' [G, H, W] uint8 (sift/orb: the leads' grey images, matched by OpenCV).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least
from jaxad.data import Batch
from jaxad.distances import mahalanobis as gaussian
from jaxad.distances import matching
from jaxad.errors import ConfigError, NumericsError
from jaxad.methods import _memory
from jaxad.runtime import compilation, memory

SHRINKAGE = ("ledoit_wolf", "ridge")
GROUPING = ("size", "threshold")
CHUNK_BYTES = 64 * 2**20  # gathered group rows per block of locations while scoring
MAX_SIGMA_FRACTION = 1 / 8  # feature_sigma ≤ image side / 8: the kernel's ±2σ core spans ≤ half the image


# --- patch-adaptive average pooling -------------------------------------------------------------


def pooling_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch ``adaptive_avg_pool1d`` of a length-``length`` vector as (indices, weights) [out, k].

    Bin i averages [⌊i·length/out⌋, ⌈(i+1)·length/out⌉); short bins are padded with weight 0.
    """
    start = (np.arange(out) * length) // out
    end = -((-(np.arange(out) + 1) * length) // out)
    k = int(np.max(end - start))
    idx = start[:, None] + np.arange(k)[None, :]
    inside = idx < end[:, None]
    weight = inside / (end - start)[:, None]
    return np.where(inside, idx, 0).astype(np.int32), weight.astype(np.float32)


def out_channels(channels: int, patch_size: int, num_channels: int) -> int:
    """C' = min(num_channels, p²·C): never more bins than pooled values."""
    return min(num_channels, patch_size * patch_size * channels)


def patch_adaptive_pool(x: jax.Array, patch_size: int, out: int) -> jax.Array:
    """[B, h, w, C] → [B, h, w, out]: each zero-padded p×p neighbourhood flattened (c, dy, dx), then pooled."""
    patches = jax.lax.conv_general_dilated_patches(
        x, (patch_size, patch_size), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # [B, h, w, C·p·p], channel-major like torch Unfold
    idx, weight = pooling_bins(patches.shape[-1], out)
    return jnp.einsum("bhwok,ok->bhwo", patches[..., idx], jnp.asarray(weight), precision=jax.lax.Precision.HIGHEST)


def smooth(x: jax.Array, sigma: float) -> jax.Array:
    """Gaussian blur of every channel of [B, h, w, C] over the grid (reflect padding); σ ≤ 0: identity."""
    if sigma <= 0:
        return x
    rows = jnp.asarray(postprocess.blur_matrix(x.shape[1], sigma), x.dtype)
    cols = jnp.asarray(postprocess.blur_matrix(x.shape[2], sigma), x.dtype)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


# --- features -----------------------------------------------------------------------------------


def resolutions(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """Resolution name → its taps: 'image' (``taps``) and, when set, 'pixel' (``pixel_taps``)."""
    return {"image": tuple(config.taps), **({"pixel": tuple(config.pixel_taps)} if config.pixel_taps else {})}


def check(config: ml_collections.ConfigDict, backbone: Backbone) -> None:
    """One-line ConfigErrors for every setting fit would otherwise trip over later."""
    taps = backbone_taps(config)
    unknown = [t for t in taps if t not in backbone.taps]
    if unknown or not config.taps:
        raise ConfigError(f"--config.taps / pixel_taps / match_tap: {unknown or 'none given'} are not taps of "
                          f"{backbone.name}; valid: {', '.join(backbone.taps)}")
    matching.check_matcher(config.matcher)
    if config.shrinkage not in SHRINKAGE:
        raise ConfigError(f"--config.shrinkage={config.shrinkage}: choose one of {', '.join(SHRINKAGE)}")
    if config.grouping not in GROUPING:
        raise ConfigError(f"--config.grouping={config.grouping}: choose one of {', '.join(GROUPING)}")
    require_at_least(config, 1, "group_size", "min_group_size", "match_chunk")
    require_at_least(config, 0, "ridge", "feature_sigma")
    size = config.image_size if isinstance(config.image_size, int) else min(config.image_size)
    if config.feature_sigma > size * MAX_SIGMA_FRACTION:
        raise ConfigError(f"--config.feature_sigma={config.feature_sigma}: it is in pixels and must be at most "
                          f"image_size/8 = {size * MAX_SIGMA_FRACTION:g} (a wider kernel blurs each cell into most "
                          f"of the grid)")
    if config.patch_size < 1 or config.patch_size % 2 == 0 or config.num_channels < 1:
        raise ConfigError(f"--config.patch_size={config.patch_size} must be odd and ≥ 1, "
                          f"--config.num_channels={config.num_channels} ≥ 1")


def backbone_taps(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The feature taps of both resolutions and, for the dense matcher, ``match_tap``."""
    match = [config.match_tap] if config.matcher == matching.DENSE else []
    return tuple(dict.fromkeys([*config.taps, *config.pixel_taps, *match]))


def adapt(config: ml_collections.ConfigDict, backbone: Backbone, maps: dict[str, jax.Array], taps: tuple[str, ...]) -> jax.Array:
    """Backbone maps → adapted features [B, h, w, C'] on the grid of ``taps[0]``.

    Several taps are resized (bilinear) to the first tap's grid and concatenated before pooling;
    the smoothing σ is ``feature_sigma`` pixels in cells of that tap's stride.
    """
    grid = maps[taps[0]].shape[1:3]
    f = jnp.concatenate([features.resize_bilinear(maps[t], grid) for t in taps], axis=-1)
    out = out_channels(f.shape[-1], config.patch_size, config.num_channels)
    return smooth(patch_adaptive_pool(f, config.patch_size, out), config.feature_sigma / backbone.taps[taps[0]].stride)


def embed(config: ml_collections.ConfigDict, backbone: Backbone, variables, images: jax.Array) -> tuple[dict[str, jax.Array], jax.Array | None]:
    """Images → ({resolution: adapted features [B, h, w, C']}, unit-norm match descriptors [B, P, D] or None).

    One backbone pass serves both resolutions; the descriptors (``match_tap`` patches) exist only
    for the dense matcher.
    """
    maps = backbone.apply(variables, images, backbone_taps(config))
    adapted = {name: adapt(config, backbone, maps, taps) for name, taps in resolutions(config).items()}
    if config.matcher != matching.DENSE:
        return adapted, None
    m = maps[config.match_tap]
    return adapted, matching.normalise(m.reshape(m.shape[0], -1, m.shape[-1]))


# --- per-group Gaussians ------------------------------------------------------------------------


def shrinkage(xc: np.ndarray, mode: str, ridge: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(a [L], b [L]) with Σ = a·XcᵀXc + b·I per location, for centred float64 features xc [n, L, d].

    ``ledoit_wolf``: :func:`jaxad.distances.mahalanobis.ledoit_wolf`, with b kept ≥ ``floor`` so a
    degenerate group stays solvable. ``ridge``: Σ = XcᵀXc/(n−1) + ridge·I.
    """
    n = xc.shape[0]
    if mode == "ridge":
        return np.full(xc.shape[1], 1.0 / max(n - 1, 1)), np.full(xc.shape[1], ridge)
    a, b = gaussian.ledoit_wolf(xc)
    return a, np.maximum(b, floor)


def group_members(group_id: np.ndarray) -> np.ndarray:
    """[G, m] training-image indices of each group, padded with N (the zero row of 'rows')."""
    sizes = np.bincount(group_id)
    members = np.full((len(sizes), int(sizes.max())), len(group_id), np.int32)
    for g in range(len(sizes)):
        members[g, : sizes[g]] = np.flatnonzero(group_id == g)
    return members


def group_gaussians(feats: np.ndarray, members: np.ndarray, mode: str, ridge: float,
                    budget_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Per-group, per-location mean and Woodbury factors of the shrunk covariance (float64 inside).

    feats [N, L, d] adapted features of the training images, members [G, m] from
    :func:`group_members` → 'rows', 'mean', 'whiten', 'iso', location-major as in the module docstring.
    Locations are independent: they are solved in blocks whose float64 temporaries (a group's
    features, centred and scaled, and its m×m factors) fit in ``budget_bytes`` (default: a quarter
    of the memory available); blocks do not change the result.
    """
    n_img, n_loc, d = feats.shape
    groups, m = members.shape
    floor = 1e-6 * float(np.mean(np.var(feats, axis=0, dtype=np.float64))) + 1e-30
    rows = np.zeros((n_loc, n_img + 1, d), np.float32)
    mean = np.zeros((n_loc, groups, d), np.float32)
    whiten = np.broadcast_to(np.eye(m, dtype=np.float32), (n_loc, groups, m, m)).copy()
    iso = np.zeros((n_loc, groups), np.float32)
    budget = memory.available().bytes // 4 if budget_bytes is None else budget_bytes
    step = memory.rows_per_chunk(8 * (4 * m * d + 4 * m * m), budget)
    for lo in range(0, n_loc, step):
        loc = slice(lo, lo + step)
        for g in range(groups):  # fit time, once per group; a block of locations at once
            idx = members[g][members[g] < n_img]
            x = feats[idx, loc].astype(np.float64)
            mu = x.mean(axis=0)
            xc = x - mu
            a, b = shrinkage(xc, mode, ridge, floor)
            scaled = xc * np.sqrt(a)[None, :, None]
            capacitance = np.einsum("nld,mld->lnm", scaled, scaled) + b[:, None, None] * np.eye(len(idx))
            rows[loc, idx] = scaled.transpose(1, 0, 2)
            mean[loc, g], iso[loc, g] = mu, b
            whiten[loc, g, : len(idx), : len(idx)] = gaussian.inverse_factor(np.linalg.cholesky(capacitance))
    return {"rows": rows, "mean": mean, "whiten": whiten, "iso": iso}


def mahalanobis(f: jax.Array, group: jax.Array, members: jax.Array, stats: dict, chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """Distance of features f [B, L, d] to the Gaussians of their groups [B] at every location → [B, L].

    Locations are scored in blocks (``jax.lax.map``) sized so that the gathered group rows, a
    [block, B, m, d] array, stay within ``chunk_bytes``; the result does not depend on the block size.
    A symbolic batch (``jax.export``) gives no size to divide by: its images are scored one at a time.
    """
    b, n_loc, d = f.shape
    if jax.export.is_symbolic_dim(b):
        one = partial(mahalanobis, members=members, stats=stats, chunk_bytes=chunk_bytes)
        return jax.lax.map(lambda args: one(args[0][None], args[1][None])[0], (f, group))
    index = members[group]  # [B, m]
    block = int(max(1, min(n_loc, chunk_bytes // (b * index.shape[1] * d * f.dtype.itemsize))))

    def location(args):
        x, rows, mean, whiten, iso = args  # [B, d], [N+1, d], [G, d], [G, m, m], [G]
        v = x - mean[group]
        proj = jnp.einsum("bd,bmd->bm", v, rows[index], precision=jax.lax.Precision.HIGHEST)
        z = jnp.einsum("bmn,bn->bm", whiten[group], proj, precision=jax.lax.Precision.HIGHEST)
        return (jnp.sum(v * v, axis=-1) - jnp.sum(z * z, axis=-1)) / iso[group]

    d2 = jax.lax.map(location, (f.swapaxes(0, 1), stats["rows"], stats["mean"], stats["whiten"], stats["iso"]), batch_size=block)
    return jnp.sqrt(jnp.maximum(d2.T, 0.0))


# --- the method ---------------------------------------------------------------------------------


def match_counts(config: ml_collections.ConfigDict, descriptors: np.ndarray | None, grey: np.ndarray | None) -> np.ndarray:
    """[N, N] match counts between all training images with ``config.matcher``."""
    if config.matcher == matching.DENSE:
        return matching.pairwise_dense_counts(descriptors, config.match_min_similarity, config.match_ratio, config.match_chunk)
    return matching.pairwise_keypoint_counts(grey, config.matcher, config.match_ratio, config.match_ransac)


def memory_need(config: ml_collections.ConfigDict, backbone: Backbone, n_images: int) -> tuple[int, str, str]:
    """(bytes, what, keys that lower it) of both resolutions' adapted features (twice while joined) and
    Gaussians: 'rows' and 'mean' as large as the features, 'whiten' [L, G, m, m] taken at groups of
    ``2·group_size`` images (the sizes come from matching, after the features are extracted)."""
    m = min(n_images, 2 * config.group_size)
    need = _memory.forward_bytes(config, backbone, backbone_taps(config))
    for taps in resolutions(config).values():
        locations = _memory.cells(config, backbone, taps[0])
        d = out_channels(_memory.channels(backbone, taps), config.patch_size, config.num_channels)
        need += (4 * n_images * locations * d + locations * n_images * m) * _memory.FLOAT32
    return (need, f"PAAP's adapted features and group Gaussians ({n_images} images) and a batch's backbone pass",
            "--config.image_size, --config.num_channels, --config.pixel_taps or --config.batch_size")


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Extract, match all pairs, group, and fit one Gaussian per group and location at each resolution. No training."""
    check(config, backbone)
    dense = config.matcher == matching.DENSE
    extract = compilation.jit(lambda v, x: embed(config, backbone, v, x))
    grey_fn = compilation.jit(matching.grey_uint8)
    feats = {name: [] for name in resolutions(config)}
    descs, greys = [], []
    for batch in batches:
        valid = np.asarray(batch.valid)
        adapted, m = extract(backbone.variables, batch.images)
        for name, f in adapted.items():
            f = np.asarray(f)[valid]
            if not np.isfinite(f).all():
                bad = ", ".join(str(p) for p, v in zip(batch.paths, batch.valid) if v)
                raise NumericsError(f"non-finite features from the backbone on one of: {bad}; check these images")
            feats[name].append(f.reshape(len(f), -1, f.shape[-1]))
        if dense:
            descs.append(np.asarray(m)[valid])
        else:
            greys.append(np.asarray(grey_fn(batch.images))[valid])
        if progress is not None:
            progress(int(valid.sum()))
    if not feats["image"]:
        raise NumericsError("no training batch was seen; the training set is empty")
    descs = np.concatenate(descs) if dense else None
    greys = None if dense else np.concatenate(greys)
    counts = match_counts(config, descs, greys)
    if config.grouping == "threshold":
        threshold = float(config.group_threshold)
    else:
        threshold = matching.threshold_for_size(counts, config.group_size, config.min_group_size)
    group_id, leads = matching.group(counts, threshold, config.min_group_size)
    members = group_members(group_id)
    state = {}
    for name in list(feats):
        state[name] = group_gaussians(np.concatenate(feats.pop(name)), members, config.shrinkage, config.ridge)
        if not all(np.isfinite(v).all() for v in state[name].values()):
            raise NumericsError(f"group covariance not positive definite; use --config.shrinkage=ridge with a larger "
                                f"--config.ridge (now {config.ridge})")
    state.update(members=members, group_id=group_id, leads=leads, threshold=np.float64(threshold))
    if dense:
        state["lead_desc"] = descs[leads]
    else:
        state["lead_images"] = greys[leads]
    return state


def route(config: ml_collections.ConfigDict, state: dict, images: jax.Array, descriptors: jax.Array | None) -> jax.Array:
    """The group [B] whose lead image each test image matches best (first group on ties)."""
    if config.matcher == matching.DENSE:
        counts = matching.mutual_nn_counts(descriptors, state["lead_desc"], config.match_min_similarity, config.match_ratio)
    else:
        router = matching.keypoint_router(config.matcher, config.match_ratio, config.match_ransac)
        counts = router(matching.grey_uint8(images), state["lead_images"])
    return jnp.argmax(counts, axis=1)


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); routing and scoring in one jit.

    Both resolutions use the group chosen once per image; the score is the maximum of the 'image'
    map, the returned map is the 'pixel' one (the 'image' one without ``pixel_taps``).
    """
    adapted, descriptors = embed(config, backbone, state["backbone"], images)
    group = route(config, state, images, descriptors)
    maps = {}
    for name, f in adapted.items():
        b, h, w, d = f.shape
        patch_scores = mahalanobis(f.reshape(b, h * w, d), group, state["members"], state[name]).reshape(b, h, w)
        maps[name] = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    return jnp.max(maps["image"], axis=(1, 2)), maps.get("pixel", maps["image"])
