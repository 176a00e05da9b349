"""Image and mask files → float RGB arrays and boolean masks, resized like torchvision does.

Reference implementations read ``PIL.Image.open(p).convert("RGB")`` and apply torchvision's
``Resize`` to the PIL image (bilinear, antialiased when shrinking), so 8-bit images are resized
here as uint8 PIL images too: features then match the published numbers. Deeper images (16-bit,
float) keep their precision and are resized per channel as PIL float images with the same filter.
Alpha is dropped (the stored colour is kept, as ``convert("RGB")`` does); EXIF orientation is
ignored, as PIL and torchvision ignore it.

A file's width × height is read from its header and checked against :data:`MAX_IMAGE_PIXELS`
before any pixel is decoded, so a small file declaring a huge image (a decompression bomb) is
refused instead of filling memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from jaxad.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

MAX_IMAGE_PIXELS = 8192 * 8192  # 67 Mpixel, 0.8 GB as float32 RGB; below PIL's own bomb threshold

# A truncated file must fail loudly instead of yielding a partly grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted), for any folder of generic images."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; check the path")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{folder}: no image files ({' '.join(IMAGE_EXTENSIONS)}) found under it")
    return paths


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode a file, so that damaged files fail here, with the file named.
    Images over :data:`MAX_IMAGE_PIXELS` are refused from their header, before decoding."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: image is {img.width}x{img.height} (width x height), over jaxad's limit of "
                                f"{MAX_IMAGE_PIXELS:,} pixels; downscale or tile it before use")
            img.load()
            return img
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the path or restore the file") from None
    except UnidentifiedImageError:
        reason = "not an image, or a format PIL cannot read"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError... on bad data
        reason = " ".join(f"{type(e).__name__}: {e}".split())
    raise DataError(f"{path}: cannot read image ({reason}); re-export or remove the file")


def _convert(img: Image.Image, mode: str, path: str | os.PathLike) -> Image.Image:
    try:
        return img.convert(mode)
    except ValueError:
        raise DataError(f"{path}: colour mode {img.mode} cannot be converted to {mode}; re-export the file as RGB") from None


def _integer_max(img: Image.Image) -> float:
    """Full scale of an integer image's bit depth (never its brightest pixel)."""
    if img.mode.startswith("I;16"):
        return 65535.0
    bits = img.tag_v2.get(258, (16,))[0] if hasattr(img, "tag_v2") else 16  # TIFF BitsPerSample
    return float(2 ** min(bits, 31) - 1)  # mode "I" holds int32


def to_rgb(img: Image.Image, path: str | os.PathLike) -> Image.Image | np.ndarray:
    """An RGB PIL image for 8-bit sources, or an [H,W,3] float32 array in [0,1] for deeper ones.

    16-bit and 32-bit integer greyscale are divided by their bit depth's maximum; float ("F")
    images are taken to hold values in [0,1] and clipped, and must be finite (a NaN would pass the
    clip and turn every score it reaches into NaN). PIL reads 48-bit RGB PNGs as 8-bit RGB.
    """
    if img.mode.startswith("I") or img.mode == "F":
        grey = np.asarray(img, dtype=np.float32)
        if img.mode != "F":
            grey = grey / _integer_max(img)
        elif not np.isfinite(grey).all():
            raise DataError(f"{path}: {int((~np.isfinite(grey)).sum())} pixel(s) are NaN or infinite; "
                            "re-export the image with finite values")
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    return img if img.mode == "RGB" else _convert(img, "RGB", path)


def _to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / np.float32(255)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """[H,W,3] float32 in [0,1] from any PIL-readable image (grey, palette, 16-bit, CMYK, ...)."""
    pixels = to_rgb(open_image(path), path)
    return pixels if isinstance(pixels, np.ndarray) else _to_float(pixels)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize [H,W,3] float32 to ``size`` = (height, width) with PIL bilinear (antialiased).

    Images that are exactly k/255 (8-bit sources) go through a uint8 PIL image, as torchvision's
    ``Resize`` on a PIL image does; others are resized per channel in float.
    """
    img = np.asarray(img, dtype=np.float32)
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    levels = np.rint(img * 255)
    if np.array_equal(levels.astype(np.float32) / np.float32(255), img):
        return _to_float(Image.fromarray(levels.astype(np.uint8)).resize((w, h), Image.BILINEAR))
    channels = [Image.fromarray(np.ascontiguousarray(img[..., c])).resize((w, h), Image.BILINEAR) for c in range(img.shape[-1])]
    return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """[H,W] bool: 8-bit masks are set above 127, integer masks above half their bit depth's maximum."""
    img = open_image(path)
    if img.mode.startswith("I"):
        return np.asarray(img) > _integer_max(img) / 2
    if img.mode == "F":
        return np.asarray(img) > 0.5
    return np.asarray(img if img.mode == "L" else _convert(img, "L", path)) > 127


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an [H,W] bool mask to (height, width), as torchvision on a PIL mask."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST)) > 0


def merge_masks(
    mask_paths: Sequence[str | os.PathLike], image_path: str | os.PathLike, image_size: tuple[int, int]
) -> np.ndarray:
    """Logical OR of an image's masks (several per image in MVTec LOCO) at the image's (height, width)."""
    merged = np.zeros(image_size, dtype=bool)
    for mask_path in mask_paths:
        mask = read_mask(mask_path)
        if mask.shape != merged.shape:
            (mh, mw), (ih, iw) = mask.shape, image_size
            raise DataError(
                f"{mask_path}: mask is {mw}x{mh} (width x height) but its image {image_path} is {iw}x{ih}; "
                "re-export the mask at the image's size"
            )
        merged |= mask
    return merged


def load_sample(
    path: str | os.PathLike,
    mask_paths: Sequence[str | os.PathLike],
    image_size: tuple[int, int],
    mask_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(image [h,w,3] float32 at ``image_size``, merged mask [h,w] bool at ``mask_size`` or None).

    An image without mask files gets an all-false mask.
    """
    img = open_image(path)
    original = (img.height, img.width)
    pixels = to_rgb(img, path)
    if isinstance(pixels, np.ndarray):
        image = resize_image(pixels, image_size)
    else:
        h, w = image_size
        image = _to_float(pixels if pixels.size == (w, h) else pixels.resize((w, h), Image.BILINEAR))
    if mask_size is None:
        return image, None
    if not mask_paths:
        return image, np.zeros(mask_size, dtype=bool)
    return image, resize_mask(merge_masks(mask_paths, path, original), mask_size)
