"""PUAD: EfficientAD for anomalies a map can show ("picturable"), plus a Gaussian on globally pooled
student features for those it cannot ("unpicturable", e.g. a wrong number of parts).

Fit: EfficientAD's fit, then on the training images (not the validation split) the
global-average-pooled features — the student's first C channels (the half regressing the
C-channel teacher, the paper's best choice), or the standardised teacher output with ``feature='teacher'``
— get a mean and a Ledoit-Wolf shrunk covariance; its pseudo-inverse is the precision (as the
spec and the reference code ask: Ledoit-Wolf shrinkage makes the covariance full rank whenever
the shrinkage is > 0, so pinv is then the ordinary inverse, computed once at fit time; predict
is one matmul). On the validation split the EfficientAD image scores and the Mahalanobis
distances give a mean and a population std each; the final score is
``w_effad·z(EfficientAD) + w_maha·z(Mahalanobis)``. The pixel map is EfficientAD's.

State: EfficientAD's state plus ``{'gauss_mean': [C], 'precision': [C, C],
'z_effad': [mean, std], 'z_maha': [mean, std]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.backbones import Backbone
from jaxad.data import Batch
from jaxad.distances import mahalanobis as gaussian
from jaxad.errors import ConfigError
from jaxad.methods import efficientad
from jaxad.runtime import compilation
from jaxad.train import loop

FEATURES = ("student", "teacher")


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage ρ) of samples x [n, d], as sklearn's ``LedoitWolf``."""
    x = np.asarray(x, np.float64)
    xc = x - x.mean(0)
    a, b = (v[0] for v in gaussian.ledoit_wolf(xc[:, None, :]))
    return a * (xc.T @ xc) + b * np.eye(x.shape[1]), float(1.0 - a * len(x))


def mahalanobis(f: jax.Array, mean: jax.Array, precision: jax.Array) -> jax.Array:
    """sqrt(max(0, (f − μ)ᵀ P (f − μ))) for features f [B, d] → [B]."""
    d = f - mean
    q = jnp.einsum("bi,ij,bj->b", d, precision, d, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.maximum(q, 0.0))


def pooled_features(config: ml_collections.ConfigDict, t: jax.Array, s: jax.Array) -> jax.Array:
    """Global average pool of the student's first C channels (or of the C-channel teacher output) → [B, C]."""
    f = s[..., : t.shape[-1]] if config.feature == "student" else t
    return jnp.mean(f, axis=(1, 2))


def scores(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(EfficientAD image scores [B], Mahalanobis scores [B], EfficientAD maps [B, H, W]) in one pass."""
    maps, t, s = efficientad.forward(config, backbone, state, images)
    maha = mahalanobis(pooled_features(config, t, s), state["gauss_mean"], state["precision"])
    return jnp.max(maps, axis=(1, 2)), maha, maps


def z_stats(values: np.ndarray) -> np.ndarray:
    """[mean, population std] of validation scores; a zero std (one image) becomes 1 so z stays finite."""
    std = float(np.std(values))
    return np.asarray([np.mean(values), std if std > 0 else 1.0], np.float32)


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (w₁·z(EfficientAD) + w₂·z(Mahalanobis) [B], EfficientAD maps [B, H, W])."""
    effad, maha, maps = scores(config, backbone, state, images)
    z_e = (effad - state["z_effad"][0]) / state["z_effad"][1]
    z_m = (maha - state["z_maha"][0]) / state["z_maha"][1]
    return config.w_effad * z_e + config.w_maha * z_m, maps


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """EfficientAD's fit, then the Gaussian on pooled features and the validation z statistics."""
    if config.feature not in FEATURES:
        raise ConfigError(f"--config.feature={config.feature}: choose one of {', '.join(FEATURES)}")
    images = loop.collect_images(batches, progress)
    state, train_idx, val_idx = efficientad.fit_images(config, images, backbone)
    runtime = {**state, "backbone": backbone.variables}
    pool = compilation.jit(lambda x: pooled_features(config, *efficientad.outputs(config, backbone, runtime, x)[:2]))
    f = np.concatenate(compilation.in_fixed_batches(pool, images[train_idx], config.batch_size))
    cov, _ = ledoit_wolf(f)
    gauss = {"gauss_mean": jnp.asarray(f.mean(0), jnp.float32),
             "precision": jnp.asarray(np.linalg.pinv(cov, hermitian=True), jnp.float32)}
    run = compilation.jit(lambda x: scores(config, backbone, {**runtime, **gauss}, x)[:2])
    parts = compilation.in_fixed_batches(run, images[val_idx], config.batch_size)
    effad, maha = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    return {**state, **gauss, "z_effad": z_stats(effad), "z_maha": z_stats(maha)}
