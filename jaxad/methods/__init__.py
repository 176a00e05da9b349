"""Anomaly-detection methods, found by name: ``jaxad.methods.get('crd')``.

Each public module here is a method. It provides ``fit(config, batches, backbone, mesh=None,
progress=None) -> state`` (``batches``: :class:`~jaxad.data.Batch` es with a length, a list or
:func:`~jaxad.data.iterate_batches`' stream) and ``predict(config, backbone, state, images) -> (image_scores, maps)``,
a pure function to be jit-compiled with ``config`` and ``backbone`` bound; a method that reads
backbone taps besides ``config.taps`` names them all in ``backbone_taps(config)``. A method whose
fit holds arrays that grow with the data gives ``memory_need(config, backbone, n_images) -> (bytes,
what, keys)``, checked against the memory available before any image is read. Modules whose name
starts with an underscore hold parts that several methods share.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import ml_collections

from jaxad.errors import ConfigError


def names() -> list[str]:
    """Every method name, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    """The module implementing method ``name``."""
    if name not in names():
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(names())}")
    return importlib.import_module(f"jaxad.methods.{name}")


def backbone_taps(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The backbone taps ``config.method`` reads."""
    method = get(config.method)
    return tuple(method.backbone_taps(config)) if hasattr(method, "backbone_taps") else tuple(config.taps)
