"""EfficientNet-B0…B4 ports: every tap against torchvision's own forward (hooks on ``model.features``)
with random weights, timm's naming from a .safetensors file, and a wrong file that names its keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_backbones_resnet import randomised

from jaxad import backbones
from jaxad.backbones import efficientnet, layers
from jaxad.errors import WeightsError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet normalisation
ATOL = 1e-4
TAPS = tuple(f"features.{i}" for i in range(9))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))


def test_the_forward_stops_at_the_deepest_tap():
    module = efficientnet.EfficientNet(*efficientnet.SCALES["efficientnet_b0"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), taps=("features.2",)))
    built = set(shapes["params"])
    assert {"stem_conv", "stage1_0", "stage2_0", "stage2_1"} <= built
    assert not any(k.startswith(("stage3", "stage4", "stage5", "stage6", "stage7", "head")) for k in built)


def test_default_weights_name_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="efficientnet_b0_rwightman"):
        backbones.load("efficientnet_b0")


@pytest.mark.parametrize("size,stride", [(9, 1), (9, 2), (10, 2)])
def test_symmetric_depthwise_matches_the_grouped_convolution(size, stride):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size + 3, 4)), jnp.float32)
    shift = layers.DepthwiseConv(5, stride, impl="shift", symmetric=True)
    grouped = layers.DepthwiseConv(5, stride, impl="grouped", symmetric=True)
    variables = shift.init(jax.random.PRNGKey(0), x)
    a, b = shift.apply(variables, x), grouped.apply(variables, x)
    assert a.shape == (2, (size - 1) // stride + 1, (size + 2) // stride + 1, 4)  # torch: (n + 2·2 − 5) // s + 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def hooked(model, modules: dict, torch, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of ``modules`` during the reference model's own forward on NHWC ``x`` in [0, 1], as NHWC."""
    out = {}
    handles = [m.register_forward_hook(lambda _m, _i, y, tap=tap: out.__setitem__(tap, y.permute(0, 2, 3, 1).numpy()))
               for tap, m in modules.items()]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        model((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std)
    for handle in handles:
        handle.remove()
    return out


def assert_taps_match(bb, reference: dict[str, np.ndarray], x: np.ndarray) -> None:
    """Every tap: same shape, stride and channels as the registry says, and within ATOL (absolute)."""
    with jax.default_matmul_precision("highest"):
        ours = bb(x, TAPS)
    for tap, ref in reference.items():
        stride, channels = bb.taps[tap]
        assert ref.shape == (x.shape[0], -(-x.shape[1] // stride), -(-x.shape[2] // stride), channels), tap
        assert ours[tap].shape == ref.shape, tap
        diff = float(np.max(np.abs(np.asarray(ours[tap]) - ref)))
        assert diff <= ATOL, f"{bb.name} {tap}: max abs diff {diff}"


@pytest.mark.port
@pytest.mark.parametrize("name,shapes", [
    ("efficientnet_b0", [(1, 64, 64, 3), (2, 72, 88, 3)]),
    pytest.param("efficientnet_b1", [(2, 72, 88, 3)], marks=pytest.mark.slow),
    pytest.param("efficientnet_b2", [(2, 72, 88, 3)], marks=pytest.mark.slow),
    pytest.param("efficientnet_b3", [(2, 72, 88, 3)], marks=pytest.mark.slow),
    ("efficientnet_b4", [(2, 72, 88, 3)]),
])
def test_torchvision_parity(name, shapes, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = randomised(getattr(torchvision.models, name)(weights=None), torch)
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    bb = backbones.load(name, tmp_path / f"{name}.pth")
    for shape in shapes:  # 72×88: odd grids from stride 8 on, where padding and rounding show
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        assert_taps_match(bb, hooked(model, dict(zip(TAPS, model.features)), torch, x), x)


def _save_timm(model, torch, path_stem) -> str:
    """The state dict as .safetensors (the format timm publishes) when that package is here, else .pth."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, f"{path_stem}.pth")
        return f"{path_stem}.pth"
    save_file(state, f"{path_stem}.safetensors")
    return f"{path_stem}.safetensors"


@pytest.mark.port
def test_timm_naming_matches_timm(tmp_path):
    """timm builds the same network (same eps, padding, rounding) under its own names; bn1/bn2 include SiLU."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    model = randomised(timm.create_model("efficientnet_b0", pretrained=False), torch, seed=2)
    path = _save_timm(model, torch, tmp_path / "b0")
    modules = {"features.0": model.bn1, **{f"features.{i}": b for i, b in enumerate(model.blocks, start=1)},
               "features.8": model.bn2}
    x = np.random.default_rng(2).random((1, 64, 64, 3), dtype=np.float32)
    assert_taps_match(backbones.load("efficientnet_b0", path), hooked(model, modules, torch, x), x)


@pytest.mark.port
def test_a_wrong_file_names_every_bad_key(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.efficientnet_b0(weights=None).state_dict()
    del state["features.1.0.block.1.fc1.weight"]
    state["features.3.0.block.3.0.weight"] = torch.zeros(40, 144, 3, 3)
    state["features.9.0.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError) as error:
        backbones.load("efficientnet_b0", tmp_path / "wrong.pth")
    message = str(error.value)
    assert "wrong.pth" in message
    for key in ("missing: features.1.0.block.1.fc1.weight", "unexpected: features.9.0.weight",
                "mis-shaped: features.3.0.block.3.0.weight"):
        assert key in message
