"""Read PyTorch ``.pth`` (zip and legacy) and ``.safetensors`` weight files into numpy, without torch.

``torch.load`` can run any code a pickle names; this unpickler resolves only the few globals a
state dict needs, so reading an untrusted weight file cannot execute anything. Sizes are checked
before memory is taken: a tensor may not hold more elements than its storage, and a zip member may
not inflate past :data:`_MAX_INFLATION` times the archive (torch stores its members uncompressed).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from jaxad.errors import WeightsError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_SAFETENSORS_HEADER = 100 * 2**20
_MAX_INFLATION = 16  # uncompressed / archive size: deflated floats shrink ~1.1×, a zip bomb 1000×

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_TORCH_DTYPES = {  # the dtypes torch pickles by name (``_rebuild_tensor_v3``)
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CORRUPT = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
    struct.error, zipfile.BadZipFile, OverflowError, RecursionError, MemoryError,
    zlib.error, NotImplementedError, RuntimeError,  # a damaged deflated, unknown-method or "encrypted" zip member
)


@dataclass(frozen=True, slots=True)
class _Dtype:
    """A storage class or torch dtype named in the pickle; deliberately not callable, and without
    a ``__dict__`` that a pickle's BUILD opcode could rewrite."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    offset: int  # elements into the stored storage (legacy storage views)


@dataclass(frozen=True)
class _TensorRef:
    key: str
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None) -> _TensorRef:
    return _TensorRef(storage.key, storage.dtype, storage.offset + offset, tuple(shape), tuple(stride))


def _rebuild_tensor_v3(storage, offset, shape, stride, requires_grad, hooks, dtype, metadata=None) -> _TensorRef:
    return _TensorRef(storage.key, dtype.dtype, storage.offset + offset, tuple(shape), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "UntypedStorage"): _Dtype(np.dtype("u1")),
    ("torch.storage", "UntypedStorage"): _Dtype(np.dtype("u1")),
    **{("torch", name): _Dtype(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _Dtype(dtype) for name, dtype in _TORCH_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a state dict; records the storages the pickle refers to."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, np.dtype] = {}

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global; a function comes wrapped afresh, so that a BUILD opcode setting
        its attributes (``__defaults__``, ...) changes this file's copy, never the reader."""
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self.path}: refused to unpickle global {module}.{name}; only plain state dicts of tensors "
                "are read (load it with torch yourself and save model.state_dict())"
            ) from None
        if isinstance(found, _Dtype):  # a frozen dataclass's __setstate__ would let BUILD rewrite it
            return _Dtype(found.dtype)
        if callable(found) and not isinstance(found, type):
            return lambda *args, **kwargs: found(*args, **kwargs)
        return found

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        _, kind, key, _location, _numel, *view = pid
        self.storages[str(key)] = kind.dtype
        offset = view[0][1] if view and view[0] is not None else 0
        return _StorageRef(str(key), kind.dtype, int(offset))


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any parse failure into a one-line WeightsError naming the file."""
    try:
        yield
    except WeightsError:
        raise
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weight file ({e.strerror or e}); check the path") from e
    except _CORRUPT as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise WeightsError(f"{path}: truncated or corrupt weight file ({reason}); download or export it again") from e


def _unpickle(data: BinaryIO, path: Path) -> tuple[Any, dict[str, np.dtype]]:
    unpickler = _Unpickler(data, path)
    return unpickler.load(), unpickler.storages


def _flat(raw: bytes, dtype: np.dtype, big_endian: bool = False) -> np.ndarray:
    usable = len(raw) - len(raw) % dtype.itemsize
    if big_endian and dtype.itemsize > 1:
        swapped = np.frombuffer(raw, f">u{dtype.itemsize}", usable // dtype.itemsize).astype(f"<u{dtype.itemsize}")
        return swapped.view(dtype)
    return np.frombuffer(raw, dtype, usable // dtype.itemsize)


def _materialise(ref: _TensorRef, raw: bytes, big_endian: bool) -> np.ndarray:
    """The tensor as a contiguous array: ``as_strided`` over its storage, bounds-checked first."""
    if len(ref.shape) != len(ref.stride):
        raise ValueError(f"tensor of shape {ref.shape} has {len(ref.stride)} strides")
    if any(n == 0 for n in ref.shape):
        return np.zeros(ref.shape, ref.dtype)
    flat = _flat(raw, ref.dtype, big_endian)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= flat.size:
        raise ValueError(f"tensor of shape {ref.shape} lies outside its storage of {flat.size} elements")
    if math.prod(ref.shape) > flat.size:  # overlapping strides would let a few bytes fill all memory
        raise ValueError(f"tensor of shape {ref.shape} has more elements than its storage of {flat.size}")
    strides = tuple(s * ref.dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape, strides, writeable=False)
    return np.array(view, order="C")


def _state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    """The mapping of tensors, unwrapping ``{'state_dict': ...}`` / ``{'model': ...}`` checkpoints."""
    while isinstance(obj, Mapping) and not any(isinstance(v, _TensorRef) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, _TensorRef)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise WeightsError(f"{path}: holds no state dict of tensors; pass a file saved from model.state_dict()")
    return tensors


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        inflated = sum(info.file_size for info in zf.infolist())
        if inflated > _MAX_INFLATION * max(path.stat().st_size, 1):
            raise ValueError(f"members inflate to {inflated} bytes from {path.stat().st_size}, a zip bomb")
        names = zf.namelist()
        pkl = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if pkl is None:
            raise WeightsError(f"{path}: zip without data.pkl, not a PyTorch checkpoint; pass a .pth from torch.save")
        root = pkl[: -len("data.pkl")]
        big = f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() == b"big"
        obj, _ = _unpickle(io.BytesIO(zf.read(pkl)), path)
        tensors = _state_dict(obj, path)
        raw = {key: zf.read(f"{root}data/{key}") for key in {t.key for t in tensors.values()}}
    return {k: _materialise(t, raw[t.key], big) for k, t in tensors.items()}


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic, _ = _unpickle(f, path)
        protocol, _ = _unpickle(f, path)
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: not a PyTorch checkpoint (bad magic number); pass a .pth from torch.save")
        _unpickle(f, path)  # sys info: torch writes storages little-endian whatever the machine
        obj, storages = _unpickle(f, path)
        keys, _ = _unpickle(f, path)
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise ValueError("storage key list does not match the storages the state dict uses")
        raw = {}
        for key in map(str, keys):
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * storages[key].itemsize
            raw[key] = f.read(nbytes)
            if numel < 0 or len(raw[key]) != nbytes:
                raise EOFError(f"storage {key} ends early")
    return {k: _materialise(t, raw[t.key], False) for k, t in _state_dict(obj, path).items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            kind = info["dtype"]
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {kind}; convert it to F32, F16 or BF16")
        shape = tuple(int(n) for n in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
        count = math.prod(shape)
        if end - start != count * dtype.itemsize or start < 0 or end > len(data):
            raise ValueError(f"tensor {name} lies outside the data")
        out[name] = np.frombuffer(data, dtype, count, start).reshape(shape).copy()
    if not out:
        raise WeightsError(f"{path}: holds no tensors; pass a weight file")
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``.pth`` (zip or legacy torch format) or ``.safetensors`` file, by state-dict key."""
    path = Path(path)
    with _reading(path):
        with open(path, "rb") as f:
            head = f.read(9)
        if head.startswith(b"PK\x03\x04"):
            return _read_zip(path)
        if head.startswith(b"\x80"):
            return _read_legacy(path)
        if head[8:9] == b"{":
            return _read_safetensors(path)
    raise WeightsError(f"{path}: not a PyTorch .pth or .safetensors weight file; pass a state dict saved by torch")
