"""CPR (cascade patch retrieval): global retrieval of similar training images, then a windowed
local search in them with a learned metric, gated by a foreground estimate.

Fit: raw backbone features of the training images → k-means visual words and block histograms
(global branch), foreground discriminant on 2-means pseudo-labels (objects), local branches trained
on synthetic anomalies (or raw features when ``use_lrb`` is off), and the reference bank of every
training image's unit-length descriptors. Predict (one jitted function): histograms of the query →
robust KL to every training image → top-K references → windowed cosine search per scale → scales
summed → × foreground → Gaussian blur → image score = sum of the top T pixels.

State: ``centres`` [k, C₀], ``histograms`` [N, S², k], ``fingerprints`` [N, C₀] (mean raw
features, to recognise a training image used as query), ``bank`` {scale_i: [N, h_i, w_i, D]},
with ``use_lrb`` the branches' ``params``/``batch_stats`` and ``validation``, with ``use_feb``
``foreground`` {w, b, lo, hi} and ``foreground_maps`` [N, h₀, w₀].

Its parts: :mod:`~jaxad.methods.cpr.retrieval` (k-means codebook, block histograms, robust KL,
top-K), :mod:`~jaxad.methods.cpr.foreground` (2-means pseudo-labels, linear discriminant) and
:mod:`~jaxad.methods.cpr.train` (contrastive training of the local branch on synthetic pairs). The
local branch's network is :mod:`jaxad.nets.cpr_local`, its search :mod:`jaxad.distances.windowed`,
the synthetic anomalies :mod:`jaxad.data.anomalies`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import postprocess
from jaxad.backbones import Backbone
from jaxad.config import require_at_least, require_between, require_positive
from jaxad.data import Batch, anomalies, read_image, resize_image
from jaxad.data.images import IMAGE_EXTENSIONS
from jaxad.distances import windowed
from jaxad.errors import ConfigError, DataError, NumericsError
from jaxad.methods import _memory
from jaxad.methods.cpr import foreground, retrieval
from jaxad.methods.cpr import train as lrb_training
from jaxad.runtime import compilation
from jaxad.train import loop

FOREGROUND_CLASSIFIERS = ("lda", "logistic")
SELECT = ("best", "last")
# config keys that count something and are meaningless below 1
COUNTS = ("top_k", "clusters", "blocks", "kmeans_samples", "top_pixels", "pairs_per_type", "train_batch_size",
          "val_refs", "search_chunk", "checkpoint_every")


# ---------------------------------------------------------------- checks and helpers


def _check(config: ml_collections.ConfigDict, backbone: Backbone) -> None:
    unknown = [t for t in config.taps if t not in backbone.taps]
    if unknown:
        raise ConfigError(f"--config.taps: {unknown} are not taps of {backbone.name}; valid: {', '.join(backbone.taps)}")
    if len(config.taps) != len(config.windows):
        raise ConfigError(f"--config.windows={config.windows}: one window size per tap of {config.taps}")
    if any(r < 1 or r % 2 == 0 for r in config.windows):
        raise ConfigError(f"--config.windows={config.windows}: window sizes must be odd and positive")
    require_at_least(config, 1, *COUNTS)
    require_positive(config, "learning_rate")
    require_between(config, "val_fraction", 0.0, 1.0, low_closed=True)
    if config.foreground_classifier not in FOREGROUND_CLASSIFIERS:
        raise ConfigError(f"--config.foreground_classifier={config.foreground_classifier}: choose one of "
                          f"{', '.join(FOREGROUND_CLASSIFIERS)}")
    if config.select not in SELECT:
        raise ConfigError(f"--config.select={config.select}: choose one of {', '.join(SELECT)}")
    if config.drop_blocks >= config.blocks ** 2:
        raise ConfigError(f"--config.drop_blocks={config.drop_blocks}: must be below blocks² = {config.blocks ** 2}")
    if config.use_lrb and not isinstance(config.image_size, int):
        raise ConfigError(f"--config.image_size={config.image_size}: training the local branch needs square images "
                          "(one int); or set use_lrb=false")
    if config.use_lrb and (config.train_steps < 1 or config.validate_every < 1):
        raise ConfigError(f"--config.train_steps={config.train_steps} / validate_every={config.validate_every}: "
                          "both must be at least 1 when use_lrb is on")


def _scales(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return lrb_training.scale_taps(config)


def load_textures(folder: str, size: int, limit: int) -> np.ndarray:
    """Up to ``limit`` images of ``folder`` (sorted, recursive) resized to size×size → [T, S, S, 3]."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--config.texture_dir={folder}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())[:limit]
    if not files:
        raise ConfigError(f"--config.texture_dir={folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return np.stack([resize_image(read_image(p), (size, size)) for p in files])


def extract(config: ml_collections.ConfigDict, backbone: Backbone, images: np.ndarray) -> list[np.ndarray]:
    """The cascade's backbone maps of every image (:func:`jaxad.methods.cpr.train.cascade_maps`), one
    [N, h, w, C] array per tap of ``config.taps``."""
    run = compilation.jit(lambda v, x: list(lrb_training.cascade_maps(config, backbone, v, x).values()))
    maps = compilation.in_fixed_batches_on_host(partial(run, backbone.variables), images, config.batch_size)
    if not all(np.isfinite(m).all() for m in maps):
        raise NumericsError("non-finite features from the backbone on the training images; check them")
    return maps


def sample_pixels(features: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` random pixel vectors (without replacement when possible) of features [N, h, w, C]."""
    flat = features.reshape(-1, features.shape[-1])
    rng = np.random.default_rng(seed)
    return flat[rng.choice(len(flat), min(count, len(flat)), replace=False)]


def neighbour_table(distances: np.ndarray, candidates: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    """For every row of distances [M, N], the k nearest columns among ``candidates`` (indices),
    the row's own index left out when ``exclude_self`` (rows are then images 0..M−1)."""
    allowed = np.zeros(distances.shape, bool)
    allowed[:, candidates] = True
    if exclude_self and len(candidates) > 1:
        allowed[np.arange(len(distances)), np.arange(len(distances))] = False
    k = max(1, min(k, int(allowed.sum(1).min())))
    return np.asarray(retrieval.top_k(jnp.asarray(distances), k, jnp.asarray(~allowed)))


# ---------------------------------------------------------------- fit


def _fit_foreground(config: ml_collections.ConfigDict, first: np.ndarray) -> tuple[foreground.Linear, np.ndarray]:
    """2-means pseudo-labels on raw stride-4 features, linear classifier, robust min-max →
    (model, foreground maps [N, h, w])."""
    key = jax.random.key(config.seed + 2)
    centres = retrieval.kmeans(jnp.asarray(sample_pixels(first, config.kmeans_samples, config.seed + 2)), 2, key)
    words = np.asarray(compilation.jit(retrieval.assign)(jnp.asarray(first), centres))
    pos_mask, neg_mask = foreground.pseudo_labels(words)
    rng = np.random.default_rng(config.seed + 3)
    pos, neg = first[pos_mask], first[neg_mask]
    if len(pos) < 2 or len(neg) < 2:
        raise DataError("foreground pseudo-labels found no object/background split; set --config.use_feb=false "
                        "(texture categories)")
    pos = pos[rng.choice(len(pos), min(len(pos), config.foreground_samples), replace=False)]
    neg = neg[rng.choice(len(neg), min(len(neg), config.foreground_samples), replace=False)]
    if config.foreground_classifier == "lda":
        w, b = foreground.fit_lda(jnp.asarray(pos), jnp.asarray(neg))
    else:
        w, b = foreground.fit_logistic(jnp.asarray(pos), jnp.asarray(neg), config.foreground_steps, 1e-2, key)
    values = foreground.decision(jnp.asarray(first), w, b)
    model = foreground.calibrate(values.reshape(-1), w, b)
    return model, np.asarray(foreground.foreground(jnp.asarray(first), model))


def _bank(config: ml_collections.ConfigDict, raw: list[np.ndarray], params: dict | None, stats: dict | None) -> dict:
    """Unit-length reference descriptors of every training image, per scale, filled in place batch by
    batch (a CPU device shares their memory)."""
    if params is None:
        run = compilation.jit(lambda maps: [windowed.normalise(m) for m in maps])
    else:
        run = compilation.jit(lambda maps: lrb_training.describe(config, params, stats, maps))
    bank = compilation.in_fixed_batches_on_host(run, raw, config.batch_size)
    return {f"scale{s}": jax.device_put(b, may_alias=True) for s, b in enumerate(bank)}


def memory_need(config: ml_collections.ConfigDict, backbone: Backbone, n_images: int) -> tuple[int, str, str]:
    """(bytes, what, keys that lower it) of what a fit holds at once: the training images (collected
    in place; a CPU device shares them), every tap's maps and the reference bank of every scale (both
    filled in place, held once) and a batch's backbone pass; training the local branch adds the
    foreground maps at image size, the validation split's synthetic queries with their references'
    maps, and one training step (the backbone pass of its pairs and the branches' forward and
    backward). Measured peaks stay below it (README, Guarantees)."""
    h, w = _memory.image_hw(config)
    scales = _scales(config)
    cells = {t: _memory.cells(config, backbone, t) for t in config.taps}
    floats = n_images * h * w * 3
    floats += sum(n_images * cells[t] * backbone.taps[t].channels for t in config.taps)
    floats += sum(n_images * cells[t] * (config.lrb_width if config.use_lrb else backbone.taps[t].channels)
                  for t in scales)
    need = _memory.forward_bytes(config, backbone, tuple(config.taps))
    if config.use_lrb:
        n_val = len(loop.hold_out(n_images, config.val_fraction, config.seed)[1])
        floats += n_images * h * w + n_val * h * w * 4
        floats += sum(n_val * (1 + config.val_refs) * cells[t] * backbone.taps[t].channels for t in scales)
        pairs = 2 * config.train_batch_size
        need += _memory.forward_bytes(config, backbone, tuple(config.taps), pairs) + pairs * h * w * 3 * 4 * _memory.FLOAT32
        need += sum(lrb_training.branch_step_bytes(config, backbone.taps[t].channels, cells[t]) for t in scales)
    need += floats * _memory.FLOAT32
    what = (f"CPR's training images, maps and reference bank ({n_images} images), its local branch's "
            "training and a batch's backbone pass")
    keys = "--config.image_size, --config.train_images, --config.lrb_width, --config.train_batch_size or --config.batch_size"
    return need, what, keys


def fit(
    config: ml_collections.ConfigDict,
    batches: Iterable[Batch],
    backbone: Backbone,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Global codebook and histograms, foreground model, trained local branches, reference bank."""
    _check(config, backbone)
    images = loop.collect_images(batches, progress)
    n = len(images)
    raw = extract(config, backbone, images)
    first = raw[0]
    centres = retrieval.kmeans(jnp.asarray(sample_pixels(first, config.kmeans_samples, config.seed)), config.clusters,
                               jax.random.key(config.seed), config.kmeans_restarts)
    hists = compilation.jit(retrieval.histograms, static_argnums=2)(jnp.asarray(first), centres, config.blocks)
    state: dict = {"centres": centres, "histograms": hists, "fingerprints": jnp.asarray(first.mean((1, 2)))}

    fg_maps = np.ones(first.shape[:3], np.float32)
    if config.use_feb:
        model, fg_maps = _fit_foreground(config, first)
        state["foreground"] = model._asdict()
        state["foreground_maps"] = jnp.asarray(fg_maps)

    scales = [raw[config.taps.index(t)] for t in _scales(config)]
    params = stats = None
    if config.use_lrb:
        train_ids, val_ids = loop.hold_out(n, config.val_fraction, config.seed)
        distances = np.asarray(retrieval.robust_kl(hists, hists, config.drop_blocks))
        if not config.use_grb:  # no global ranking: every other training image is a candidate reference
            distances = np.zeros_like(distances)
        neighbours = neighbour_table(distances, train_ids, config.top_k, exclude_self=True)
        data = {"images": jax.device_put(images, may_alias=True), "neighbours": jnp.asarray(neighbours, jnp.int32),
                "foreground": postprocess.anomaly_maps(jnp.asarray(fg_maps), images.shape[1:3], 0.0),
                "backbone": backbone.variables}
        if config.texture_dir:
            data["textures"] = jnp.asarray(load_textures(config.texture_dir, images.shape[1], config.max_textures))
        else:
            data["textures"] = anomalies.texture_bank(jax.random.key(config.seed + 4), config.procedural_textures,
                                                      images.shape[1])
        val = None
        if len(val_ids):
            val_neighbours = neighbour_table(distances[val_ids], train_ids, config.val_refs, exclude_self=False)
            val = lrb_training.validation_set(config, backbone, data, val_ids, val_neighbours)
        workdir = Path(config.workdir) if "workdir" in config else None
        params, stats, summary = lrb_training.run(config, backbone, data, [m.shape[-1] for m in scales],
                                                  train_ids, val, workdir, mesh)
        state.update(params=params, batch_stats=stats,
                     validation={k: np.float32(v) for k, v in summary.items()})
    state["bank"] = _bank(config, scales, params, stats)
    return state


# ---------------------------------------------------------------- predict


def retrieve(config: ml_collections.ConfigDict, state: dict, first: jax.Array) -> jax.Array:
    """Indices [B, K] of the training images whose block histograms are closest (robust KL) to
    the queries' (raw stride-4 features [B, h, w, C]); a training image never retrieves itself."""
    n = state["histograms"].shape[0]
    if not config.use_grb:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (first.shape[0], n))
    hists = retrieval.histograms(first, state["centres"], config.blocks)
    distances = retrieval.robust_kl(hists, state["histograms"], config.drop_blocks)
    exclude = retrieval.same_image(first.mean((1, 2)), state["fingerprints"]) if config.exclude_self else None
    k = max(1, min(config.top_k, n - 1 if config.exclude_self else n))
    return retrieval.top_k(distances, k, exclude)


def fused_foreground(state: dict, first: jax.Array, neighbours: jax.Array, size: tuple[int, int]) -> jax.Array:
    """F* [B, H, W]: elementwise max of the query's and its references' foreground maps (upsampled)."""
    model = foreground.Linear(**state["foreground"])
    maps = jnp.concatenate([foreground.foreground(first, model)[:, None], state["foreground_maps"][neighbours]], 1)
    B, M = maps.shape[:2]
    up = postprocess.anomaly_maps(maps.reshape(B * M, *maps.shape[2:]), size, 0.0)
    return jnp.max(up.reshape(B, M, *size), axis=1)


def predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] → (image scores [B], pixel maps [B, H, W]); jit with config/backbone bound.

    On a single CPU device the images go through one at a time: a whole batch's window stacks and
    image-sized maps overflow the caches; at batch 16 one at a time gave CPR-Faster 1.8× the
    throughput (BENCHMARKS.md, cpr-speed-mvtec_bottle-cpu). On GPU/TPU the batch is one computation."""
    return compilation.in_small_batches_on_cpu(partial(_predict, config, backbone, state), images, 1)


def _predict(config: ml_collections.ConfigDict, backbone: Backbone, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    size = images.shape[1:3]
    maps = lrb_training.cascade_maps(config, backbone, state["backbone"], images)
    first = maps[config.taps[0]]
    neighbours = retrieve(config, state, first)
    raw = [maps[t] for t in _scales(config)]
    if config.use_lrb:
        query = lrb_training.describe(config, state["params"], state["batch_stats"], raw)
    else:
        query = [windowed.normalise(m) for m in raw]
    bank = [state["bank"][f"scale{i}"] for i in range(len(raw))]
    scores = lrb_training.local_scores(config, query, bank, neighbours)
    pixel = postprocess.anomaly_maps(scores, size, 0.0)
    if config.use_feb:
        pixel = pixel * fused_foreground(state, first, neighbours, size)
    pixel = postprocess.gaussian_blur(pixel, config.blur_sigma)
    top = jax.lax.top_k(pixel.reshape(pixel.shape[0], -1), min(config.top_pixels, size[0] * size[1]))[0]
    return jnp.sum(top, -1), pixel
