"""jaxad's PaDiM against anomalib's, on the same backbone weights, channels and training images.

Both sides read EfficientNet-Lite0 (jaxad's bundled weights, renamed to timm's keys for anomalib's
``tf_efficientnet_lite0`` feature extractor) at the taps of jaxad's PaDiM config, keep the same
channel subset, and fit a Gaussian per location on the same images. Their predictions are then
timed interleaved in one process (:func:`jaxad.bench.timing.interleaved_median_seconds`) at each
batch size. Imported only by ``bench.py --anomalib-padim``; anomalib is not a dependency of jaxad
(install it in an environment of its own, e.g. a venv with ``--system-site-packages``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import pipeline
from jaxad.backbones.efficientnet_lite import EXPAND, LITE0
from jaxad.backbones.registry import bundled_weights
from jaxad.backbones.torch_weights import read_state_dict
from jaxad.bench import harness, timing
from jaxad.bench.torch_reference import LITE_STAGES
from jaxad.data import iterate_batches, open_dataset
from jaxad.errors import ConfigError
from jaxad.eval import report
from jaxad.methods import padim

BACKBONE = "efficientnet_lite0"
ROUNDS = 10  # interleaved rounds per batch size, two calls of each contender per round
# torch's intra-op threads for anomalib: every core, and one (on a CPU shared with other jobs, torch's
# spinning worker threads can cost more than they give)
THREADS = tuple(sorted({os.cpu_count() or 1, 1}, reverse=True))


def timm_lite_state(state: Mapping[str, np.ndarray], depths: Sequence[int]) -> dict[str, np.ndarray]:
    """EfficientNet-PyTorch (lukemelas) keys, as jaxad's bundled weights have them → timm's
    ``tf_efficientnet_lite*`` keys."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inner = {  # block layer names in timm: depthwise-separable (expand 1) or inverted residual
        1: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
        6: {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"},
    }
    where = [(s, i) for s, d in enumerate(depths) for i in range(d)]
    out = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            stage, i = where[int(block[1])]
            name = f"blocks.{stage}.{i}.{inner[EXPAND[stage]][block[2]]}.{block[3]}"
        else:
            layer, param = key.split(".", 1)
            name = f"{top[layer]}.{param}"
        out[name] = np.asarray(value)
    return out


def timm_input(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] in [0, 1] → [B, 3, H, W] as timm's Lite models take it ((255·x − 127) / 128, the
    normalisation jaxad's EfficientNet-Lite applies inside its forward)."""
    return np.ascontiguousarray(np.transpose(images * 255.0 - 127.0, (0, 3, 1, 2)) / 128.0, dtype=np.float32)


def anomalib_model(config: ml_collections.ConfigDict, channels: np.ndarray):
    """anomalib's ``PadimModel`` on timm's EfficientNet-Lite0 with jaxad's bundled weights, at the
    config's taps, keeping ``channels`` of the concatenated taps."""
    if config.backbone != BACKBONE or any(t not in LITE_STAGES for t in config.taps):
        raise ConfigError(f"--config.backbone={config.backbone}, taps {tuple(config.taps)}: the anomalib comparison "
                          f"reads {BACKBONE} at {', '.join(LITE_STAGES)}")
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel

    model = PadimModel(backbone=f"tf_{BACKBONE}", layers=[LITE_STAGES[t] for t in config.taps], pre_trained=False,
                       n_features=len(channels))
    state = timm_lite_state(read_state_dict(bundled_weights(BACKBONE)), LITE0["depths"])
    extractor = model.feature_extractor.feature_extractor
    wanted = extractor.state_dict()
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"timm's tf_{BACKBONE}: {len(missing)} tensors not in jaxad's weights, e.g. {missing[:3]}")
    extractor.load_state_dict({k: torch.from_numpy(state[k]) for k in wanted if k in state}, strict=False)
    model.idx = torch.tensor(np.array(channels), dtype=torch.long)
    return model


def anomalib_fit(model, images: np.ndarray, batch_size: int):
    """anomalib's fit: embeddings of every training image in train mode, then one Gaussian per location."""
    import torch

    model.train()
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            model(torch.from_numpy(timm_input(images[s:s + batch_size])))
    model.fit()
    return model.eval()


def _images(samples: Sequence, size: tuple[int, int], batch_size: int) -> np.ndarray:
    out = [np.asarray(b.images)[np.asarray(b.valid)] for b in iterate_batches(samples, size, batch_size)]
    return np.concatenate(out)


def compare(config: ml_collections.ConfigDict, category: Path, train_count: int = 32, batches: Sequence[int] = (1, 16),
            rounds: int = ROUNDS) -> dict[str, Any]:
    """Fit both PaDiMs on the first ``train_count`` training images of ``category``; their image
    scores on test images, and the median seconds of a prediction at each batch size."""
    import torch

    backbone = pipeline.load_backbone(config)
    dataset = open_dataset(category)
    size = pipeline.image_size(config)
    train = _images(dataset.train[:train_count], size, config.batch_size)
    test = _images(dataset.test[:max(batches)], size, config.batch_size)
    if len(test) < max(batches):
        raise ConfigError(f"{category}: {len(test)} test images, fewer than the batch of {max(batches)}")
    state = padim.fit(config, iterate_batches(dataset.train[:train_count], size, config.batch_size), backbone)
    predictor = pipeline.make_predictor(config, backbone, state)
    model = anomalib_fit(anomalib_model(config, np.asarray(state["channels"])), train, config.batch_size)

    def anomalib_predict(x, threads: int = THREADS[0]):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(x).pred_score.reshape(-1)

    jaxad_scores = np.asarray(predictor(jnp.asarray(test))[0])
    anomalib_scores = anomalib_predict(torch.from_numpy(timm_input(test))).numpy()
    rows = []
    for b in batches:
        x = jax.device_put(jnp.asarray(test[:b]))
        xt = torch.from_numpy(timm_input(test[:b]))
        contenders = {"jaxad": lambda x=x: predictor(x),
                      **{f"anomalib_{t}t": lambda xt=xt, t=t: anomalib_predict(xt, t) for t in THREADS}}
        seconds = timing.interleaved_median_seconds(contenders, rounds)
        best = min(seconds[f"anomalib_{t}t"] for t in THREADS)
        rows.append({"batch": b, "jaxad_ms": 1e3 * seconds["jaxad"],
                     **{f"anomalib_{t}t_ms": 1e3 * seconds[f"anomalib_{t}t"] for t in THREADS},
                     "speedup": best / seconds["jaxad"]})
    return {"rows": rows, "train_images": len(train), "channels": len(state["channels"]), "image_size": size,
            "score_correlation": float(np.corrcoef(jaxad_scores, anomalib_scores)[0, 1]),
            "score_max_rel_diff": float(np.max(np.abs(jaxad_scores - anomalib_scores) / np.abs(anomalib_scores)))}


def section(result: Mapping[str, Any], category: str, command: str, note: str = "") -> str:
    """Markdown of :func:`compare`."""
    h, w = result["image_size"]
    lines = [
        f"## PaDiM: jaxad against anomalib on {category}, milliseconds per prediction", "",
        *report.provenance(command, harness.machine()), "",
        (f"Both sides: {BACKBONE} with jaxad's bundled weights (timm's tf_{BACKBONE} for anomalib), taps stage1, "
         f"stage2, stage4 (timm out_indices {', '.join(str(v) for v in LITE_STAGES.values() if v < 4)}), "
         f"the same {result['channels']} channels, {h}×{w} px, one Gaussian per location fitted on the same "
         f"{result['train_images']} training images; a prediction is image scores and {h}×{w} anomaly maps "
         "(σ = 4 blur). Timed interleaved in one process (median per call, inputs already in memory); "
         "anomalib_Nt: anomalib with N torch threads (jaxad's XLA uses every core); speedup = the faster anomalib / "
         "jaxad. anomalib's feature extractor runs timm's whole feature model, as anomalib ships it. "
         f"Image scores of the two on the first test images: correlation {result['score_correlation']:.6f}, "
         f"largest relative difference {result['score_max_rel_diff']:.2e}."), "",
        report.markdown_table(list(result["rows"]), list(result["rows"][0]), floatfmt=".4g"),
        "", *([note, ""] if note else []),
    ]
    return "\n".join(lines)


def write_comparison(out: Path, command: str, config: ml_collections.ConfigDict, category: Path,
                     section_name: str | None = None, train_count: int = 32, note: str = "") -> str:
    """Run :func:`compare` on ``category`` and write section ``section_name`` (default
    ``padim-anomalib-CATEGORY``) of ``out``."""
    name = section_name or f"padim-anomalib-{Path(category).resolve().name}"
    result = compare(config, Path(category), train_count)
    harness.write_section(Path(out), name, section(result, Path(category).resolve().name, command, note))
    return name
