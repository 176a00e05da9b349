"""Fitted state on disk: arrays with orbax, the config beside them as JSON.

A workdir holds ``config.json``, ``state/`` (orbax) and the run's reports. A marker file tells a
jaxad workdir from a user's folder, so jaxad replaces its own earlier outputs but never writes
into a folder holding anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxad.config import completed
from jaxad.errors import ConfigError

MARKER = "jaxad_run.json"


def prepare_workdir(workdir: str | Path, option: str = "--workdir") -> Path:
    """Create ``workdir`` or reuse one that jaxad made; refuse a folder holding other files.
    ``option`` names the command-line flag that chose the folder, for the error."""
    workdir = Path(workdir).expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{workdir}: {option} is a file; choose a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise ConfigError(f"{workdir}: holds files that jaxad did not write; choose an empty or new {option}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(json.dumps({"written_by": "jaxad"}) + "\n")
    return workdir


def save_arrays(path: str | Path, tree: Any) -> None:
    """Write a pytree of arrays to the orbax folder ``path`` (replacing one there).

    Written by this process alone: in a multi-host run process 0 saves while the others, which
    hold the same state, do not take part (orbax would otherwise wait for them at a barrier)."""
    path = Path(path).expanduser().resolve()  # orbax takes absolute paths only
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone)
    checkpointer.save(path, jax.device_get(tree), force=True)


def load_arrays(path: str | Path) -> Any:
    """Read back what :func:`save_arrays` wrote, as numpy arrays on the host."""
    path = Path(path).expanduser().resolve()
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=restore_args)


def fitted_runs(folder: str | Path) -> list[Path]:
    """The workdirs directly inside ``folder`` that jaxad fitted (one per category of a multi-category
    fit), sorted; none when ``folder`` is not a folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / MARKER).is_file() and (p / "config.json").is_file())


def save(workdir: Path, config: ml_collections.ConfigDict, state: Any) -> None:
    """Write ``config.json`` and the state pytree (replacing a previous one of this workdir)."""
    workdir = Path(workdir).resolve()
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list) + "\n")
    save_arrays(workdir / "state", state)


def load(workdir: str | Path) -> tuple[ml_collections.ConfigDict, Any]:
    """Read back what :func:`save` wrote; arrays come back as numpy. A config saved before a key
    was added is completed with the value it was fitted with (:func:`jaxad.config.completed`)."""
    workdir = Path(workdir).expanduser().resolve()
    if not (workdir / "config.json").is_file() or not (workdir / "state").is_dir():
        fitted = fitted_runs(workdir)
        if fitted:
            raise ConfigError(f"{workdir}: holds one fitted model per category ({', '.join(p.name for p in fitted)}); "
                              f"pass one of them, e.g. {fitted[0]}")
        raise ConfigError(f"{workdir}: no fitted model here (config.json and state/ missing); run scripts/fit.py first")
    raw = json.loads((workdir / "config.json").read_text())
    return completed(ml_collections.ConfigDict(_tuples(raw))), load_arrays(workdir / "state")


def _tuples(node: Any) -> Any:
    """JSON turns tuples into lists; configs use tuples."""
    if isinstance(node, dict):
        return {k: _tuples(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(_tuples(v) for v in node)
    return node
