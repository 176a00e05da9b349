"""Anomaly-detection methods, found by name: ``jaxad.methods.get('crd')``.

Each method module provides ``fit(config, batches, backbone, mesh=None, progress=None) -> state``
and ``predict(config, backbone, state, images) -> (image_scores, maps)``, a pure function to be
jit-compiled with ``config`` and ``backbone`` bound.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from jaxad.errors import ConfigError

METHODS: tuple[str, ...] = ("crd", "patchcore")


def get(name: str) -> ModuleType:
    """The module implementing method ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return importlib.import_module(f"jaxad.methods.{name}")
