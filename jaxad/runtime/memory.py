"""How much more memory this process may take, and how much it has taken.

A fit that needs more memory than it may take should say so before it starts, not be stopped by
the kernel halfway. What is available is the smallest of: the data-segment and address-space
rlimits less what the process already maps, the cgroup's limit less its usage, and the system's
``MemAvailable``. Of the two rlimits, ``RLIMIT_DATA`` is the one to set under jax: XLA's CPU client
reserves about 1.5 GB of address space it never touches, so an ``RLIMIT_AS`` below that stops
``import jax`` itself, while ``RLIMIT_DATA`` counts the writable memory the process maps.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import NamedTuple

GIB = 2**30


class Available(NamedTuple):
    bytes: int  # how much more the process may allocate
    limit: str  # the limit that sets it, e.g. "RLIMIT_DATA = 2.00 GiB, 0.25 GiB in use"


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _status_bytes(key: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` (VmData, VmSize, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key} line")


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file, None when absent or unlimited ("max")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup() -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup (v2, else v1), None when unlimited or unknown."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    v2 = [line.split(":", 2)[2] for line in own if line.startswith("0::")]
    for folder in [Path("/sys/fs/cgroup") / p.lstrip("/") for p in v2] + [Path("/sys/fs/cgroup")]:
        limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        if limit is not None and usage is not None:
            return limit, usage
    v1 = Path("/sys/fs/cgroup/memory")
    limit, usage = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for "none"
        return limit, usage
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available() -> Available:
    """The memory this process may still allocate and the limit that says so (the smallest one)."""
    found = []
    for name, which, used in (("RLIMIT_DATA", resource.RLIMIT_DATA, "VmData"), ("RLIMIT_AS", resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(which)[0]
        if soft != resource.RLIM_INFINITY:
            in_use = _status_bytes(used)
            found.append(Available(max(soft - in_use, 0), f"{name} = {gib(soft)}, {gib(in_use)} in use"))
    cgroup = _cgroup()
    if cgroup is not None:
        limit, usage = cgroup
        found.append(Available(max(limit - usage, 0), f"the cgroup's memory.max = {gib(limit)}, {gib(usage)} in use"))
    free = _mem_available()
    if free is not None:
        found.append(Available(free, "the system's MemAvailable"))
    return min(found, default=Available(2**62, "no limit found"))


def rows_per_chunk(row_bytes: int, budget_bytes: int) -> int:
    """How many rows of ``row_bytes`` each fit in ``budget_bytes`` (at least one)."""
    return max(1, int(budget_bytes // max(row_bytes, 1)))


def reset_peak_rss() -> bool:
    """Restart the resident-set high-water mark (Linux: ``/proc/self/clear_refs``); False where
    that cannot be done, and :func:`peak_rss` then counts from the start of the process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Bytes of the resident-set high-water mark since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_bytes("VmHWM")
