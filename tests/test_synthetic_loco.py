"""The synthetic LOCO-layout category: read back by the dataset reader, masks, determinism."""

import numpy as np
import pytest

from jaxad.data import open_dataset, read_image, read_mask, synthetic_loco
from jaxad.errors import DataError

COUNTS = dict(image_size=64, n_train=3, n_val=2, n_test_good=2, n_per_kind=1)


@pytest.fixture(scope="module")
def tray(tmp_path_factory):
    return synthetic_loco.generate(tmp_path_factory.mktemp("loco"), seed=3, **COUNTS)


def test_reader_sees_a_loco_category_with_both_anomaly_kinds_and_masks(tray):
    ds = open_dataset(tray)
    assert ds.layout == "mvtec_loco" and ds.name == "tray"
    assert len(ds.train) == 3 and len(ds.validation) == 2
    by_kind = {}
    for s in ds.test:
        by_kind.setdefault(s.defect, []).append(s)
    assert set(by_kind) == {"good", "logical_anomalies", "structural_anomalies"}
    assert len(by_kind["logical_anomalies"]) == len(synthetic_loco.LOGICAL)
    assert len(by_kind["structural_anomalies"]) == len(synthetic_loco.STRUCTURAL)
    for s in by_kind["logical_anomalies"] + by_kind["structural_anomalies"]:
        assert s.label == 1 and len(s.mask_paths) == 1
        mask = read_mask(s.mask_paths[0])
        assert mask.shape == (64, 64) and 0 < mask.sum() < mask.size
    assert all(s.label == 0 and not s.mask_paths for s in by_kind["good"])


def test_same_seed_same_pixels_other_seed_other_pixels(tray, tmp_path):
    again = synthetic_loco.generate(tmp_path / "a", seed=3, **COUNTS)
    other = synthetic_loco.generate(tmp_path / "b", seed=4, **COUNTS)
    name = "test/logical_anomalies/000.png"
    assert np.array_equal(read_image(tray / name), read_image(again / name))
    assert not np.array_equal(read_image(tray / name), read_image(other / name))


@pytest.mark.parametrize("kind", synthetic_loco.LOGICAL + synthetic_loco.STRUCTURAL)
def test_every_anomaly_changes_the_image_inside_its_mask(kind):
    seed = [7, len(kind)]
    normal, _ = synthetic_loco.render(np.random.default_rng(seed), 96)
    image, mask = synthetic_loco.render(np.random.default_rng(seed), 96, kind)
    assert mask.any()
    changed = np.abs(image - normal).max(-1) > 0.1
    # the anomaly changes pixels inside its mask; structural ones change nothing outside it beyond noise
    assert changed[mask].mean() > 0.05
    if kind in synthetic_loco.STRUCTURAL:
        assert not changed[~mask].any()


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "tray").mkdir()
    (tmp_path / "tray" / "mine.txt").write_text("x")
    with pytest.raises(DataError):
        synthetic_loco.generate(tmp_path, **COUNTS)
