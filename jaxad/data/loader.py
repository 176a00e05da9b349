"""Fixed-shape batches streamed from disk, decoded and resized in a thread pool.

PIL releases the GIL while decoding and resizing, so a few threads keep up with the model; only
``(prefetch + 1) * batch_size`` images are in memory at once. The last batch is padded to full size
(its last image repeated, ``valid`` false) so a jitted consumer sees one shape and compiles once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from jaxad.data.images import load_sample
from jaxad.data.layouts import Sample


class Batch(NamedTuple):
    images: np.ndarray  # [B, H, W, 3] float32 in [0, 1]
    masks: np.ndarray | None  # [B, h, w] float32 0/1; None unless a mask size was asked for
    labels: np.ndarray  # [B] int32: 0 normal, 1 anomalous, -1 unknown
    valid: np.ndarray  # [B] bool: false for the padding of the last batch
    paths: tuple[str, ...]  # [B], padding repeats the last path
    index: np.ndarray | None = None  # [B] int: each image's place in the whole list (padding repeats the last)


Loaded = tuple[np.ndarray, np.ndarray | None, int, str]  # image, mask, label, path


def num_batches(num_samples: int, batch_size: int) -> int:
    """How many (padded) batches ``num_samples`` make."""
    return -(-num_samples // batch_size)


def _assemble(items: list[Loaded], batch_size: int, first: int) -> Batch:
    """Items ``first, first + 1, ...`` of the whole list as one padded batch."""
    pad = batch_size - len(items)
    items = items + [items[-1]] * pad
    images, masks, labels, paths = zip(*items)
    return Batch(
        images=np.stack(images),
        masks=None if masks[0] is None else np.stack(masks).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int32),
        valid=np.arange(batch_size) < batch_size - pad,
        paths=tuple(paths),
        index=first + np.minimum(np.arange(batch_size), batch_size - pad - 1),
    )


class Stream:
    """Batches read on demand whose number is known (``len``) before the first is read, so that a fit
    can preallocate what it fills batch by batch. An iterator: read once."""

    def __init__(self, batches: Generator[Batch, None, None], count: int):
        self._batches, self._count = batches, count

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        """Stop reading: the loading threads end (as a generator's ``close``)."""
        self._batches.close()

    def __len__(self) -> int:
        return self._count


def stream(count: int, load: Callable[[int], Loaded], batch_size: int, workers: int = 2, prefetch: int = 2,
           batches: int | None = None, first: int = 0) -> Stream:
    """Batches of ``load(0) ... load(count - 1)``, run in ``workers`` threads, ``prefetch`` batches ahead.
    ``first``: where item 0 stands in the whole list (a process's share of it starts there), for ``Batch.index``.

    ``batches`` (at least the batches ``count`` makes) adds batches of padding only (the last
    batch with ``valid`` all false), so that every process of a multi-host fit steps through as
    many batches as the others although its share of the files may be one image shorter.
    An exception raised by ``load`` reaches the consumer unchanged.
    """
    return Stream(_read(count, load, batch_size, workers, prefetch, batches, first),
                  max(num_batches(count, batch_size), batches or 0))


def _read(count: int, load: Callable[[int], Loaded], batch_size: int, workers: int, prefetch: int,
          batches: int | None, first: int) -> Generator[Batch, None, None]:
    ahead = batch_size * (prefetch + 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque[Future] = deque()
    submitted = 0
    try:
        for start in range(0, count, batch_size):
            while submitted < min(count, start + ahead):
                pending.append(pool.submit(load, submitted))
                submitted += 1
            items = [pending.popleft().result() for _ in range(min(batch_size, count - start))]
            last = _assemble(items, batch_size, first + start)
            yield last
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for _ in range(num_batches(count, batch_size), batches or 0):
        yield last._replace(valid=np.zeros(batch_size, bool))


def iterate_batches(
    samples: Sequence[Sample],
    image_size: tuple[int, int],
    batch_size: int,
    mask_size: tuple[int, int] | None = None,
    workers: int = 2,
    prefetch: int = 2,
    batches: int | None = None,
    first: int = 0,
) -> Stream:
    """Stream ``samples`` as :class:`Batch` es; images at ``image_size``, masks (if asked) at
    ``mask_size``; ``batches``: pad with invalid batches to that many, ``first``: the place of
    ``samples[0]`` in the whole list (see :func:`stream`)."""
    samples = tuple(samples)

    def load(i: int) -> Loaded:
        s = samples[i]
        image, mask = load_sample(s.path, s.mask_paths, image_size, mask_size)
        return image, mask, s.label, str(s.path)

    return stream(len(samples), load, batch_size, workers, prefetch, batches, first)
