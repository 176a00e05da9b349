"""Dataset layouts, image decoding and the batch loader, on tiny folders built per test."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxad.data import (
    Batch,
    Sample,
    find_categories,
    iterate_batches,
    loader,
    num_batches,
    open_dataset,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
)
from jaxad.data.images import load_sample
from jaxad.errors import DataError

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"
RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)
    return path


def _mask(path: Path, h: int = 12, w: int = 10, box: tuple[slice, slice] = (slice(2, 6), slice(3, 7))) -> Path:
    m = np.zeros((h, w), np.uint8)
    m[box] = 255
    return _save(path, m)


def _png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit grey or RGB PNG written by hand (PIL cannot write 48-bit RGB)."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def make_mvtec(root: Path, n_train: int = 3, defects: tuple[str, ...] = ("crack",), n_defect: int = 2) -> Path:
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", _rgb())
    for i in range(2):
        _save(root / "test" / "good" / f"{i:03d}.png", _rgb())
    for d in defects:
        for i in range(n_defect):
            _save(root / "test" / d / f"{i:03d}.png", _rgb())
            _mask(root / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


# --------------------------------------------------------------------------- layouts
def test_mvtec_ad_layout(tmp_path):
    root = make_mvtec(tmp_path / "bottle", defects=("crack", "broken"))
    (root / "train" / "good" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _save(root / "train" / "good" / "UPPER.JPG", _rgb())
    ds = open_dataset(root)
    assert (ds.name, ds.layout, ds.validation) == ("bottle", "mvtec_ad", ())
    assert [p.path.name for p in ds.train] == ["000.png", "001.png", "002.png", "UPPER.JPG"]
    assert [(s.defect, s.label, s.path.name) for s in ds.test] == [
        ("broken", 1, "000.png"), ("broken", 1, "001.png"), ("crack", 1, "000.png"), ("crack", 1, "001.png"),
        ("good", 0, "000.png"), ("good", 0, "001.png"),
    ]
    assert ds.test[0].mask_paths == (root / "ground_truth" / "broken" / "000_mask.png",)
    assert all(s.mask_paths == () for s in ds.test if s.label == 0)
    assert open_dataset(root) == ds  # deterministic


def test_mvtec_loco_layout_merges_masks(tmp_path):
    root = make_mvtec(tmp_path / "pushpins", defects=())
    _save(root / "validation" / "good" / "000.png", _rgb())
    for cls in ("logical_anomalies", "structural_anomalies"):
        _save(root / "test" / cls / "000.png", _rgb())
        _mask(root / "ground_truth" / cls / "000" / "000.png", box=(slice(0, 2), slice(0, 2)))
        _mask(root / "ground_truth" / cls / "000" / "001.png", box=(slice(8, 12), slice(5, 10)))
    ds = open_dataset(root)
    assert ds.layout == "mvtec_loco"
    assert len(ds.validation) == 1 and ds.validation[0].label == 0
    assert [s.defect for s in ds.test] == ["good", "good", "logical_anomalies", "structural_anomalies"]
    logical = ds.test[2]
    assert len(logical.mask_paths) == 2
    _, mask = load_sample(logical.path, logical.mask_paths, (12, 10), (12, 10))
    assert mask.sum() == 4 + 20 and mask[0, 0] and mask[11, 9]


def test_btad_layout(tmp_path):
    root = tmp_path / "01"
    _save(root / "train" / "ok" / "0000.bmp", _rgb())
    _save(root / "test" / "ok" / "0000.bmp", _rgb())
    _save(root / "test" / "ko" / "0001.bmp", _rgb())
    _mask(root / "ground_truth" / "ko" / "0001.png")
    ds = open_dataset(root)
    assert ds.layout == "btad"
    assert [(s.defect, s.label) for s in ds.test] == [("ko", 1), ("good", 0)]
    assert ds.test[0].mask_paths == (root / "ground_truth" / "ko" / "0001.png",)


def test_plain_folder_with_test_folder(tmp_path):
    for i in range(3):
        _save(tmp_path / "normal" / f"{i}.jpg", _rgb())
    _save(tmp_path / "check" / "good" / "a.png", _rgb())
    _save(tmp_path / "check" / "dent" / "b.png", _rgb())
    _save(tmp_path / "check" / "c.png", _rgb())
    ds = open_dataset(tmp_path / "normal", test_dir=tmp_path / "check")
    assert ds.layout == "folder" and len(ds.train) == 3
    assert [(s.path.name, s.label, s.defect) for s in ds.test] == [("b.png", 1, "dent"), ("a.png", 0, "good"), ("c.png", -1, "unknown")]
    assert all(s.mask_paths == () for s in ds.test)


def test_find_categories(tmp_path):
    make_mvtec(tmp_path / "b_cat")
    make_mvtec(tmp_path / "a_cat")
    (tmp_path / "notes").mkdir()
    assert find_categories(tmp_path) == [tmp_path / "a_cat", tmp_path / "b_cat"]
    assert find_categories(tmp_path / "a_cat") == [tmp_path / "a_cat"]


# --------------------------------------------------------------------------- bad input
def _raises(match_path: Path, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert str(match_path) in message and "\n" not in message
    return message


def test_missing_folder(tmp_path):
    _raises(tmp_path / "nope", open_dataset, tmp_path / "nope")
    _raises(tmp_path / "nope", find_categories, tmp_path / "nope")


def test_empty_train_folder_lists_extensions(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cat" / "train" / "good" / "readme.txt").write_text("x")
    message = _raises(tmp_path / "cat" / "train" / "good", open_dataset, tmp_path / "cat")
    assert ".png" in message and ".tiff" in message


def test_no_train_folder_and_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", open_dataset, tmp_path / "empty")
    (tmp_path / "odd" / "train" / "normal").mkdir(parents=True)
    _raises(tmp_path / "odd" / "train", open_dataset, tmp_path / "odd")


def test_missing_mask(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    message = _raises(root / "test" / "crack" / "001.png", open_dataset, root)
    assert "001_mask.png" in message


def test_missing_test_folder(tmp_path):
    _save(tmp_path / "train" / "a.png", _rgb())
    _raises(tmp_path / "nope", open_dataset, tmp_path / "train", test_dir=tmp_path / "nope")


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a PNG", "truncated"])
def test_unreadable_images(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        _save(path, _rgb(64, 64))
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    message = _raises(path, read_image, path)
    assert "cannot read image" in message
    _raises(path, read_mask, path)


def test_missing_image_file(tmp_path):
    _raises(tmp_path / "gone.png", read_image, tmp_path / "gone.png")


def test_mask_size_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "img.png", _rgb(12, 10))
    mask = _mask(tmp_path / "img_mask.png", 8, 8)
    message = _raises(mask, load_sample, image, (mask,), (4, 4), (4, 4))
    assert str(image) in message and "8x8" in message and "10x12" in message


def test_worker_errors_reach_the_consumer_unwrapped(tmp_path):
    good = [Sample(_save(tmp_path / f"{i}.png", _rgb()), 0, "good") for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(DataError, match="bad.png"):
        list(iterate_batches(good + [Sample(bad, 0, "good")], (8, 8), 2))


# --------------------------------------------------------------------------- odd but valid images
def test_eight_bit_modes_read_as_rgb(tmp_path):
    rgb = _rgb(7, 13)
    expected = rgb.astype(np.float32) / 255
    for name, mode in [("rgb.png", None), ("rgb.bmp", None), ("rgb.tif", None), ("rgba.png", "RGBA")]:
        img = read_image(_save(tmp_path / name, rgb, mode))
        assert img.shape == (7, 13, 3) and img.dtype == np.float32
        np.testing.assert_array_equal(img, expected)  # alpha dropped, colour kept
    grey = read_image(_save(tmp_path / "grey.png", rgb, "L"))
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.fromarray(rgb).convert("L")) / np.float32(255))
    for name, mode in [("la.png", "LA"), ("p.png", "P"), ("bw.png", "1"), ("cmyk.jpg", "CMYK"), ("rgb.jpg", None)]:
        path = _save(tmp_path / name, rgb, mode)
        np.testing.assert_allclose(read_image(path), np.asarray(Image.open(path).convert("RGB")) / 255, atol=1e-6)


def test_sixteen_bit_scaled_by_bit_depth(tmp_path):
    values = np.array([[0, 32768, 65535], [1000, 1000, 1000]], np.uint16)  # image max would mislead
    grey = read_image(_png16(tmp_path / "g16.png", values))
    assert grey.shape == (2, 3, 3)
    np.testing.assert_allclose(grey[..., 1], values / 65535, atol=1e-7)
    tiff = tmp_path / "g16.tif"
    Image.frombytes("I;16B", (3, 2), values.astype(">u2").tobytes()).save(tiff)
    np.testing.assert_allclose(read_image(tiff)[..., 0], values / 65535, atol=1e-7)
    dim = read_image(_png16(tmp_path / "dim.png", np.full((2, 2), 1000, np.uint16)))
    np.testing.assert_allclose(dim, 1000 / 65535, atol=1e-7)
    rgb = read_image(_png16(tmp_path / "rgb16.png", np.stack([values] * 3, -1)))  # PIL keeps 8 of 16 bits
    assert rgb.shape == (2, 3, 3) and rgb[0, 2, 0] == 1.0 and abs(rgb[0, 1, 0] - 0.5) < 1 / 255


def test_float_tiff(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.25, 2.0]], np.float32)).save(path)
    np.testing.assert_allclose(read_image(path)[0, :, 1], [0.0, 0.25, 1.0])


def test_a_float_image_with_nan_or_inf_is_refused_by_name(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan, np.inf]], np.float32)).save(path)
    with pytest.raises(DataError, match=r"nan\.tif: 2 pixel\(s\) are NaN or infinite"):
        read_image(path)


def test_read_mask_thresholds(tmp_path):
    eight = np.array([[0, 127, 128, 255]], np.uint8)
    assert read_mask(_save(tmp_path / "m.png", eight)).tolist() == [[False, False, True, True]]
    assert read_mask(_save(tmp_path / "rgb.png", np.repeat(eight[..., None], 3, -1))).tolist() == [[False, False, True, True]]
    assert read_mask(_save(tmp_path / "bw.png", eight, "1")).tolist() == [[False, False, True, True]]
    sixteen = np.array([[0, 128, 32767, 40000]], np.uint16)  # 8-bit-style thresholds would call 128 set
    assert read_mask(_png16(tmp_path / "m16.png", sixteen)).tolist() == [[False, False, False, True]]


# --------------------------------------------------------------------------- resizing
@pytest.mark.parametrize("size", [(5, 7), (24, 20), (12, 30)])
def test_resize_matches_pil_bilinear(size):
    rgb = _rgb(12, 10)
    expected = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BILINEAR)) / np.float32(255)
    np.testing.assert_array_equal(resize_image(rgb / np.float32(255), size), expected)


def test_resize_keeps_deep_precision_and_skips_same_size():
    img = np.random.default_rng(1).random((12, 10, 3), dtype=np.float32)
    out = resize_image(img, (6, 5))
    expected = np.asarray(Image.fromarray(img[..., 1]).resize((5, 6), Image.BILINEAR))
    np.testing.assert_allclose(out[..., 1], expected, atol=1e-6)
    assert resize_image(img, (12, 10)) is img


def test_resize_mask_nearest():
    mask = np.random.default_rng(2).random((12, 10)) > 0.5
    out = resize_mask(mask, (5, 7))
    expected = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((7, 5), Image.NEAREST)) > 0
    assert out.dtype == bool and out.shape == (5, 7)
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------- loader
def test_batches_are_padded_and_flagged(tmp_path):
    root = make_mvtec(tmp_path / "cat", n_defect=3)  # 5 test images
    ds = open_dataset(root)
    batches = list(iterate_batches(ds.test, (8, 6), 4, mask_size=(4, 3)))
    assert len(batches) == num_batches(len(ds.test), 4) == 2
    last = batches[-1]
    assert isinstance(last, Batch)
    assert last.images.shape == (4, 8, 6, 3) and last.images.dtype == np.float32
    assert last.masks.shape == (4, 4, 3) and last.labels.dtype == np.int32
    assert last.valid.tolist() == [True, False, False, False]
    np.testing.assert_array_equal(last.images[3], last.images[0])
    assert last.paths == (str(ds.test[-1].path),) * 4
    labels = np.concatenate([b.labels[b.valid] for b in batches])
    assert labels.tolist() == [s.label for s in ds.test]
    first = batches[0]
    assert first.masks[:3].sum() > 0 and first.masks[3:].sum() == 0  # crack masks, then a good image
    assert list(iterate_batches(ds.train, (8, 6), 4))[0].masks is None


def test_loader_order_is_deterministic(tmp_path):
    ds = open_dataset(make_mvtec(tmp_path / "cat", n_train=7))
    a = list(iterate_batches(ds.train, (8, 8), 3, workers=2))
    b = list(iterate_batches(ds.train, (8, 8), 3, workers=1, prefetch=0))
    assert [x.paths for x in a] == [x.paths for x in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.images, y.images)
    assert np.concatenate([x.images[x.valid] for x in a]).shape[0] == 7


def test_loader_streams(tmp_path, monkeypatch):
    ds = open_dataset(make_mvtec(tmp_path / "cat", n_train=20))
    reads = []

    def counting(path, *args):
        reads.append(path)
        return load_sample(path, *args)

    monkeypatch.setattr(loader, "load_sample", counting)
    batches = iterate_batches(ds.train, (8, 8), 2, prefetch=1)
    assert reads == []  # nothing read before the first batch is asked for
    next(batches)
    batches.close()
    assert 2 <= len(reads) <= 4 < len(ds.train)


def test_a_stream_knows_its_batch_count_before_reading(tmp_path):
    ds = open_dataset(make_mvtec(tmp_path / "cat", n_train=5))
    assert len(iterate_batches(ds.train, (8, 8), 2)) == 3
    padded = iterate_batches(ds.train, (8, 8), 2, batches=4)  # one batch of padding only
    assert len(padded) == 4 == len(list(padded))


# --------------------------------------------------------------------------- real data
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@pytest.mark.realdata
@needs_shared
def test_real_mvtec_bottle():
    ds = open_dataset(SHARED / "mvtec_bottle")
    assert (ds.layout, len(ds.train), len(ds.test)) == ("mvtec_ad", 209, 83)
    anomalous = [s for s in ds.test if s.label == 1]
    assert len(anomalous) == 63 and all(len(s.mask_paths) == 1 for s in anomalous)
    batch = next(iterate_batches(anomalous, (64, 64), 4, mask_size=(64, 64)))
    assert batch.masks.sum() > 0


@pytest.mark.realdata
@needs_shared
def test_real_magnetic_tile():
    ds = open_dataset(SHARED / "magnetic_tile")
    assert len(ds.train) == 762
    assert sum(s.label == 0 for s in ds.test) == 190 and sum(s.label == 1 for s in ds.test) == 392
    shapes = {read_image(s.path).shape for s in ds.test[::60]}
    assert len(shapes) > 1 and all(len(s) == 3 and s[2] == 3 for s in shapes)
    batch = next(iterate_batches(ds.test, (64, 64), 8, mask_size=(64, 64)))
    assert batch.images.shape == (8, 64, 64, 3) and batch.masks.sum() > 0
