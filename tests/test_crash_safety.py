"""Workdirs survive kills, damage, concurrent writers and old layouts: each ends in a complete model
or a clear ConfigError that says how to redo it, never in a model that loads wrongly."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxad import checkpoint
from jaxad.data import synthetic
from jaxad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _state(value: float) -> dict:  # the bank is large enough to be memory-mapped when loaded
    return {"bank": np.full((512, 512), value, np.float32), "stats": {"mean": np.full(8, value, np.float32)}}


def _saved(tmp_path: Path, value: float = 1.0) -> Path:
    workdir = checkpoint.prepare_workdir(tmp_path / "w")
    checkpoint.save(workdir, ml_collections.ConfigDict({"method": "crd", "value": value}), _state(value))
    return workdir


def test_a_complete_save_loads(tmp_path):
    config, state = checkpoint.load(_saved(tmp_path, 2.0))
    assert config.value == 2.0 and np.all(state["bank"] == 2.0)
    assert json.loads((tmp_path / "w" / checkpoint.COMPLETE).read_text()) == {"format_version": checkpoint.FORMAT_VERSION}
    assert not list((tmp_path / "w").glob("*.tmp*")) and not (tmp_path / "w" / "state.partial").exists()


def test_arrays_come_back_as_saved_the_large_ones_mapped_read_only(tmp_path):
    tree = {"big": np.arange(1 << 19, dtype=np.float32).reshape(512, 1024), "grid": [np.float32(2.5), None, (np.int32(3),)],
            "half": jnp.linspace(0, 1, 6, dtype=jnp.bfloat16).reshape(2, 3), "mask": np.array([True, False])}
    checkpoint.save_arrays(tmp_path / "a", tree)
    back = checkpoint.load_arrays(tmp_path / "a")
    assert jax.tree.structure(back) == jax.tree.structure({**tree, "grid": [tree["grid"][0], None, [tree["grid"][2][0]]]})
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert got.dtype == np.asarray(want).dtype and np.array_equal(got, np.asarray(want))
    assert not back["big"].flags.writeable and back["mask"].flags.writeable  # mapped / read into memory


def test_a_pickled_array_file_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    workdir = _saved(tmp_path)
    target = max((workdir / "state").glob("*.npy"), key=lambda p: p.stat().st_size)
    np.save(target, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="corrupt or truncated.*fit again"):
        checkpoint.load(workdir)
    assert not marker.exists()


def test_a_workdir_without_its_completion_mark_is_refused(tmp_path):
    workdir = _saved(tmp_path)
    (workdir / checkpoint.COMPLETE).unlink()
    with pytest.raises(ConfigError, match="incomplete workdir.*fit again with scripts/fit.py --workdir") as e:
        checkpoint.load(workdir)
    assert str(workdir) in str(e.value)


@pytest.mark.parametrize("version", [1, checkpoint.FORMAT_VERSION - 1, checkpoint.FORMAT_VERSION + 1, "x"])
def test_another_format_version_is_refused_by_number(tmp_path, version):
    workdir = _saved(tmp_path)
    (workdir / checkpoint.COMPLETE).write_text(json.dumps({"format_version": version}))
    with pytest.raises(ConfigError, match=f"format version {version}, this jaxad reads version {checkpoint.FORMAT_VERSION}"):
        checkpoint.load(workdir)


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete", "config"])
def test_corrupt_or_truncated_state_is_a_clear_error(tmp_path, damage):
    workdir = _saved(tmp_path)
    files = sorted((p for p in (workdir / "state").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    target = workdir / "config.json" if damage == "config" else files[0]
    if damage == "delete":
        target.unlink()
    elif damage == "zero":
        target.write_bytes(bytes(target.stat().st_size))
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ConfigError, match="corrupt or truncated.*fit again") as e:
        checkpoint.load(workdir)
    assert str(workdir) in str(e.value)


def _holder(workdir: Path) -> subprocess.Popen:
    """A second process that takes ``workdir`` and holds it until killed."""
    code = (f"import sys, time; from jaxad import checkpoint; checkpoint.prepare_workdir({str(workdir)!r}); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_locked_workdir_is_refused(tmp_path):
    workdir = checkpoint.prepare_workdir(tmp_path / "w")
    checkpoint._held.pop(workdir).close()  # as if another process held it
    with open(workdir / checkpoint.LOCK, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another jaxad process .* is writing this --out; wait"):
            checkpoint.prepare_workdir(workdir, "--out")
    assert checkpoint.prepare_workdir(workdir) == workdir


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    workdir = tmp_path / "w"
    proc = _holder(workdir)
    try:
        with pytest.raises(ConfigError, match=f"another jaxad process \\(pid {proc.pid}\\) is writing"):
            checkpoint.prepare_workdir(workdir)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert checkpoint.prepare_workdir(workdir) == workdir.resolve()


_SAVER = """
import sys, ml_collections, numpy as np
from jaxad import checkpoint
workdir = checkpoint.prepare_workdir(sys.argv[1])
print("ready", flush=True)
for i in range(1000):
    value = float(i % 7)
    state = {"bank": np.full((256, 256), value, np.float32), "stats": {"mean": np.full(8, value, np.float32)}}
    checkpoint.save(workdir, ml_collections.ConfigDict({"method": "crd", "value": value}), state)
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7, 1.1, 1.6])
def test_a_save_killed_anywhere_never_loads_wrongly(tmp_path, delay):
    """SIGKILL during a loop of saves: the workdir then loads a state that matches its config (never
    one save's arrays with another's config) or says it is incomplete; the next writer succeeds."""
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path / "w")], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        config, state = checkpoint.load(tmp_path / "w")
    except ConfigError as e:
        assert "incomplete workdir" in str(e) or "no fitted model" in str(e)
    else:
        assert np.all(state["bank"] == config.value) and np.all(state["stats"]["mean"] == config.value)
    _saved(tmp_path, 5.0)
    assert checkpoint.load(tmp_path / "w")[0].value == 5.0


_KILL_AT_LINE = """
import os, signal, sys, ml_collections, numpy as np
from jaxad import checkpoint
workdir = checkpoint.prepare_workdir(sys.argv[1])
def save(value):
    state = {"bank": np.full((64, 32), value, np.float32), "stats": {"mean": np.full(8, value, np.float32)}}
    checkpoint.save(workdir, ml_collections.ConfigDict({"method": "crd", "value": value}), state)
save(1.0)
lines = 0
def trace(frame, event, arg):
    global lines
    if frame.f_code is not checkpoint.save.__code__:
        return None
    if event == "line":
        lines += 1
        if lines == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    return trace
sys.settrace(trace)
save(2.0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("line", range(1, 10))
def test_a_save_killed_before_each_of_its_statements_never_loads_wrongly(tmp_path, line):
    """SIGKILL before the n-th statement of a save that replaces a complete one: the workdir loads
    the old model or the new one whole, or says it is incomplete; never one's arrays with the other's config."""
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_LINE, str(tmp_path / "w"), str(line)], env=ENV, check=False)
    try:
        config, state = checkpoint.load(tmp_path / "w")
    except ConfigError as e:
        assert "incomplete workdir" in str(e), str(e)
        assert proc.returncode == -signal.SIGKILL
    else:
        assert config.value in (1.0, 2.0)
        assert np.all(state["bank"] == config.value) and np.all(state["stats"]["mean"] == config.value)


@pytest.fixture(scope="module")
def gear(tmp_path_factory) -> Path:
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=1, categories=["gear"],
                              image_size=64, n_train=8, n_test_good=2, n_per_defect=1)
    return root / "gear"


def _fit(gear: Path, workdir: Path, steps: int) -> subprocess.Popen:
    args = ["--method", "simplenet", "--data", str(gear), "--workdir", str(workdir), "--config.image_size=64",
            "--config.batch_size=4", "--config.num_overlays=1", f"--config.train_steps={steps}",
            "--config.validate_every=10", "--config.checkpoint_every=5", "--config.hidden_dim=16"]
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "fit.py"), *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_training_fit_resumes_to_the_same_model(gear, tmp_path):
    """SIGKILL a trained fit at random times; each time the workdir is refused as incomplete (or holds
    the finished model), and the next run resumes from the last complete checkpoint and ends with
    exactly the model an uninterrupted fit gives."""
    steps = 40
    clean = _fit(gear, tmp_path / "clean", steps)
    assert clean.wait() == 0, clean.stderr.read()
    _, reference = checkpoint.load(tmp_path / "clean")
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = _fit(gear, workdir, steps)
        time.sleep(rng.uniform(4, 12))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            checkpoint.load(workdir)
        except ConfigError as e:
            assert "incomplete workdir" in str(e) or "no fitted model" in str(e)
    proc = _fit(gear, workdir, steps)
    err = proc.communicate()[1]
    assert proc.returncode == 0, err
    _, state = checkpoint.load(workdir)
    for a, b in zip(*(sorted(_leaves(s)) for s in (state, reference))):
        assert a[0] == b[0] and np.array_equal(a[1], b[1]), a[0]


def _leaves(tree, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}/{k}")]
    return [(prefix, np.asarray(tree))]
