"""Contrastive training of the local retrieval branch on synthetic (query, reference) pairs.

A pair is a training image with a synthetic anomaly (the query) and one of its global neighbours
(the reference). Three kinds of point pairs are drawn per image: positives (a normal query pixel
and the same pixel of the reference), anomalous negatives (an anomalous pixel and the same pixel)
and remote negatives (a query pixel and a reference pixel further than θ apart, weighted by how
different the frozen backbone finds them). The loss pulls positives above cosine m⁺ and pushes
negatives below m⁻, with a power p that focuses on the worst pairs.

Model selection uses a held-out split of the TRAINING images with fixed synthetic anomalies: the
pixel AUROC of the local scores against the synthetic masks; the test set is never seen.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxad import features, postprocess
from jaxad.backbones import Backbone
from jaxad.data import anomalies
from jaxad.distances import windowed
from jaxad.eval import metrics as jaxad_metrics
from jaxad.nets import cpr_local
from jaxad.runtime import compilation, parallel
from jaxad.train import loop

HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- model


def init_branches(config: ml_collections.ConfigDict, channels: list[int], key: jax.Array) -> tuple[dict, dict]:
    """(params, batch_stats) of one LRB per scale, keyed 'scale0', 'scale1', ..."""
    params, stats = {}, {}
    for i, (c, k) in enumerate(zip(channels, jax.random.split(key, len(channels)))):
        v = compilation.init(cpr_local.LocalRetrievalBranch(config.lrb_width), k, jnp.zeros((1, 4, 4, c), jnp.float32),
                             train=False)
        params[f"scale{i}"], stats[f"scale{i}"] = v["params"], v["batch_stats"]
    return params, stats


PROBE_CELLS = 16  # side of the grid a branch's training step is compiled on to measure its memory
_step_bytes: dict[tuple[int, int, int], float] = {}  # (width, channels, maps) → XLA bytes per grid cell


def branch_step_bytes(config: ml_collections.ConfigDict, channels: int, cells: int) -> int:
    """Host memory of one training step of a scale's branch on a CPU (forward in training mode,
    BatchNorm statistics and backward over the 2·``train_batch_size`` maps of its pairs, ``cells``
    grid cells each): XLA's buffers, measured by compiling the step on a PROBE_CELLS² grid and
    scaled per cell; 0 on an accelerator, where they take device memory."""
    if jax.default_backend() != "cpu":
        return 0
    maps = 2 * config.train_batch_size
    key = (config.lrb_width, channels, maps)
    if key not in _step_bytes:
        net = cpr_local.LocalRetrievalBranch(config.lrb_width)
        shape = (maps, PROBE_CELLS, PROBE_CELLS, channels)
        variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(shape[1:])[None], train=False))

        def loss(params, stats, x):
            out, _ = net.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out)

        step = jax.jit(jax.value_and_grad(loss), compiler_options=compilation.cpu_options() or None)
        analysis = step.lower(variables["params"], variables["batch_stats"],
                              jax.ShapeDtypeStruct(shape, jnp.float32)).compile().memory_analysis()
        used = 0 if analysis is None else analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        _step_bytes[key] = used / PROBE_CELLS**2
    return int(_step_bytes[key] * cells)


def describe(config: ml_collections.ConfigDict, params: dict, batch_stats: dict, maps: list[jax.Array]) -> list[jax.Array]:
    """Unit-length LRB descriptors [B, h, w, D] of each scale's backbone map (BatchNorm in eval mode)."""
    net = cpr_local.LocalRetrievalBranch(config.lrb_width)
    return [windowed.normalise(net.apply({"params": params[f"scale{i}"], "batch_stats": batch_stats[f"scale{i}"]}, m, train=False))
            for i, m in enumerate(maps)]


# ---------------------------------------------------------------- point pairs and loss


def sample_points(key: jax.Array, weights: jax.Array, n: int) -> jax.Array:
    """n pixel coordinates [n, 2] (row, col) drawn with replacement ∝ weights [S, S] (uniform when
    the weights are all zero; the caller then gives those pairs zero weight)."""
    flat = weights.reshape(-1)
    flat = jnp.where(flat.sum() > 0, flat, jnp.ones_like(flat))
    idx = jax.random.choice(key, flat.shape[0], (n,), p=flat / flat.sum())
    return jnp.stack(jnp.unravel_index(idx, weights.shape), -1)


def uniform_points(key: jax.Array, size: int, n: int) -> jax.Array:
    """n pixel coordinates [n, 2] of an size×size image, uniform with replacement. Not
    :func:`sample_points` with constant weights: XLA would constant-fold their cumulative sum at
    every compilation, for seconds at 320 px."""
    idx = jax.random.randint(key, (n,), 0, size * size)
    return jnp.stack(jnp.unravel_index(idx, (size, size)), -1)


def bilinear_sample(fmap: jax.Array, points: jax.Array, size: int) -> jax.Array:
    """Values of fmap [h, w, C] at image pixels points [n, 2] of an S×S image, as torch grid_sample
    (align_corners=False, zero padding) with u = p·w/(S − 1) − 0.5 (the reference code's mapping)."""
    h, w = fmap.shape[:2]
    u = points[:, 0].astype(jnp.float32) * h / (size - 1) - 0.5
    v = points[:, 1].astype(jnp.float32) * w / (size - 1) - 0.5
    y0, x0 = jnp.floor(u), jnp.floor(v)
    out = 0.0
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = y0 + dy, x0 + dx
        weight = (1 - jnp.abs(u - y)) * (1 - jnp.abs(v - x))
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        value = fmap[jnp.clip(y, 0, h - 1).astype(jnp.int32), jnp.clip(x, 0, w - 1).astype(jnp.int32)]
        out = out + (weight * inside)[:, None] * value
    return out


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of matching rows of a, b [..., C]."""
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-8)


def contrastive_loss(cos_pos: jax.Array, v: jax.Array, cos_neg: jax.Array, w: jax.Array,
                     m_pos: float, m_neg: float, power: float) -> jax.Array:
    """Σ(max(0, m⁺ − cos)·v)^p / max(1, #pos) + Σ(max(0, cos − m⁻)·w)^p / max(1, #(w > 0))."""
    pos = jnp.sum((jax.nn.relu(m_pos - cos_pos) * v) ** power) / jnp.maximum(1.0, jnp.sum(v > 0))
    neg = jnp.sum((jax.nn.relu(cos_neg - m_neg) * w) ** power) / jnp.maximum(1.0, jnp.sum(w > 0))
    return pos + neg


def point_pairs(config: ml_collections.ConfigDict, key: jax.Array, mask: jax.Array, fg_q: jax.Array,
                fg_r: jax.Array) -> dict:
    """Γ positive, Γ anomalous and Γ remote point pairs of one (query, reference) pair of S×S images."""
    size, n = mask.shape[0], config.pairs_per_type
    k_pos, k_anom, k_rq, k_rr = jax.random.split(key, 4)
    normal = 1.0 - mask
    pos = sample_points(k_pos, normal * jnp.maximum(fg_q, fg_r), n)
    anom = sample_points(k_anom, mask, n)
    rq = uniform_points(k_rq, size, n)
    rr = sample_points(k_rr, jnp.maximum(fg_q, fg_r), n)
    theta = config.remote_distance * size / 320.0
    far = jnp.linalg.norm((rq - rr).astype(jnp.float32), axis=-1) > theta
    has_pos = jnp.sum(normal * jnp.maximum(fg_q, fg_r)) > 0
    return {"pos": pos, "anom": anom, "remote_q": rq, "remote_r": rr,
            "v": jnp.full((n,), has_pos, jnp.float32),
            "w_anom": jnp.full((n,), mask.sum() > 0, jnp.float32), "far": far.astype(jnp.float32)}


def pair_loss(config: ml_collections.ConfigDict, desc_q: jax.Array, desc_r: jax.Array, raw_q: jax.Array,
              raw_r: jax.Array, pairs: dict, size: int) -> jax.Array:
    """Loss of one image at one scale: LRB maps desc_q/desc_r [h, w, D], frozen backbone maps
    raw_q/raw_r [h, w, C] (for the remote weights)."""
    sample = partial(bilinear_sample, size=size)
    cos_pos = cosine(sample(desc_q, pairs["pos"]), sample(desc_r, pairs["pos"]))
    cos_anom = cosine(sample(desc_q, pairs["anom"]), sample(desc_r, pairs["anom"]))
    cos_remote = cosine(sample(desc_q, pairs["remote_q"]), sample(desc_r, pairs["remote_r"]))
    if config.texture:
        w_remote = jnp.zeros_like(pairs["far"])
    elif config.remote_weighting:
        d2 = jnp.sum((sample(raw_q, pairs["remote_q"]) - sample(raw_r, pairs["remote_r"])) ** 2, -1) * pairs["far"]
        w_remote = jax.lax.stop_gradient(d2 / jnp.maximum(jnp.sum(d2) / jnp.maximum(jnp.sum(pairs["far"]), 1.0), 1e-12))
    else:
        w_remote = pairs["far"]
    cos_neg = jnp.concatenate([cos_anom, cos_remote])
    w = jnp.concatenate([pairs["w_anom"], w_remote])
    return contrastive_loss(cos_pos, pairs["v"], cos_neg, w, config.margin_pos, config.margin_neg, config.power)


# ---------------------------------------------------------------- data of a step


def make_pairs(config: ml_collections.ConfigDict, key: jax.Array, data: dict, idx: jax.Array) -> tuple:
    """Synthetic queries for images ``idx`` and a random global neighbour of each as reference:
    (queries, references, masks, fg of query sources, fg of references), all [B, S, S(, 3)]."""
    k_ref, k_syn, k_aug = jax.random.split(key, 3)
    choice = jax.random.randint(k_ref, idx.shape, 0, data["neighbours"].shape[1])
    ref = data["neighbours"][idx, choice]
    fg_q, fg_r = data["foreground"][idx], data["foreground"][ref]
    p_texture = 1.0 if config.texture else config.p_texture
    synth = jax.vmap(lambda k, im, fg: anomalies.synthesize(k, im, fg > 0.5, data["textures"],
                                                           config.p_anomaly, p_texture))
    queries, masks = synth(jax.random.split(k_syn, idx.shape[0]), data["images"][idx], fg_q)
    augment = jax.vmap(partial(anomalies.augment, p=config.p_augment))
    k_q, k_r = jax.random.split(k_aug)
    queries = augment(jax.random.split(k_q, idx.shape[0]), queries)
    refs = augment(jax.random.split(k_r, idx.shape[0]), data["images"][ref])
    return queries, refs, masks, fg_q, fg_r


def batch_indices(config: ml_collections.ConfigDict, step: jax.Array, train_ids: jax.Array) -> jax.Array:
    """Images of optimiser step ``step``: seeded epoch permutations of ``train_ids`` cut into batches;
    a function of the step alone, so a resumed run sees the same batches."""
    count = train_ids.shape[0]
    size = min(config.train_batch_size, count)
    per_epoch = count // size
    order = jax.random.permutation(jax.random.fold_in(jax.random.key(config.seed), step // per_epoch), count)
    picked = jax.lax.dynamic_slice(order, ((step % per_epoch) * size,), (size,))
    return train_ids[picked]


def cascade_maps(config: ml_collections.ConfigDict, backbone: Backbone, variables: dict,
                 images: jax.Array) -> dict[str, jax.Array]:
    """The backbone maps every branch of the cascade reads, float32, per tap of ``config.taps``.

    ``aggregate`` > 1 replaces each location by the mean of its k×k in-image neighbours, so that a
    cell describes its surroundings as PatchCore's do (1: the paper's raw maps)."""
    maps = backbone.apply(variables, images, tuple(config.taps))
    return {t: features.local_average(m.astype(jnp.float32), config.aggregate, count_padding=False)
            for t, m in maps.items()}


def backbone_maps(config: ml_collections.ConfigDict, backbone: Backbone, variables: dict, images: jax.Array) -> list[jax.Array]:
    """Frozen backbone maps of the scales in use, float32, no gradient."""
    maps = cascade_maps(config, backbone, variables, images)
    return [jax.lax.stop_gradient(maps[t]) for t in scale_taps(config)]


def scale_taps(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The taps the cascade searches: both, or only the stride-4 one when multi_scale is off."""
    return tuple(config.taps) if config.multi_scale else tuple(config.taps[:1])


def training_loss(config, backbone: Backbone, params: dict, batch_stats: dict, data: dict, key: jax.Array,
                  idx: jax.Array, shard: Callable = lambda tree: tree) -> tuple[jax.Array, tuple[dict, dict]]:
    """Loss of one step, summed over scales; returns (loss, (new batch_stats, metrics)).

    ``shard`` places the synthesised pairs (e.g. :func:`jaxad.runtime.parallel.along_batch`): everything
    after it runs data-parallel."""
    k_pairs, k_points = jax.random.split(key)
    queries, refs, masks, fg_q, fg_r = shard(make_pairs(config, k_pairs, data, idx))
    B, size = queries.shape[0], queries.shape[1]
    raw = backbone_maps(config, backbone, data["backbone"], jnp.concatenate([queries, refs]))
    pairs = jax.vmap(partial(point_pairs, config))(jax.random.split(k_points, B), masks, fg_q, fg_r)
    net = cpr_local.LocalRetrievalBranch(config.lrb_width)
    loss, new_stats = 0.0, {}
    for i, m in enumerate(raw):
        name = f"scale{i}"
        out, updated = net.apply({"params": params[name], "batch_stats": batch_stats[name]}, m, train=True,
                                 mutable=["batch_stats"])  # query and reference in one BatchNorm batch
        new_stats[name] = updated["batch_stats"]
        per_image = jax.vmap(partial(pair_loss, config, size=size))(out[:B], out[B:], m[:B], m[B:], pairs)
        loss = loss + jnp.mean(per_image)
    return loss, (new_stats, {"loss": loss, "anomalous_fraction": jnp.mean(masks.sum((1, 2)) > 0)})


# ---------------------------------------------------------------- validation


def validation_set(config: ml_collections.ConfigDict, backbone: Backbone, data: dict, val_ids: np.ndarray,
                   val_neighbours: np.ndarray) -> dict:
    """Fixed synthetic anomalies on held-out training images (every one anomalous), with the frozen
    backbone maps of the queries and of their nearest training references, computed once,
    ``batch_size`` images at a time."""
    ids = jnp.asarray(val_ids)
    synth = jax.vmap(lambda k, im, fg: anomalies.synthesize(k, im, fg > 0.5, data["textures"], 1.0,
                                                           1.0 if config.texture else config.p_texture))
    keys = jax.random.split(jax.random.key(config.seed + 7), len(val_ids))
    queries, masks = compilation.jit(synth)(keys, data["images"][ids], data["foreground"][ids])
    run = compilation.jit(lambda x: backbone_maps(config, backbone, data["backbone"], x))
    extract = partial(compilation.in_fixed_batches_on_host, run, batch_size=config.batch_size)
    refs = val_neighbours.reshape(-1)
    return {"queries": extract(queries), "refs": extract(data["images"][jnp.asarray(refs)]), "masks": masks,
            "neighbours": jnp.arange(len(refs), dtype=jnp.int32).reshape(val_neighbours.shape)}


def local_scores(config: ml_collections.ConfigDict, query: list[jax.Array], bank: list[jax.Array],
                 neighbours: jax.Array) -> jax.Array:
    """Windowed search per scale, scales resized to the first grid and summed → [B, h0, w0]."""
    grid = query[0].shape[1:3]
    total = 0.0
    for i, (q, b) in enumerate(zip(query, bank)):
        d = windowed.windowed_min_distance(q, b, neighbours, config.windows[i], config.search_chunk)
        total = total + postprocess.anomaly_maps(d, grid, 0.0)
    return total


def validation_maps(config: ml_collections.ConfigDict, params: dict, batch_stats: dict, val: dict) -> jax.Array:
    """Local scores of the validation queries, upsampled to the image: [n_val, S, S].

    Each query is described and searched with its own references only, a few queries at a time
    (one on a CPU), so that the descriptors and window stacks of the whole validation split are
    never held at once: at width 384 they grew by about 17 MB per validation image."""
    n_val, n_refs = val["neighbours"].shape
    size = val["masks"].shape[1:3]
    refs = [r.reshape(n_val, n_refs, *r.shape[1:]) for r in val["refs"]]  # stored query by query

    def one(item: tuple[list[jax.Array], list[jax.Array]]) -> jax.Array:
        queries, references = item
        q = describe(config, params, batch_stats, [x[None] for x in queries])
        r = describe(config, params, batch_stats, references)
        scores = local_scores(config, q, r, jnp.arange(n_refs, dtype=jnp.int32)[None])
        return postprocess.anomaly_maps(scores, size, 0.0)[0]

    group = 1 if jax.default_backend() == "cpu" else config.batch_size
    return jax.lax.map(one, (val["queries"], refs), batch_size=min(group, n_val))


# ---------------------------------------------------------------- the loop


def optimiser(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW(lr, weight decay, β = (0.9, 0.999)), no schedule (the reference code)."""
    return optax.adamw(config.learning_rate, b1=0.9, b2=0.999, weight_decay=config.weight_decay)


def init_state(config: ml_collections.ConfigDict, channels: list[int], key: jax.Array) -> dict:
    """Train state: branches, optimiser, step count, and the best-on-validation branches so far."""
    params, stats = init_branches(config, channels, key)
    return {"params": params, "batch_stats": stats, "opt": optimiser(config).init(params),
            "step": jnp.zeros((), jnp.int32), "best": {"params": params, "batch_stats": stats},
            "best_auroc": jnp.array(-jnp.inf, jnp.float32), "best_step": jnp.zeros((), jnp.int32),
            "last_auroc": jnp.array(jnp.nan, jnp.float32)}


def _validated(state: dict, value: float) -> dict:
    """Record the validation AUROC of the current branches; keep them if it is the best yet."""
    better = bool(np.isfinite(value)) and value > float(state["best_auroc"])
    # placed like the value it replaces: a differently placed scalar would recompile the step
    value = jax.device_put(jnp.float32(value), state["last_auroc"].sharding)
    if not better:
        return {**state, "last_auroc": value}
    best = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return {**state, "best": best, "best_auroc": value, "best_step": state["step"], "last_auroc": value}


def make_step(config: ml_collections.ConfigDict, backbone: Backbone, data: dict, train_ids: jax.Array,
              val: dict | None, mesh: Mesh | None = None) -> Callable:
    """The ``(state, batch, key) -> (state, metrics)`` for :func:`jaxad.train.loop.train`: one jitted
    optimiser step, then, every ``validate_every`` steps, the validation pixel AUROC (maps on the
    device, the ranking on the host).

    Everything the step reads (images, foreground maps, neighbours, textures, backbone weights)
    stays on the device (replicated over ``mesh``, whose devices each take a slice of the pairs)."""
    frozen = ml_collections.FrozenConfigDict(config)
    shard = (lambda tree: tree) if mesh is None else parallel.along_batch(mesh)
    if mesh is not None:
        data, train_ids, val = parallel.replicate((data, train_ids, val), mesh)

    @compilation.jit
    def update(state, key, data, train_ids):
        idx = batch_indices(frozen, state["step"], train_ids)
        grad_fn = jax.value_and_grad(partial(training_loss, frozen, backbone, shard=shard), has_aux=True)
        (_, (stats, metrics)), grads = grad_fn(state["params"], state["batch_stats"], data, key, idx)
        updates, opt = optimiser(frozen).update(grads, state["opt"], state["params"])
        state = {**state, "params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                 "opt": opt, "step": state["step"] + 1}
        return state, metrics

    maps = compilation.jit(partial(validation_maps, frozen))

    def step(state, _batch, key):
        state, metrics = update(state, key, data, train_ids)
        if val is None:
            return state, metrics
        done = int(state["step"])
        if done % config.validate_every == 0 or done == config.train_steps:
            scores = np.asarray(maps(state["params"], state["batch_stats"], val))
            state = _validated(state, jaxad_metrics.pixel_auroc(scores, np.asarray(val["masks"]) > 0.5))
        return state, {**metrics, "val_auroc": state["last_auroc"]}

    return step


def run(config: ml_collections.ConfigDict, backbone: Backbone, data: dict, channels: list[int],
        train_ids: np.ndarray, val: dict | None, workdir: Path | None,
        mesh: Mesh | None = None) -> tuple[dict, dict, dict]:
    """Train (data-parallel over ``mesh``, default: the devices that divide the pair batch);
    returns (params, batch_stats, summary) of the selected branches (best validation AUROC when
    there is a validation set and ``select='best'``, else the last)."""
    key_init, key_train = jax.random.split(jax.random.key(config.seed + 1))
    if mesh is None:
        mesh = parallel.training_mesh(min(config.train_batch_size, len(train_ids)))
    step = make_step(config, backbone, data, jnp.asarray(train_ids), val, mesh)
    state = parallel.replicate(init_state(config, channels, key_init), mesh)
    state, history = loop.train(
        step, state, itertools.repeat(None), config.train_steps, key_train,
        checkpoint_dir=None if workdir is None else workdir / "train", checkpoint_every=config.checkpoint_every,
        desc="cpr", log_every=config.validate_every, run=loop.run_identity(config.to_dict()))
    use_best = val is not None and config.select == "best" and bool(np.isfinite(float(state["best_auroc"])))
    chosen = state["best"] if use_best else {"params": state["params"], "batch_stats": state["batch_stats"]}
    summary = {"best_auroc": float(state["best_auroc"]), "best_step": int(state["best_step"]),
               "last_auroc": float(state["last_auroc"]), "selected_step": int(state["best_step"] if use_best else state["step"])}
    if workdir is not None:
        record = {"select": config.select, "n_train": int(len(train_ids)), **summary, "history": history}
        (workdir / "train_history.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return chosen["params"], chosen["batch_stats"], summary
