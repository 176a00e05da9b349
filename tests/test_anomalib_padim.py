"""jaxad's PaDiM against anomalib's: the glue (key renames, input layout, the section) always, the
fitted models' agreement where anomalib is installed."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxad import backbones
from jaxad.backbones.efficientnet_lite import LITE0
from jaxad.bench import anomalib_padim
from jaxad.config import load_config
from jaxad.data import Batch
from jaxad.errors import ConfigError
from jaxad.methods import padim


def test_bundled_keys_become_timm_keys():
    state = {k: np.zeros(1, np.float32) for k in ("_conv_stem.weight", "_bn0.running_mean", "_blocks.0._depthwise_conv.weight",
                                                  "_blocks.1._expand_conv.weight", "_blocks.2._bn2.bias",
                                                  "_blocks.3._project_conv.weight", "_fc.bias")}
    renamed = anomalib_padim.timm_lite_state(state, LITE0["depths"])
    # depths (1, 2, ...): block 0 is stage 0 (expand 1), blocks 1-2 stage 1, block 3 opens stage 2
    assert sorted(renamed) == sorted(["conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight",
                                      "blocks.1.0.conv_pw.weight", "blocks.1.1.bn3.bias", "blocks.2.0.conv_pwl.weight",
                                      "classifier.bias"])


def test_timm_input_is_channels_first_and_normalised_as_the_lite_forward():
    images = np.full((2, 4, 5, 3), 0.5, np.float32)
    images[0, 1, 2] = (1.0, 0.0, 127.0 / 255.0)
    x = anomalib_padim.timm_input(images)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 1, 2], [1.0, -127.0 / 128.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(x[1, 0, 0, 0], 0.5 / 128.0, atol=1e-6)


def test_a_config_anomalib_cannot_mirror_is_refused_before_anomalib_is_imported():
    config = ml_collections.ConfigDict({"backbone": "resnet18", "taps": ("layer1",)})
    with pytest.raises(ConfigError, match="reads efficientnet_lite0 at stage1"):
        anomalib_padim.anomalib_model(config, np.arange(3))


def test_section_lists_both_sides_per_batch():
    result = {"rows": [{"batch": 1, "jaxad_ms": 20.0, "anomalib_2t_ms": 90.0, "anomalib_1t_ms": 60.0, "speedup": 3.0},
                       {"batch": 16, "jaxad_ms": 200.0, "anomalib_2t_ms": 900.0, "anomalib_1t_ms": 950.0,
                        "speedup": 4.5}],
              "train_images": 8, "channels": 100, "image_size": (256, 256), "score_correlation": 0.999999,
              "score_max_rel_diff": 1e-4}
    text = anomalib_padim.section(result, "bottle", "python scripts/bench.py --anomalib-padim")
    assert "| batch | jaxad_ms | anomalib_2t_ms | anomalib_1t_ms | speedup |" in text
    assert "| 1 | 20 | 90 | 60 | 3 |" in text and "| 16 | 200 | 900 | 950 | 4.5 |" in text
    assert "same 8 training images" in text and "the same 100 channels" in text


@pytest.mark.slow  # anomalib's import and two fits: minutes on a shared CPU
def test_both_padims_give_the_same_image_scores():
    pytest.importorskip("anomalib", reason="anomalib not installed (it is no dependency of jaxad)")
    config = load_config("configs/padim.py")
    config.image_size, config.num_channels, config.batch_size = 64, 40, 4
    backbone = backbones.load(config.backbone, taps=config.taps)
    rng = np.random.default_rng(0)
    train = rng.uniform(size=(6, 64, 64, 3)).astype(np.float32)
    test = rng.uniform(size=(3, 64, 64, 3)).astype(np.float32)
    batches = [Batch(train[s:s + 4], None, np.zeros(len(train[s:s + 4]), np.int32), np.ones(len(train[s:s + 4]), bool),
                     ("x",) * len(train[s:s + 4])) for s in (0, 4)]
    state = padim.fit(config, batches, backbone)
    ours = np.asarray(padim.predict(config, backbone, {"backbone": backbone.variables, **state}, jnp.asarray(test))[0])
    model = anomalib_padim.anomalib_fit(anomalib_padim.anomalib_model(config, np.asarray(state["channels"])),
                                        train, config.batch_size)
    import torch

    with torch.inference_mode():
        theirs = model(torch.from_numpy(anomalib_padim.timm_input(test))).pred_score.reshape(-1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-2)
