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
from typing import TypeVar

import jax

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
    count, processes, index = len(items), jax.process_count(), jax.process_index()
    return tuple(items[index * count // processes:(index + 1) * count // processes])


def batches_per_process(count: int, batch_size: int) -> int:
    """How many batches every process steps through when ``count`` items are shared out by
    :func:`process_share`: enough for the largest share (a smaller one ends on padding)."""
    largest = -(-count // jax.process_count())
    return -(-largest // batch_size)
