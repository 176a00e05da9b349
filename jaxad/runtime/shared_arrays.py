"""Host arrays that a CPU device can use without copying them.

``jax.device_put(x, may_alias=True)`` on the CPU backend shares a numpy array's memory only when
its data starts on a 64-byte boundary, which numpy does not promise for large arrays; an array
allocated here does, so a bank filled on the host becomes a device array without a second copy.
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64  # bytes; what XLA's CPU client needs to alias a host buffer


def empty(shape: tuple[int, ...], dtype: np.dtype = np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` whose data is ALIGNMENT-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)
