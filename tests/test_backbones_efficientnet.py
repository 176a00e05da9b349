"""EfficientNet-B0…B4 ports: every tap against torchvision, and timm's naming from .safetensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import backbones
from jaxad.backbones import efficientnet, layers, resnet
from test_backbones import write_safetensors
from test_backbones_resnet import assert_taps_match, randomised

TAPS = tuple(f"features.{i}" for i in range(9))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))


def test_the_forward_stops_at_the_deepest_tap():
    module = efficientnet.EfficientNet(*efficientnet.SCALES["efficientnet_b0"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), taps=("features.2",)))
    assert "stage2_1" in shapes["params"] and not any(k.startswith(("stage3", "head")) for k in shapes["params"])


@pytest.mark.parametrize("size,stride", [(9, 1), (9, 2), (10, 2)])
def test_symmetric_depthwise_matches_the_grouped_convolution(size, stride):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size + 3, 4)), jnp.float32)
    shift = layers.DepthwiseConv(5, stride, impl="shift", symmetric=True)
    grouped = layers.DepthwiseConv(5, stride, impl="grouped", symmetric=True)
    variables = shift.init(jax.random.PRNGKey(0), x)
    a, b = shift.apply(variables, x), grouped.apply(variables, x)
    assert a.shape == (2, (size - 1) // stride + 1, (size + 2) // stride + 1, 4)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _nhwc(torch, x: np.ndarray):
    mean, std = torch.tensor(resnet.MEAN).view(1, 3, 1, 1), torch.tensor(resnet.STD).view(1, 3, 1, 1)
    return (torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std


def torchvision_taps(model, torch, x: np.ndarray) -> dict[str, np.ndarray]:
    out, h = {}, _nhwc(torch, x)
    with torch.no_grad():
        for i, stage in enumerate(model.features):
            h = stage(h)
            out[f"features.{i}"] = h.permute(0, 2, 3, 1).numpy()
    return out


@pytest.mark.port
@pytest.mark.parametrize("name", ["efficientnet_b0", pytest.param("efficientnet_b1", marks=pytest.mark.slow),
                                  pytest.param("efficientnet_b2", marks=pytest.mark.slow),
                                  pytest.param("efficientnet_b3", marks=pytest.mark.slow), "efficientnet_b4"])
def test_torchvision_parity(name, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = randomised(getattr(torchvision.models, name)(weights=None), torch)
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    x = np.random.default_rng(0).random((2, 72, 88, 3), dtype=np.float32)
    assert_taps_match(backbones.load(name, tmp_path / f"{name}.pth"), torchvision_taps(model, torch, x), x)


@pytest.mark.port
def test_timm_naming_from_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    model = randomised(timm.create_model("efficientnet_b0", pretrained=False), torch, seed=2)
    write_safetensors(tmp_path / "b0.safetensors", {k: v.numpy() for k, v in model.state_dict().items()})
    x = np.random.default_rng(2).random((1, 64, 64, 3), dtype=np.float32)
    with torch.no_grad():
        h = model.bn1(model.conv_stem(_nhwc(torch, x)))
        reference = {"features.0": h}
        for i, stage in enumerate(model.blocks, start=1):
            h = stage(h)
            reference[f"features.{i}"] = h
        reference["features.8"] = model.bn2(model.conv_head(h))
    reference = {k: v.permute(0, 2, 3, 1).numpy() for k, v in reference.items()}
    assert_taps_match(backbones.load("efficientnet_b0", tmp_path / "b0.safetensors"), reference, x)
