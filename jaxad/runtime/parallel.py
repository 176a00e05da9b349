"""Data parallelism over every device: batches split along their first axis.

One mesh axis, ``batch``. A per-shard computation whose results add up (a Gram matrix, a count,
a loss sum) runs under ``shard_map`` and is combined with one ``psum``, so a fit on eight devices
gives the same result as on one.

In a multi-host run (:mod:`~jaxad.runtime.distributed`) the mesh spans every process's devices:
each process passes its own part of a batch to :func:`shard_batch`, the global batch is the
processes' parts one after the other, and the ``psum`` adds over all hosts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"


def batch_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place arrays split along axis 0 across the mesh (axis 0 must divide evenly over this
    process's devices of it). Over several processes, each gives its own part of the batch and
    the result is the global batch: the processes' parts in process order."""
    sharding = NamedSharding(mesh, P(AXIS))
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a full copy of every array on every device of the mesh (over several processes,
    every process must pass the same values)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

    def whole(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(whole, tree)


def training_mesh(batch_size: int, devices: list[jax.Device] | None = None) -> Mesh:
    """The batch mesh over as many devices as divide ``batch_size`` evenly (all of them when the
    batch size is a multiple of the device count; a prime batch on 8 devices falls back to 1)."""
    devices = jax.local_devices() if devices is None else devices
    return batch_mesh(devices[: math.gcd(batch_size, len(devices))])


def along_batch(mesh: Mesh) -> Callable[[Any], Any]:
    """Inside ``jit``: constrain every array of a pytree to be split along axis 0 over ``mesh``.

    Applied to the batch a step builds on the device, it makes the step data-parallel: XLA
    partitions the per-example work and turns the reductions over the batch (loss mean,
    BatchNorm statistics, gradients) into all-reduces, so the result is that of one device.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    return lambda tree: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def summed_over_batch(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``fn(replicated, batch)`` run on each device's shard of ``batch``, results psum-ed.

    The returned function takes the same arguments: ``replicated`` is any pytree every device
    holds whole (e.g. network weights), ``batch`` a pytree split along axis 0.
    """

    def per_shard(replicated: Any, batch: Any) -> Any:
        return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), fn(replicated, batch))

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
