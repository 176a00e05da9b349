"""Ports under non-trivial BatchNorm statistics hold README's bound: max abs difference ≤ 1e-4.

At init BatchNorm is the identity (mean 0, var 1), which hides how float32 rounding grows through a
deep network. Here every BatchNorm gets running mean ∈ [−0.5, 0.5], var ∈ [0.5, 2] and a random
affine part (weight ∈ [0.5, 1], bias ~ 0.1·N(0, 1)), and a 2×128×128 input goes through both
sides, on CPU at full float32. Measured largest differences over all taps: ResNet18 5.4e-6,
WideResNet50-2 7.2e-6 (layer3), DenseNet201 1.7e-5 (denseblock1), EfficientNet-B0 1.1e-6.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import test_backbones_densenet as densenet_tests
import test_backbones_efficientnet as efficientnet_tests
import test_backbones_resnet as resnet_tests

from jaxad import backbones

ATOL = 1e-4
NAMES = ("resnet18", "wide_resnet50_2", "densenet201", "efficientnet_b0")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))


def with_statistics(model, torch, seed: int = 0):
    """BatchNorm statistics as a trained network has them: mean ∈ [−0.5, 0.5], var ∈ [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def reference_taps(name: str, model, torch, x: np.ndarray) -> dict[str, np.ndarray]:
    if name.startswith(("resnet", "wide_resnet")):
        return resnet_tests.torch_taps(model, torch, x, resnet_tests.TAPS)
    if name.startswith("densenet"):
        return densenet_tests.torch_taps(model, torch, x)
    return efficientnet_tests.hooked(model, dict(zip(efficientnet_tests.TAPS, model.features)), torch, x)


def differences(name: str, tmp_path) -> dict[str, float]:
    """max |ours − torchvision| per tap."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = with_statistics(getattr(torchvision.models, name)(weights=None), torch)
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    bb = backbones.load(name, tmp_path / f"{name}.pth")
    x = np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32)
    reference = reference_taps(name, model, torch, x)
    with jax.default_matmul_precision("highest"):
        ours = bb(x, tuple(reference))
    out = {}
    for tap, ref in reference.items():
        diff = float(np.max(np.abs(np.asarray(ours[tap]) - ref)))
        print(f"{name} {tap}: max abs diff {diff:.2e}, max |value| {float(np.max(np.abs(ref))):.3g}")
        out[tap] = diff
    return out


@pytest.mark.port
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ports_hold_the_stated_bound_under_trained_statistics(name, tmp_path):
    for tap, diff in differences(name, tmp_path).items():
        assert diff <= ATOL, f"{name} {tap}: max abs difference {diff:.2e}"
