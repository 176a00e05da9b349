"""Finding torchvision's published weight files where torch keeps them, without downloading.

torchvision names each file ``<arch>-<first hex digits of its SHA-256>.pth`` and caches downloads in
``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``). A user who has ever
run torchvision with pretrained weights already has them there; anyone else copies the file in or
names it with ``scripts/port_weights.py NAME --from FILE``. The hash in the name is checked, so a
truncated or swapped file is caught before conversion.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from jaxad.errors import WeightsError

URL = "https://download.pytorch.org/models/"

# torchvision's canonical file names per architecture, IMAGENET1K_V1 first (the papers' weights).
TORCHVISION_FILES: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
    "wide_resnet101_2": ("wide_resnet101_2-32ee1156.pth", "wide_resnet101_2-d733dc28.pth"),
    "densenet121": ("densenet121-a639ec97.pth",),
    "densenet201": ("densenet201-c1103571.pth",),
    "efficientnet_b0": ("efficientnet_b0_rwightman-7f5810bc.pth",),
    "efficientnet_b1": ("efficientnet_b1_rwightman-bac287d4.pth", "efficientnet_b1-c27df63c.pth"),
    "efficientnet_b2": ("efficientnet_b2_rwightman-c35c1473.pth",),
    "efficientnet_b3": ("efficientnet_b3_rwightman-b3899882.pth",),
    "efficientnet_b4": ("efficientnet_b4_rwightman-23ab8bcd.pth",),
}

_HASH = re.compile(r"-([0-9a-f]{6,})\.")


def checkpoints_dir() -> Path:
    """torch's download cache: ``$TORCH_HOME/hub/checkpoints``, TORCH_HOME defaulting as torch does."""
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
    return Path(home) / "hub" / "checkpoints"


def check_hash(path: Path) -> None:
    """If the file name carries a hash prefix, the file's SHA-256 must start with it."""
    match = _HASH.search(path.name)
    if match is None:
        return
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    if not sha.hexdigest().startswith(match.group(1)):
        raise WeightsError(f"{path}: SHA-256 {sha.hexdigest()[:12]}… does not start with {match.group(1)} as its name says; "
                           "the file is truncated or not the published one")


def missing_message(name: str) -> str:
    """What to do when ``name``'s weights are nowhere: the one command that fixes it."""
    first = TORCHVISION_FILES[name][0]
    return (f"{name}: no weights found (jaxad never downloads). Run `python scripts/port_weights.py {name} "
            f"--from /path/to/{first}` (torchvision's file, {URL}{first}), or copy that file into {checkpoints_dir()}")


def finder(name: str) -> Callable[[], Path]:
    """An ``Entry.bundled`` finder: the first canonical file of ``name`` in torch's cache, hash-checked."""

    def find() -> Path:
        for file in TORCHVISION_FILES[name]:
            path = checkpoints_dir() / file
            if path.is_file():
                check_hash(path)
                return path
        raise WeightsError(missing_message(name))

    return find
