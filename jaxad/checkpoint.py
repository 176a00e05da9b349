"""Fitted state on disk: arrays as ``.npy`` files, the config beside them as JSON.

A workdir holds ``config.json``, ``state/`` (:func:`save_arrays`) and the run's reports. A marker file tells a
jaxad workdir from a user's folder, so jaxad replaces its own earlier outputs but never writes
into a folder holding anything else.

Crash safety: every file is written to a temporary name and renamed into place, and
``complete.json`` (holding :data:`FORMAT_VERSION`) is written last and removed first, so a process
killed at any point leaves either the previous complete model or a workdir that :func:`load`
reports as incomplete. A lock file refuses a second process writing the same workdir; the lock
dies with its process, so a killed fit leaves none behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.config import completed
from jaxad.errors import ConfigError

MARKER = "jaxad_run.json"
COMPLETE = "complete.json"  # written last: the state and config beside it are whole
LOCK = ".jaxad.lock"
FORMAT_VERSION = 4  # 1: before complete.json; 3: PAAP keeps L⁻¹ ('whiten'); 4: state/ is .npy files, not orbax; bump when state/ or config.json change meaning
ARRAYS_INDEX = "arrays.json"  # in a folder of arrays: the tree, each leaf named by its .npy file
MAP_BYTES = 1 << 20  # arrays of at least this many bytes on disk are memory-mapped when loaded

_held: dict[Path, TextIO] = {}  # the workdirs this process has locked, with their open lock files


@atexit.register
def _release() -> None:
    """Close the lock files at exit (the kernel drops the locks with them)."""
    while _held:
        _held.popitem()[1].close()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (same suffix, so writers that choose a format by it still do)
    to write the file to; renamed onto ``path`` when the block ends, removed if it raises. A reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _lock(workdir: Path, option: str) -> None:
    """Hold an exclusive lock on ``workdir`` for the rest of this process, or refuse."""
    if workdir in _held:
        return
    f = open(workdir / LOCK, "a+")  # noqa: SIM115 (held open, so locked, until _release at exit)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{workdir}: another jaxad process (pid {owner}) is writing this {option}; "
                          f"wait for it to finish or choose another {option}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[workdir] = f


def prepare_workdir(workdir: str | Path, option: str = "--workdir") -> Path:
    """Create ``workdir`` or reuse one that jaxad made, locked for this process; refuse a folder
    holding other files, or one another process is writing. ``option`` names the command-line flag
    that chose the folder, for the error."""
    workdir = Path(workdir).expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{workdir}: {option} is a file; choose a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise ConfigError(f"{workdir}: holds files that jaxad did not write; choose an empty or new {option}")
    workdir.mkdir(parents=True, exist_ok=True)
    _lock(workdir, option)
    write_text(workdir / MARKER, json.dumps({"written_by": "jaxad"}) + "\n")
    return workdir


def save_arrays(path: str | Path, tree: Any) -> None:
    """Write a pytree (dicts, lists, arrays, scalars) to the folder ``path``, replacing one there:
    one ``.npy`` file per leaf, then ``arrays.json``, the tree with each leaf named by its file.

    Each leaf goes to disk straight from its buffer, so saving holds nothing beyond the state itself
    (an orbax save of a 2 GiB array took about 3.8 GB more), and :func:`load_arrays` can map the
    files instead of reading them. Written by this process alone, as a multi-host run's process 0 does."""
    path = Path(path).expanduser()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    count = itertools.count()

    def encode(node: Any) -> Any:
        if isinstance(node, dict):
            return {"dict": {str(k): encode(v) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return {"list": [encode(v) for v in node]}
        if node is None:
            return {"none": True}
        name = f"{next(count):05d}.npy"
        array = np.asarray(jax.device_get(node))
        plain = array.dtype.kind in "biufc"  # numpy's own dtypes; others (bfloat16) go as their bytes
        with open(path / name, "wb") as f:
            np.save(f, array if plain else array.reshape(-1).view(np.uint8), allow_pickle=False)
        return {"array": name, "dtype": array.dtype.name, "shape": list(array.shape)}

    index = encode(tree)
    write_text(path / ARRAYS_INDEX, json.dumps(index) + "\n")


def load_arrays(path: str | Path) -> Any:
    """Read back what :func:`save_arrays` wrote, as numpy arrays on the host; arrays of a MiB or
    more are memory-mapped (read-only), so loading takes no memory until they are used. Never
    unpickles. A missing, truncated or altered file is a ConfigError naming ``path``."""
    path = Path(path).expanduser()
    try:
        index = json.loads((path / ARRAYS_INDEX).read_text())
        return _decode(path, index)
    except ConfigError:
        raise
    except Exception as e:  # json, numpy and the file system raise many kinds on damaged files
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"{path}: arrays are missing, corrupt or truncated ({reason})") from e


def _decode(path: Path, node: dict) -> Any:
    if "dict" in node:
        return {k: _decode(path, v) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(path, v) for v in node["list"]]
    if "none" in node:
        return None
    file = path / node["array"]
    big = file.stat().st_size >= MAP_BYTES
    raw = np.load(file, mmap_mode="r" if big else None, allow_pickle=False)
    dtype, shape = jnp.dtype(node["dtype"]), tuple(node["shape"])
    array = raw.view(dtype).reshape(shape) if raw.dtype != dtype else np.asarray(raw)
    if array.shape != shape:
        raise ConfigError(f"{file}: holds an array of shape {array.shape}, {ARRAYS_INDEX} says {shape}")
    return array


def fitted_runs(folder: str | Path) -> list[Path]:
    """The workdirs directly inside ``folder`` that jaxad fitted (one per category of a multi-category
    fit, complete or not: loading an incomplete one says so), sorted; none when ``folder`` is not a folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / MARKER).is_file() and (p / "config.json").is_file())


def save(workdir: Path, config: ml_collections.ConfigDict, state: Any) -> None:
    """Write ``config.json`` and the state pytree (replacing a previous one of this workdir), then
    ``complete.json``; each step replaces whole files, so a kill anywhere leaves an incomplete mark."""
    workdir = Path(workdir).resolve()
    (workdir / COMPLETE).unlink(missing_ok=True)
    partial = workdir / "state.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_arrays(partial, state)
    shutil.rmtree(workdir / "state", ignore_errors=True)
    os.replace(partial, workdir / "state")
    write_text(workdir / "config.json", json.dumps(config.to_dict(), indent=2, default=list) + "\n")
    write_text(workdir / COMPLETE, json.dumps({"format_version": FORMAT_VERSION}) + "\n")


def load(workdir: str | Path) -> tuple[ml_collections.ConfigDict, Any]:
    """Read back what :func:`save` wrote; arrays come back as numpy. A config saved before a key
    was added is completed with the value it was fitted with (:func:`jaxad.config.completed`)."""
    workdir = Path(workdir).expanduser().resolve()
    if not (workdir / COMPLETE).is_file():
        fitted = fitted_runs(workdir)
        if fitted:
            raise ConfigError(f"{workdir}: holds one fitted model per category ({', '.join(p.name for p in fitted)}); "
                              f"pass one of them, e.g. {fitted[0]}")
        if not (workdir / MARKER).is_file():
            raise ConfigError(f"{workdir}: no fitted model here (config.json and state/ missing); run scripts/fit.py first")
    _check_complete(workdir)
    try:
        raw = json.loads((workdir / "config.json").read_text())
        arrays = load_arrays(workdir / "state")
    except Exception as e:  # numpy and json raise many kinds on damaged files
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"{workdir}: config.json or state/ is corrupt or truncated ({reason}); "
                          f"fit again with scripts/fit.py --workdir {workdir}") from e
    return completed(ml_collections.ConfigDict(_tuples(raw))), arrays


def _check_complete(workdir: Path) -> None:
    """ConfigError unless ``complete.json`` says a save of this format version finished."""
    redo = f"fit again with scripts/fit.py --workdir {workdir} (trained methods resume from their last checkpoint)"
    if not (workdir / COMPLETE).is_file():
        raise ConfigError(f"{workdir}: incomplete workdir (no {COMPLETE}): a fit stopped before saving finished, "
                          f"or jaxad before format version {FORMAT_VERSION} wrote it; {redo}")
    try:
        version = json.loads((workdir / COMPLETE).read_text())["format_version"]
    except (ValueError, KeyError, TypeError):
        version = "unreadable"
    if version != FORMAT_VERSION:
        raise ConfigError(f"{workdir}: written in workdir format version {version}, this jaxad reads version "
                          f"{FORMAT_VERSION}; {redo}")


def _tuples(node: Any) -> Any:
    """JSON turns tuples into lists; configs use tuples."""
    if isinstance(node, dict):
        return {k: _tuples(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(_tuples(v) for v in node)
    return node
