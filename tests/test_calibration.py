"""Thresholds and normalisation from calibration images, where those images come from (never the
test split), and the decision metrics evaluate reports."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import CONFIGS_DIR

from jaxad import pipeline
from jaxad.config import apply_overrides, load_config
from jaxad.data import open_dataset, read_image, synthetic, synthetic_loco
from jaxad.errors import ConfigError, DataError
from jaxad.eval import calibration
from jaxad.train import loop


def _maps(values):
    """One [2, 2] map per value, whose largest pixel is the value."""
    return np.stack([np.array([[v, v / 2], [v / 4, 0.0]]) for v in values])


def test_max_rule_is_the_largest_normal_score_and_maps_it_to_one_half():
    normal = np.array([1.0, 3.0, 2.0, 5.0])
    c = calibration.calibrate("max", 0.99, normal, _maps(normal))
    assert c["image_threshold"] == 5.0 and c["pixel_threshold"] == 5.0
    scores, labels, maps = calibration.decide(c, np.array([1.0, 3.0, 5.0, 7.0, 100.0]), _maps([5.0, 1.0]))
    np.testing.assert_allclose(scores, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert labels.tolist() == [False, False, True, True, True]
    assert float(maps.max()) == 0.5 and float(maps.min()) == 0.0  # the lowest normal pixel is 0


def test_quantile_rule_flags_the_chosen_share_of_normal_images():
    normal = np.arange(101, dtype=np.float64)
    c = calibration.calibrate("quantile", 0.9, normal, _maps(normal))
    assert c["image_threshold"] == pytest.approx(90.0) and c["pixel_threshold"] == pytest.approx(90.0)
    assert np.mean(np.asarray(calibration.decide(c, normal, _maps(normal))[1])) == pytest.approx(11 / 101)


def test_f1_rule_separates_defects_and_needs_them():
    normal, defects = np.array([1.0, 2.0, 3.0]), np.array([2.5, 6.0, 7.0])
    masks = np.zeros((3, 2, 2), bool)
    masks[:, 0, 0] = True
    c = calibration.calibrate("f1", 0.99, normal, _maps(normal), defects, _maps(defects), masks)
    assert c["image_threshold"] == 2.5  # F1 = 6/7 there (one normal image flagged), 4/5 at 6.0
    assert c["pixel_threshold"] == 6.0  # pixels: F1 4/5 there, 2/3 at 2.5 (three normal pixels reach it)
    with pytest.raises(ConfigError, match="threshold_rule=f1"):
        calibration.calibrate("f1", 0.99, normal, _maps(normal))


def test_constant_scores_still_normalise_and_broken_ones_are_refused():
    c = calibration.calibrate("max", 0.99, np.array([4.0]), _maps([4.0]))
    assert c["image_span"] == 4.0 and float(calibration.decide(c, np.array([4.0]), _maps([4.0]))[0][0]) == 0.5
    with pytest.raises(Exception, match="non-finite"):
        calibration.calibrate("max", 0.99, np.array([1.0, np.nan]), _maps([1.0, 1.0]))


def test_decision_metrics_count_the_confusion():
    m = calibration.decision_metrics(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 0, 1, 1], bool))
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == 0.6 and m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert np.isnan(calibration.decision_metrics(np.zeros(2, bool), np.zeros(2, bool))["precision"])


@pytest.mark.parametrize("override, message", [
    ("--config.threshold_rule=median", "threshold_rule=median: choose one of max, quantile, f1"),
    ("--config.threshold_quantile=0.0", "threshold_quantile=0.0: must be in (0.0, 1.0]"),
    ("--config.calibration_fraction=1.0", "calibration_fraction=1.0: must be in [0.0, 1.0)"),
])
def test_calibration_settings_are_checked_by_name(override, message):
    config = apply_overrides(load_config(CONFIGS_DIR / "crd.py"), [override])
    with pytest.raises(ConfigError) as err:
        pipeline.check_shared_settings(config)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def gear(tmp_path_factory):
    return open_dataset(synthetic.generate(tmp_path_factory.mktemp("syn"), seed=2, categories=["gear"], image_size=64,
                                           n_train=10, n_test_good=2, n_per_defect=1) / "gear")


def _paths(samples):
    return {s.path for s in samples}


def test_held_out_training_images_calibrate_and_are_not_fitted_on(gear):
    config = apply_overrides(load_config(CONFIGS_DIR / "crd.py"), ["--config.calibration_fraction=0.2"])
    fitted, held, source = pipeline.split_for_calibration(config, gear)
    assert len(held) == 2 and len(fitted.train) == 8 and "calibration_fraction" in source
    assert not _paths(held) & _paths(fitted.train) and not _paths(held) & _paths(gear.test)
    assert _paths(held) | _paths(fitted.train) == _paths(gear.train)
    few = apply_overrides(config, ["--config.train_images=3"])  # few-shot draws from the images left
    fitted_few, held_few, _ = pipeline.split_for_calibration(few, gear)
    assert held_few == held and len(fitted_few.train) == 3 and not _paths(held) & _paths(fitted_few.train)


def test_a_validating_method_lends_its_own_split_and_keeps_every_image(gear):
    config = load_config(CONFIGS_DIR / "simplenet.py")
    fitted, held, source = pipeline.split_for_calibration(config, gear)
    assert fitted.train == gear.train and "validation split" in source
    assert [s.path for s in held] == [gear.train[i].path for i in loop.hold_out(10, config.val_fraction, config.seed)[1]]
    assert not _paths(held) & _paths(gear.test)


def test_a_validation_split_calibrates_when_there_is_one(tmp_path):
    loco = open_dataset(synthetic_loco.generate(tmp_path, seed=0, image_size=64, n_train=4, n_val=2, n_test_good=1,
                                                n_per_kind=1))
    fitted, held, source = pipeline.split_for_calibration(load_config(CONFIGS_DIR / "crd.py"), loco)
    assert held == loco.validation and fitted.train == loco.train and source == "validation split"


def test_too_few_images_to_hold_out_say_which_key_to_change(gear):
    one = dataclasses.replace(gear, train=gear.train[:1])
    with pytest.raises(DataError, match="calibration_fraction=0"):
        pipeline.split_for_calibration(load_config(CONFIGS_DIR / "crd.py"), one)
    config = apply_overrides(load_config(CONFIGS_DIR / "crd.py"), ["--config.calibration_fraction=0.0"])
    fitted, held, _ = pipeline.split_for_calibration(config, one)
    assert fitted.train == one.train and held == ()


def _brightness_model(images):
    """A stand-in predictor: maps are each pixel's distance from mid-grey, scores their maximum."""
    maps = jnp.abs(jnp.asarray(images).mean(-1) - 0.5)
    return maps.max((1, 2)), maps


@pytest.mark.parametrize("rule", ["max", "f1"])
def test_pipeline_calibration_scores_the_given_images_and_pastes_defects_for_f1(gear, rule, monkeypatch):
    """The calibration images are scored as they are and, for ``f1``, again with a pasted defect
    each (one paster, built and compiled once here, serves the test and the calibration)."""
    config = apply_overrides(load_config(CONFIGS_DIR / "crd.py"),
                             ["--config.image_size=64", "--config.batch_size=4", f"--config.threshold_rule={rule}"])
    paste = pipeline.synthetic_defects(config) if rule == "f1" else None
    pasted_batches = []

    def spy(_config):
        def pasting(i, images):
            pasted_batches.append(i)
            return paste(i, images)
        return pasting

    monkeypatch.setattr(pipeline, "synthetic_defects", spy)
    held = gear.train[:5]
    found = pipeline.calibrate(config, _brightness_model, held, "test")
    scores = np.asarray(_brightness_model(np.stack([read_image(s.path) for s in held]))[0])
    assert found["rule"] == rule and found["n_images"] == 5 and found["images"] == [str(s.path) for s in held]
    assert found["image_low"] == pytest.approx(scores.min(), rel=1e-6)
    if rule == "max":
        assert found["image_threshold"] == pytest.approx(scores.max(), rel=1e-6) and pasted_batches == []
        return
    assert pasted_batches == [0, 1]  # both batches of the five images, each with its own seed
    images = jnp.asarray(np.stack([read_image(s.path) for s in held[:4]]))
    pasted, masks = paste(0, images)
    assert pasted.shape == images.shape and bool(jnp.all(masks.sum((1, 2)) > 0))
    assert np.array_equal(np.asarray(pasted), np.asarray(paste(0, images)[0]))  # seeded by the batch
    assert not np.array_equal(np.asarray(pasted), np.asarray(paste(1, images)[0]))
