"""CRD as a method: stream the training set into per-group statistics, finalize once, score with
one batched contraction. Any protocol distance runs here (``config.distance``, default ``crd``).

λ: a number, or ``auto``: the training stream holds out every k-th image (``lam_heldout``), pastes
one synthetic anomaly (:func:`jaxad.data.anomalies.paste`) into each, and picks among
``lam_candidates`` the λ whose scores best separate them from the clean held-out images (mean of
image AUROC and patch AUROC), all candidates from one eigendecomposition in one compiled call.
The held-out images are then added to the statistics. No test image is read. Over several processes
the held-out images are those a one-process fit holds out (chosen by their place in the whole list),
each process scores its own, and the scores of all of them choose λ: every process picks the same λ.

State: the distance's params (CRD: ``M`` [P, d, d] and the cell → group map ``group``), plus for the
CRD distances ``lam`` (the chosen value in ``lam_mode``), ``lam_effective`` (median over groups),
``lam_ratio`` (median of effective λ / smallest eigenvalue of G) and with ``auto`` the
``lam_curve`` [K, 3]: candidate, image AUROC, patch AUROC on the synthetic anomalies.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least, require_between
from jaxad.data import Batch, anomalies
from jaxad.distances import crd, protocol
from jaxad.errors import ConfigError
from jaxad.runtime import compilation, distributed, parallel

LAM_DISTANCES = ("crd", "kernel_crd")  # distances whose finalize reads λ
IMAGE_SCORES = ("max", "topk_mean")
INACTIVE_RATIO = 1e-3  # λ below this fraction of G's smallest eigenvalue changes no ranking


def patch_features(config: ml_collections.ConfigDict, backbone: Backbone, variables, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] → patch features [B, h, w, d]."""
    maps = backbone.apply(variables, images, tuple(config.taps))
    return features.embed(maps, tuple(config.taps), config.aggregate)


def lam_value(config: ml_collections.ConfigDict) -> float | str:
    """``config.lam`` as a positive float, or ``'auto'``."""
    raw = str(config.lam).strip()
    if raw == "auto":
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--config.lam={raw}: expected a positive number or 'auto'") from None
    if not 0 < value < np.inf:
        raise ConfigError(f"--config.lam={raw}: must be in (0.0, inf)")
    return value


def check_config(config: ml_collections.ConfigDict, backbone: Backbone) -> tuple[int, tuple[int, int]]:
    """Every CRD setting, before any work; returns the feature dimension and grid."""
    distance = protocol.get(config.distance)
    if config.lam_mode not in crd.LAM_MODES:
        raise ConfigError(f"--config.lam_mode={config.lam_mode}: choose one of {', '.join(crd.LAM_MODES)}")
    if config.distance in LAM_DISTANCES and lam_value(config) == "auto":
        if config.lam_mode == "absolute":
            raise ConfigError("--config.lam=auto: candidates are relative; use --config.lam_mode=trace or per_patch")
        if not config.lam_candidates or not all(isinstance(c, float | int) and c > 0 for c in config.lam_candidates):
            raise ConfigError(f"--config.lam_candidates={config.lam_candidates}: expected positive numbers")
        require_between(config, "lam_heldout", 0.0, 0.5, high_closed=True)
    if config.image_score not in IMAGE_SCORES:
        raise ConfigError(f"--config.image_score={config.image_score}: choose one of {', '.join(IMAGE_SCORES)}")
    require_at_least(config, 1, "image_topk", "position_blocks", "rff_dim")
    require_between(config, "rff_scale", 0.0, np.inf)
    require_at_least(config, 0, "reg")
    f = jax.eval_shape(lambda v, x: patch_features(config, backbone, v, x), backbone.variables,
                       jax.ShapeDtypeStruct((1, *_image_shape(config)), jnp.float32))
    d, grid = f.shape[-1], tuple(f.shape[1:3])
    protocol.check_position(config, grid)
    protocol.check_memory(config, distance, d, grid)
    return d, grid


def _image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    size = config.image_size
    return (*((size, size) if isinstance(size, int) else size), 3)


def _hold_out(batches: Iterable[Batch], every: int, kept: list[np.ndarray]) -> Iterator[Batch]:
    """The batches with the images at places 1, 1 + every, 1 + 2·every, ... of the whole training list
    marked invalid; those images go to ``kept``. The place is ``Batch.index`` (a process's share of the
    list starts past 0, so several processes hold out what one process would), else the count of valid
    images seen. The first image always trains (it seeds the statistics) and any set of two images holds one out."""
    seen = 0
    for batch in batches:
        valid = np.asarray(batch.valid).copy()
        for i in np.flatnonzero(valid):
            place = seen if batch.index is None else int(batch.index[i])
            if place % every == 1:
                kept.append(np.asarray(batch.images[i]))
                valid[i] = False
            seen += 1
        yield batch._replace(valid=valid)


def weighted_auroc(scores: jax.Array, positive: jax.Array, negative: jax.Array) -> jax.Array:
    """P(score of a positive > score of a negative) over the flagged entries, ties counting half."""
    s = jnp.sort(jnp.where(negative, scores, jnp.inf))
    lt = jnp.searchsorted(s, scores, side="left")  # negatives strictly below each score
    le = jnp.searchsorted(s, scores, side="right")
    wins = jnp.sum(positive * (lt + 0.5 * (le - lt)))
    return wins / jnp.maximum(jnp.sum(positive) * jnp.sum(negative), 1)


def _candidate_maps(context: dict, w, V, lams, f_normal, f_anomalous):
    """Patch scores [K, N, h, w] of every candidate on clean and on pasted held-out images."""
    return (crd.candidate_scores(context, w, V, lams, f_normal),
            crd.candidate_scores(context, w, V, lams, f_anomalous))


def _selection(s_n, s_a, coverage):
    """Image and patch AUROC [K] of every candidate on clean (``s_n``) vs pasted (``s_a``) held-out images."""
    k = s_n.shape[0]
    has = jnp.max(coverage, axis=(1, 2)) > 0
    img = jnp.concatenate([jnp.max(s_n, axis=(2, 3)), jnp.max(s_a, axis=(2, 3))], axis=1)
    img_pos = jnp.concatenate([jnp.zeros(s_n.shape[1], bool), has])
    img_neg = jnp.concatenate([jnp.ones(s_n.shape[1], bool), jnp.zeros(s_a.shape[1], bool)])
    patch = jnp.concatenate([s_n.reshape(k, -1), s_a.reshape(k, -1)], axis=1)
    patch_pos = jnp.concatenate([jnp.zeros(s_n[0].size, bool), coverage.reshape(-1) >= 0.5])
    patch_neg = jnp.concatenate([jnp.ones(s_n[0].size, bool), jnp.zeros(s_a[0].size, bool)])
    image_auroc = jax.vmap(weighted_auroc, in_axes=(0, None, None))(img, img_pos, img_neg)
    patch_auroc = jax.vmap(weighted_auroc, in_axes=(0, None, None))(patch, patch_pos, patch_neg)
    return image_auroc, patch_auroc


def select_lam(config: ml_collections.ConfigDict, stats: protocol.Stats, extract: Callable,
               held: np.ndarray, f_normal: jax.Array, first: int, total: int) -> tuple[float, np.ndarray]:
    """The candidate λ (in ``lam_mode``) that best separates held-out images from their pasted-anomaly
    copies; returns it and the curve [K, 3] (λ, image AUROC, patch AUROC).

    ``held`` are images ``first ..`` of the ``total`` held out by all processes: each is pasted with its
    own key of the whole set, scored here, and the scores of every process decide together, so any
    number of processes picks what one process would."""
    key = jax.random.key(config.seed)
    textures = anomalies.texture_bank(jax.random.fold_in(key, 1), 8, held.shape[1])
    candidates = sorted((float(c) for c in config.lam_candidates), reverse=True)  # ties go to the larger λ
    w, V = crd.spectrum(stats.sums["G"])
    lams = np.stack([crd.group_lambda(stats, c, config.lam_mode) for c in candidates])
    grid = f_normal.shape[1:3]
    s_n = s_a = np.zeros((len(candidates), 0, *grid), np.float32)
    coverage = np.zeros((0, *grid), np.float32)
    if len(held):
        keys = jax.random.split(jax.random.fold_in(key, 2), total)[first:first + len(held)]
        pasted, masks = anomalies.paste(keys, jnp.asarray(held), textures)
        f_anomalous = jnp.concatenate(compilation.in_fixed_batches(extract, pasted, config.batch_size))
        coverage = jax.image.resize(masks, (masks.shape[0], *grid), "linear", antialias=True)
        s_n, s_a = compilation.jit(_candidate_maps)(
            stats.context, jnp.asarray(w, jnp.float32), jnp.asarray(V, jnp.float32), jnp.asarray(lams, jnp.float32),
            f_normal, f_anomalous)
    s_n, s_a = distributed.concatenated(s_n, axis=1), distributed.concatenated(s_a, axis=1)
    image_auroc, patch_auroc = compilation.jit(_selection)(s_n, s_a, distributed.concatenated(coverage))
    curve = np.stack([candidates, np.asarray(image_auroc), np.asarray(patch_auroc)], axis=1)
    return candidates[int(np.argmax(curve[:, 1] + curve[:, 2]))], curve


def _feature_batches(f: jax.Array, batch_size: int, steps: int) -> Iterator[Batch]:
    """Features [N, h, w, d] as ``steps`` batches of ``batch_size`` (the tail and any extra batch padding)."""
    for start in range(0, steps * batch_size, batch_size):
        rows = np.arange(start, start + batch_size)
        chunk = f[np.minimum(rows, len(f) - 1)] if len(f) else jnp.zeros((batch_size, *f.shape[1:]), f.dtype)
        yield Batch(chunk, None, np.zeros(batch_size, np.int32), rows < len(f), ("held-out image",) * batch_size)


def _choose_lam(config: ml_collections.ConfigDict, distance: protocol.Distance, stats: protocol.Stats, run: Callable,
                held: list[np.ndarray], feature_shape: tuple[int, int, int],
                mesh: jax.sharding.Mesh) -> tuple[float, np.ndarray, protocol.Stats]:
    """(λ, its curve, the statistics with the held-out images added) from every process's held-out images."""
    held_counts = distributed.counts(len(held))  # every process's, in process order
    if not held_counts.sum():
        raise ConfigError("--config.lam=auto: one training image cannot be split to choose λ; give a number")
    images = np.stack(held) if held else np.zeros((0, *_image_shape(config)), np.float32)
    f_held = (jnp.concatenate(compilation.in_fixed_batches(run, jnp.asarray(images), config.batch_size)) if held
              else jnp.zeros((0, *feature_shape), jnp.float32))
    first = int(held_counts[:jax.process_index()].sum())
    lam, curve = select_lam(config, stats, run, images, f_held, first, int(held_counts.sum()))
    steps = -(-int(held_counts.max()) // config.batch_size)  # as many on every process: each step is a psum
    more = protocol.stream(distance, config, lambda _, f: f, None, _feature_batches(f_held, config.batch_size, steps),
                           mesh, context=stats.context)
    return lam, curve, protocol.add(stats, more.sums)


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Stream the training patches into the distance's statistics (sharded over ``mesh``), then finalize."""
    d, grid = check_config(config, backbone)
    distance = protocol.get(config.distance)
    mesh = parallel.batch_mesh() if mesh is None else mesh
    extract = lambda v, x: patch_features(config, backbone, v, x)
    auto = config.distance in LAM_DISTANCES and lam_value(config) == "auto"
    held: list[np.ndarray] = []
    if auto:
        batches = _hold_out(batches, max(2, round(1 / config.lam_heldout)), held)
    stats = protocol.stream(distance, config, extract, backbone.variables, batches, mesh, progress)
    state: dict = {}
    if config.distance in LAM_DISTANCES:
        final = ml_collections.ConfigDict(config.to_dict())
        if auto:
            lam, curve, stats = _choose_lam(config, distance, stats, partial(compilation.jit(extract), backbone.variables),
                                            held, (*grid, d), mesh)
            state["lam_curve"] = curve
            if distributed.is_main():
                _write_curve(config, curve)
        else:
            lam = lam_value(config)
        final.lam = str(lam)
        effective = crd.group_lambda(stats, lam, config.lam_mode)
        smallest = crd.spectrum(stats.sums["G"])[0][:, 0]
        ratio = float(np.median(np.divide(effective, smallest, out=np.full_like(effective, np.inf), where=smallest > 0)))
        if ratio < INACTIVE_RATIO:
            warnings.warn(f"λ = {lam} ({config.lam_mode}) is {ratio:.1e} of G's smallest eigenvalue: it changes no "
                          "ranking; use --config.lam_mode=trace or a larger λ", stacklevel=2)
        state.update(lam=np.float64(lam), lam_effective=np.float64(np.median(effective)), lam_ratio=np.float64(ratio))
        config = final
    params = distance.finalize(stats, config)
    return {**params, **state, "n": np.float64(np.sum(stats.sums["n"]))}


def _write_curve(config: ml_collections.ConfigDict, curve: np.ndarray) -> None:
    """lam_curve.json in the run's workdir, when there is one (the pipeline sets ``config.workdir``)."""
    workdir = config.get("workdir")
    if workdir:
        rows = [{"lam": float(r[0]), "image_auroc": float(r[1]), "patch_auroc": float(r[2])} for r in curve]
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / "lam_curve.json").write_text(json.dumps({"lam_mode": config.lam_mode, "curve": rows}, indent=2) + "\n")


def image_scores(config: ml_collections.ConfigDict, patch_scores: jax.Array) -> jax.Array:
    """Max of the patch map (the paper) or the mean of its ``image_topk`` largest patches."""
    flat = patch_scores.reshape(patch_scores.shape[0], -1)
    if config.image_score == "max":
        return jnp.max(flat, axis=1)
    return jnp.mean(jax.lax.top_k(flat, min(config.image_topk, flat.shape[1]))[0], axis=1)


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); jit with config/backbone bound."""
    f = patch_features(config, backbone, state["backbone"], images)
    patch_scores = protocol.get(config.distance).score(state, f)
    maps = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    return image_scores(config, patch_scores), maps
