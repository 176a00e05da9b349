"""The streaming-statistics protocol every memory-free distance follows, and its one fit driver.

A distance is four pure functions (:class:`Distance`)::

    init(config, sample) -> stats            # sample: one batch of features [B, h, w, d]
    update(stats, features, valid) -> stats # jit-able; additive in stats.sums
    finalize(stats, config) -> params       # once, on the host
    score(params, features) -> [B, h, w]     # one batched contraction

``stats`` is a :class:`Stats`: ``context`` (fixed at init: a shift, a random feature map, the cell →
group map) and ``sums`` (sums over patches). Because ``update`` only adds to ``sums``, a device's
shard of a batch starts from zero sums, one ``psum`` adds the shards, and the host adds batches in
float64 (:func:`stream`): a fit on eight devices equals a fit on one, and memory does not grow
with the number of patches.

A distance lives in one module of :mod:`jaxad.distances` that defines ``DISTANCE``; ``get(name)``
finds it by module name, and ``python scripts/fit.py --method crd --config.distance=NAME`` fits it.
Position: every distance sees the grid; :func:`cell_groups` maps each grid cell to one of P groups
(one global group, K×K blocks or every location), so statistics are kept per group.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.errors import ConfigError, NumericsError
from jaxad.runtime import compilation, distributed, parallel

POSITIONS: tuple[str, ...] = ("global", "blocks", "location")
MAX_STATS_BYTES = 2 * 1024**3  # float32 sums larger than this are refused before any work
_HIGHEST = jax.lax.Precision.HIGHEST


class Stats(NamedTuple):
    """What a fit carries between batches: ``context`` fixed at init, ``sums`` added to."""

    context: dict[str, Any]
    sums: dict[str, Any]


@dataclass(frozen=True)
class Distance:
    """A memory-free patch distance (see the module docstring for the contract)."""

    init: Callable[[ml_collections.ConfigDict, jax.Array], Stats]
    update: Callable[[Stats, jax.Array, jax.Array], Stats]
    finalize: Callable[[Stats, ml_collections.ConfigDict], dict]
    score: Callable[[dict, jax.Array], jax.Array]
    stats_bytes: Callable[[ml_collections.ConfigDict, int, tuple[int, int]], int]  # of float32 sums, for d and grid


def names() -> list[str]:
    """Every module of :mod:`jaxad.distances` that defines ``DISTANCE``, sorted."""
    found = []
    for m in pkgutil.iter_modules(importlib.import_module("jaxad.distances").__path__):
        if m.name != "protocol" and hasattr(importlib.import_module(f"jaxad.distances.{m.name}"), "DISTANCE"):
            found.append(m.name)
    return sorted(found)


def get(name: str) -> Distance:
    """The distance defined in ``jaxad/distances/<name>.py``."""
    if name not in names():
        raise ConfigError(f"--config.distance={name}: unknown distance; available: {', '.join(names())}")
    return importlib.import_module(f"jaxad.distances.{name}").DISTANCE


# ---- position: cells → groups -------------------------------------------------------------------


def num_groups(config: ml_collections.ConfigDict, grid: tuple[int, int]) -> int:
    """P: 1 (global), K² (blocks) or h·w (location)."""
    if config.position == "global":
        return 1
    if config.position == "blocks":
        return config.position_blocks**2
    return grid[0] * grid[1]


def cell_groups(config: ml_collections.ConfigDict, grid: tuple[int, int]) -> np.ndarray:
    """The group of every grid cell, row-major [h·w] int32 (blocks: K×K near-equal tiles)."""
    return groups_of_cells(num_groups(config, grid), grid)


def groups_of_cells(groups: int, grid: tuple[int, int]) -> np.ndarray:
    """The group of every cell [h·w] for P groups: P = h·w is one cell each, else P = K² tiles of
    near-equal size (K = 1: one global group). P and the grid fix the layout, so a compiled update
    can derive it from array shapes alone."""
    h, w = grid
    if groups == h * w:
        return np.arange(h * w, dtype=np.int32)
    k = math.isqrt(groups)
    if k * k != groups or k > min(grid):
        raise ValueError(f"{groups} groups are neither every cell nor K×K tiles of the {h}×{w} grid")
    rows, cols = np.arange(h) * k // h, np.arange(w) * k // w
    return (rows[:, None] * k + cols[None, :]).reshape(-1).astype(np.int32)


def cells_of_groups(groups: int, grid: tuple[int, int]) -> np.ndarray:
    """The cells of every group [P, m] (row-major order, m the largest group), unequal groups padded
    with the index h·w, which :func:`grouped_outer` points at a row of zeros."""
    group = groups_of_cells(groups, grid)
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=groups)
    rank = np.arange(group.size) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.full((groups, counts.max()), group.size, np.int32)
    table[group[order], rank] = order
    return table


def check_position(config: ml_collections.ConfigDict, grid: tuple[int, int]) -> None:
    """ConfigError for an unknown position or a block count the grid cannot hold."""
    if config.position not in POSITIONS:
        raise ConfigError(f"--config.position={config.position}: choose one of {', '.join(POSITIONS)}")
    if config.position == "blocks" and not 1 <= config.position_blocks <= min(grid):
        raise ConfigError(f"--config.position_blocks={config.position_blocks}: must be between 1 and "
                          f"{min(grid)} (the feature grid is {grid[0]}×{grid[1]})")


def check_memory(config: ml_collections.ConfigDict, distance: Distance, d: int, grid: tuple[int, int]) -> None:
    """Refuse statistics too large to accumulate (e.g. one 1536² Gram per location of WRN50)."""
    size = distance.stats_bytes(config, d, grid)
    if size > MAX_STATS_BYTES:
        raise ConfigError(
            f"--config.position={config.position}: the statistics need {size / 1024**3:.1f} GiB "
            f"({num_groups(config, grid)} groups of dimension {d}), more than {MAX_STATS_BYTES / 1024**3:.0f} GiB; "
            "use --config.position=blocks with a small --config.position_blocks, or fewer channels (taps)")


def grouped_outer(x: jax.Array, groups: int) -> jax.Array:
    """Σ x xᵀ per group: x [B, h, w, d] → [P, d, d] in float32, groups laid out by :func:`groups_of_cells`.

    Each group's patches are gathered into one [B·m, d] slab (m cells of B images), so the Grams
    are one matmul batched over groups, each contracting all the group's patches of the batch.
    """
    b, h, w, d = x.shape
    if groups == 1:
        flat = x.reshape(-1, d)
        return jnp.matmul(flat.T, flat, precision=_HIGHEST)[None]
    cells = x.reshape(b, h * w, d)
    if groups == h * w:  # one cell per group: the layout is a transpose
        slabs = jnp.swapaxes(cells, 0, 1)
    else:
        table = cells_of_groups(groups, (h, w))
        padded = jnp.concatenate([cells, jnp.zeros((b, 1, d), x.dtype)], axis=1)
        slabs = jnp.swapaxes(padded[:, table], 0, 1).reshape(groups, -1, d)  # [P, B·m, d]
    return jnp.einsum("pnd,pne->pde", slabs, slabs, precision=_HIGHEST)


def grouped_sum(x: jax.Array, group: jax.Array, groups: int) -> jax.Array:
    """Σ x per group: x [B, h, w, ...] → [P, ...]."""
    b, h, w = x.shape[:3]
    per_cell = jnp.sum(x.reshape(b, h * w, *x.shape[3:]), axis=0)
    return jax.ops.segment_sum(per_cell, group, groups)


def per_cell(matrices: jax.Array, group: jax.Array, cells: int) -> jax.Array:
    """Per-group arrays [P, ...] → per-cell [h·w, ...] (a view when P is 1 or h·w)."""
    if matrices.shape[0] == cells:
        return matrices
    return matrices[group]


def apply_per_cell(matrices: jax.Array, group: jax.Array, x: jax.Array) -> jax.Array:
    """x [B, h, w, d] times each cell's group matrix [P, d, e] → [B, h, w, e], one contraction."""
    b, h, w, d = x.shape
    if matrices.shape[0] == 1:
        return jnp.einsum("bhwd,de->bhwe", x, matrices[0], precision=_HIGHEST)
    m = per_cell(matrices, group, h * w)
    return jnp.einsum("bld,lde->ble", x.reshape(b, h * w, d), m, precision=_HIGHEST).reshape(b, h, w, -1)


# ---- the fit driver -----------------------------------------------------------------------------


def zero_sums(stats: Stats) -> Stats:
    return Stats(stats.context, jax.tree.map(jnp.zeros_like, stats.sums))


def stream(
    distance: Distance,
    config: ml_collections.ConfigDict,
    extract: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    batches: Iterable,
    mesh: jax.sharding.Mesh,
    progress: Callable[[int], None] | None = None,
    context: dict | None = None,
) -> Stats:
    """One pass over ``batches`` (objects with ``images``, ``valid``, ``paths``): per-device shard
    statistics of ``extract(variables, images)``, one psum, summed over batches in float64 on the host.

    ``context`` (e.g. of an earlier pass) fixes the statistics' context; without it the first
    batch's features seed :func:`Distance.init` (shapes, shifts, random maps). Over several
    processes the context is process 0's (its first batch is a one-process fit's first batch),
    so every device adds to the same statistics.
    """
    extract_jit = compilation.jit(extract)

    def shard_sums(replicated, batch):
        vars_, context = replicated
        images, valid = batch
        f = extract(vars_, images)
        sums0 = jax.tree.map(jnp.zeros_like, stats_shape.sums)
        return distance.update(Stats(context, sums0), f, valid).sums

    replicated_vars = parallel.replicate(variables, mesh)
    step, stats, stats_shape = None, None, None
    for batch in batches:
        valid = np.asarray(batch.valid)
        if stats is None:
            f = np.asarray(extract_jit(variables, batch.images))
            # a process other than 0 may start on held-out images only: its own context is replaced
            stats = distance.init(config, jnp.asarray(f[valid] if valid.any() else f))
            stats = Stats(distributed.from_main(stats.context) if context is None else context, stats.sums)
            stats_shape = stats
            step = compilation.jit(parallel.summed_over_batch(shard_sums, mesh))
            replicated_context = parallel.replicate(stats.context, mesh)
            total = jax.tree.map(lambda s: np.zeros(s.shape, np.float64), stats.sums)
        inc = step((replicated_vars, replicated_context), parallel.shard_batch((batch.images, batch.valid), mesh))
        inc = jax.tree.map(lambda a: np.asarray(a, np.float64), inc)
        if not all(np.isfinite(a).all() for a in jax.tree.leaves(inc)):
            bad = ", ".join(str(p) for p, v in zip(batch.paths, valid) if v)
            raise NumericsError(f"non-finite features from the backbone on one of: {bad}; check these images")
        total = jax.tree.map(lambda t, i: np.add(t, i, out=t), total, inc)  # in place: one float64 copy
        if progress is not None:
            progress(int(valid.sum()))
    if stats is None:
        raise NumericsError("no training batch was seen; the training set is empty")
    return Stats(stats.context, total)


def add(stats: Stats, more: dict) -> Stats:
    """Stats with ``more`` (sums of further patches) added."""
    return Stats(stats.context, jax.tree.map(lambda a, b: np.asarray(a, np.float64) + np.asarray(b, np.float64),
                                             stats.sums, more))
