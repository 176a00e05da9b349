"""TFDS builders for MVTec AD, MVTec LOCO and BTAD that work without TensorFlow installed.

TFDS encodes an image feature through TensorFlow only when it is given a numpy array; a file path
or encoded bytes are stored as they are. So each example carries the image file's path when the
file already is 8-bit grey or RGB PNG/JPEG/BMP, and PNG bytes encoded here with PIL otherwise
(palette, alpha, CMYK, 16-bit — stored quantised to 8 bits); masks (merged for LOCO, all-zero for
good images) are PNG bytes too. Records are written as ``array_record`` and read with
``builder.as_data_source()``, which decodes with PIL (or OpenCV when installed); the default
``tfrecord`` format and ``as_dataset()`` would need TensorFlow.

The data cannot be downloaded automatically: ``manual_dir`` is the extracted dataset, holding one
folder per category. Each category is a builder config; a folder whose name is not an official
category is read with a config made on the fly (see :func:`load_split`). TFDS 4.9.10 imports the
``importlib_resources`` package for builders defined inside a package without declaring it
(tensorflow/datasets#11212), so it has to be installed alongside.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxad.data.images import merge_masks, open_image, resize_image, resize_mask, to_rgb
from jaxad.data.layouts import Sample, open_dataset
from jaxad.data.loader import Batch, stream
from jaxad.errors import ConfigError, DataError

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
BTAD_CATEGORIES = ("01", "02", "03")


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "mask": tfds.features.Image(shape=(None, None, 1)),  # 0 / 255
        "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
        "defect": tfds.features.Text(),  # "good" or the defect folder's name
        "filename": tfds.features.Text(),  # relative to the category folder
    })


def _png(img: Image.Image) -> bytes:
    """PNG bytes at low compression: TFDS's own PIL path uses level 6, many times slower on noisy images."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decodes_alike(img: Image.Image, path: Path) -> bool:
    """Whether PIL, OpenCV and TensorFlow all decode the file itself to these 8-bit grey or RGB pixels."""
    if img.mode not in ("RGB", "L") or img.format not in ("PNG", "JPEG", "BMP"):
        return False
    if img.format != "PNG":
        return True
    with open(path, "rb") as f:
        return f.read(25)[24] == 8  # IHDR bit depth: PIL reads 16-bit RGB as 8-bit, OpenCV does not


def _encodable_image(img: Image.Image, path: Path) -> Path | bytes:
    """The file itself when every decoder agrees on it, else 8-bit RGB PNG bytes."""
    if _decodes_alike(img, path):
        return path
    pixels = to_rgb(img, path)
    return _png(pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.rint(pixels * 255).astype(np.uint8)))


class _ManualDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One category of a dataset in MVTec-like layout, read from ``manual_dir/<category>``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    SPLITS: tuple[str, ...] = ("train", "test")
    DESCRIPTION = HOMEPAGE = CITATION = ""
    LICENSE: str | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=_features(), homepage=self.HOMEPAGE,
            citation=self.CITATION, license=self.LICENSE, disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        dataset = open_dataset(Path(dl_manager.manual_dir) / self.builder_config.name)
        return {split: self._generate_examples(dataset.root, getattr(dataset, split)) for split in self.SPLITS}

    def _generate_examples(self, root: Path, samples: Sequence[Sample]) -> Iterator[tuple[str, dict[str, Any]]]:
        for s in samples:
            img = open_image(s.path)
            mask = merge_masks(s.mask_paths, s.path, (img.height, img.width))
            name = s.path.relative_to(root).as_posix()
            yield name, {
                "image": _encodable_image(img, s.path),
                "mask": _png(Image.fromarray(mask.astype(np.uint8) * 255)),
                "label": s.label,
                "defect": s.defect,
                "filename": name,
            }


def _configs(names: Sequence[str]) -> list[tfds.core.BuilderConfig]:
    return [tfds.core.BuilderConfig(name=n) for n in names]


class MvtecAd(_ManualDirBuilder):
    """MVTec AD: 15 categories of objects and textures with pixel-precise defect masks."""

    BUILDER_CONFIGS = _configs(MVTEC_AD_CATEGORIES)
    DESCRIPTION = "MVTec AD: defect-free training images and annotated defective test images, 15 categories."
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    CITATION = (
        "@inproceedings{bergmann2019mvtec, title={MVTec AD -- A Comprehensive Real-World Dataset for "
        "Unsupervised Anomaly Detection}, author={Bergmann, Paul and Fauser, Michael and Sattlegger, David "
        "and Steger, Carsten}, booktitle={CVPR}, year={2019}}"
    )
    LICENSE = "CC BY-NC-SA 4.0"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download mvtec_anomaly_detection.tar.xz from https://www.mvtec.com/company/research/datasets/mvtec-ad "
        "(registration required), extract it, and pass the folder holding bottle/, cable/, ... as manual_dir."
    )


class MvtecLoco(_ManualDirBuilder):
    """MVTec LOCO AD: structural and logical anomalies; an image's several masks are merged into one."""

    BUILDER_CONFIGS = _configs(MVTEC_LOCO_CATEGORIES)
    SPLITS = ("train", "validation", "test")
    DESCRIPTION = "MVTec LOCO AD: structural and logical anomalies in 5 categories; masks merged per image."
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-loco"
    CITATION = (
        "@article{bergmann2022beyond, title={Beyond Dents and Scratches: Logical Constraints in Unsupervised "
        "Anomaly Detection and Localization}, author={Bergmann, Paul and Batzner, Kilian and Fauser, Michael "
        "and Sattlegger, David and Steger, Carsten}, journal={IJCV}, volume={130}, pages={947--969}, year={2022}}"
    )
    LICENSE = "CC BY-NC-SA 4.0"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download mvtec_loco_anomaly_detection.tar.xz from https://www.mvtec.com/company/research/datasets/mvtec-loco "
        "(registration required), extract it, and pass the folder holding breakfast_box/, juice_bottle/, ... as manual_dir."
    )


class Btad(_ManualDirBuilder):
    """BTAD (beanTech): three industrial products; ``ok`` images become ``good``, ``ko`` is the defect."""

    BUILDER_CONFIGS = _configs(BTAD_CATEGORIES)
    DESCRIPTION = "BTAD: beanTech anomaly detection dataset, 3 products with defect masks."
    HOMEPAGE = "https://github.com/pankajmishra000/VT-ADL"
    CITATION = (
        "@inproceedings{mishra2021vtadl, title={VT-ADL: A Vision Transformer Network for Image Anomaly "
        "Detection and Localization}, author={Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and "
        "Piciarelli, Claudio and Foresti, Gian Luca}, booktitle={ISIE}, year={2021}}"
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download BTAD (btad.zip, linked from https://github.com/pankajmishra000/VT-ADL), extract it, and pass "
        "the folder holding 01/, 02/, 03/ as manual_dir."
    )


BUILDERS: dict[str, type[_ManualDirBuilder]] = {"mvtec_ad": MvtecAd, "mvtec_loco": MvtecLoco, "btad": Btad}


def load_split(
    name: str,
    category: str,
    split: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
) -> Sequence[dict[str, Any]]:
    """A random-access data source of one split, prepared from ``manual_dir`` on first use.

    ``category`` may be any folder of ``manual_dir`` in the dataset's layout, not only an official one.
    """
    if name not in BUILDERS:
        raise ConfigError(f"unknown TFDS dataset {name!r}; use one of {', '.join(BUILDERS)}")
    cls = BUILDERS[name]
    official = {c.name for c in cls.BUILDER_CONFIGS}
    config = category if category in official else tfds.core.BuilderConfig(name=category)
    builder = cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if manual_dir is not None:
        folder = Path(manual_dir) / category
        if not folder.is_dir():
            raise DataError(f"{folder}: category folder not found; pass as manual_dir the folder holding the extracted categories")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    elif not builder.is_prepared():
        raise DataError(f"{builder.data_dir}: {name}/{category} is not prepared; pass manual_dir, the extracted dataset's folder")
    return builder.as_data_source(split=split)


def iterate_source_batches(
    source: Sequence[dict[str, Any]],
    image_size: tuple[int, int],
    batch_size: int,
    mask_size: tuple[int, int] | None = None,
    workers: int = 2,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """The records of a data source as the padded :class:`Batch` es ``iterate_batches`` gives (paths relative)."""

    def load(i: int) -> tuple[np.ndarray, np.ndarray | None, int, str]:
        record = source[i]
        image = resize_image(record["image"].astype(np.float32) / np.float32(255), image_size)
        mask = None if mask_size is None else resize_mask(record["mask"][..., 0] > 127, mask_size)
        return image, mask, int(record["label"]), record["filename"].decode()

    return stream(len(source), load, batch_size, workers, prefetch)
