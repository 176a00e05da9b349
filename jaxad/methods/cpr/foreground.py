"""Foreground estimation branch: where the object is, learned without labels.

Objects in industrial images sit in the middle on a plain background. A 2-means clustering of raw
stride-4 features finds the background cluster (the one owning most border pixels); border pixels
of that cluster become negatives, centre pixels outside it positives. A linear discriminant on
those pseudo-labels is a 1×1 conv; its decision values are squashed to [0, 1] by a robust
(percentile) min-max, so the foreground map can gate the anomaly map.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

HIGHEST = jax.lax.Precision.HIGHEST


class Linear(NamedTuple):
    """A 1×1 conv d → 1 followed by the robust min-max: fg = clip((x·w + b − lo)/(hi − lo), 0, 1)."""

    w: jax.Array
    b: jax.Array
    lo: jax.Array
    hi: jax.Array


def regions(h: int, w: int, border: int = 3, centre: tuple[float, float] = (0.3, 0.7)) -> tuple[np.ndarray, np.ndarray]:
    """(border band, centre square) bool masks [h, w]; at 80×80 the band is 3 cells wide and the
    centre is rows/cols [24, 56), both scaled with the grid for other sizes."""
    band = max(1, int(round(border * h / 80))), max(1, int(round(border * w / 80)))
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    edge = (y < band[0]) | (y >= h - band[0]) | (x < band[1]) | (x >= w - band[1])
    inner = ((y >= int(centre[0] * h)) & (y < int(centre[1] * h)) & (x >= int(centre[0] * w)) & (x < int(centre[1] * w)))
    return edge, inner


def pseudo_labels(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-means cluster indices [N, h, w] → (positive, negative) bool masks [N, h, w].

    The background cluster is the one holding most border pixels over all images."""
    edge, inner = regions(*words.shape[1:])
    background = int(np.bincount(words[:, edge].ravel(), minlength=2).argmax())
    is_bg = words == background
    return inner[None] & ~is_bg, edge[None] & is_bg


def fit_lda(pos: jax.Array, neg: jax.Array, ridge: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Two-class linear discriminant with pooled covariance: (w [d], b) so that d(x) = x·w + b.

    w = Σ⁻¹(μ₊ − μ₋) by a linear solve; b = −½(μ₊ + μ₋)·w + log(n₊/n₋) (sklearn's decision
    function). Σ gets a tiny ridge (relative to its mean variance) so dead channels do not make it
    singular."""
    pos, neg = pos.astype(jnp.float32), neg.astype(jnp.float32)
    mu_p, mu_n = pos.mean(0), neg.mean(0)
    scatter = ((pos - mu_p).T @ (pos - mu_p) + (neg - mu_n).T @ (neg - mu_n))
    cov = scatter / (pos.shape[0] + neg.shape[0] - 2)
    cov = cov + ridge * jnp.trace(cov) / cov.shape[0] * jnp.eye(cov.shape[0])
    w = jnp.linalg.solve(cov, mu_p - mu_n)
    b = -0.5 * jnp.dot(mu_p + mu_n, w) + jnp.log(pos.shape[0] / neg.shape[0])
    return w, b


def fit_logistic(pos: jax.Array, neg: jax.Array, steps: int, lr: float, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The paper's alternative: a 1×1 conv trained by Adam on the logistic loss (full batch).

    Inputs are standardised for the optimisation; the returned (w, b) act on raw features."""
    x = jnp.concatenate([pos, neg]).astype(jnp.float32)
    y = jnp.concatenate([jnp.ones(len(pos)), jnp.zeros(len(neg))])
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    params = {"w": 0.01 * jax.random.normal(key, (x.shape[1],)), "b": jnp.zeros(())}
    opt = optax.adam(lr)

    def loss(p):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(z @ p["w"] + p["b"], y))

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    w = params["w"] / std
    return w, params["b"] - jnp.dot(mean, w)


def decision(features: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x·w + b over the last axis of features [..., d]."""
    return jnp.einsum("...d,d->...", features.astype(jnp.float32), w, precision=HIGHEST) + b


def calibrate(values: jax.Array, w: jax.Array, b: jax.Array, low: float = 1.0, high: float = 99.0) -> Linear:
    """Robust min-max bounds: the ``low``/``high`` percentiles of the decision values [n]."""
    lo, hi = jnp.percentile(values, low), jnp.percentile(values, high)
    return Linear(w, b, lo, jnp.maximum(hi, lo + 1e-6))


def foreground(features: jax.Array, model: Linear) -> jax.Array:
    """Raw stride-4 features [..., d] → foreground probability-like map [...] in [0, 1]."""
    return jnp.clip((decision(features, model.w, model.b) - model.lo) / (model.hi - model.lo), 0.0, 1.0)
