"""PaDiM: a Gaussian per patch location over a fixed random subset of backbone channels.

Fit streams the training set once, accumulating per-location moments (sharded over devices, one
psum per batch); the state keeps each location's mean and the Cholesky factor of its regularised
covariance, and a test patch scores its Mahalanobis distance by a triangular solve.

State: ``{'channels': (d,) int32, 'mean': (h·w, d), 'chol': (h·w, d, d), 'n': images seen}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least
from jaxad.data import Batch
from jaxad.distances import mahalanobis
from jaxad.errors import ConfigError, NumericsError
from jaxad.runtime import compilation, parallel


def channel_subset(config: ml_collections.ConfigDict, backbone: Backbone) -> np.ndarray:
    """The ``num_channels`` concatenated-tap channels kept, drawn once from ``seed`` (sorted)."""
    unknown = [t for t in config.taps if t not in backbone.taps]
    if unknown:
        raise ConfigError(f"--config.taps: {unknown} are not taps of {backbone.name}; valid: {', '.join(backbone.taps)}")
    total = sum(backbone.taps[t].channels for t in config.taps)
    if not 0 < config.num_channels <= total:
        raise ConfigError(f"--config.num_channels={config.num_channels}: the taps {tuple(config.taps)} have {total} channels")
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(total, config.num_channels, replace=False)).astype(np.int32)


def patch_features(config: ml_collections.ConfigDict, backbone: Backbone, variables, images: jax.Array,
                   channels: jax.Array) -> jax.Array:
    """Images → [B, h, w, d]: taps resized (nearest) to the first tap's grid, concatenated, subset kept."""
    maps = backbone.apply(variables, images, tuple(config.taps))
    grid = maps[config.taps[0]].shape[1:3]
    f = jnp.concatenate([features.resize_nearest(maps[t], grid) for t in config.taps], axis=-1)
    return jnp.take(f, channels, axis=-1)


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """One pass: per-location moments about the first batch's mean, then mean and Cholesky factor."""
    mesh = parallel.batch_mesh() if mesh is None else mesh
    require_at_least(config, 0, "reg")
    channels = channel_subset(config, backbone)
    extract = compilation.jit(lambda v, x, c: patch_features(config, backbone, v, x, c))

    def shard_moments(replicated, batch):
        variables, shift = replicated
        images, valid = batch
        return mahalanobis.moments(extract(variables, images, channels), valid, shift)

    step = compilation.jit(parallel.summed_over_batch(shard_moments, mesh))
    variables = parallel.replicate(backbone.variables, mesh)
    total, shift = None, None
    for batch in batches:
        if shift is None:
            first = extract(backbone.variables, batch.images, channels)
            shift = mahalanobis.masked_mean(first, jnp.asarray(batch.valid))
        m = step((variables, parallel.replicate(shift, mesh)), parallel.shard_batch((batch.images, batch.valid), mesh))
        if not bool(jnp.isfinite(m.s1).all()):
            bad = ", ".join(str(p) for p, v in zip(batch.paths, batch.valid) if v)
            raise NumericsError(f"non-finite features from the backbone on one of: {bad}; check these images")
        total = m if total is None else mahalanobis.add(total, m)
        if progress is not None:
            progress(int(np.sum(batch.valid)))
    if total is None:
        raise NumericsError("no training batch was seen; the training set is empty")
    mean, chol = compilation.jit(mahalanobis.gaussians, static_argnums=2)(total, shift, config.reg)
    if not bool(jnp.isfinite(chol).all()):
        raise NumericsError(f"covariance not positive definite at some location; raise --config.reg (now {config.reg})")
    return {"channels": jnp.asarray(channels), "mean": mean, "chol": chol, "n": total.n}


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); image score = max of the map."""
    f = patch_features(config, backbone, state["backbone"], images, state["channels"])
    patch_scores = mahalanobis.distance(f, state["mean"], state["chol"])
    maps = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    return jnp.max(maps, axis=(1, 2)), maps
