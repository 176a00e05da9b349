"""The torch side of the backbone benchmark computes what jaxad's side does, no more."""

import pytest

pytestmark = pytest.mark.port
PORT = "needs torch, torchvision and timm: pip install -e '.[test,port]' && python -m pytest -m port"
torch = pytest.importorskip("torch", reason=PORT)
pytest.importorskip("timm", reason=PORT)
pytest.importorskip("torchvision", reason=PORT)

from jaxad.bench import torch_reference  # noqa: E402  (after the skips: it needs torch)


def _channels_computed(model: torch.nn.Module, modules, size: int = 64) -> list[int]:
    seen = []
    for m in modules:
        m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[1]))
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    return seen


def test_the_lite_extractor_stops_at_the_deepest_tap():
    # timm's features_only model alone runs every block (to 320 channels at stride 32)
    model = torch_reference._extractor("efficientnet_lite0", ("stage2", "stage4"))
    assert _channels_computed(model, model.blocks)[-1] == 112
    outputs = model(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outputs] == [(40, 8, 8), (112, 4, 4)]


def test_weight_bytes_grow_with_the_deepest_tap():
    for name, shallow, deep in (("efficientnet_lite0", "stage2", "stage4"), ("resnet18", "layer2", "layer3")):
        assert 0 < torch_reference.weight_bytes(name, (shallow,)) < torch_reference.weight_bytes(name, (shallow, deep))
