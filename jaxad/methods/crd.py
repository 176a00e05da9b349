"""CRD as a method: stream the training set into G, solve once for M, score with one matmul.

State: ``{'M': (d, d) float32, 'G': (d, d) float64, 'n': patches seen, 'lam': λ used}`` (G and n are kept so a fit
can be extended with more normal images and λ changed without re-reading the data). At predict
time the backbone's variables travel in ``state['backbone']``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_positive
from jaxad.data import Batch
from jaxad.distances import crd
from jaxad.errors import ConfigError, NumericsError
from jaxad.runtime import compilation, parallel


def patch_features(config: ml_collections.ConfigDict, backbone: Backbone, variables, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] → patch features [B, h, w, d]."""
    maps = backbone.apply(variables, images, tuple(config.taps))
    return features.embed(maps, tuple(config.taps), config.aggregate)


def _gram_step(config: ml_collections.ConfigDict, backbone: Backbone, mesh: jax.sharding.Mesh) -> Callable:
    def shard_gram(variables, batch):
        images, valid = batch
        f = patch_features(config, backbone, variables, images)
        f = f * valid[:, None, None, None].astype(f.dtype)  # padded images add nothing
        n = jnp.sum(valid) * f.shape[1] * f.shape[2]
        return crd.gram(f), n.astype(jnp.float32)

    return compilation.jit(parallel.summed_over_batch(shard_gram, mesh))


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Accumulate G = Σ f fᵀ over every training patch (sharded over ``mesh``), then M."""
    if config.lam_mode not in crd.LAM_MODES:
        raise ConfigError(f"--config.lam_mode={config.lam_mode}: choose one of {', '.join(crd.LAM_MODES)}")
    require_positive(config, "lam")  # λ ≤ 0 leaves G + λI singular or indefinite
    mesh = parallel.batch_mesh() if mesh is None else mesh
    step = _gram_step(config, backbone, mesh)
    variables = parallel.replicate(backbone.variables, mesh)
    G, n = None, 0.0
    for batch in batches:
        g, m = step(variables, parallel.shard_batch((batch.images, batch.valid), mesh))
        g = np.asarray(g, dtype=np.float64)  # the running sum over batches is kept in float64
        if not np.isfinite(g).all():
            bad = ", ".join(str(p) for p, v in zip(batch.paths, batch.valid) if v)
            raise NumericsError(f"non-finite features from the backbone on one of: {bad}; check these images")
        G = g if G is None else G + g
        n += float(m)
        if progress is not None:
            progress(int(np.sum(batch.valid)))
    if G is None:
        raise NumericsError("no training batch was seen; the training set is empty")
    lam = crd.effective_lambda(G, n, config.lam, config.lam_mode)
    return {"M": crd.matrix(G, lam), "G": G, "n": np.float64(n), "lam": np.float64(lam)}


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); jit with config/backbone bound."""
    f = patch_features(config, backbone, state["backbone"], images)
    patch_scores = crd.score(state["M"], f)
    maps = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    return jnp.max(patch_scores, axis=(1, 2)), maps
