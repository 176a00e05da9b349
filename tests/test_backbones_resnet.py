"""ResNet ports: every tap against torchvision (and timm's naming) with random weights, to 1e-4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import backbones
from jaxad.backbones import resnet
from jaxad.errors import WeightsError

TAPS = ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")


def test_the_forward_stops_at_the_deepest_tap():
    module = resnet.ResNet(**resnet.VARIANTS["resnet50"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), taps=("layer1",)))
    assert "layer1_0" in shapes["params"] and not any(k.startswith("layer2") for k in shapes["params"])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))


def randomised(model, torch, seed: int = 0):
    """Random BN statistics and affine parameters, so BN is not the identity it is at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def torch_taps(model, torch, x: np.ndarray, taps) -> dict[str, np.ndarray]:
    """Every tap of a torchvision/timm ResNet on NHWC ``x`` in [0, 1], as NHWC arrays."""
    mean, std = torch.tensor(resnet.MEAN).view(1, 3, 1, 1), torch.tensor(resnet.STD).view(1, 3, 1, 1)
    h = (torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std
    out = {}
    with torch.no_grad():
        relu = model.relu if hasattr(model, "relu") else model.act1  # timm calls it act1
        h = relu(model.bn1(model.conv1(h)))
        out["conv1"] = h
        h = model.maxpool(h)
        out["maxpool"] = h
        for i in range(1, 5):
            h = getattr(model, f"layer{i}")(h)
            out[f"layer{i}"] = h
    return {t: out[t].permute(0, 2, 3, 1).numpy() for t in taps}


def assert_taps_match(bb, reference: dict[str, np.ndarray], x: np.ndarray, atol: float = 1e-4):
    with jax.default_matmul_precision("highest"):
        ours = bb(x, tuple(reference))
    for tap, ref in reference.items():
        diff = float(np.max(np.abs(np.asarray(ours[tap]) - ref)))
        assert diff <= atol * max(1.0, float(np.max(np.abs(ref)))), f"{bb.name} {tap}: max abs diff {diff}"


@pytest.mark.port
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "wide_resnet50_2",
                                  pytest.param("wide_resnet101_2", marks=pytest.mark.slow)])
def test_torchvision_parity(name, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = randomised(getattr(torchvision.models, name)(weights=None), torch)
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    bb = backbones.load(name, tmp_path / f"{name}.pth")
    x = np.random.default_rng(0).random((2, 72, 88, 3), dtype=np.float32)  # odd grid sizes at stride 16/32
    assert_taps_match(bb, torch_taps(model, torch, x, TAPS), x)


@pytest.mark.port
def test_timm_wide_resnet50_naming(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    model = randomised(timm.create_model("wide_resnet50_2", pretrained=False), torch, seed=1)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    bb = backbones.load("wide_resnet50_2", tmp_path / "timm.pth")
    x = np.random.default_rng(1).random((1, 64, 64, 3), dtype=np.float32)
    assert_taps_match(bb, torch_taps(model, torch, x, ("layer2", "layer3")), x)


@pytest.mark.port
def test_weights_of_another_architecture_are_refused_naming_the_first_bad_keys(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError) as err:
        backbones.load("resnet50", tmp_path / "r18.pth")
    message = str(err.value)
    assert "r18.pth" in message and "77 of the 265 tensors it needs found" in message
    assert "165 missing: layer1.0.conv3.weight," in message and "and 160 more" in message
    assert "23 mis-shaped: layer1.0.conv1.weight (64, 64, 3, 3)" in message
