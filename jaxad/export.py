"""A fitted, calibrated workdir → one ``.jaxad`` file that :mod:`jaxad.deploy` runs without jaxad.

The exported program is the whole decision: uint8 images → float in [0, 1] (as the data loader
decodes them), a resize to the config's image size when the input size differs, the method's
predict (backbone, distances or networks, maps), then the calibrated normalisation and threshold
(:func:`jaxad.eval.calibration.decide`). It is lowered with ``jax.export`` on the platforms asked
for (default: this machine's backend), for any number of images (a symbolic batch dimension) or,
when a batch size is given, for that fixed batch; :mod:`jaxad.deploy` describes the file and how
it feeds either.

The resize is antialiased bilinear (``jax.image.resize``), the filter the data loader uses through
PIL, rounded to uint8 like PIL's; PIL computes it in fixed point, so a pixel may differ by one grey
level from the training-time decoding. Images given at the config's size are not resampled.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxad
from jaxad import checkpoint, methods, pipeline
from jaxad.deploy import FORMAT
from jaxad.errors import ConfigError
from jaxad.eval import calibration


def decode(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """uint8 [B, h, w, 3] → float32 [B, H, W, 3] in [0, 1] at ``size``, as the loader decodes files."""
    if images.shape[1:3] != size:
        resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], *size, 3), "linear", antialias=True)
        images = jnp.clip(jnp.round(resized), 0, 255)
    return images.astype(jnp.float32) / jnp.float32(255)


def decision_program(workdir: Path, input_size: tuple[int, int] | None = None):
    """(``fn(weights, images_uint8) -> (scores, labels, maps)``, its weights as a flat list, the
    config, the input size, the calibration) for the model in ``workdir``."""
    config, saved = checkpoint.load(workdir)
    calibrated = pipeline.load_calibration(workdir)
    backbone = pipeline.load_backbone(config)
    size = pipeline.image_size(config)
    input_size = size if input_size is None else tuple(input_size)
    if min(input_size) < 1:
        raise ConfigError(f"--input-size={input_size}: must be at least 1 pixel")
    method = methods.get(config.method)
    leaves, tree = jax.tree.flatten({"backbone": backbone.variables, **saved})
    decide = {k: calibrated[k] for k in ("image_threshold", "image_span", "pixel_threshold", "pixel_span")}

    def fn(weights: list[jax.Array], images: jax.Array):
        scores, maps = method.predict(config, backbone, jax.tree.unflatten(tree, weights), decode(images, size))
        return calibration.decide(decide, scores, maps)

    return fn, [np.asarray(leaf) for leaf in leaves], config, input_size, calibrated


def export(workdir: str | Path, out: str | Path, batch_size: int | None = None,
           input_size: tuple[int, int] | None = None, platforms: tuple[str, ...] | None = None) -> Path:
    """Write ``out`` (see :mod:`jaxad.deploy` for what it holds); returns its path. Without
    ``batch_size`` the program takes any number of images; ``input_size`` (H, W) defaults to the
    config's image size."""
    fn, weights, config, input_size, calibrated = decision_program(Path(workdir).expanduser(), input_size)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size}: must be at least 1")
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
    specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
    images = jax.ShapeDtypeStruct((batch, *input_size, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(specs, images)
    meta = {
        "jaxad_version": jaxad.__version__, "method": config.method, "image_size": list(pipeline.image_size(config)),
        "calibration": {k: v for k, v in calibrated.items() if k != "images"},
    }
    return write(out, exported, weights, meta, chunk_size=config.batch_size)


def write(out: str | Path, exported: jax.export.Exported, weights: list[np.ndarray], meta: dict,
          chunk_size: int | None = None) -> Path:
    """Write an exported ``fn(weights, images) -> (scores, labels, maps)`` with its weights and
    ``meta`` in the layout :func:`jaxad.deploy.load` reads; returns the path. ``chunk_size``: the
    most images the loader passes in one call of a program with a symbolic batch (bounded memory);
    a fixed batch is its own."""
    images = exported.in_avals[-1]
    batch = None if jax.export.is_symbolic_dim(images.shape[0]) else int(images.shape[0])
    if batch is None and (chunk_size is None or chunk_size < 1):
        raise ConfigError(f"a program with a symbolic batch needs a chunk size of at least 1; got {chunk_size}")
    meta = {**meta, "format": FORMAT, "jax_version": jax.__version__, "batch_size": batch,
            "chunk_size": batch if batch is not None else chunk_size,
            "input_size": list(images.shape[1:3]), "map_size": list(exported.out_avals[2].shape[1:]),
            "platforms": list(exported.platforms), "weight_dtypes": [np.asarray(w).dtype.name for w in weights]}
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = {f"w{i}": _storable(np.asarray(w)) for i, w in enumerate(weights)}
    with open(out, "wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(f, module=np.frombuffer(exported.serialize(), np.uint8),
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **stored)
    return out


def _storable(array: np.ndarray) -> np.ndarray:
    """``array`` as numpy's own formats store it: extension dtypes (bfloat16) as same-width uints,
    viewed back by the loader through the dtype name in ``meta``."""
    if array.dtype.kind == "V":
        return array.view(np.dtype(f"uint{8 * array.dtype.itemsize}"))
    return array

