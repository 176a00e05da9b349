"""Dataset folders → lists of samples, for the layouts anomaly-detection data comes in.

- MVTec AD (also VisA/MPDD converted to it): ``train/good``, ``test/<defect>``,
  ``ground_truth/<defect>/<stem>_mask.png``.
- MVTec LOCO: adds ``validation/good``; masks are folders ``ground_truth/<defect>/<stem>/*.png``,
  merged when loaded.
- BTAD: ``train/ok``, ``test/{ok,ko}``, ``ground_truth/ko/<stem>.png`` (``ok`` is read as ``good``).
- A plain folder of normal images, optionally with a separate folder of test images.

Only the file lists are built here; pixels are read batch by batch by :mod:`jaxad.data.loader`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jaxad.data.images import IMAGE_EXTENSIONS
from jaxad.errors import DataError

NORMAL_NAMES = {"good": "good", "ok": "good"}  # folder name of normal images → defect name "good"
UNKNOWN = -1  # label of a test image whose class no folder name tells


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous, -1 unknown
    defect: str  # "good" or the defect folder's name
    mask_paths: tuple[Path, ...] = ()  # empty: an all-zero mask


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    layout: str  # "mvtec_ad", "mvtec_loco", "btad" or "folder"
    train: tuple[Sample, ...]
    validation: tuple[Sample, ...]
    test: tuple[Sample, ...]


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_dir()]


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def _normal_samples(folder: Path) -> tuple[Sample, ...]:
    return tuple(Sample(p, 0, "good") for p in _image_files(folder))


def _require_images(folder: Path, samples: tuple[Sample, ...]) -> tuple[Sample, ...]:
    if not samples:
        raise DataError(f"{folder}: no training images (supported: {' '.join(IMAGE_EXTENSIONS)}); add normal images to it")
    return samples


def _mask_paths(image: Path, gt_folder: Path, index: dict[str, tuple[Path, ...]]) -> tuple[Path, ...]:
    masks = index.get(image.stem + "_mask") or index.get(image.stem)
    if not masks:
        raise DataError(
            f"{image}: defective test image has no mask ({gt_folder / (image.stem + '_mask.png')} or "
            f"{gt_folder / image.stem}/*.png); add the mask or move the image out of test/"
        )
    return masks


def _mask_index(gt_folder: Path) -> dict[str, tuple[Path, ...]]:
    """Mask files by stem, and LOCO's per-image mask folders by name."""
    if not gt_folder.is_dir():
        return {}
    index = {p.stem: (p,) for p in _image_files(gt_folder)}
    index.update({d.name: tuple(_image_files(d)) for d in _subdirs(gt_folder)})
    return index


def _test_samples(test: Path, gt_root: Path | None) -> tuple[Sample, ...]:
    """Images in ``test/<class>/``; with ``gt_root`` every defective image must have a mask."""
    samples = []
    for folder in _subdirs(test):
        if folder.name in NORMAL_NAMES:
            samples += _normal_samples(folder)
            continue
        index = _mask_index(gt_root / folder.name) if gt_root is not None else {}
        for p in _image_files(folder):
            masks = _mask_paths(p, gt_root / folder.name, index) if gt_root is not None else ()
            samples.append(Sample(p, 1, folder.name, masks))
    return tuple(samples)


def _test_folder(test_dir: Path) -> tuple[Sample, ...]:
    """A user's test folder: class subfolders (``good``/``ok`` normal) and/or loose images of unknown class."""
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: test folder not found; check the path")
    loose = tuple(Sample(p, UNKNOWN, "unknown") for p in _image_files(test_dir))
    return _test_samples(test_dir, None) + loose


def open_dataset(root: str | os.PathLike, test_dir: str | os.PathLike | None = None) -> Dataset:
    """Read one category's file lists, detecting its layout; ``test_dir`` replaces its test split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; check the path")
    train_dir = root / "train"
    validation: tuple[Sample, ...] = ()
    if train_dir.is_dir():
        normal = next((train_dir / n for n in NORMAL_NAMES if (train_dir / n).is_dir()), None)
        if normal is None:
            raise DataError(
                f"{train_dir}: unknown layout, no good/ (MVTec) or ok/ (BTAD) folder; "
                f"put the normal training images in {train_dir / 'good'}"
            )
        train = _require_images(normal, _normal_samples(normal))
        if (root / "validation" / "good").is_dir():
            layout, validation = "mvtec_loco", _normal_samples(root / "validation" / "good")
        else:
            layout = "btad" if normal.name == "ok" else "mvtec_ad"
        test = _test_samples(root / "test", root / "ground_truth") if (root / "test").is_dir() else ()
    elif _image_files(root):
        layout, train, test = "folder", _normal_samples(root), ()
    else:
        raise DataError(
            f"{root}: no train/ folder and no images; expected {root}/train/good/*.png (MVTec layout) "
            f"or image files ({' '.join(IMAGE_EXTENSIONS)}) directly in it"
        )
    if test_dir is not None:
        test = _test_folder(Path(test_dir))
    return Dataset(root, root.name, layout, train, validation, test)


def find_categories(root: str | os.PathLike) -> list[Path]:
    """``[root]`` when root is a category (or a plain image folder), else its subfolders holding train/."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; check the path")
    if (root / "train").is_dir() or _image_files(root):
        return [root]
    return [d for d in _subdirs(root) if (d / "train").is_dir()] or [root]
