"""Greedy (farthest-point) coreset subsampling of a memory bank, on device.

Each iteration adds the point farthest from the current coreset and updates every point's
distance to the coreset with one pass over the (projected) features: O(n·d') per step, memory
O(n·d'). A Gaussian random projection to ``projection_dim`` (Johnson-Lindenstrauss) makes the
iterations cheap for wide features, as the PatchCore reference does.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxad.runtime import compilation


def project(features: jax.Array, key: jax.Array, projection_dim: int = 128) -> jax.Array:
    """Gaussian random projection to ``projection_dim`` dims (identity when already that narrow)."""
    d = features.shape[-1]
    if d <= projection_dim:
        return features.astype(jnp.float32)
    matrix = jax.random.normal(key, (d, projection_dim), jnp.float32) / jnp.sqrt(projection_dim)
    return jnp.matmul(features.astype(jnp.float32), matrix, precision=jax.lax.Precision.HIGHEST)


@partial(compilation.jit, static_argnames=("count",))
def farthest_points(points: jax.Array, count: int, start: jax.Array) -> jax.Array:
    """Indices [count] chosen greedily from ``points`` [n, d'], beginning with index ``start``."""
    sq = jnp.sum(jnp.square(points), axis=-1)

    def distances_to(i):
        p = points[i]
        return jnp.maximum(sq - 2.0 * jnp.matmul(points, p, precision=jax.lax.Precision.HIGHEST) + sq[i], 0.0)

    def body(t, carry):
        chosen, min_d = carry
        nxt = jnp.argmax(min_d).astype(jnp.int32)
        return chosen.at[t].set(nxt), jnp.minimum(min_d, distances_to(nxt))

    chosen = jnp.zeros((count,), jnp.int32).at[0].set(start)
    chosen, _ = jax.lax.fori_loop(1, count, body, (chosen, distances_to(start)))
    return chosen


def greedy_coreset(features: jax.Array, count: int, key: jax.Array, projection_dim: int = 128) -> jax.Array:
    """``count`` indices of a greedy coreset of ``features`` [n, d]; the random start is included."""
    n = features.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"coreset size must be in [1, {n}], got {count}")
    project_key, start_key = jax.random.split(key)
    points = project(features, project_key, projection_dim)
    start = jax.random.randint(start_key, (), 0, n, dtype=jnp.int32)
    return farthest_points(points, count, start)
