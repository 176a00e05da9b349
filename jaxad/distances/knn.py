"""Exact k-nearest-neighbour search of query patches in a memory bank.

Distances come from ``|q|² − 2 q·bᵀ + |b|²``: one matmul per bank chunk, a running top-k carried
through ``lax.scan``, so memory is bounded by (queries × chunk) whatever the bank size, and the
work is the 2·q·n·d FLOPs of the matmuls. On several devices each holds a slice of the bank and
the per-device k best are merged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxad.runtime.parallel import AXIS

_HIGHEST = jax.lax.Precision.HIGHEST


class Bank(NamedTuple):
    """Bank vectors [n, d] and their squared norms [n] (computed once)."""

    vectors: jax.Array
    sq_norms: jax.Array


def make_bank(vectors: jax.Array) -> Bank:
    vectors = jnp.asarray(vectors, jnp.float32)
    return Bank(vectors, jnp.sum(jnp.square(vectors), axis=-1))


def _chunked(bank: Bank, chunk_size: int) -> tuple[jax.Array, jax.Array, int]:
    """Bank padded to a multiple of the chunk; padding has +inf norm so it never wins."""
    n = bank.vectors.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    vectors = jnp.pad(bank.vectors, ((0, pad), (0, 0)))
    sq = jnp.pad(bank.sq_norms, (0, pad), constant_values=jnp.inf)
    return vectors.reshape(-1, chunk, vectors.shape[-1]), sq.reshape(-1, chunk), chunk


def _search(q: jax.Array, bank: Bank, k: int, chunk_size: int, offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """k smallest squared distances [m, k] and bank indices of flat queries q [m, d]."""
    vectors, sq, chunk = _chunked(bank, chunk_size)
    q_sq = jnp.sum(jnp.square(q), axis=-1, keepdims=True)
    m = q.shape[0]
    init = (jnp.full((m, k), jnp.inf, jnp.float32), jnp.zeros((m, k), jnp.int32))

    def step(carry, xs):
        best_d, best_i = carry
        v, s, start = xs
        d2 = q_sq - 2.0 * jnp.matmul(q, v.T, precision=_HIGHEST) + s[None, :]
        neg, pos = jax.lax.top_k(-jnp.concatenate([best_d, d2], axis=1), k)
        # positions below k are the carried best, the rest this chunk's columns: no [m, chunk]
        # index array (XLA would also constant-fold its iota at every compilation)
        kept = jnp.take_along_axis(best_i, jnp.minimum(pos, k - 1), axis=1)
        return (-neg, jnp.where(pos < k, kept, start + pos - k)), None

    starts = jnp.arange(vectors.shape[0], dtype=jnp.int32) * chunk + offset
    (best_d, best_i), _ = jax.lax.scan(step, init, (vectors, sq, starts))
    return jnp.maximum(best_d, 0.0), best_i


def nearest(
    queries: jax.Array, bank: Bank | jax.Array, k: int = 1, chunk_size: int = 4096, squared: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Distances [..., k] (ascending; Euclidean, or squared) and int32 bank indices [..., k]."""
    bank = bank if isinstance(bank, Bank) else make_bank(bank)
    lead = queries.shape[:-1]
    d2, idx = _search(queries.reshape(-1, queries.shape[-1]).astype(jnp.float32), bank, k, chunk_size)
    dist = d2 if squared else jnp.sqrt(d2)
    return dist.reshape(*lead, k), idx.reshape(*lead, k)


def nearest_sharded(
    queries: jax.Array, bank: Bank | jax.Array, k: int, mesh: Mesh, chunk_size: int = 4096, squared: bool = False
) -> tuple[jax.Array, jax.Array]:
    """:func:`nearest` with the bank split over the mesh: each device searches its slice for its k
    best, and the devices' candidates are merged by one more top-k. Any bank size: the bank is
    padded to a multiple of the devices with rows that never win; queries are replicated."""
    bank = bank if isinstance(bank, Bank) else make_bank(bank)
    lead = queries.shape[:-1]
    q = queries.reshape(-1, queries.shape[-1]).astype(jnp.float32)
    pad = -bank.vectors.shape[0] % mesh.size
    vectors = jnp.pad(bank.vectors, ((0, pad), (0, 0)))
    sq_norms = jnp.pad(bank.sq_norms, (0, pad), constant_values=jnp.inf)

    def local(q, vectors, sq_norms):
        offset = jax.lax.axis_index(AXIS) * vectors.shape[0]
        d2, idx = _search(q, Bank(vectors, sq_norms), k, chunk_size, offset)
        all_d = jax.lax.all_gather(d2, AXIS, axis=1, tiled=True)  # [m, devices·k]
        all_i = jax.lax.all_gather(idx, AXIS, axis=1, tiled=True)
        neg, pos = jax.lax.top_k(-all_d, k)
        return -neg, jnp.take_along_axis(all_i, pos, axis=1)

    search = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()), check_vma=False)
    d2, idx = search(q, vectors, sq_norms)
    dist = d2 if squared else jnp.sqrt(d2)
    return dist.reshape(*lead, k), idx.reshape(*lead, k)


def reweighted_scores(
    features: jax.Array, patch_scores: jax.Array, nn_index: jax.Array, bank: Bank, num_neighbours: int = 9,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Image scores re-weighted as in PatchCore's eq. 7.

    For each image take the patch m_test with the largest nearest-neighbour distance s* and its
    nearest bank patch m*; with N_b(m*) the b nearest bank patches of m* (m* itself included),
    w = 1 − exp(|m_test − m*|) / Σ_{m ∈ N_b(m*)} exp(|m_test − m|), and the score is w · s*.
    The exponentials are computed relative to their largest term, so large distances stay finite.
    With ``mesh`` the neighbours of m* are searched in the bank split over it.
    """
    B = features.shape[0]
    flat_f = features.reshape(B, -1, features.shape[-1])
    flat_s = patch_scores.reshape(B, -1)
    worst = jnp.argmax(flat_s, axis=1)
    m_test = jnp.take_along_axis(flat_f, worst[:, None, None], axis=1)[:, 0]  # [B, d]
    s_star = jnp.take_along_axis(flat_s, worst[:, None], axis=1)[:, 0]
    m_star_idx = jnp.take_along_axis(nn_index.reshape(B, -1), worst[:, None], axis=1)[:, 0]
    m_star = bank.vectors[m_star_idx]
    if mesh is None:
        _, support = nearest(m_star, bank, k=num_neighbours)  # [B, b], m* first
    else:
        _, support = nearest_sharded(m_star, bank, num_neighbours, mesh)
    neighbours = bank.vectors[support]  # [B, b, d]
    dists = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(neighbours - m_test[:, None]), axis=-1), 0.0))
    d_star = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(m_star - m_test), axis=-1), 0.0))
    shift = jnp.max(dists, axis=1)
    w = 1.0 - jnp.exp(d_star - shift) / jnp.sum(jnp.exp(dists - shift[:, None]), axis=1)
    return w * s_star
