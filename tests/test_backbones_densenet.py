"""DenseNet ports: every tap against torchvision's forward (hooks on ``model.features``) with random
weights, torchvision's legacy key spelling, timm's naming, and a wrong file that names its keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_backbones_resnet import randomised

from jaxad import backbones
from jaxad.backbones import densenet
from jaxad.errors import WeightsError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet normalisation
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))


def test_taps_have_the_published_strides_and_widths():
    """Widths from the paper's growth rule, as torchvision's classifiers confirm (1024 and 1920 inputs)."""
    small, large = backbones.tap_info("densenet121"), backbones.tap_info("densenet201")
    assert small["features.pool0"] == (4, 64) and small["features.norm5"] == (32, 1024)
    assert large["features.denseblock1"] == (4, 256) and large["features.denseblock2"] == (8, 512)
    assert large["features.transition3"] == (32, 896) and large["features.norm5"] == (32, 1920)
    assert list(large) == ["features.pool0", "features.denseblock1", "features.transition1", "features.denseblock2",
                           "features.transition2", "features.denseblock3", "features.transition3",
                           "features.denseblock4", "features.norm5"]


def test_the_forward_stops_at_the_deepest_tap():
    module = densenet.DenseNet(densenet.VARIANTS["densenet201"])
    images = jnp.zeros((1, 64, 64, 3))
    taps = ("features.denseblock1",)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), images, taps=taps))
    built = set(shapes["params"])
    assert built == {"conv0", "norm0", *(f"denseblock1_denselayer{i}" for i in range(1, 7))}
    out = jax.eval_shape(lambda variables: module.apply(variables, images, taps), shapes)
    assert out["features.denseblock1"].shape == (1, 16, 16, 256)


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
    assert any(".norm.1." in k for k in out) and not any(".norm1." in k for k in out)
    return out


def torch_taps(model, torch, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of the children of ``model.features`` named like jaxad's taps, from the model's own
    forward on NHWC ``x`` in [0, 1], as NHWC arrays in network order."""
    out = {}
    hooks = [child.register_forward_hook(lambda _m, _i, y, tap=f"features.{name}": out.__setitem__(tap, y.clone()))
             for name, child in model.features.named_children()
             if name.startswith(("pool0", "denseblock", "transition", "norm5"))]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        model((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std)
    for hook in hooks:
        hook.remove()
    return {tap: y.permute(0, 2, 3, 1).numpy() for tap, y in out.items()}


def ours(bb, x: np.ndarray, taps) -> dict[str, np.ndarray]:
    # Parity of the port, not of precision modes: accelerators default to TF32 convolutions.
    with jax.default_matmul_precision("highest"):
        return {tap: np.asarray(y) for tap, y in bb(x, tuple(taps)).items()}


def assert_close(label: str, got: dict[str, np.ndarray], reference: dict[str, np.ndarray]):
    for tap, ref in reference.items():
        assert got[tap].shape == ref.shape, (label, tap, got[tap].shape, ref.shape)
        diff = float(np.max(np.abs(got[tap] - ref)))
        print(f"{label} {tap}: max abs diff {diff:.2e} (max |value| {float(np.max(np.abs(ref))):.2f})")
        assert diff <= ATOL, f"{label} {tap}: max abs diff {diff}"


@pytest.mark.port
# 72×88 gives odd grids from stride 8 on (flooring pools); one size each keeps compilation short.
@pytest.mark.parametrize("name, shape", [("densenet121", (1, 64, 64, 3)), ("densenet201", (2, 72, 88, 3))])
@pytest.mark.slow
def test_torchvision_parity_in_both_spellings(name, shape, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)  # the convolutions' random init
    model = randomised(getattr(torchvision.models, name)(weights=None), torch)
    torch.save(model.state_dict(), tmp_path / "modern.pth")
    torch.save(legacy_spelling(model.state_dict()), tmp_path / "legacy.pth")
    bb, legacy = backbones.load(name, tmp_path / "modern.pth"), backbones.load(name, tmp_path / "legacy.pth")
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    reference = torch_taps(model, torch, x)
    assert list(reference) == list(bb.taps)
    got = ours(bb, x, reference)
    assert_close(f"{name} {shape[1]}x{shape[2]}", got, reference)
    for tap, y in ours(legacy, x, reference).items():
        assert np.array_equal(y, got[tap]), tap


@pytest.mark.port
def test_timm_densenet121_naming(tmp_path):
    torch = pytest.importorskip("torch")
    try:
        import timm
    except Exception as e:  # noqa: BLE001  (a broken torchvision raises RuntimeError, not ImportError)
        pytest.skip(f"timm unusable here: {type(e).__name__}: {e}")
    torch.manual_seed(1)
    model = randomised(timm.create_model("densenet121", pretrained=False), torch, seed=1)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    bb = backbones.load("densenet121", tmp_path / "timm.pth")
    x = np.random.default_rng(1).random((1, 64, 64, 3), dtype=np.float32)
    reference = torch_taps(model, torch, x)
    got = ours(bb, x, reference)
    # timm fuses the final ReLU into norm5 (BatchNormAct2d); torchvision's norm5, our tap, precedes it.
    got["features.norm5"] = np.maximum(got["features.norm5"], 0.0)
    assert_close("timm densenet121 64x64", got, reference)


@pytest.mark.port
def test_weights_of_another_architecture_are_refused_counting_every_bad_key(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.densenet121(weights=None).state_dict()
    state["features.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "d121.pth")
    with pytest.raises(WeightsError) as err:
        backbones.load("densenet201", tmp_path / "d121.pth")
    message = str(err.value)
    # what densenet201 needs: its torch state less the classifier head and BN step counters
    needed = {k: v.shape for k, v in torchvision.models.densenet201(weights=None).state_dict().items()
              if not k.startswith("classifier") and not k.endswith("num_batches_tracked")}
    missing = [k for k in needed if k not in state]
    misshaped = [k for k in needed if k in state and state[k].shape != needed[k]]
    assert message.startswith(str(tmp_path / "d121.pth")) and "\n" not in message
    assert f"{len(needed) - len(missing) - len(misshaped)} of the {len(needed)} tensors it needs found" in message
    assert f"{len(missing)} missing: features.denseblock3.denselayer25.norm1.weight," in message
    assert f"and {len(missing) - 5} more" in message
    assert "1 unexpected: features.extra.weight;" in message
    assert f"{len(misshaped)} mis-shaped: features.transition3.norm.weight (1024,)" in message
    assert len(message) < 1500, "a file of another network is summarised, not listed key by key"
