"""``jax.jit`` with the XLA:CPU options jaxad's programs run fastest with.

XLA:CPU (jax 0.10) hands matrix products and convolutions to YNNPACK. In whole backbone forwards
on the 2-core AVX-512 machine of BENCHMARKS.md, XLA's own kernels for them were faster, so on CPU
jaxad compiles its programs with ``xla_cpu_experimental_ynn_fusion_type`` set to keep YNNPACK to
reductions. Section backbones-cpu of BENCHMARKS.md times every backbone both ways
(``jaxad_over_xla_defaults``).

The option applies to jaxad's own compiled programs, not to the process. Where a CPU runs
YNNPACK's products faster, set the option in ``XLA_FLAGS``: jaxad then leaves it to that setting.
On GPU/TPU, or with an XLA that does not know the option, programs compile with XLA's defaults.

Beside it: :func:`init` (a Linen init as one program) and :func:`in_fixed_batches` (one program
for every batch of a loop, the tail padded), which save compilations on any backend, and
:func:`in_small_batches_on_cpu`, which keeps a CPU's working set in its caches.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxad.runtime import shared_arrays

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_SETTING = "LIBRARY_FUSION_TYPE_REDUCE"  # YNNPACK for reductions; products and convolutions by XLA


@functools.cache
def cpu_options() -> dict[str, str]:
    """The compile options of jaxad's programs on this backend (empty: XLA's defaults).

    Decided at the first compilation, not at import, so that importing jaxad does not start a
    backend (and ``jax_num_cpu_devices`` can still be set after the import)."""
    if jax.default_backend() != "cpu" or YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    options = {YNN_OPTION: YNN_SETTING}
    try:  # an XLA without the option (or this value of it) rejects it at compile time
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(options)
    except Exception:  # noqa: BLE001 - any rejection means: compile with the defaults
        return {}
    return options


def jit(fun: Callable | None = None, /, **kwargs: Any) -> Callable:
    """``jax.jit(fun, **kwargs)`` compiled with :func:`cpu_options`; usable as ``@jit`` and
    ``@partial(jit, static_argnums=...)``. Called with traced arguments (inside another jitted
    function) it is an ordinary nested ``jax.jit``, and the outer program's options apply: JAX
    takes compile options only at the top level."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    nested = jax.jit(fun, **kwargs)
    top: Callable | None = None

    @functools.wraps(fun)
    def call(*args: Any, **call_kwargs: Any) -> Any:
        nonlocal top
        options = cpu_options()  # cached: without options (GPU/TPU) no argument is looked at
        if not options or any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, call_kwargs))):
            return nested(*args, **call_kwargs)
        if top is None:
            top = jax.jit(fun, compiler_options=options, **kwargs)
        return top(*args, **call_kwargs)

    return call


def init(module: Any, key: jax.Array, *args: Any, **kwargs: Any) -> dict:
    """``module.init(key, *args, **kwargs)`` of a Linen module, as one compiled program.

    Run eagerly, every initialiser and every layer of the dummy forward compiles on its own
    (about a second each on CPU); compiled whole, the unused forward is dropped. Keyword
    arguments (``train=False``) are static."""
    return jit(functools.partial(module.init, **kwargs))(key, *args)


def in_fixed_batches(fn: Callable[[Any], Any], inputs: Any, batch_size: int) -> list:
    """``fn`` over ``inputs`` (arrays, or a pytree of arrays sharing their leading axis) in
    batches of ``batch_size``, one output per batch.

    The last batch is padded with copies of its final item and the padding is cut from its
    output, so one compiled program serves every batch: a shorter tail would compile ``fn`` again."""
    return [result for _, result in _fixed_batches(fn, inputs, batch_size)]


def in_fixed_batches_on_host(fn: Callable[[Any], Any], inputs: Any, batch_size: int) -> Any:
    """:func:`in_fixed_batches` joined: one host array [N, ...] per output leaf, allocated when the
    first batch's output arrives and filled batch by batch, so that the outputs are held once, never
    as a list of batches plus their concatenation. The arrays are aligned for a CPU device to share
    them (:mod:`jaxad.runtime.shared_arrays`)."""
    count = len(jax.tree.leaves(inputs)[0])
    joined = None
    for start, result in _fixed_batches(fn, inputs, batch_size):
        if joined is None:
            joined = jax.tree.map(lambda r: shared_arrays.empty((count, *r.shape[1:]), r.dtype), result)
        for out, r in zip(jax.tree.leaves(joined), jax.tree.leaves(result)):
            out[start:start + len(r)] = np.asarray(r)
    return joined


def _fixed_batches(fn: Callable[[Any], Any], inputs: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(first row, output) of each batch of :func:`in_fixed_batches`, computed as they are read."""
    count = len(jax.tree.leaves(inputs)[0])
    for start in range(0, count, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), count - 1)  # the tail repeats the last item
        result = fn(jax.tree.map(operator.itemgetter(rows), inputs))
        real = count - start
        yield start, (jax.tree.map(operator.itemgetter(slice(real)), result) if real < batch_size else result)


def in_small_batches_on_cpu(fn: Callable[[jax.Array], Any], images: jax.Array, size: int) -> Any:
    """``fn(images)`` (a pytree with a leading batch axis), computed ``size`` images at a time
    (``lax.map``) on a single CPU device, where a whole batch's intermediate maps overflow the
    caches; elsewhere, or across devices (the batch is sharded), in one call. A symbolic batch
    (``jax.export``) cannot be cut into groups of ``size``: its images go one at a time."""
    batch = images.shape[0]
    if jax.default_backend() != "cpu" or jax.device_count() > 1 or (not jax.export.is_symbolic_dim(batch) and batch <= size):
        return fn(images)
    return jax.lax.map(lambda image: jax.tree.map(lambda a: a[0], fn(image[None])), images,
                       batch_size=None if jax.export.is_symbolic_dim(batch) else size)
