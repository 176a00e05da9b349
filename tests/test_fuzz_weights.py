"""Hostile and broken weight files: every one is read correctly or refused with a WeightsError naming it.

Hypothesis draws small state dicts, writes them as torch zip, legacy ``.pth`` or ``.safetensors``,
then breaks the bytes (truncation, bit flips, zeroed runs, recompression, garbage), forges shapes,
strides and dtypes, and writes pickles that name arbitrary globals. A fixture holds pickles that
would run a shell command through ``os.system`` (and other routes): the reader refuses each by
name and the command's marker file is never created.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import subprocess
import tempfile
import zipfile
from datetime import timedelta
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_backbones import LEGACY_MAGIC, LEGACY_SYS_INFO, Strided, write_legacy, write_safetensors, write_zip
from test_fuzz_images import damaged

from jaxad.backbones import torch_weights
from jaxad.backbones.torch_weights import read_state_dict
from jaxad.errors import WeightsError

FUZZ = dict(deadline=timedelta(seconds=20), suppress_health_check=[HealthCheck.too_slow], derandomize=True)
DTYPES = [np.dtype(t) for t in ("float32", "float16", "int64", "uint8", "bool")] + [np.dtype(ml_dtypes.bfloat16)]
WRITERS = {"zip": write_zip, "legacy": write_legacy, "safetensors": write_safetensors}


@st.composite
def state_dicts(draw) -> dict[str, np.ndarray]:
    count = draw(st.integers(1, 4))
    keys = draw(st.lists(st.text("abcdefgh._0123", min_size=1, max_size=12), min_size=count, max_size=count, unique=True))
    out = {}
    for key in keys:
        shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES if draw(st.booleans()) else DTYPES[:1]))
        out[key] = (np.arange(int(np.prod(shape))) % 7).reshape(shape).astype(dtype)
    return out


def encode(container: str, state: dict[str, np.ndarray]) -> bytes:
    if container == "safetensors":
        state = {k: v for k, v in state.items() if v.dtype.name in ("float32", "float16", "bfloat16", "int64")}
        state = state or {"x": np.zeros(1, np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w"
        WRITERS[container](path, state)
        return path.read_bytes()


def recompressed(data: bytes) -> bytes:
    """The same zip with its members deflated, so that damage reaches the decompressor."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


@st.composite
def broken_files(draw) -> bytes:
    container = draw(st.sampled_from(sorted(WRITERS)))
    data = encode(container, draw(state_dicts()))
    if container == "zip" and draw(st.booleans()):
        data = recompressed(data)
    damage = draw(st.sampled_from(["none", "truncate", "flip", "zero_run", "empty", "garbage"]))
    data = damaged(draw, data, damage)
    if damage == "garbage":
        data = draw(st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{"])) + draw(st.binary(max_size=200))
    return data


def check(data: bytes, expected: dict[str, np.ndarray] | None = None) -> None:
    """The contract: a dict of numpy arrays (``expected`` when given), or one WeightsError line naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.pth"
        path.write_bytes(data)
        try:
            state = read_state_dict(path)
        except WeightsError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return
        assert state and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
        if expected is not None:
            assert list(state) == list(expected)
            for k, v in expected.items():
                np.testing.assert_array_equal(state[k], v)


@given(st.sampled_from(sorted(WRITERS)), state_dicts())
@settings(max_examples=20, **FUZZ)
def test_valid_files_round_trip(container, state):
    if container == "safetensors":
        state = {k: v for k, v in state.items() if v.dtype.name in ("float32", "float16", "bfloat16", "int64")} or state
    if container != "safetensors" or all(v.dtype.name in ("float32", "float16", "bfloat16", "int64") for v in state.values()):
        check(encode(container, state), expected=state)


@given(broken_files())
@settings(max_examples=60, **FUZZ)
def test_broken_files_read_or_fail_by_name(data):
    check(data)


@pytest.mark.slow
@given(broken_files())
@settings(max_examples=1500, **FUZZ)
def test_broken_files_read_or_fail_by_name_many(data):
    check(data)


@given(
    st.integers(1, 64), st.one_of(st.integers(-4, 8), st.integers(-4, 2**40)),
    st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**31)), max_size=3),
    st.lists(st.one_of(st.integers(-1, 3), st.integers(-3, 2**31)), max_size=3), st.sampled_from(["zip", "legacy"]),
)
@settings(max_examples=60, **FUZZ)
def test_forged_shapes_and_strides_never_read_outside_the_storage(size, offset, shape, stride, container):
    """Shapes, strides and offsets that claim more than the storage holds (or overlap it, to inflate
    a few bytes into gigabytes) are refused; consistent ones read back exactly."""
    storage = np.arange(size, dtype=np.float32)
    forged = Strided(storage, offset, tuple(shape), tuple(stride))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forged.pth"
        WRITERS[container](path, {"w": forged})
        try:
            state = read_state_dict(path)
        except WeightsError as e:
            assert str(path) in str(e)
            return
    expected = np.lib.stride_tricks.as_strided(storage[offset:], shape, [s * 4 for s in stride])
    np.testing.assert_array_equal(state["w"], expected)
    assert state["w"].size <= size


@given(
    st.text(max_size=8), st.lists(st.integers(-2, 2**40), max_size=3),
    st.tuples(st.integers(-8, 2**40), st.integers(-8, 2**40)), st.integers(0, 64),
)
@settings(max_examples=60, **FUZZ)
def test_forged_safetensors_headers_fail_by_name(dtype, shape, offsets, data_bytes):
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}}).encode()
    check(struct.pack("<Q", len(header)) + header + bytes(data_bytes))


# ---- pickles naming globals ------------------------------------------------------------------

DANGEROUS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "__import__"), ("builtins", "getattr"), ("subprocess", "Popen"), ("subprocess", "check_output"),
    ("shutil", "rmtree"), ("importlib", "import_module"), ("pickle", "loads"), ("torch", "load"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "frombuffer"), ("collections", "namedtuple"),
    ("torch._utils", "_rebuild_tensor"), ("torch.serialization", "_get_layout"), ("functools", "partial"),
]
ALLOWED = set(torch_weights._ALLOWED)


def _op_global(module: str, name: str, opcode: str) -> bytes:
    """Bytes that push ``module.name`` by one of the three opcodes that resolve a global."""
    if opcode == "GLOBAL":
        return b"c" + f"{module}\n{name}\n".encode()
    if opcode == "STACK_GLOBAL":
        text = [s.encode() for s in (module, name)]
        return b"".join(b"\x8c" + bytes([len(t)]) + t for t in text) + b"\x93"
    raise ValueError(opcode)


def _calling(module: str, name: str, opcode: str, arg: str) -> bytes:
    """A pickle that calls ``module.name(arg)``: REDUCE after a global, or one INST opcode."""
    if opcode == "INST":
        return b"\x80\x02(" + b"\x8c" + bytes([len(arg.encode())]) + arg.encode() + b"i" + f"{module}\n{name}\n".encode() + b"."
    head = b"\x80\x04" if opcode == "STACK_GLOBAL" else b"\x80\x02"
    return head + _op_global(module, name, opcode) + b"\x8c" + bytes([len(arg.encode())]) + arg.encode() + b"\x85R."


def in_container(payload: bytes, container: str) -> bytes:
    if container == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
            zf.writestr("archive/byteorder", "little")
        return out.getvalue()
    headers = b"".join(pickle.dumps(h, protocol=2) for h in (LEGACY_MAGIC, 1001, LEGACY_SYS_INFO))
    return headers + payload


_NAME = st.text(st.characters(codec="ascii", exclude_characters="\n\r\x00"), min_size=1, max_size=20)


@given(
    st.one_of(st.sampled_from(DANGEROUS), st.tuples(_NAME, _NAME)),
    st.sampled_from(["GLOBAL", "STACK_GLOBAL", "INST"]), st.sampled_from(["zip", "legacy"]),
)
@settings(max_examples=80, **FUZZ)
def test_any_global_outside_the_allow_list_is_refused_by_name(target, opcode, container):
    module, name = target
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "named.pth"
        marker = Path(tmp) / "ran"
        path.write_bytes(in_container(_calling(module, name, opcode, f"touch {marker}"), container))
        with pytest.raises(WeightsError) as e:
            read_state_dict(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        if (module, name) not in ALLOWED:
            assert f"refused to unpickle global {module}.{name}" in str(e.value)
        assert not marker.exists()


class _System:
    """Pickles as ``os.system(command)``: what a hostile ``torch.load`` file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Popen(_System):
    def __reduce__(self):
        return subprocess.Popen, (["touch", self.command.split()[-1]],)


@pytest.fixture
def malicious(tmp_path) -> tuple[dict[str, Path], Path]:
    """Weight files whose pickle would create ``marker`` by running a shell command, and the marker.

    The payloads are live: plain ``pickle.loads`` of the first runs the command (checked here)."""
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    alone = pickle.dumps(_System(command), protocol=2)
    pickle.loads(alone)
    assert marker.exists(), "the fixture's payload must really run"
    marker.unlink()
    payloads = {
        "os_system_zip": in_container(alone, "zip"),
        "os_system_legacy": in_container(alone, "legacy"),
        "popen_zip": in_container(pickle.dumps(_Popen(command), protocol=2), "zip"),
        "eval_stack_global": in_container(_calling("builtins", "eval", "STACK_GLOBAL", f"__import__('os').system('{command}')"), "zip"),
        "exec_inst": in_container(_calling("builtins", "exec", "INST", f"import os; os.system('{command}')"), "legacy"),
        "system_after_tensors": _after_tensors(tmp_path, alone),
    }
    paths = {}
    for name, data in payloads.items():
        paths[name] = tmp_path / f"{name}.pth"
        paths[name].write_bytes(data)
    return paths, marker


def _after_tensors(tmp_path: Path, payload: bytes) -> bytes:
    """A real state dict whose pickle, after its tensors, also calls the payload (as a dict value)."""
    write_zip(tmp_path / "host.pth", {"weight": np.ones(3, np.float32)})
    with zipfile.ZipFile(tmp_path / "host.pth") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = members["archive/data.pkl"]
    assert pkl.endswith(b".")  # before STOP the dict is complete: push ("evil", payload) and SETITEM it
    call = payload[2:-1]  # the payload's body without its protocol header and STOP
    members["archive/data.pkl"] = pkl[:-1] + b"\x8c\x04evil" + call + b"s."
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return out.getvalue()


def test_malicious_pickles_are_refused_and_nothing_runs(malicious, monkeypatch):
    paths, marker = malicious
    ran = []
    for module, name in [(os, "system"), (subprocess, "Popen"), (builtins, "eval"), (builtins, "exec")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: (ran.append(_n), _o(*a, **k))[1])
    for kind, path in paths.items():
        with pytest.raises(WeightsError, match="refused to unpickle global") as e:
            read_state_dict(path)
        assert str(path) in str(e.value), kind
    assert not ran and not marker.exists()


def test_a_pickle_cannot_rewrite_the_reader(tmp_path):
    """BUILD on an allowed global sets attributes on what ``find_class`` returned: that must be a
    throwaway copy, or a file could change how every later file is read."""
    defaults = torch_weights._rebuild_tensor_v2.__defaults__
    forged = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + b"N}\x8c\x0c__defaults__(K\x01K\x02K\x03ts\x86b"
              + b"ctorch\nFloatStorage\n" + b"}\x8c\x05dtypeK\x01sb" + b"\x86.")
    path = tmp_path / "rewrite.pth"
    path.write_bytes(in_container(forged, "zip"))
    with pytest.raises(WeightsError, match="rewrite.pth"):
        read_state_dict(path)
    assert torch_weights._rebuild_tensor_v2.__defaults__ == defaults
    assert torch_weights._ALLOWED[("torch", "FloatStorage")].dtype == np.float32
    write_zip(tmp_path / "ok.pth", {"a": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(read_state_dict(tmp_path / "ok.pth")["a"], np.arange(3, dtype=np.float32))


def test_zip_bombs_are_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}.")
        zf.writestr("archive/data/0", bytes(64 * 2**20))
    with pytest.raises(WeightsError, match="zip bomb") as e:
        read_state_dict(path)
    assert str(path) in str(e.value)
