"""EfficientAD: a student PDN regresses a frozen teacher locally, an autoencoder predicts the
teacher globally, and the student learns to predict the autoencoder; anomalies are where they
disagree.

Teacher (``config.teacher``):

- ``"backbone"`` (default): the frozen pretrained ``config.backbone`` itself. Its taps
  ``config.taps`` (Lite0 stage2 + stage4, 152 channels) are averaged over k×k neighbours
  (``aggregate``), resized to the student's output grid and concatenated, then standardised per
  channel with the mean and std over the training images. Student and autoencoder are sized to
  that channel count. The paper distils a PDN from a pretrained network so the teacher is as fast
  as the student; on a CPU without an ImageNet-scale distillation the pretrained network is the
  better teacher, and Lite0 costs less than the student.
- a folder written by ``scripts/distill_teacher.py``: a distilled PDN (384 channels), as the paper.
- ``"distil"``: a PDN distilled during fit on the category's own training images for
  ``teacher_steps`` steps. Plumbing for tests of the distillation path, not a teacher: a PDN that
  has seen a few hundred steps is close to a random network, and the student then learns nothing
  that separates defects from normal (image AUROC near 0.5). Fit warns when it is chosen.

Training (per category, ``train_steps`` optimiser steps, batch ``train_batch_size``):
hard-feature loss (mean of the student-teacher squared differences at or above their 0.999
quantile) + optional penalty on generic images (``penalty_dir``; "none" drops it, the
reproduction's default) + autoencoder loss + student-autoencoder loss on a colour-jittered copy;
Adam with coupled L2, learning rate ×0.1 at 95 % of the steps. A seeded ``val_fraction`` of the
training images is held out. Every ``validate_every`` steps the held-out images and copies of them
with synthetic anomalies (jaxad.data.anomalies) are scored: image and pixel AUROC go to
``<workdir>/train_history.json`` and ``train.png``; schedules are chosen on this curve, never on the
test set. After training, the 0.9 / 0.995 quantiles of both anomaly maps on the held-out normal
images normalise the maps at test time. Teacher, student and autoencoder run fused in one jitted
predict.

State: ``{'student', 'ae': params, 'teacher_mean', 'teacher_std': [C], 'quantiles': {'st', 'ae':
[q_a, q_b]}, 'penalty': 1 if a penalty folder was used else 0}``, plus ``'teacher'`` (PDN params)
for a PDN teacher; a backbone teacher's weights come with the backbone (``state['backbone']``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least, require_between, require_positive
from jaxad.data import Batch, anomalies, image_files
from jaxad.errors import ConfigError
from jaxad.eval import metrics, report
from jaxad.nets import PDN, PDN_SIZES, Autoencoder, imagenet_normalise, pdn_output_size
from jaxad.runtime import compilation, parallel
from jaxad.train import distillation, loop

PDN_CHANNELS = distillation.TEACHER_CHANNELS  # 384: a PDN teacher's channels
MAP_PAD = 4  # zero border added to the H/4 − 8 map before resizing (H/4 − 8 + 8 = H/4)
BACKBONE, DISTIL = "backbone", "distil"  # teacher sources besides a folder
VALIDATION_TEXTURES = 16  # procedural textures the synthetic validation anomalies draw from


def teacher_kind(config: ml_collections.ConfigDict) -> str:
    """"backbone", "distil" or "folder"."""
    return config.teacher if config.teacher in (BACKBONE, DISTIL) else "folder"


def channels(config: ml_collections.ConfigDict, backbone: Backbone) -> int:
    """Teacher channels C: the tapped backbone channels, or a PDN teacher's 384. The student has 2C."""
    if teacher_kind(config) == BACKBONE:
        return sum(backbone.taps[t].channels for t in config.taps)
    return PDN_CHANNELS


def student_net(config: ml_collections.ConfigDict, c: int) -> PDN:
    return PDN(2 * c, config.pdn, padded=False)


def autoencoder(c: int) -> Autoencoder:
    return Autoencoder(c)


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


def teacher_raw(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] → the teacher's unnormalised output on the student's grid."""
    if teacher_kind(config) != BACKBONE:
        return PDN(PDN_CHANNELS, config.pdn, padded=False).apply({"params": state["teacher"]}, imagenet_normalise(images))
    maps = backbone.apply(state["backbone"], images, tuple(config.taps))
    f = features.embed(maps, tuple(config.taps), config.aggregate)
    g = pdn_output_size(images.shape[1]), pdn_output_size(images.shape[2])
    return features.resize_bilinear(f, g)


def teacher_features(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> jax.Array:
    """Teacher output standardised per channel with the category's μ, σ."""
    return (teacher_raw(config, backbone, state, images) - state["teacher_mean"]) / state["teacher_std"]


def outputs(config: ml_collections.ConfigDict, backbone: Backbone, state: dict,
            images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [B, H, W, 3] in [0, 1] → (teacher, student, autoencoder) outputs, one fused graph."""
    c = state["teacher_mean"].shape[-1]
    x = imagenet_normalise(images)
    t = teacher_features(config, backbone, state, images)
    s = student_net(config, c).apply({"params": state["student"]}, x)
    a = autoencoder(c).apply({"params": state["ae"]}, x)
    return t, s, a


def raw_maps(t: jax.Array, s: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(map_ST, map_AE) [B, h, w]: channel means of (T − S_local)² and (AE − S_global)²."""
    c = t.shape[-1]
    return jnp.mean((t - s[..., :c]) ** 2, -1), jnp.mean((a - s[..., c:]) ** 2, -1)


def combined_map(quantiles: dict, map_st: jax.Array, map_ae: jax.Array) -> jax.Array:
    """0.5·M̂_ST + 0.5·M̂_AE with M̂ = 0.1·(M − q_a)/(q_b − q_a) per map type."""
    def norm(m, q):
        return 0.1 * (m - q[0]) / (q[1] - q[0])

    return 0.5 * norm(map_st, quantiles["st"]) + 0.5 * norm(map_ae, quantiles["ae"])


def to_image(maps: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """[B, h, w] → [B, H, W]: zero-pad 4 px on each side, then torch-style bilinear to the image."""
    padded = jnp.pad(maps, ((0, 0), (MAP_PAD, MAP_PAD), (MAP_PAD, MAP_PAD)))
    return postprocess.anomaly_maps(padded, image_hw, 0.0)


def forward(config: ml_collections.ConfigDict, backbone: Backbone, state: dict,
            images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (pixel maps [B, H, W], teacher output, student output)."""
    t, s, a = outputs(config, backbone, state, images)
    maps = to_image(combined_map(state["quantiles"], *raw_maps(t, s, a)), images.shape[1:3])
    return maps, t, s


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B] = max of the map, maps [B, H, W]); jit with config/backbone bound."""
    maps = forward(config, backbone, state, images)[0]
    return jnp.max(maps, axis=(1, 2)), maps


def gflop_per_image(config: ml_collections.ConfigDict, backbone: Backbone, state: dict) -> float:
    """GFLOP of one image's predict (teacher, student, autoencoder, map), XLA's cost analysis."""
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    fn = jax.jit(lambda s, im: predict(config, backbone, s, im))
    cost = fn.lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 1e9


# ---------------------------------------------------------------- fit


def _check(config: ml_collections.ConfigDict, backbone: Backbone) -> None:
    if config.pdn not in PDN_SIZES:
        raise ConfigError(f"--config.pdn={config.pdn}: choose one of {', '.join(PDN_SIZES)}")
    size = config.image_size
    if not isinstance(size, int) or size < 64 or size % 32:
        raise ConfigError(f"--config.image_size={size}: EfficientAD needs a square size, a multiple of 32, ≥ 64")
    require_at_least(config, 1, "train_steps", "train_batch_size", "teacher_steps", "teacher_batch_size",
                     "checkpoint_every", "validate_every")
    require_positive(config, "lr")
    for key in ("val_fraction", "hard_quantile", "q_a", "q_b"):
        require_between(config, key, 0.0, 1.0)
    if config.q_a >= config.q_b:
        raise ConfigError(f"--config.q_a={config.q_a} / q_b={config.q_b}: q_a must be below q_b")
    if not config.teacher:
        raise ConfigError(f"--config.teacher is empty: give '{BACKBONE}' (the pretrained backbone), "
                          f"a folder from scripts/distill_teacher.py, or '{DISTIL}'")
    unknown = [t for t in config.taps if t not in backbone.taps]
    if teacher_kind(config) != "folder" and unknown:
        raise ConfigError(f"--config.taps: {unknown} are not taps of {backbone.name}; valid: {', '.join(backbone.taps)}")


def teacher_for(config: ml_collections.ConfigDict, backbone: Backbone, images: np.ndarray,
                workdir: Path | None) -> tuple[dict, str]:
    """(the teacher's frozen weights for the state, where they came from)."""
    kind = teacher_kind(config)
    if kind == BACKBONE:
        return {"backbone": backbone.variables}, (f"pretrained {backbone.name} {tuple(config.taps)}, "
                                                  f"{config.aggregate}x{config.aggregate} average")
    if kind == "folder":
        settings, teacher = distillation.load_teacher(config.teacher)
        if settings.pdn != config.pdn:
            raise ConfigError(f"--config.teacher={config.teacher} is a PDN-{settings.pdn.upper()}, "
                              f"but --config.pdn={config.pdn}")
        return {"teacher": teacher["params"]}, f"file {config.teacher}"
    warnings.warn(f"--config.teacher={DISTIL}: a PDN distilled for {config.teacher_steps} steps on the training "
                  "images is plumbing, not a teacher; expect chance-level detection", stacklevel=2)
    settings = distillation.Settings(
        pdn=config.pdn, backbone=config.backbone, taps=tuple(config.taps), aggregate=config.aggregate,
        projection=config.teacher_projection, image_size=config.image_size, target_size=config.image_size,
        steps=config.teacher_steps, batch_size=config.teacher_batch_size, stats_images=len(images), seed=config.seed)
    teacher = distillation.distil(
        settings, backbone, loop.random_batches(images, settings.batch_size, config.seed),
        stats_batches=loop.random_batches(images, settings.batch_size, config.seed + 1),
        checkpoint_dir=None if workdir is None else workdir / "teacher", checkpoint_every=config.checkpoint_every,
        run=loop.run_identity(config.to_dict(), ("teacher_steps", "train_steps")))
    source = (f"distilled here on {len(images)} training images, {config.teacher_steps} steps "
              f"(plumbing, not a teacher)")
    return {"teacher": teacher["params"]}, source


def teacher_stats(config: ml_collections.ConfigDict, backbone: Backbone, frozen: dict,
                  images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of the teacher's outputs on unaugmented images."""
    run = compilation.jit(lambda x: teacher_raw(config, backbone, frozen, x))
    s1 = s2 = 0.0
    n = 0
    for f in compilation.in_fixed_batches(run, images, config.batch_size):
        f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])  # float64 sums: no cancellation in E[x²] − E[x]²
        s1, s2, n = s1 + f.sum(0), s2 + (f * f).sum(0), n + len(f)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def optimiser(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with coupled L2 weight decay; the learning rate drops ×0.1 at 95 % of the steps."""
    drop = max(int(0.95 * config.train_steps), 1)
    schedule = optax.piecewise_constant_schedule(config.lr, {drop: 0.1})
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))


def make_update(config: ml_collections.ConfigDict, backbone: Backbone, frozen: dict) -> Callable:
    """The jitted ``(params, opt, (images, penalty_images), key) -> (params, opt, metrics)``."""
    tx, penalty = optimiser(config), uses_penalty(config)
    c = frozen["teacher_mean"].shape[-1]
    student, ae = student_net(config, c), autoencoder(c)

    def loss_fn(params, images, generic, key):
        k_aug, k_drop, k_pen = jax.random.split(key, 3)
        t = teacher_features(config, backbone, frozen, images)
        s = student.apply({"params": params["student"]}, imagenet_normalise(images))
        l_hard = hard_feature_loss((t - s[..., :c]) ** 2, config.hard_quantile)
        l_pen = jnp.zeros((), jnp.float32)
        if penalty:
            p = imagenet_normalise(penalty_view(k_pen, generic, images.shape[1]))
            l_pen = jnp.mean(student.apply({"params": params["student"]}, p)[..., :c] ** 2)
        jittered = colour_jitter(k_aug, images)
        x_aug = imagenet_normalise(jittered)
        t_aug = teacher_features(config, backbone, frozen, jittered)
        a = ae.apply({"params": params["ae"]}, x_aug, train=True, rngs={"dropout": k_drop})
        s_aug = student.apply({"params": params["student"]}, x_aug)[..., c:]
        l_ae, l_stae = jnp.mean((t_aug - a) ** 2), jnp.mean((a - s_aug) ** 2)
        total = l_hard + l_pen + l_ae + l_stae
        return total, {"loss": total, "hard": l_hard, "penalty": l_pen, "ae": l_ae, "stae": l_stae}

    @compilation.jit
    def update(params: dict, opt: dict, batch: tuple[jax.Array, jax.Array], key: jax.Array):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, *batch, key)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, metrics

    return update


def train_batches(config: ml_collections.ConfigDict, images: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (training images, generic penalty images at 2× size or a placeholder) pairs."""
    own = loop.random_batches(images, config.train_batch_size, config.seed)
    if not uses_penalty(config):
        placeholder = np.zeros((config.train_batch_size, 1, 1, 3), np.float32)
        return ((x, placeholder) for x in own)
    paths = image_files(config.penalty_dir)
    generic = distillation.file_batches(paths, config.train_batch_size, 2 * config.image_size, config.seed)
    return zip(own, generic)


# ---------------------------------------------------------------- validation


def validation_set(config: ml_collections.ConfigDict, images: np.ndarray) -> dict:
    """The held-out normal images and one copy of each with a synthetic anomaly (Perlin-shaped,
    texture or tile-shuffled self), fixed for the whole fit: {'normal', 'anomalous', 'masks'}."""
    key_textures, key_synth = jax.random.split(jax.random.key(config.seed + 7))
    size = images.shape[1]
    textures = anomalies.texture_bank(key_textures, VALIDATION_TEXTURES, size)
    everywhere = jnp.ones((size, size), bool)
    synth = compilation.jit(jax.vmap(lambda k, im: anomalies.synthesize(k, im, everywhere, textures, 1.0)))
    anomalous, masks = synth(jax.random.split(key_synth, len(images)), jnp.asarray(images))
    return {"normal": images, "anomalous": np.asarray(anomalous), "masks": np.asarray(masks) > 0.5}


def map_quantiles(config: ml_collections.ConfigDict, maps: tuple[np.ndarray, np.ndarray]) -> dict:
    """q_a and q_b of map_ST and map_AE over every pixel of the held-out normal images' maps."""
    qs = (config.q_a, config.q_b)
    return {k: jnp.asarray(np.quantile(m, qs), jnp.float32) for k, m in zip(("st", "ae"), maps)}


def make_validator(config: ml_collections.ConfigDict, backbone: Backbone, frozen: dict,
                   val: dict) -> Callable[[dict], dict[str, float]]:
    """``params -> {'val_image_auroc', 'val_pixel_auroc'}`` on the synthetic validation set, the maps
    normalised with quantiles of the normal images' maps (as after training)."""
    run = compilation.jit(lambda params, x: raw_maps(*outputs(config, backbone, {**frozen, **params}, x)))
    combine = compilation.jit(lambda q, st, ae: to_image(combined_map(q, st, ae), val["masks"].shape[1:3]))
    n = len(val["normal"])
    labels = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    masks = np.concatenate([np.zeros_like(val["masks"]), val["masks"]])

    def validate(params: dict) -> dict[str, float]:
        normal, anomalous = (compilation.in_fixed_batches(lambda x: run(params, x), val[k], config.batch_size)
                             for k in ("normal", "anomalous"))
        st_n, ae_n = (np.concatenate([p[i] for p in normal]) for i in (0, 1))
        st_a, ae_a = (np.concatenate([p[i] for p in anomalous]) for i in (0, 1))
        q = map_quantiles(config, (st_n, ae_n))
        maps = np.asarray(combine(q, np.concatenate([st_n, st_a]), np.concatenate([ae_n, ae_a])))
        return {"val_image_auroc": metrics.image_auroc(maps.max(axis=(1, 2)), labels),
                "val_pixel_auroc": metrics.pixel_auroc(maps, masks)}

    return validate


def make_step(update: Callable, validate: Callable, config: ml_collections.ConfigDict) -> Callable:
    """``(state, batch, key) -> (state, metrics)`` for :func:`jaxad.train.loop.train`: one update,
    then the validation metrics when the step is a logged one (every ``validate_every``, and the last)."""
    def step(state: dict, batch: tuple, key: jax.Array) -> tuple[dict, dict]:
        params, opt, metrics = update(state["params"], state["opt"], batch, key)
        done = int(state["step"]) + 1
        state = {"params": params, "opt": opt, "step": jnp.asarray(done, jnp.int32)}
        if done % config.validate_every == 0 or done == config.train_steps:
            metrics = {**metrics, **validate(params)}
        return state, metrics

    return step


def save_curve(workdir: Path, history: list[dict]) -> None:
    """train.png: validation image / pixel AUROC against the step."""
    steps = [h["step"] for h in history if "val_image_auroc" in h]
    series = {name: (steps, [h[f"val_{name.replace(' ', '_')}_auroc"] for h in history if "val_image_auroc" in h])
              for name in ("image", "pixel")}
    report.save_line_plot(workdir / "train.png", series, "step", "AUROC (held-out, synthetic anomalies)",
                          "EfficientAD validation", ylim=(0.0, 1.0))


def fit_images(config: ml_collections.ConfigDict, images: np.ndarray, backbone: Backbone) -> tuple[dict, np.ndarray, np.ndarray]:
    """Fit on images in memory; returns (state, train indices, validation indices) of ``images``."""
    _check(config, backbone)
    train_idx, val_idx = loop.hold_out(len(images), config.val_fraction, config.seed)
    if len(val_idx) == 0:
        raise ConfigError(f"EfficientAD needs ≥ 2 training images (a validation split); got {len(images)}")
    train_images = images[train_idx]
    workdir = Path(config.workdir) if "workdir" in config else None
    start = time.perf_counter()
    frozen, teacher_source = teacher_for(config, backbone, train_images, workdir)
    teacher_seconds = time.perf_counter() - start
    mean, std = teacher_stats(config, backbone, frozen, train_images)
    frozen = {**frozen, "teacher_mean": jnp.asarray(mean), "teacher_std": jnp.asarray(std)}
    c = len(mean)
    k_student, k_ae, k_train = jax.random.split(jax.random.key(config.seed), 3)
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = {"student": compilation.init(student_net(config, c), k_student, dummy)["params"],
              "ae": compilation.init(autoencoder(c), k_ae, dummy)["params"]}
    validate = make_validator(config, backbone, frozen, validation_set(config, images[val_idx]))
    state = {"params": params, "opt": optimiser(config).init(params), "step": jnp.zeros((), jnp.int32)}
    start = time.perf_counter()
    trained, history = loop.train(
        make_step(make_update(config, backbone, frozen), validate, config), state,
        train_batches(config, train_images), config.train_steps, k_train,
        checkpoint_dir=None if workdir is None else workdir / "train", checkpoint_every=config.checkpoint_every,
        desc="efficientad", log_every=config.validate_every, mesh=parallel.training_mesh(config.train_batch_size),
        run=loop.run_identity(config.to_dict()))
    train_seconds = time.perf_counter() - start
    state = {**frozen, **trained["params"], "penalty": np.int32(uses_penalty(config))}
    run = compilation.jit(lambda x: raw_maps(*outputs(config, backbone, state, x)))
    parts = compilation.in_fixed_batches(run, images[val_idx], config.batch_size)
    state["quantiles"] = map_quantiles(config, [np.concatenate([p[i] for p in parts]) for i in (0, 1)])
    state.pop("backbone", None)  # the backbone's weights travel with the backbone, not the state
    if workdir is not None:
        record = {"teacher": teacher_source, "channels": c, "pdn": config.pdn,
                  "penalty": config.penalty_dir if uses_penalty(config) else "none (dropped)",
                  "n_train": len(train_idx), "n_validation": len(val_idx), "train_steps": config.train_steps,
                  "teacher_seconds": teacher_seconds, "train_seconds": train_seconds,
                  "quantiles": {k: np.asarray(v).tolist() for k, v in state["quantiles"].items()}, "history": history}
        (workdir / "train_history.json").write_text(json.dumps(record, indent=2) + "\n")
        save_curve(workdir, history)
    return state, train_idx, val_idx


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Collect the training images, hold out the validation split, set up the teacher, train
    student + autoencoder (validated on synthetic anomalies), then set the map quantiles."""
    return fit_images(config, loop.collect_images(batches, progress), backbone)[0]
