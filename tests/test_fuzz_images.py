"""Hostile and broken image files: every one is read correctly or refused with a DataError naming it.

Hypothesis draws a small valid image (PNG, JPEG, TIFF or BMP; RGB, grey, palette, RGBA, 1-bit,
16-bit, float; 1×1 upwards), then breaks its bytes: truncation, bit flips, zeroed runs, an empty
file, or a misleading extension. A crash, a hang (the deadline), any other exception or an array
outside [0, 1] fails the test. The default run draws a few dozen cases; the ``slow`` one draws more.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxad.data import images
from jaxad.data.images import MAX_IMAGE_PIXELS, load_sample, read_image, read_mask
from jaxad.errors import DataError

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
MODES = {  # the modes each format writes
    "PNG": ("RGB", "L", "P", "RGBA", "LA", "1", "I;16"),
    "JPEG": ("RGB", "L", "CMYK"),
    "TIFF": ("RGB", "L", "P", "RGBA", "1", "I;16", "F", "CMYK"),
    "BMP": ("RGB", "L", "P", "1"),
}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")
FUZZ = dict(deadline=timedelta(seconds=20), suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def encode(fmt: str, mode: str, h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@st.composite
def valid_files(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(MODES[fmt]))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    return fmt, encode(fmt, mode, h, w, draw(st.integers(0, 3)))


def damaged(draw, data: bytes, damage: str) -> bytes:
    """``data`` after one kind of byte-level damage (truncate, flip, zero_run, empty; others: unchanged)."""
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            flipped[i] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    elif damage == "zero_run":
        start = draw(st.integers(0, len(data) - 1))
        data = data[:start] + bytes(draw(st.integers(1, 64))) + data[start + 64:]
    elif damage == "empty":
        data = b""
    return data


@st.composite
def broken_files(draw) -> tuple[str, bytes]:
    """(extension, bytes): a valid file, then one kind of damage."""
    fmt, data = draw(valid_files())
    ext = FORMATS[fmt]
    damage = draw(st.sampled_from(["none", "truncate", "flip", "zero_run", "empty", "extension", "garbage"]))
    data = damaged(draw, data, damage)
    if damage == "extension":
        ext = draw(st.sampled_from([e for e in FORMATS.values() if e != ext]))
    elif damage == "garbage":
        data = draw(st.binary(max_size=256))
    return ext, data


def check(ext: str, data: bytes) -> None:
    """The contract: a valid [H,W,3] float32 image in [0, 1], or one DataError line naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzzed{ext}"
        path.write_bytes(data)
        for read in (read_image, lambda p: load_sample(p, [], (8, 8), (8, 8))[0], read_mask):
            try:
                out = read(path)
            except DataError as e:
                assert str(path) in str(e) and "\n" not in str(e)
                continue
            assert out.ndim in (2, 3) and out.size > 0
            if out.dtype != bool:
                assert out.dtype == np.float32 and out.shape[-1] == 3
                assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@given(valid_files())
@settings(max_examples=30, **FUZZ)
def test_valid_files_of_every_format_and_mode_read(case):
    fmt, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"ok{FORMATS[fmt]}"
        path.write_bytes(data)
        img = read_image(path)
        with Image.open(path) as ref:
            assert img.shape == (ref.height, ref.width, 3) and img.dtype == np.float32


@given(broken_files())
@settings(max_examples=60, **FUZZ)
def test_broken_files_read_or_fail_by_name(case):
    check(*case)


@pytest.mark.slow
@given(broken_files())
@settings(max_examples=1500, **FUZZ)
def test_broken_files_read_or_fail_by_name_many(case):
    check(*case)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w×h pixels and holds a few bytes of compressed data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(8193, 8192), (100_000, 100_000), (2**31 - 1, 1)])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, w, h):
    def no_decoding(self):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(images.ImageFile.ImageFile, "load", no_decoding)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(w, h))
    with pytest.raises(DataError, match="pixels") as e:
        read_image(path)
    assert str(path) in str(e.value)


def test_largest_allowed_image_is_decoded(tmp_path):
    """The bound refuses nothing at the limit: a (cheap, all-black) 8192×8192 PNG reads."""
    assert MAX_IMAGE_PIXELS == 8192 * 8192
    path = tmp_path / "big.png"
    Image.new("L", (8192, 8192)).save(path)
    assert read_mask(path).shape == (8192, 8192)


def test_extension_does_not_matter(tmp_path):
    """A PNG named .jpg is read by its content, as PIL does."""
    data = encode("PNG", "RGB", 5, 7, 0)
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "a.jpg").write_bytes(data)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), read_image(tmp_path / "a.jpg"))
