"""One fit over several processes (the hosts of a TPU pod slice, or CPU processes on one machine),
on JAX's own distributed runtime.

``jax.distributed.initialize`` joins the processes; afterwards ``jax.devices()`` lists every
process's devices, so the batch mesh of :mod:`~jaxad.runtime.parallel` spans them all and a
``psum`` inside ``shard_map`` adds the statistics of every host. Each process reads only its own
share of the training files (:func:`process_share`) and builds its part of each global batch; all
processes step through the same number of batches, because every step is a collective.

For a TFDS source the same split is ``tfds.even_splits('train', n=jax.process_count())
[jax.process_index()]``: contiguous, nearly equal slices, as :func:`process_share` cuts the file list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join this process to the others (blocks until all of them have started); with no arguments
    (on a TPU pod slice) JAX finds the coordinator, the process count and this process's id itself.

    Must run before anything touches a device. CPU processes exchange their collectives through
    gloo; on TPU and GPU the backend's own interconnect carries them."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_main() -> bool:
    """Whether this process is the one that writes the results (process 0)."""
    return jax.process_index() == 0


def process_share(items: Sequence[T]) -> tuple[T, ...]:
    """This process's contiguous slice of ``items``: slices of nearly equal size (they differ by at
    most one item), in process order, that together cover ``items`` once (empty when there are
    fewer items than processes)."""
    count, index = len(items), jax.process_index()
    return tuple(items[share_start(count, index):share_start(count, index + 1)])


def share_start(count: int, index: int | None = None) -> int:
    """Where process ``index``'s (default: this process's) share of ``count`` items starts."""
    index = jax.process_index() if index is None else index
    return index * count // jax.process_count()


def batches_per_process(count: int, batch_size: int) -> int:
    """How many batches every process steps through when ``count`` items are shared out by
    :func:`process_share`: enough for the largest share (a smaller one ends on padding)."""
    largest = -(-count // jax.process_count())
    return -(-largest // batch_size)


def from_main(tree: Any) -> Any:
    """Process 0's values of ``tree`` (arrays of the same shapes on every process), on every process:
    what every process must hold alike (e.g. a random feature map drawn from process 0's first batch)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


def counts(count: int) -> np.ndarray:
    """Every process's ``count`` [processes], in process order."""
    if jax.process_count() == 1:
        return np.asarray([count])
    return np.asarray(multihost_utils.process_allgather(np.asarray(count, np.int32))).reshape(-1)


def concatenated(rows: np.ndarray, axis: int = 0) -> np.ndarray:
    """Every process's ``rows`` joined along ``axis`` in process order; their lengths along it may
    differ (each is padded to the longest for the all-gather, the padding cut after)."""
    if jax.process_count() == 1:
        return np.asarray(rows)
    rows = np.asarray(rows)
    lengths = counts(rows.shape[axis])
    pad = [(0, 0)] * rows.ndim
    pad[axis] = (0, int(lengths.max()) - rows.shape[axis])
    gathered = np.asarray(multihost_utils.process_allgather(np.pad(rows, pad)))  # [processes, ...]
    return np.concatenate([np.take(g, np.arange(n), axis=axis) for g, n in zip(gathered, lengths)], axis=axis)
