"""TFDS builders: prepare from a tiny manual_dir, read back with as_data_source, no TensorFlow."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_data import _mask, _png16, _rgb, _save, make_mvtec

from jaxad.data import iterate_batches, open_dataset, read_image, tfds_builders
from jaxad.errors import ConfigError, DataError


def test_mvtec_ad_round_trip(tmp_path):
    root = make_mvtec(tmp_path / "manual" / "bottle")
    _save(root / "test" / "good" / "002.png", _rgb(9, 11), "L")  # stored as the file itself
    _save(root / "test" / "good" / "003.png", _rgb(), "P")  # re-encoded as RGB
    _png16(root / "test" / "good" / "004.png", np.full((5, 6), 40000, np.uint16))
    builder = tfds_builders.MvtecAd(config="bottle", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
    source = builder.as_data_source(split="test")
    dataset = open_dataset(root)
    assert len(source) == len(dataset.test) == 7
    for i, sample in enumerate(dataset.test):
        record = source[i]
        assert record["filename"].decode() == sample.path.relative_to(root).as_posix()
        assert (record["label"], record["defect"].decode()) == (sample.label, sample.defect)
        np.testing.assert_allclose(record["image"] / 255, read_image(sample.path), atol=0.5 / 255)
        expected_mask = np.asarray(Image.open(sample.mask_paths[0])) if sample.mask_paths else 0
        np.testing.assert_array_equal(record["mask"][..., 0], np.broadcast_to(expected_mask, record["image"].shape[:2]))
    assert len(builder.as_data_source(split="train")) == 3

    ours = list(tfds_builders.iterate_source_batches(source, (8, 8), 4, mask_size=(4, 4)))
    direct = list(iterate_batches(dataset.test, (8, 8), 4, mask_size=(4, 4)))
    for a, b in zip(ours, direct, strict=True):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_allclose(a.images, b.images, atol=1 / 255)  # the 16-bit image is stored at 8 bits
    assert "tensorflow" not in sys.modules


def test_mvtec_loco_round_trip_with_custom_category(tmp_path):
    root = make_mvtec(tmp_path / "manual" / "my_part", defects=())
    _save(root / "validation" / "good" / "000.png", _rgb())
    _save(root / "test" / "logical_anomalies" / "000.png", _rgb())
    _mask(root / "ground_truth" / "logical_anomalies" / "000" / "000.png", box=(slice(0, 2), slice(0, 2)))
    _mask(root / "ground_truth" / "logical_anomalies" / "000" / "001.png", box=(slice(8, 12), slice(5, 10)))
    kwargs = dict(name="mvtec_loco", category="my_part", data_dir=tmp_path / "tfds")
    test = tfds_builders.load_split(split="test", manual_dir=tmp_path / "manual", **kwargs)
    assert [r["defect"].decode() for r in test] == ["good", "good", "logical_anomalies"]
    assert (test[2]["mask"] > 0).sum() == 4 + 20
    assert len(tfds_builders.load_split(split="validation", **kwargs)) == 1  # prepared: no manual_dir needed
    assert "tensorflow" not in sys.modules


def test_load_split_errors(tmp_path):
    with pytest.raises(ConfigError, match="visa"):
        tfds_builders.load_split("visa", "candle", "test", tmp_path)
    with pytest.raises(DataError, match="manual_dir"):
        tfds_builders.load_split("mvtec_ad", "bottle", "test", tmp_path)
    with pytest.raises(DataError, match="bottle"):
        tfds_builders.load_split("mvtec_ad", "bottle", "test", tmp_path, manual_dir=tmp_path / "empty")


def test_official_categories():
    assert len(tfds_builders.MvtecAd.BUILDER_CONFIGS) == 15 and len(tfds_builders.MvtecLoco.BUILDER_CONFIGS) == 5
    assert tfds.builder_cls("mvtec_ad") is tfds_builders.MvtecAd
    assert tfds_builders.MvtecLoco.MANUAL_DOWNLOAD_INSTRUCTIONS
