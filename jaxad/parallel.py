"""Data parallelism over every local device: batches split along their first axis.

One mesh axis, ``batch``. A per-shard computation whose results add up (a Gram matrix, a count,
a loss sum) runs under ``shard_map`` and is combined with one ``psum``, so a fit on eight devices
gives the same result as on one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"


def batch_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place arrays split along axis 0 across the mesh (axis 0 must divide evenly)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a full copy of every array on every device of the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def summed_over_batch(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``fn(replicated, batch)`` run on each device's shard of ``batch``, results psum-ed.

    The returned function takes the same arguments: ``replicated`` is any pytree every device
    holds whole (e.g. network weights), ``batch`` a pytree split along axis 0.
    """

    def per_shard(replicated: Any, batch: Any) -> Any:
        return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), fn(replicated, batch))

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
