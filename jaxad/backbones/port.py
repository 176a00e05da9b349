"""Torch state dict → Flax variables: the layout rules every port shares.

An architecture supplies only its key map (torch module prefix → Flax module path and layer
kind); the rules below move each tensor, and every problem is counted in one error so a wrong file
is diagnosed in one run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxad.errors import WeightsError


class Layer(NamedTuple):
    """A torch module (``kind``: 'conv' or 'bn') and where it lives in the Flax tree."""

    kind: str
    path: tuple[str, ...]


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # OIHW → HWIO (depthwise: (C,1,k,k) → (k,k,1,C))


def _same(w: np.ndarray) -> np.ndarray:
    return w


# torch parameter name → (Flax collection, Flax leaf, layout change), per layer kind
_RULES: dict[str, dict[str, tuple[str, str, Callable[[np.ndarray], np.ndarray]]]] = {
    "conv": {"weight": ("params", "kernel", _conv), "bias": ("params", "bias", _same)},
    "bn": {
        "weight": ("params", "scale", _same),
        "bias": ("params", "bias", _same),
        "running_mean": ("batch_stats", "mean", _same),
        "running_var": ("batch_stats", "var", _same),
    },
}


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        out.update(_leaves(v, (*prefix, k)) if isinstance(v, Mapping) else {(*prefix, k): v})
    return out


def _nest(leaves: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in leaves.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


_NAMED = 5  # keys named per kind of problem; a file of another network has hundreds


def _listed(label: str, keys: list[str]) -> str:
    """'12 missing: a, b, c, d, e and 7 more'."""
    rest = f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else ""
    return f"{len(keys)} {label}: {', '.join(keys[:_NAMED])}{rest}"


def convert(
    state: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    source: str,
    *,
    layers: Mapping[str, Layer],
    ignore: Callable[[str], bool] = lambda key: key.endswith("num_batches_tracked"),
) -> dict:
    """Flax variables shaped like ``target`` (e.g. ``jax.eval_shape`` of ``init``) from ``state``.

    Raises one WeightsError that counts the missing, unexpected and mis-shaped keys, names the
    first few of each, and says how many of the tensors the architecture needs were found.
    """
    wanted = _leaves(target)
    routes = {}  # torch key → (Flax leaf path, layout change)
    for prefix, layer in layers.items():
        for name, (collection, leaf, change) in _RULES[layer.kind].items():
            path = (collection, *layer.path, leaf)
            if path in wanted:
                routes[f"{prefix}.{name}"] = (path, change)
    out, misshaped = {}, []
    for key, value in state.items():
        if key not in routes:
            continue
        path, change = routes[key]
        value = change(np.asarray(value))
        if value.shape != tuple(wanted[path].shape):
            shapes = f"{tuple(np.shape(state[key]))} → {value.shape}, needs {tuple(wanted[path].shape)}"
            misshaped.append(f"{key} {shapes} for {'/'.join(path)}")
            continue
        out[path] = value.astype(wanted[path].dtype)
    routed = {path for path, _ in routes.values()}
    missing = [k for k in routes if k not in state] + ["/".join(p) for p in wanted if p not in routed]
    unexpected = [k for k in state if k not in routes and not ignore(k)]
    if missing or unexpected or misshaped:
        found = {"missing": missing, "unexpected": unexpected, "mis-shaped": misshaped}
        listed = "; ".join(_listed(label, keys) for label, keys in found.items() if keys)
        raise WeightsError(f"{source}: weights do not fit the architecture, {len(out)} of the {len(wanted)} tensors "
                           f"it needs found ({listed}); pass weights of this backbone")
    return _nest(out)
