"""Run an exported model (``scripts/export.py``) with jax and numpy alone.

    model = jaxad.deploy.load("model.jaxad")
    scores, labels, maps = model(images)  # images: uint8 [N, H, W, 3] at model.input_size

The file is an ``.npz`` archive (read with ``allow_pickle=False``): ``module``, the serialised
``jax.export`` program (StableHLO with its calling convention), ``meta`` (JSON: sizes, batch,
thresholds, the weights' dtypes) and ``w0``, ``w1``, ... the weights. The weights are arguments of
the program, not constants inside it: the program stays small (a CPR reference bank is gigabytes)
and they are put on the device once, at load. Nothing here imports flax, jaxad's methods or configs,
nor jaxad itself: errors are ``ValueError`` (bad images, not an export) and ``FileNotFoundError``.

Batches. By default the program takes any number of images: its batch dimension is symbolic
(``model.batch_size`` is None). :class:`Model` passes at most ``model.chunk_size`` images per call
(the fitted config's batch size), so memory stays bounded; each distinct number of images compiles
once. Where a method chooses how to split its work from the batch size (CPU micro-batches of the
backbone, PaAP's location blocks sized to a memory budget), a symbolic batch runs those parts one
image at a time. Exported with ``--batch-size N``, the program is fixed to N images: the last
batch is padded with copies of its final image and the padding cut from the outputs, so every
call runs the one compiled program.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

FORMAT = "jaxad-export/2"  # /1 had no symbolic batch and no chunk_size


class Model:
    """A loaded export: call it on uint8 images [N, H, W, 3] for (scores [N] float32 in [0, 1],
    labels [N] bool — True is anomalous, maps [N, h, w] float32 in [0, 1]); 0.5 is the threshold of
    both scores and maps."""

    def __init__(self, path: Path, exported: jax.export.Exported, weights: list[jax.Array], meta: dict):
        self.path, self.meta = path, meta
        self.batch_size: int | None = meta["batch_size"]  # None: any number of images
        self.chunk_size = int(meta["chunk_size"])
        self.input_size = tuple(meta["input_size"])
        self._weights = weights
        self._call = jax.jit(exported.call)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = np.asarray(images)
        want = (*self.input_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(f"{self.path}: expects uint8 images of shape [N, {want[0]}, {want[1]}, 3]; "
                            f"got {images.dtype} {list(images.shape)}")
        count = len(images)
        parts = []
        for start in range(0, count, self.chunk_size):
            rows = np.arange(start, min(start + self.chunk_size, count))
            if self.batch_size is not None:  # a fixed batch: the tail repeats the last image
                rows = np.minimum(np.arange(start, start + self.batch_size), count - 1)
            out = jax.device_get(self._call(self._weights, images[rows]))
            parts.append([o[: count - start] for o in out])
        if not parts:
            return np.zeros(0, np.float32), np.zeros(0, bool), np.zeros((0, *self.meta["map_size"]), np.float32)
        scores, labels, maps = (np.concatenate(p) for p in zip(*parts))
        return scores, labels, maps


def load(path: str | Path) -> Model:
    """Read a ``.jaxad`` file written by ``scripts/export.py``; its weights go on the default device."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model not found; write one with scripts/export.py")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not an exported jaxad model ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile) or not {"meta", "module"} <= set(archive.files):
        raise ValueError(f"{path}: not an exported jaxad model (no module and meta in it); write one with scripts/export.py")
    with archive:
        meta = json.loads(archive["meta"].tobytes())
        module = bytearray(archive["module"].tobytes())
        stored = [archive[f"w{i}"] for i in range(len(meta["weight_dtypes"]))]
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this loader reads {FORMAT!r}; export the model again")
    weights = [jax.device_put(w.view(jax.numpy.dtype(d)) if w.dtype.name != d else w)
               for w, d in zip(stored, meta["weight_dtypes"])]
    return Model(path, jax.export.deserialize(module), weights, meta)
