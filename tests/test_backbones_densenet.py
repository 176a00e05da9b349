"""DenseNet ports: every tap against torchvision with random weights, both key spellings, to 1e-4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import backbones
from jaxad.backbones import densenet
from test_backbones_resnet import assert_taps_match, randomised


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))


def test_the_forward_stops_at_the_deepest_tap():
    module = densenet.DenseNet(densenet.VARIANTS["densenet121"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                                taps=("features.denseblock1",)))
    assert "denseblock1_denselayer6" in shapes["params"]
    assert not any(k.startswith(("transition", "denseblock2")) for k in shapes["params"])


def test_legacy_key_spelling_is_renamed():
    state = {"features.denseblock1.denselayer1.norm.1.weight": 1, "features.denseblock3.denselayer12.conv.2.weight": 2,
             "features.transition1.norm.weight": 3}
    assert set(densenet.modern_keys(state)) == {"features.denseblock1.denselayer1.norm1.weight",
                                                "features.denseblock3.denselayer12.conv2.weight",
                                                "features.transition1.norm.weight"}


def legacy_spelling(state: dict) -> dict:
    """The key spelling of torchvision's published DenseNet files: ``denselayerN.norm.1.weight``."""
    out = {}
    for k, v in state.items():
        if ".denselayer" in k:
            for part in ("norm1", "conv1", "norm2", "conv2"):
                k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        out[k] = v
    assert any(".norm.1." in k for k in out)
    return out


def torch_taps(model, torch, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of every child of ``model.features`` named like a jaxad tap (NHWC)."""
    from test_backbones_resnet import resnet

    mean, std = torch.tensor(resnet.MEAN).view(1, 3, 1, 1), torch.tensor(resnet.STD).view(1, 3, 1, 1)
    h = (torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std
    out = {}
    with torch.no_grad():
        for name, child in model.features.named_children():
            h = child(h)
            if name.startswith(("pool0", "denseblock", "transition", "norm5")):
                out[f"features.{name}"] = h.permute(0, 2, 3, 1).numpy()
    return out


@pytest.mark.port
@pytest.mark.parametrize("name", ["densenet121", "densenet201"])
def test_torchvision_parity_in_both_spellings(name, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = randomised(getattr(torchvision.models, name)(weights=None), torch)
    x = np.random.default_rng(0).random((2, 72, 88, 3), dtype=np.float32)
    reference = torch_taps(model, torch, x)
    assert set(reference) == set(densenet.tap_info(densenet.VARIANTS[name]))
    torch.save(model.state_dict(), tmp_path / "modern.pth")
    assert_taps_match(backbones.load(name, tmp_path / "modern.pth"), reference, x)
    torch.save(legacy_spelling(model.state_dict()), tmp_path / "legacy.pth")
    assert_taps_match(backbones.load(name, tmp_path / "legacy.pth"), {"features.denseblock2": reference["features.denseblock2"]}, x)
