"""The loop every trained method shares: jitted steps, progress, resumable orbax checkpoints.

A method supplies its train state (any pytree of arrays: params, optimiser state, BatchNorm
statistics, step counter), a jitted ``step(state, batch, key) -> (state, metrics)`` and an
endless batch source. ``train`` resumes from the newest checkpoint in ``checkpoint_dir`` when there
is one written by the same run, so an interrupted fit continues where it stopped instead of starting
over; checkpoints of another run (another configuration or data, or more steps than asked for) are
replaced, never resumed into a model that belongs to neither.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm import tqdm

from jaxad import checkpoint
from jaxad.data import Batch
from jaxad.errors import DataError, NumericsError
from jaxad.runtime import parallel, shared_arrays

Step = Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]

RUN_FILE = "run.json"  # beside the checkpoints: what defines the run that wrote them


def run_identity(config: Mapping[str, Any], length_keys: tuple[str, ...] = ("train_steps",)) -> dict[str, Any]:
    """What makes two fits the same run, so one may resume the other's checkpoints: the config
    (data path included) less the keys that set how long it trains (``length_keys``, so a longer
    run continues a shorter one) and where and how often it is checkpointed."""
    dropped = {*length_keys, "checkpoint_every", "workdir"}
    return {k: v for k, v in config.items() if k not in dropped}


def collect_images(batches: Iterable[Batch], progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Every valid training image of a batch stream in host memory, [N, H, W, 3] float32.

    Trained methods pass over their (small, one-category) training set many times; holding it
    once in memory is cheaper than decoding files again every epoch. A stream that knows its
    length (:class:`jaxad.data.loader.Stream`) is copied into one array allocated at the first
    batch, aligned so that a CPU device shares it (``jax.device_put(..., may_alias=True)``):
    the images are held once, never as a list of batches plus their concatenation.
    """
    total = len(batches) if isinstance(batches, Sized) else None
    images, parts, count = None, [], 0
    for batch in batches:
        valid = np.asarray(batch.valid)
        chunk = np.asarray(batch.images, np.float32)[valid]
        if total is None:
            parts.append(chunk)
        else:
            if images is None:
                images = shared_arrays.empty((total * len(valid), *chunk.shape[1:]), np.float32)
            images[count:count + len(chunk)] = chunk
        count += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if count == 0:
        raise DataError("the training set is empty: a trained method needs at least one image")
    return images[:count] if total is not None else np.concatenate(parts)


def hold_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): a seeded random ``fraction`` of ``count`` items for validation.

    At least one item stays on each side when there are two or more, so model selection never
    falls back to the test set.
    """
    order = np.random.default_rng(seed).permutation(count)
    n_val = int(round(fraction * count))
    n_val = min(max(n_val, 1), count - 1) if count >= 2 and fraction > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def random_batches(images: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled batches of ``images`` (an epoch is one permutation; batches never straddle)."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, len(images))
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield images[order[start : start + batch_size]]


def _manager(checkpoint_dir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir.resolve(), options=options)


def _resumable_manager(checkpoint_dir: Path, run: Mapping[str, Any], steps: int, desc: str) -> ocp.CheckpointManager:
    """The checkpoint manager of ``checkpoint_dir``, after deleting its checkpoints when they were
    written by another run than ``run`` (or record no run) or reach past ``steps``: resuming those
    would return a model trained under other settings."""
    record = json.dumps(run, sort_keys=True, default=str)
    manager = _manager(checkpoint_dir, keep=2)
    latest = manager.latest_step()
    if latest is not None:
        written = checkpoint_dir / RUN_FILE
        why = ("they record no run" if not written.is_file() else
               "another configuration or data wrote them" if written.read_text() != record else
               f"they reach step {latest}, past the {steps} asked for" if latest > steps else None)
        if why is None:
            print(f"{desc}: resuming from step {latest} in {checkpoint_dir}", file=sys.stderr)
            return manager
        print(f"{desc}: not resuming the checkpoints in {checkpoint_dir} ({why}); training from step 0",
              file=sys.stderr)
        for old in manager.all_steps():
            manager.delete(old)
    if jax.process_index() == 0:
        checkpoint.write_text(checkpoint_dir / RUN_FILE, record)
    return manager


def train(
    step: Step,
    state: Any,
    batches: Iterator[Any],
    steps: int,
    key: jax.Array,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    desc: str = "train",
    log_every: int = 50,
    mesh: Mesh | None = None,
    run: Mapping[str, Any] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Run ``step`` until ``steps`` optimiser steps are done; returns (state, logged metrics).

    The step number is counted here; the key of step ``i`` is ``fold_in(key, i)``, so a resumed run
    draws the same noise a continuous one would. A non-finite loss stops training with an error
    naming the step instead of saving NaN weights. With ``mesh`` the state is replicated and every
    batch split along its first axis over the mesh: the jitted step then runs data-parallel.
    Checkpoints in ``checkpoint_dir`` are resumed only when they were written under the same ``run``
    (:func:`run_identity` of the config) and have at most ``steps`` steps.
    """
    start, manager = 0, None
    if checkpoint_dir is not None:
        manager = _resumable_manager(Path(checkpoint_dir), run or {}, steps, desc)
        latest = manager.latest_step()
        if latest is not None:
            state = manager.restore(latest, args=ocp.args.StandardRestore(state))
            start = latest
    if mesh is not None:
        state = parallel.replicate(state, mesh)
        batches = (parallel.shard_batch(b, mesh) for b in batches)
    history: list[dict[str, float]] = []
    with tqdm(total=steps, initial=start, desc=desc, unit="step", leave=False, dynamic_ncols=True) as bar:
        for i in range(start, steps):
            state, metrics = step(state, next(batches), jax.random.fold_in(key, i))
            if (i + 1) % log_every == 0 or i + 1 == steps:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(np.isfinite(v) for v in logged.values()):
                    raise NumericsError(f"{desc}: non-finite training metrics {logged} at step {i + 1}; "
                                        "lower the learning rate or check the inputs")
                history.append({"step": i + 1, **logged})
                bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items()})
            bar.update(1)
            if manager is not None and ((i + 1) % checkpoint_every == 0 or i + 1 == steps):
                manager.save(i + 1, args=ocp.args.StandardSave(state))
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return state, history
