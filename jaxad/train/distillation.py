"""Teacher distillation for EfficientAD: a PDN learns to regress a frozen backbone's patch features.

The target is the PatchCore-style embedding of any registry backbone (k×k local average of each
tap, taps resized to the finest grid and concatenated), resized to the padded PDN's output grid
(64×64 for 256-px images) and mapped to 384 channels, then standardised per channel with the mean
and std measured on the distillation images. The PDN runs padded on the image resized to
``image_size``; the backbone sees the same image at ``target_size`` (the paper: WRN101-2
layer2+layer3 at 512 px). Loss: MSE; optimiser: Adam with coupled L2 weight decay; the grayscale
augmentation (probability ``grayscale``) is applied to both views alike.

A teacher is saved as a folder: ``teacher.json`` (PDN size, backbone, taps, sizes, steps) and
``arrays/`` (one .npy file per array: PDN params, target mean/std). :func:`load_teacher` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from PIL import Image

from jaxad import checkpoint, features
from jaxad.backbones import Backbone
from jaxad.data.images import read_image
from jaxad.errors import ConfigError
from jaxad.nets import PDN, PDN_SIZES, imagenet_normalise, pdn_output_size
from jaxad.runtime import compilation, parallel
from jaxad.train import loop

TEACHER_CHANNELS = 384
PROJECTIONS = ("pool", "random")


@dataclass(frozen=True)
class Settings:
    """What defines a distillation run (saved beside the teacher)."""

    pdn: str = "s"  # "xs", "s" or "m"
    backbone: str = "efficientnet_lite0"
    taps: tuple[str, ...] = ("stage2", "stage4")
    aggregate: int = 3  # k of the k×k local average of each tap
    projection: str = "random"  # "pool" (adaptive channel average, PUAD) or "random" (fixed Gaussian)
    image_size: int = 256  # PDN input side
    target_size: int = 256  # backbone input side (paper: 512)
    steps: int = 60000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-5
    grayscale: float = 0.1
    stats_images: int = 10000  # images used for the target's per-channel mean and std
    seed: int = 0


def projection_matrix(dim: int, kind: str, seed: int, out: int = TEACHER_CHANNELS) -> np.ndarray:
    """(dim × out) map from backbone channels to teacher channels.

    "pool": adaptive average pooling over channels (PUAD's target; with dim < out channels repeat).
    "random": a fixed Gaussian projection scaled by 1/√dim, which spreads every backbone channel over
    all outputs (the natural choice when dim < out, e.g. EfficientNet-Lite0's 152 channels).
    """
    if kind == "random":
        return (np.random.default_rng(seed).standard_normal((dim, out)) / np.sqrt(dim)).astype(np.float32)
    if kind != "pool":
        raise ConfigError(f"projection={kind!r}: choose one of {', '.join(PROJECTIONS)}")
    i = np.arange(out)
    start, end = (i * dim) // out, -((-(i + 1) * dim) // out)  # torch adaptive_avg_pool1d windows
    j = np.arange(dim)[:, None]
    inside = (j >= start) & (j < end)
    return (inside / (end - start)).astype(np.float32)


def target_features(settings: Settings, backbone: Backbone, variables, projection: jax.Array,
                    images: jax.Array) -> jax.Array:
    """Backbone images [B, T, T, 3] in [0, 1] → raw targets [B, g, g, 384] on the padded PDN grid."""
    maps = backbone.apply(variables, images, tuple(settings.taps))
    f = features.embed(maps, tuple(settings.taps), settings.aggregate)
    g = pdn_output_size(settings.image_size, padded=True)
    f = features.resize_bilinear(f, (g, g))
    return jnp.matmul(f, projection, precision=jax.lax.Precision.HIGHEST)


def to_grayscale(images: jax.Array, flags: jax.Array) -> jax.Array:
    """torchvision ``Grayscale(3)`` (ITU-R 601 luma in all channels) where ``flags`` [B] is true."""
    luma = images @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)
    return jnp.where(flags[:, None, None, None], luma[..., None].repeat(3, -1), images)


def resize_images(images: jax.Array, size: int) -> jax.Array:
    """Antialiased bilinear resize of [B, H, W, 3] to size×size (identity when already that size)."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=True)


def read_square(path: Path, size: int) -> np.ndarray:
    """An image file resized (PIL bilinear, antialiased) to size×size, [size, size, 3] float32."""
    image = (read_image(path) * 255 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32) / np.float32(255)


def file_batches(paths: Sequence[Path], batch_size: int, size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless random batches [B, size, size, 3] read from files on demand (ImageNet-scale folders)."""
    rng = np.random.default_rng(seed)
    while True:
        pick = rng.choice(len(paths), size=batch_size, replace=len(paths) < batch_size)
        yield np.stack([read_square(paths[i], size) for i in pick])


def target_stats(settings: Settings, backbone: Backbone, projection: jax.Array,
                 batches: Iterator[np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of the raw targets over ``count`` images (float64 sums)."""
    run = compilation.jit(lambda v, x: target_features(settings, backbone, v, projection, resize_images(x, settings.target_size)))
    s1 = s2 = 0.0
    n, seen = 0, 0
    while seen < count:
        x = next(batches)[: count - seen]
        f = np.asarray(run(backbone.variables, x), np.float64).reshape(-1, TEACHER_CHANNELS)
        s1, s2, n, seen = s1 + f.sum(0), s2 + (f * f).sum(0), n + len(f), seen + len(x)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def optimiser(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """Adam with coupled L2 weight decay (torch ``Adam(weight_decay=...)``)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def distil(settings: Settings, backbone: Backbone, batches: Iterator[np.ndarray], *,
           stats_batches: Iterator[np.ndarray], checkpoint_dir: str | Path | None = None,
           checkpoint_every: int = 1000, mesh: Mesh | None = None, run: Mapping[str, Any] | None = None) -> dict:
    """Train a padded PDN on the standardised targets; returns {'params', 'mean', 'std'}.

    Data-parallel over ``mesh`` (default: the devices that divide the batch size). Checkpoints in
    ``checkpoint_dir`` are resumed only under the same ``run`` (see :func:`jaxad.train.loop.train`).

    ``batches`` and ``stats_batches`` yield [B, S, S, 3] images in [0, 1] with S ≥ both sizes
    (they are resized on the device to ``image_size`` and ``target_size``).
    """
    if settings.pdn not in PDN_SIZES:
        raise ConfigError(f"pdn={settings.pdn!r}: choose one of {', '.join(PDN_SIZES)}")
    unknown = [t for t in settings.taps if t not in backbone.taps]
    if unknown:
        raise ConfigError(f"taps {unknown} are not taps of {backbone.name}; valid: {', '.join(backbone.taps)}")
    dim = sum(backbone.taps[t].channels for t in settings.taps)
    projection = jnp.asarray(projection_matrix(dim, settings.projection, settings.seed))
    mean, std = target_stats(settings, backbone, projection, stats_batches, settings.stats_images)
    pdn = PDN(TEACHER_CHANNELS, settings.pdn, padded=True)
    key_init, key_train = jax.random.split(jax.random.key(settings.seed))
    params = compilation.init(pdn, key_init, jnp.zeros((1, settings.image_size, settings.image_size, 3), jnp.float32))["params"]
    tx = optimiser(settings.lr, settings.weight_decay)
    state = {"params": params, "opt": tx.init(params)}

    @compilation.jit
    def step(state: dict, images: jax.Array, key: jax.Array) -> tuple[dict, dict]:
        images = to_grayscale(images, jax.random.bernoulli(key, settings.grayscale, (images.shape[0],)))
        raw = target_features(settings, backbone, backbone.variables, projection,
                              resize_images(images, settings.target_size))
        target = (raw - mean) / std
        x = imagenet_normalise(resize_images(images, settings.image_size))

        def loss_fn(params):
            return jnp.mean((pdn.apply({"params": params}, x) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

    state, _ = loop.train(step, state, batches, settings.steps, key_train, checkpoint_dir=checkpoint_dir,
                              checkpoint_every=checkpoint_every, desc="distil teacher", run=run,
                              mesh=parallel.training_mesh(settings.batch_size) if mesh is None else mesh)
    return {"params": state["params"], "mean": jnp.asarray(mean), "std": jnp.asarray(std)}


def check_new_teacher_folder(path: str | Path) -> None:
    """ConfigError unless ``path`` is absent, empty, or holds only the ``train/`` checkpoints of an
    interrupted distillation: a finished teacher or foreign files are never overwritten."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder; choose another --config.out")
    if (path / "teacher.json").exists():
        raise ConfigError(f"{path}: already holds a teacher; choose another --config.out or delete it first")
    foreign = sorted(p.name for p in path.iterdir() if p.name != "train") if path.is_dir() else []
    if foreign:
        raise ConfigError(f"{path}: not empty ({', '.join(foreign[:5])}); choose another --config.out")


def save_teacher(path: str | Path, settings: Settings, teacher: dict) -> Path:
    """Write a teacher folder (``teacher.json`` + ``arrays/``, :func:`jaxad.checkpoint.save_arrays`); returns its path."""
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    checkpoint.save_arrays(path / "arrays", teacher)
    (path / "teacher.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return path


def load_teacher(path: str | Path) -> tuple[Settings, dict]:
    """Read a teacher folder written by :func:`save_teacher` → (settings, {'params', 'mean', 'std'})."""
    path = Path(path).expanduser()
    if not (path / "teacher.json").is_file() or not (path / "arrays").is_dir():
        raise ConfigError(f"{path}: not a teacher folder (teacher.json and arrays/ missing); "
                          "make one with scripts/distill_teacher.py or leave --config.teacher empty")
    raw = json.loads((path / "teacher.json").read_text())
    settings = Settings(**{**raw, "taps": tuple(raw["taps"])})
    return settings, checkpoint.load_arrays(path / "arrays")
