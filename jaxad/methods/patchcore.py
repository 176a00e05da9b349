"""PatchCore: every training patch feature (or a greedy coreset of them) is the memory bank; a test
patch's score is the distance to its nearest bank patch.

State: ``{'bank': (n, d) float32}``; the bank's squared norms are recomputed at predict time (one
pass over n·d, negligible next to the search). With several local devices the search is sharded:
each device searches a slice of the bank and the slices' nearest neighbours are merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least, require_between
from jaxad.data import Batch
from jaxad.distances import coreset, knn
from jaxad.errors import ConfigError, NumericsError
from jaxad.methods import _memory
from jaxad.methods.crd import patch_features
from jaxad.runtime import compilation, parallel, shared_arrays

SCORES = ("reweighted", "max")


def memory_need(config: ml_collections.ConfigDict, backbone: Backbone, n_images: int) -> tuple[int, str, str]:
    """(bytes, what, keys that lower it) of the bank, filled in place batch by batch and held once; a
    coreset selection adds its projections, a device copy of the bank where the device is not the
    host, and the kept rows."""
    patches = n_images * _memory.cells(config, backbone, config.taps[0])
    d = _memory.channels(backbone, tuple(config.taps))
    bank = patches * d * _memory.FLOAT32
    need = bank
    if config.coreset_ratio < 1.0:
        device_copy = 0 if jax.default_backend() == "cpu" else bank
        need += device_copy + patches * config.projection_dim * _memory.FLOAT32 + int(config.coreset_ratio * bank)
    need += _memory.forward_bytes(config, backbone, tuple(config.taps))
    return (need, f"PatchCore's memory bank ({patches:,} patches × {d} features, {n_images} images) and a batch's backbone pass",
            "--config.image_size, --config.train_images, --config.taps or --config.batch_size")


def fill_bank(batches: Iterable[tuple[np.ndarray, np.ndarray]], count: int) -> np.ndarray:
    """The valid rows of ``count`` batches of (features [b, h, w, d], valid [b]) as one [n, d]
    float32 bank, each batch written in place into a bank sized for ``count`` full batches when the
    first arrives: no list of batches and no second full-size copy. The result is a view of the
    bank's first n rows, aligned so that a CPU device shares it (:mod:`jaxad.runtime.shared_arrays`)."""
    bank, filled = None, 0
    for f, valid in batches:
        if bank is None:
            bank = shared_arrays.empty((count * f[..., 0].size, f.shape[-1]))
        rows = f[valid].reshape(-1, f.shape[-1])
        bank[filled:filled + len(rows)] = rows
        filled += len(rows)
    if bank is None:
        raise NumericsError("no training batch was seen; the training set is empty")
    return bank[:filled]


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Collect every training patch feature into the bank, then keep a greedy coreset of
    ``coreset_ratio`` of them. ``batches`` has a length (a list, or :func:`jaxad.data.iterate_batches`),
    which sizes the bank before the first batch is read."""
    if config.score not in SCORES:
        raise ConfigError(f"--config.score={config.score}: choose one of {', '.join(SCORES)}")
    require_between(config, "coreset_ratio", 0.0, 1.0, high_closed=True)
    require_at_least(config, 1, "num_neighbours", "projection_dim", "chunk_size")
    extract = compilation.jit(lambda v, x: patch_features(config, backbone, v, x))

    def features():
        for batch in batches:
            f, valid = np.asarray(extract(backbone.variables, batch.images)), np.asarray(batch.valid)
            if not np.isfinite(f[valid]).all():
                bad = ", ".join(str(p) for p, v in zip(batch.paths, batch.valid) if v)
                raise NumericsError(f"non-finite features from the backbone on one of: {bad}; check these images")
            yield f, valid
            if progress is not None:
                progress(int(np.sum(valid)))

    bank = fill_bank(features(), len(batches))
    if config.coreset_ratio < 1.0:
        count = max(1, int(round(config.coreset_ratio * len(bank))))
        # on a CPU the device array shares the bank's memory instead of copying it
        keep = coreset.greedy_coreset(jax.device_put(bank, may_alias=True), count, jax.random.key(config.seed),
                                      config.projection_dim)
        bank = np.take(bank, np.asarray(keep), axis=0, out=shared_arrays.empty((count, bank.shape[1])))
    return {"bank": jax.device_put(bank, may_alias=True)}


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); jit with config/backbone bound."""
    f = patch_features(config, backbone, state["backbone"], images)
    bank = knn.make_bank(state["bank"])
    squared = config.score == "max"
    mesh = parallel.batch_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None
    if mesh is None:
        dist, idx = knn.nearest(f, bank, k=1, chunk_size=config.chunk_size, squared=squared)
    else:
        dist, idx = knn.nearest_sharded(f, bank, 1, mesh, chunk_size=config.chunk_size, squared=squared)
    patch_scores, nn_index = dist[..., 0], idx[..., 0]
    maps = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    if config.score == "max":
        return jnp.max(patch_scores, axis=(1, 2)), maps
    return knn.reweighted_scores(f, patch_scores, nn_index, bank, config.num_neighbours, mesh), maps
