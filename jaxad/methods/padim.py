"""PaDiM: a Gaussian per patch location over a fixed random subset of backbone channels.

The per-location Gaussian is the ``mahalanobis`` distance of :mod:`jaxad.distances` with
``position='location'``: the fit streams the training set once through the protocol's driver
(per-location moments, sharded over devices, one psum per batch); the state keeps each location's
mean and whitening matrix (L⁻¹ of the regularised covariance, from a triangular solve at fit time),
and a test patch's Mahalanobis distance is one batched contraction ‖L⁻¹(x − μ)‖.

State: ``{'channels': (d,) int32, 'group': (h·w,), 'mean': (h·w, d), 'whiten_t': (h·w, d, d), 'n': images seen}``.
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
from jaxad.distances import mahalanobis, protocol
from jaxad.errors import ConfigError
from jaxad.methods import _memory
from jaxad.runtime import parallel

STREAM_BYTES = 28  # per covariance entry while streaming: float64 sums and increment, float32 device sums and update


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


def gaussian_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The settings the per-location Gaussian reads."""
    return ml_collections.ConfigDict({"position": "location", "position_blocks": 1, "reg": config.reg})


def memory_need(config: ml_collections.ConfigDict, backbone: Backbone, n_images: int) -> tuple[int, str, str]:
    """(bytes, what, keys that lower it) of the per-location second moments, streamed (the number of
    images does not matter) and solved in memory-sized chunks (:func:`jaxad.distances.mahalanobis.finalize`)."""
    locations = _memory.cells(config, backbone, config.taps[0])
    return (STREAM_BYTES * locations * config.num_channels ** 2 + _memory.forward_bytes(config, backbone, tuple(config.taps)),
            f"PaDiM's statistics ({locations:,} locations × {config.num_channels}² covariance) and a batch's backbone pass",
            "--config.num_channels, --config.image_size or --config.batch_size")


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """One pass: per-location moments about the first batch's mean, then mean and whitening matrix."""
    mesh = parallel.batch_mesh() if mesh is None else mesh
    require_at_least(config, 0, "reg")
    channels = channel_subset(config, backbone)
    extract = lambda v, x: patch_features(config, backbone, v, x, jnp.asarray(channels))
    gaussian = gaussian_config(config)
    stats = protocol.stream(mahalanobis.DISTANCE, gaussian, extract, backbone.variables, batches, mesh, progress)
    params = mahalanobis.finalize(stats, gaussian)
    return {"channels": jnp.asarray(channels), **params, "n": np.float64(stats.sums["n"][0])}


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); image score = max of the map."""
    f = patch_features(config, backbone, state["backbone"], images, state["channels"])
    patch_scores = mahalanobis.score(state, f)
    maps = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    return jnp.max(maps, axis=(1, 2)), maps
