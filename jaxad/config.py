"""Config files and ``--config.key=value`` overrides.

A config is a Python file with ``get_config() -> ml_collections.ConfigDict`` (big_vision style).
``--method NAME`` picks ``configs/NAME.py``; overrides are parsed to the type of the value they
replace, so ``--config.lam=3`` stays a float and ``--config.taps="('a','b')"`` a tuple.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from jaxad.errors import ConfigError, MemoryLimitError
from jaxad.runtime import memory

# Keys the pipeline reads for every method, added to a config that does not set them.
PIPELINE_DEFAULTS = {
    "train_images": 0,  # > 0: fit on that many training images drawn at random (few-shot); 0: all
    "seed": 0,  # of that draw (and of a method's own random choices)
    "compute_dtype": "float32",  # or "bfloat16": backbone compute only
    "calibration_fraction": 0.1,  # of the training images held out to set thresholds (0: none held out)
    "threshold_rule": "max",  # "max" (largest normal score), "quantile" or "f1" (jaxad.eval.calibration)
    "threshold_quantile": 0.99,  # of normal calibration scores, for threshold_rule="quantile"
}
# Keys a method's config gained after models were saved with it, at the value those models were
# fitted with: a saved config that lacks one is read with it.
ADDED_KEYS = {
    "cpr": {"aggregate": 1},
}


def completed(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the keys of :data:`PIPELINE_DEFAULTS` and :data:`ADDED_KEYS` it lacks, in place."""
    for key, value in {**PIPELINE_DEFAULTS, **ADDED_KEYS.get(config.get("method"), {})}.items():
        if key not in config:
            config[key] = value
    return config


def require_at_least(config: ml_collections.ConfigDict, minimum: float, *keys: str) -> None:
    """A ConfigError naming the first of ``keys`` whose value is below ``minimum`` (counts, sizes,
    steps), so a bad number fails before any work with the key it came from."""
    for key in keys:
        if not config[key] >= minimum:
            raise ConfigError(f"--config.{key}={config[key]}: must be at least {minimum}")


def require_between(config: ml_collections.ConfigDict, key: str, low: float, high: float, *,
                    low_closed: bool = False, high_closed: bool = False) -> None:
    """A ConfigError unless config[key] lies in the interval (open ends unless closed): rates,
    fractions, ratios, quantiles. NaN lies in none."""
    value = config[key]
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    if not (above and below):
        interval = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"
        raise ConfigError(f"--config.{key}={value}: must be in {interval}")


def require_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
    """A ConfigError naming the first of ``keys`` that is not above 0 (learning rates, λ)."""
    for key in keys:
        require_between(config, key, 0.0, math.inf)


def require_memory(need: int, what: str, keys: str) -> None:
    """MemoryLimitError when the ``need`` bytes that ``what`` will hold exceed what this process may
    still take (:func:`jaxad.runtime.memory.available`), naming the limit and the config ``keys``
    that lower the need."""
    free = memory.available()
    if need > free.bytes:
        raise MemoryLimitError(f"{what} needs about {memory.gib(need)}, but {memory.gib(free.bytes)} is available "
                               f"({free.limit}); lower {keys}, or allow more memory")


def method_configs(config_dir: Path) -> list[str]:
    """Names of the configs in ``config_dir`` that configure a method (they set ``method``), sorted."""
    files = sorted(p for p in Path(config_dir).glob("*.py") if not p.stem.startswith("_"))
    return [p.stem for p in files if "method" in load_config(p)]


def config_path(method: str, config_dir: Path) -> Path:
    """``<config_dir>/<method>.py`` when it configures a method, else an error listing those that do."""
    path = Path(config_dir) / f"{method}.py"
    if path.is_file() and "method" in load_config(path):
        return path
    why = "configures no method" if path.is_file() else f"no config for method {method!r}"
    raise ConfigError(f"{path}: {why}; known methods: {', '.join(method_configs(config_dir))}")


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Import a config file and call its ``get_config()``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"jaxad_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config()")
    return completed(module.get_config())


def _parse(raw: str, current: object, key: str) -> object:
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}={raw}: expected true or false")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ConfigError(f"--config.{key}={raw}: expected a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list | str):
        value = tuple(value) if isinstance(value, list) else (value,)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key}={raw}: expected a {type(current).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``--config.a.b=value`` strings (also ``config.a.b=value``) to a copy of ``config``."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        text = item.removeprefix("--")
        if not text.startswith("config.") or "=" not in text:
            raise ConfigError(f"{item}: overrides look like --config.key=value")
        key, raw = text[len("config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: no such section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"--config.{key}: unknown key; keys here: {', '.join(sorted(node.keys()))}")
        with node.ignore_type():
            node[leaf] = _parse(raw, node[leaf], key)
    return config
