"""SimpleNet: a one-layer feature adaptor and an MLP discriminator trained to tell adapted normal
patch features from the same features plus Gaussian noise; a test patch scores −D(adaptor(f)).

The backbone is frozen, so the patch features of the training images are computed once and the
optimiser steps only run the two small heads. A seeded fraction of the training images is held
out for model selection: every ``validate_every`` steps (and at the last step) the train state
records the hinge loss on those unseen normal patches against a fixed noise draw of their
anomalous versions (discriminator in inference mode), and keeps the parameters with the lowest
value. Real defects are never seen, so this measures how well the discriminator generalises its
normal-vs-noise boundary to new normal images, not defect detection itself; the test set is never
used.

State: ``{'adaptor': params, 'discriminator': params, 'batch_stats': BatchNorm running averages,
'validation': {'best_loss', 'best_step', 'last_loss', 'last_step', 'selected_step'}}``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least, require_between, require_positive
from jaxad.data import Batch
from jaxad.errors import ConfigError, NumericsError
from jaxad.methods.crd import patch_features
from jaxad.nets.simplenet import Discriminator, adaptor
from jaxad.runtime import compilation, parallel
from jaxad.train import loop

EMBEDDINGS = ("average", "unfold")
SELECT = ("best", "last")


# ---------------------------------------------------------------- embedding


def adaptive_pool_matrix(length: int, size: int) -> np.ndarray:
    """(length × size) matrix of 1-D adaptive average pooling (torch ``adaptive_avg_pool1d``):
    output i averages inputs [⌊i·L/m⌋, ⌈(i+1)·L/m⌉)."""
    i = np.arange(size)
    start = (i * length) // size
    end = -((-(i + 1) * length) // size)
    j = np.arange(length)[:, None]
    inside = (j >= start) & (j < end)
    return (inside / (end - start)).astype(np.float32)


def pool_channels(f: jax.Array, size: int) -> jax.Array:
    """Adaptive average pooling of the last axis to ``size`` entries (identity when equal)."""
    if f.shape[-1] == size:
        return f
    pool = jnp.asarray(adaptive_pool_matrix(f.shape[-1], size))
    return jnp.matmul(f, pool, precision=jax.lax.Precision.HIGHEST)


def embedding_dim(config: ml_collections.ConfigDict, backbone: Backbone) -> int:
    """``target_dim``, or the taps' total channel count when that is smaller (no up-sampling)."""
    unknown = [t for t in config.taps if t not in backbone.taps]
    if unknown:
        raise ConfigError(f"--config.taps: {unknown} are not taps of {backbone.name}; valid: {', '.join(backbone.taps)}")
    if config.embedding not in EMBEDDINGS:
        raise ConfigError(f"--config.embedding={config.embedding}: choose one of {', '.join(EMBEDDINGS)}")
    if config.target_dim < 1:
        raise ConfigError(f"--config.target_dim={config.target_dim}: must be a positive channel count")
    return min(config.target_dim, sum(backbone.taps[t].channels for t in config.taps))


def _unfold(x: jax.Array, size: int) -> jax.Array:
    """Every size×size neighbourhood (zero padded) flattened channel-major, as torch ``unfold``."""
    pad = size // 2
    return jax.lax.conv_general_dilated_patches(
        x, (size, size), (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def embed(config: ml_collections.ConfigDict, backbone: Backbone, variables, images: jax.Array, dim: int) -> jax.Array:
    """Images [B, H, W, 3] → patch features [B, h, w, dim].

    ``'average'``: the PatchCore embedding of jaxad (k×k local mean per tap, resize to the finest
    grid, concatenate), then channels adaptively average-pooled to ``dim``. ``'unfold'``: the
    reference code — each tap's k×k×C neighbourhood flattened and pooled to ``dim``, resized to the
    first tap's grid, the taps stacked and pooled to ``dim`` again.
    """
    if config.embedding == "average":
        return pool_channels(patch_features(config, backbone, variables, images), dim)
    maps = backbone.apply(variables, images, tuple(config.taps))
    grid = maps[config.taps[0]].shape[1:3]
    per_tap = [pool_channels(features.resize_bilinear(_unfold(maps[t].astype(jnp.float32), config.aggregate), grid), dim)
               for t in config.taps]
    return pool_channels(jnp.concatenate(per_tap, axis=-1), dim)


# ---------------------------------------------------------------- loss


def hinge_loss(true_scores: jax.Array, fake_scores: jax.Array, th: float) -> jax.Array:
    """Truncated hinge: normal scores pushed above ``th``, anomalous ones below ``-th``."""
    return jnp.mean(jax.nn.relu(th - true_scores)) + jnp.mean(jax.nn.relu(fake_scores + th))


def anomalous_noise(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """i.i.d. N(0, std²) noise that turns adapted normal features into anomalous ones."""
    return std * jax.random.normal(key, shape, jnp.float32)


def init_heads(config: ml_collections.ConfigDict, dim: int, key: jax.Array) -> tuple[dict, dict]:
    """Fresh (params, batch_stats) of the adaptor and the discriminator."""
    k_a, k_d = jax.random.split(key)
    x = jnp.zeros((2, dim), jnp.float32)
    disc = compilation.init(Discriminator(config.hidden_dim), k_d, x, train=False)
    params = {"adaptor": compilation.init(adaptor(dim), k_a, x)["params"], "discriminator": disc["params"]}
    return params, disc["batch_stats"]


def training_loss(config: ml_collections.ConfigDict, params: dict, batch_stats: dict, f: jax.Array,
                  noise: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
    """Hinge loss of one step on normal features f [n, d]; returns (loss, (new batch_stats, metrics)).

    The discriminator sees normal and anomalous features as one batch in training mode, so its
    BatchNorm statistics are those of the mixture (as the reference code)."""
    q = adaptor(f.shape[-1]).apply({"params": params["adaptor"]}, f)
    both = jnp.concatenate([q, q + noise])
    scores, updated = Discriminator(config.hidden_dim).apply(
        {"params": params["discriminator"], "batch_stats": batch_stats}, both, train=True, mutable=["batch_stats"])
    true_scores, fake_scores = scores[: len(f)], scores[len(f):]
    loss = hinge_loss(true_scores, fake_scores, config.margin)
    metrics = {"loss": loss,
               "p_true": jnp.mean(true_scores >= config.margin), "p_fake": jnp.mean(fake_scores < -config.margin)}
    return loss, (updated["batch_stats"], metrics)


def normality(config: ml_collections.ConfigDict, params: dict, batch_stats: dict, f: jax.Array) -> jax.Array:
    """D(adaptor(f)) with BatchNorm running averages: f [..., d] → scores [...]."""
    q = adaptor(f.shape[-1]).apply({"params": params["adaptor"]}, f.reshape(-1, f.shape[-1]))
    scores = Discriminator(config.hidden_dim).apply(
        {"params": params["discriminator"], "batch_stats": batch_stats}, q, train=False)
    return scores.reshape(f.shape[:-1])


def validation_loss(config: ml_collections.ConfigDict, params: dict, batch_stats: dict, f: jax.Array) -> jax.Array:
    """Hinge loss on held-out normal features [m, n, d] (m images of n patches) vs the same plus a
    FIXED noise draw, discriminator in inference mode: the same function at every evaluation, so
    values of different steps compare. One image at a time, to bound memory."""
    disc = Discriminator(config.hidden_dim)
    variables = {"params": params["discriminator"], "batch_stats": batch_stats}
    base = jax.random.key(config.seed + 1)

    def one_image(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, i = args
        q = adaptor(x.shape[-1]).apply({"params": params["adaptor"]}, x)
        noise = anomalous_noise(jax.random.fold_in(base, i), q.shape, config.noise_std)
        return hinge_loss(disc.apply(variables, q, train=False), disc.apply(variables, q + noise, train=False),
                          config.margin)

    return jnp.mean(jax.lax.map(one_image, (f, jnp.arange(f.shape[0]))))  # equal patch counts: the global mean


# ---------------------------------------------------------------- training


def optimiser(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Discriminator: Adam with coupled L2 weight decay (torch ``Adam(weight_decay=...)``);
    adaptor: AdamW (decoupled decay). One transform over the {'adaptor', 'discriminator'} tree."""
    disc = optax.chain(optax.add_decayed_weights(config.dsc_weight_decay), optax.adam(config.dsc_lr))
    adapt = optax.adamw(config.adaptor_lr, weight_decay=config.adaptor_weight_decay)
    labels = lambda params: {name: jax.tree.map(lambda _: name, tree) for name, tree in params.items()}  # noqa: E731
    return optax.multi_transform({"adaptor": adapt, "discriminator": disc}, labels)


def init_state(config: ml_collections.ConfigDict, dim: int, key: jax.Array) -> dict:
    """Train state: heads, optimiser, step count, and the best-on-validation heads seen so far."""
    params, batch_stats = init_heads(config, dim, key)
    return {
        "params": params, "batch_stats": batch_stats, "opt": optimiser(config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "best": {"params": params, "batch_stats": batch_stats},
        "best_loss": jnp.array(jnp.inf, jnp.float32), "best_step": jnp.zeros((), jnp.int32),
        "last_loss": jnp.array(jnp.nan, jnp.float32), "last_step": jnp.zeros((), jnp.int32),
    }


def _validated(config: ml_collections.ConfigDict, val_features: jax.Array, state: dict) -> dict:
    """Record the validation loss of the current heads; keep them if it is the lowest yet."""
    value = validation_loss(config, state["params"], state["batch_stats"], val_features)
    better = value < state["best_loss"]
    current = {"params": state["params"], "batch_stats": state["batch_stats"]}
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), current, state["best"])
    return {**state, "best": best, "best_loss": jnp.where(better, value, state["best_loss"]),
            "best_step": jnp.where(better, state["step"], state["best_step"]),
            "last_loss": value, "last_step": state["step"]}


def batch_indices(config: ml_collections.ConfigDict, step: jax.Array, count: int) -> jax.Array:
    """Training images of optimiser step ``step`` (0-based): epochs are seeded permutations of the
    ``count`` images cut into whole batches. A function of the step alone, so a resumed run sees
    the same batches as an uninterrupted one."""
    size = min(config.train_batch_size, count)
    per_epoch = count // size
    order = jax.random.permutation(jax.random.fold_in(jax.random.key(config.seed), step // per_epoch), count)
    return jax.lax.dynamic_slice(order, ((step % per_epoch) * size,), (size,))


def _step(config: ml_collections.FrozenConfigDict, shard: Callable[[Any], Any], state: dict, key: jax.Array,
          train_features: jax.Array, val_features: jax.Array) -> tuple[dict, dict]:
    idx = batch_indices(config, state["step"], train_features.shape[0])
    f = shard(train_features[idx]).reshape(-1, train_features.shape[-1])  # image-major: the split survives
    noise = anomalous_noise(key, f.shape, config.noise_std)
    grad_fn = jax.value_and_grad(partial(training_loss, config), has_aux=True)
    (_, (batch_stats, metrics)), grads = grad_fn(state["params"], state["batch_stats"], f, noise)
    updates, opt = optimiser(config).update(grads, state["opt"], state["params"])
    state = {**state, "params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
             "opt": opt, "step": state["step"] + 1}
    if val_features.shape[0] == 0:
        return state, metrics
    due = (state["step"] % config.validate_every == 0) | (state["step"] == config.train_steps)
    state = jax.lax.cond(due, partial(_validated, config, val_features), lambda s: s, state)
    return state, {**metrics, "val_loss": state["last_loss"]}


def make_step(config: ml_collections.ConfigDict, train_features: jax.Array, val_features: jax.Array,
              mesh: Mesh) -> Callable:
    """The jitted ``(state, batch, key) -> (state, metrics)`` for ``loop.train``. The batch is
    unused: images are picked by :func:`batch_indices` from the precomputed features [n, h, w, d]
    (train) and [m, h·w, d] (validation), which stay on the devices of ``mesh`` between steps; each
    device takes a slice of the step's images, and the gradients and BatchNorm statistics are
    all-reduced, so the step computes what one device would."""
    frozen = ml_collections.FrozenConfigDict(config)
    train_features, val_features = parallel.replicate((train_features, val_features), mesh)
    step = compilation.jit(partial(_step, frozen, parallel.along_batch(mesh)))
    return lambda state, _batch, key: step(state, key, train_features, val_features)


def _check(config: ml_collections.ConfigDict) -> None:
    if config.select not in SELECT:
        raise ConfigError(f"--config.select={config.select}: choose one of {', '.join(SELECT)}")
    require_at_least(config, 1, "train_steps", "validate_every", "train_batch_size", "hidden_dim", "checkpoint_every")
    require_positive(config, "dsc_lr", "adaptor_lr")
    require_between(config, "val_fraction", 0.0, 1.0, low_closed=True)
    if config.select == "best" and config.val_fraction <= 0:
        raise ConfigError("--config.select=best needs a validation split: set val_fraction > 0 or select=last")


def extract(config: ml_collections.ConfigDict, batches: Iterable[Batch], backbone: Backbone, dim: int,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Patch features of every valid training image [N, h, w, dim], computed once (frozen backbone)."""
    run = compilation.jit(lambda v, x: embed(config, backbone, v, x, dim))
    out = []
    for batch in batches:
        f = np.asarray(run(backbone.variables, batch.images))[np.asarray(batch.valid)]
        if not np.isfinite(f).all():
            bad = ", ".join(str(p) for p, v in zip(batch.paths, batch.valid) if v)
            raise NumericsError(f"non-finite features from the backbone on one of: {bad}; check these images")
        out.append(f)
        if progress is not None:
            progress(int(np.sum(batch.valid)))
    if not out:
        raise NumericsError("no training batch was seen; the training set is empty")
    return np.concatenate(out)


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Precompute features, hold out a validation split, train the heads (data-parallel over
    ``mesh``, default: the devices that divide the image batch), keep the selected ones."""
    _check(config)
    dim = embedding_dim(config, backbone)
    start = time.perf_counter()
    feats = extract(config, batches, backbone, dim, progress)
    extract_seconds = time.perf_counter() - start
    train_idx, val_idx = loop.hold_out(len(feats), config.val_fraction, config.seed)
    if config.select == "best" and len(val_idx) == 0:
        raise ConfigError(f"--config.select=best: {len(feats)} training image(s) leave none for validation; "
                          "use select=last")
    train_features = jnp.asarray(feats[train_idx])
    val_features = jnp.asarray(feats[val_idx].reshape(len(val_idx), -1, dim))
    key_init, key_train = jax.random.split(jax.random.key(config.seed))
    if mesh is None:
        mesh = parallel.training_mesh(min(config.train_batch_size, len(train_idx)))
    workdir = Path(config.workdir) if "workdir" in config else None
    start = time.perf_counter()
    state = parallel.replicate(init_state(config, dim, key_init), mesh)
    state, history = loop.train(
        make_step(config, train_features, val_features, mesh), state,
        itertools.repeat(None), config.train_steps, key_train,
        checkpoint_dir=None if workdir is None else workdir / "train", checkpoint_every=config.checkpoint_every,
        desc="simplenet", log_every=config.validate_every,  # logged steps are validated steps: val_loss is fresh
        run=loop.run_identity(config.to_dict()))
    train_seconds = time.perf_counter() - start
    chosen = state["best"] if config.select == "best" else {"params": state["params"], "batch_stats": state["batch_stats"]}
    selected_step = state["best_step"] if config.select == "best" else state["step"]
    validation = {"best_loss": state["best_loss"], "best_step": state["best_step"], "last_loss": state["last_loss"],
                  "last_step": state["last_step"], "selected_step": selected_step}
    if workdir is not None:
        summary = {k: float(v) for k, v in jax.device_get(validation).items()}
        record = {"select": config.select, "n_train": len(train_idx), "n_validation": len(val_idx), **summary,
                  "extract_seconds": extract_seconds, "train_seconds": train_seconds, "history": history}
        (workdir / "train_history.json").write_text(json.dumps(record, indent=2) + "\n")
    return {"adaptor": chosen["params"]["adaptor"], "discriminator": chosen["params"]["discriminator"],
            "batch_stats": chosen["batch_stats"], "validation": validation}


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); jit with config/backbone bound."""
    dim = embedding_dim(config, backbone)
    f = embed(config, backbone, state["backbone"], images, dim)
    params = {"adaptor": state["adaptor"], "discriminator": state["discriminator"]}
    patch_scores = -normality(config, params, state["batch_stats"], f)
    maps = postprocess.anomaly_maps(patch_scores, images.shape[1:3], config.blur_sigma)
    return jnp.max(patch_scores, axis=(1, 2)), maps
