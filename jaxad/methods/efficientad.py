"""EfficientAD: a student PDN regresses a distilled teacher PDN locally, an autoencoder predicts the
teacher globally, and the student learns to predict the autoencoder; anomalies are where they
disagree.

Teacher. ``config.teacher`` names a teacher folder written by ``scripts/distill_teacher.py`` (the
paper distils from WideResNet-101-2 on ImageNet; see ``configs/distill_teacher.py``). When it is
empty, fit first distils a small teacher on the category's own training images from
``config.backbone`` (``teacher_steps`` steps): a CPU-budget stand-in, NOT the paper's generic
ImageNet teacher, and weaker on anything the training images do not show.

Training (per category, ``train_steps`` optimiser steps, batch ``train_batch_size``):
hard-feature loss (mean of the student-teacher squared differences at or above their 0.999
quantile) + optional penalty on generic images (``penalty_dir``; "none" drops it, the
reproduction's default) + autoencoder loss + student-autoencoder loss on a colour-jittered copy;
Adam with coupled L2, learning rate ×0.1 at 95 % of the steps. A seeded ``val_fraction`` of the
training images is held out; the 0.9 / 0.995 quantiles of both anomaly maps on it normalise the
maps at test time. Teacher, student and autoencoder run fused in one jitted predict.

State: ``{'teacher', 'student', 'ae': params, 'teacher_mean', 'teacher_std': [384],
'quantiles': {'st', 'ae': [q_a, q_b]}, 'penalty': 1 if a penalty folder was used else 0}``.
``<workdir>/train_history.json`` records the teacher and penalty sources and the loss history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxad import postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least, require_between, require_positive
from jaxad.data import Batch, image_files
from jaxad.errors import ConfigError
from jaxad.nets import PDN, Autoencoder, imagenet_normalise
from jaxad.runtime import compilation, parallel
from jaxad.train import distillation, loop

CHANNELS = distillation.TEACHER_CHANNELS  # 384; the student has twice as many
MAP_PAD = 4  # zero border added to the 56×56 map before resizing (H/4 − 8 + 8 = H/4)


def teacher_net(config: ml_collections.ConfigDict) -> PDN:
    return PDN(CHANNELS, config.pdn, padded=False)


def student_net(config: ml_collections.ConfigDict) -> PDN:
    return PDN(2 * CHANNELS, config.pdn, padded=False)


def autoencoder() -> Autoencoder:
    return Autoencoder(CHANNELS)


def uses_penalty(config: ml_collections.ConfigDict) -> bool:
    return config.penalty_dir.strip().lower() not in ("", "none")


# ---------------------------------------------------------------- losses and augmentation


def hard_feature_loss(d: jax.Array, q: float) -> jax.Array:
    """mean(d[d ≥ d_q]) with d_q the q-quantile of d (linear interpolation, as torch/numpy).

    Only the top ⌈(1 − q)(n − 1)⌉ + 1 values can reach the quantile, so a top-k replaces the full
    sort (a 56×56×384 map has 1.2 M values)."""
    flat = d.reshape(-1)
    pos = q * (flat.size - 1)
    lo = int(np.floor(pos))
    top = jax.lax.top_k(flat, flat.size - lo)[0]  # descending; top[-1] is the lo-th smallest value
    below, above = top[-1], top[-2] if top.size > 1 else top[-1]
    d_q = below + (pos - lo) * (above - below)
    keep = top >= d_q
    return jnp.sum(jnp.where(keep, top, 0.0)) / jnp.sum(keep)


def adjust(images: jax.Array, kind: jax.Array, factor: jax.Array) -> jax.Array:
    """Brightness (kind 0), contrast (1) or saturation (2) by ``factor``, as PIL's ImageEnhance /
    torchvision's ``adjust_*``: blend with black, the mean grey level, or the grey image.
    ``kind`` and ``factor`` broadcast against images [B, H, W, 3]."""
    grey = (images @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32))[..., None]
    blend_to = jnp.where(kind == 0, 0.0, jnp.where(kind == 1, jnp.mean(grey, axis=(-3, -2, -1), keepdims=True), grey))
    return jnp.clip(factor * images + (1 - factor) * blend_to, 0.0, 1.0)


def colour_jitter(key: jax.Array, images: jax.Array) -> jax.Array:
    """One of brightness / contrast / saturation per image, factor U(0.8, 1.2) (the AE branch's input)."""
    k_kind, k_factor = jax.random.split(key)
    n = images.shape[0]
    kind = jax.random.randint(k_kind, (n, 1, 1, 1), 0, 3)
    return adjust(images, kind, jax.random.uniform(k_factor, (n, 1, 1, 1), minval=0.8, maxval=1.2))


def penalty_view(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
    """Generic images read at 2·size: RandomGrayscale(0.3), then the central size×size crop."""
    images = distillation.to_grayscale(images, jax.random.bernoulli(key, 0.3, (images.shape[0],)))
    start = (images.shape[1] - size) // 2
    return images[:, start:start + size, start:start + size]


# ---------------------------------------------------------------- the three networks


def teacher_features(config: ml_collections.ConfigDict, state: dict, x: jax.Array) -> jax.Array:
    """Normalised images → teacher output standardised per channel with the category's μ, σ."""
    t = teacher_net(config).apply({"params": state["teacher"]}, x)
    return (t - state["teacher_mean"]) / state["teacher_std"]


def outputs(config: ml_collections.ConfigDict, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [B, H, W, 3] in [0, 1] → (teacher, student, autoencoder) outputs, one fused graph."""
    x = imagenet_normalise(images)
    t = teacher_features(config, state, x)
    s = student_net(config).apply({"params": state["student"]}, x)
    a = autoencoder().apply({"params": state["ae"]}, x)
    return t, s, a


def raw_maps(t: jax.Array, s: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(map_ST, map_AE) [B, h, w]: channel means of (T − S_local)² and (AE − S_global)²."""
    return jnp.mean((t - s[..., :CHANNELS]) ** 2, -1), jnp.mean((a - s[..., CHANNELS:]) ** 2, -1)


def combined_map(quantiles: dict, map_st: jax.Array, map_ae: jax.Array) -> jax.Array:
    """0.5·M̂_ST + 0.5·M̂_AE with M̂ = 0.1·(M − q_a)/(q_b − q_a) per map type."""
    def norm(m, q):
        return 0.1 * (m - q[0]) / (q[1] - q[0])

    return 0.5 * norm(map_st, quantiles["st"]) + 0.5 * norm(map_ae, quantiles["ae"])


def to_image(maps: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """[B, h, w] → [B, H, W]: zero-pad 4 px on each side, then torch-style bilinear to the image."""
    padded = jnp.pad(maps, ((0, 0), (MAP_PAD, MAP_PAD), (MAP_PAD, MAP_PAD)))
    return postprocess.anomaly_maps(padded, image_hw, 0.0)


def forward(config: ml_collections.ConfigDict, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (pixel maps [B, H, W], teacher output, student output)."""
    t, s, a = outputs(config, state, images)
    maps = to_image(combined_map(state["quantiles"], *raw_maps(t, s, a)), images.shape[1:3])
    return maps, t, s


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B] = max of the map, maps [B, H, W]); jit with config/backbone bound."""
    maps = forward(config, state, images)[0]
    return jnp.max(maps, axis=(1, 2)), maps


# ---------------------------------------------------------------- fit


def _check(config: ml_collections.ConfigDict) -> None:
    if config.pdn not in ("s", "m"):
        raise ConfigError(f"--config.pdn={config.pdn}: choose 's' or 'm'")
    size = config.image_size
    if not isinstance(size, int) or size < 64 or size % 32:
        raise ConfigError(f"--config.image_size={size}: EfficientAD needs a square size, a multiple of 32, ≥ 64")
    require_at_least(config, 1, "train_steps", "train_batch_size", "teacher_steps", "teacher_batch_size",
                     "checkpoint_every", "log_every")
    require_positive(config, "lr")
    for key in ("val_fraction", "hard_quantile", "q_a", "q_b"):
        require_between(config, key, 0.0, 1.0)
    if config.q_a >= config.q_b:
        raise ConfigError(f"--config.q_a={config.q_a} / q_b={config.q_b}: q_a must be below q_b")


def teacher_for(config: ml_collections.ConfigDict, backbone: Backbone, images: np.ndarray,
                workdir: Path | None) -> tuple[dict, str]:
    """(teacher {'params', 'mean', 'std'}, where it came from): the configured file, else a small
    teacher distilled on ``images`` (the category's training images) as a CPU-budget stand-in."""
    if config.teacher:
        settings, teacher = distillation.load_teacher(config.teacher)
        if settings.pdn != config.pdn:
            raise ConfigError(f"--config.teacher={config.teacher} is a PDN-{settings.pdn.upper()}, "
                              f"but --config.pdn={config.pdn}")
        return teacher, f"file {config.teacher}"
    settings = distillation.Settings(
        pdn=config.pdn, backbone=config.backbone, taps=tuple(config.taps), aggregate=config.aggregate,
        projection=config.teacher_projection, image_size=config.image_size, target_size=config.image_size,
        steps=config.teacher_steps, batch_size=config.teacher_batch_size, stats_images=len(images), seed=config.seed)
    teacher = distillation.distil(
        settings, backbone, loop.random_batches(images, settings.batch_size, config.seed),
        stats_batches=loop.random_batches(images, settings.batch_size, config.seed + 1),
        checkpoint_dir=None if workdir is None else workdir / "teacher", checkpoint_every=config.checkpoint_every,
        run=loop.run_identity(config.to_dict(), ("teacher_steps", "train_steps")))
    source = (f"distilled here on {len(images)} training images, {config.teacher_steps} steps, "
              f"from {config.backbone} {tuple(config.taps)} (CPU stand-in, not an ImageNet teacher)")
    return teacher, source


def teacher_stats(config: ml_collections.ConfigDict, params: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of the teacher's outputs on unaugmented images."""
    run = compilation.jit(lambda x: teacher_net(config).apply({"params": params}, imagenet_normalise(x)))
    s1 = s2 = 0.0
    n = 0
    for f in compilation.in_fixed_batches(run, images, config.batch_size):
        f = np.asarray(f, np.float64).reshape(-1, CHANNELS)  # float64 sums: no cancellation in E[x²] − E[x]²
        s1, s2, n = s1 + f.sum(0), s2 + (f * f).sum(0), n + len(f)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def optimiser(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with coupled L2 weight decay; the learning rate drops ×0.1 at 95 % of the steps."""
    drop = max(int(0.95 * config.train_steps), 1)
    schedule = optax.piecewise_constant_schedule(config.lr, {drop: 0.1})
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))


def make_step(config: ml_collections.ConfigDict, frozen: dict) -> Callable:
    """The jitted ``(train_state, (images, penalty_images), key) -> (train_state, metrics)``."""
    tx, penalty = optimiser(config), uses_penalty(config)
    student, ae = student_net(config), autoencoder()

    def loss_fn(params, images, generic, key):
        k_aug, k_drop, k_pen = jax.random.split(key, 3)
        x = imagenet_normalise(images)
        t = teacher_features(config, frozen, x)
        s = student.apply({"params": params["student"]}, x)
        l_hard = hard_feature_loss((t - s[..., :CHANNELS]) ** 2, config.hard_quantile)
        l_pen = jnp.zeros((), jnp.float32)
        if penalty:
            p = imagenet_normalise(penalty_view(k_pen, generic, images.shape[1]))
            l_pen = jnp.mean(student.apply({"params": params["student"]}, p)[..., :CHANNELS] ** 2)
        x_aug = imagenet_normalise(colour_jitter(k_aug, images))
        t_aug = teacher_features(config, frozen, x_aug)
        a = ae.apply({"params": params["ae"]}, x_aug, train=True, rngs={"dropout": k_drop})
        s_aug = student.apply({"params": params["student"]}, x_aug)[..., CHANNELS:]
        l_ae, l_stae = jnp.mean((t_aug - a) ** 2), jnp.mean((a - s_aug) ** 2)
        total = l_hard + l_pen + l_ae + l_stae
        return total, {"loss": total, "hard": l_hard, "penalty": l_pen, "ae": l_ae, "stae": l_stae}

    @compilation.jit
    def step(state: dict, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[dict, dict]:
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"], *batch, key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, metrics

    return step


def train_batches(config: ml_collections.ConfigDict, images: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (training images, generic penalty images at 2× size or a placeholder) pairs."""
    own = loop.random_batches(images, config.train_batch_size, config.seed)
    if not uses_penalty(config):
        placeholder = np.zeros((config.train_batch_size, 1, 1, 3), np.float32)
        return ((x, placeholder) for x in own)
    paths = image_files(config.penalty_dir)
    generic = distillation.file_batches(paths, config.train_batch_size, 2 * config.image_size, config.seed)
    return zip(own, generic)


def validation_quantiles(config: ml_collections.ConfigDict, state: dict, images: np.ndarray) -> dict:
    """q_a and q_b of map_ST and map_AE over every pixel of the validation maps."""
    run = compilation.jit(lambda x: raw_maps(*outputs(config, state, x)))
    parts = compilation.in_fixed_batches(run, images, config.batch_size)
    qs = (config.q_a, config.q_b)
    st = np.quantile(np.concatenate([p[0] for p in parts]), qs)
    ae = np.quantile(np.concatenate([p[1] for p in parts]), qs)
    return {"st": jnp.asarray(st, jnp.float32), "ae": jnp.asarray(ae, jnp.float32)}


def fit_images(config: ml_collections.ConfigDict, images: np.ndarray, backbone: Backbone) -> tuple[dict, np.ndarray, np.ndarray]:
    """Fit on images in memory; returns (state, train indices, validation indices) of ``images``."""
    _check(config)
    train_idx, val_idx = loop.hold_out(len(images), config.val_fraction, config.seed)
    if len(val_idx) == 0:
        raise ConfigError(f"EfficientAD needs ≥ 2 training images (a validation split); got {len(images)}")
    train_images = images[train_idx]
    workdir = Path(config.workdir) if "workdir" in config else None
    start = time.perf_counter()
    teacher, teacher_source = teacher_for(config, backbone, train_images, workdir)
    teacher_seconds = time.perf_counter() - start
    mean, std = teacher_stats(config, teacher["params"], train_images)
    frozen = {"teacher": teacher["params"], "teacher_mean": jnp.asarray(mean), "teacher_std": jnp.asarray(std)}
    k_student, k_ae, k_train = jax.random.split(jax.random.key(config.seed), 3)
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = {"student": compilation.init(student_net(config), k_student, dummy)["params"],
              "ae": compilation.init(autoencoder(), k_ae, dummy)["params"]}
    start = time.perf_counter()
    trained, history = loop.train(
        make_step(config, frozen), {"params": params, "opt": optimiser(config).init(params)},
        train_batches(config, train_images), config.train_steps, k_train,
        checkpoint_dir=None if workdir is None else workdir / "train", checkpoint_every=config.checkpoint_every,
        desc="efficientad", log_every=config.log_every, mesh=parallel.training_mesh(config.train_batch_size),
        run=loop.run_identity(config.to_dict()))
    train_seconds = time.perf_counter() - start
    state = {**frozen, **trained["params"], "penalty": np.int32(uses_penalty(config))}
    state["quantiles"] = validation_quantiles(config, state, images[val_idx])
    if workdir is not None:
        record = {"teacher": teacher_source, "penalty": config.penalty_dir if uses_penalty(config) else "none (dropped)",
                  "n_train": len(train_idx), "n_validation": len(val_idx), "train_steps": config.train_steps,
                  "teacher_seconds": teacher_seconds, "train_seconds": train_seconds,
                  "quantiles": {k: np.asarray(v).tolist() for k, v in state["quantiles"].items()}, "history": history}
        (workdir / "train_history.json").write_text(json.dumps(record, indent=2) + "\n")
    return state, train_idx, val_idx


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Collect the training images, hold out the validation split, distil or load the teacher,
    train student + autoencoder, then set the map quantiles on the validation split."""
    return fit_images(config, loop.collect_images(batches, progress), backbone)[0]
