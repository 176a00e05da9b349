"""PatchCore as a method: bank size, coreset, both scoring modes, and the CLI."""

import json

import jax
import numpy as np
import pytest
from helpers import calibration_split
from test_pipeline import CONFIGS_DIR, SMALL, run_script

from jaxad import backbones
from jaxad.config import apply_overrides, config_path, load_config
from jaxad.data import iterate_batches, open_dataset, synthetic
from jaxad.errors import NumericsError
from jaxad.methods import patchcore


@pytest.fixture(scope="module")
def gear(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "d", seed=1, categories=["gear"], image_size=64,
                              n_train=6, n_test_good=2, n_per_defect=1)
    return open_dataset(root / "gear")


def _config(**overrides):
    base = load_config(config_path("patchcore", CONFIGS_DIR))
    return apply_overrides(base, [f"--config.{k}={v}" for k, v in {"image_size": 64, "batch_size": 4, **overrides}.items()])


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_bank_holds_every_patch_or_the_coreset(gear, ratio):
    config = _config(coreset_ratio=ratio)
    bb = backbones.load(config.backbone)
    state = patchcore.fit(config, iterate_batches(gear.train, (64, 64), 4), bb)
    patches = 6 * 8 * 8  # stride 8 at 64 px
    assert state["bank"].shape == (round(ratio * patches), 152)


@pytest.mark.parametrize("score", ["reweighted", pytest.param("max", marks=pytest.mark.slow)])
def test_scores_are_finite_and_training_patches_score_zero(gear, score):
    config = _config(coreset_ratio=1.0, score=score)
    bb = backbones.load(config.backbone)
    state = {"backbone": bb.variables, **patchcore.fit(config, iterate_batches(gear.train, (64, 64), 4), bb)}
    predict = jax.jit(lambda s, x: patchcore.predict(config, bb, s, x))
    train = next(iter(iterate_batches(gear.train, (64, 64), 4)))
    scores, maps = predict(state, train.images)
    assert maps.shape == (4, 64, 64) and np.isfinite(np.asarray(scores)).all()
    # A training image's patches are in the bank: the squared distance is 0 up to the float32
    # cancellation of |q|² − 2q·b + |b|², i.e. tiny against |q|².
    if score == "max":
        feats = patchcore.patch_features(config, bb, bb.variables, train.images)
        assert float(np.max(np.asarray(scores))) < 1e-5 * float(np.max(np.sum(np.square(feats), -1)))


@pytest.mark.slow
def test_fit_script_with_patchcore(gear, tmp_path, capsys):
    code, _, err = run_script("fit.py", "--method", "patchcore", "--data", gear.root, "--workdir", tmp_path / "w",
                              *SMALL, capsys=capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["n_train"] == calibration_split(tmp_path / "w", gear.root)[0] and 0 <= metrics["image_auroc"] <= 1


def test_unknown_score_mode_is_a_config_error(gear):
    from jaxad.errors import ConfigError

    with pytest.raises(ConfigError, match="score"):
        patchcore.fit(_config(score="median"), iterate_batches(gear.train, (64, 64), 4), backbones.load("efficientnet_lite0"))


def test_bank_is_filled_in_place_without_a_second_copy():
    # 20 batches of 4 images × 8×8 patches × 152 features, the last one half padding: the bank equals the
    # batches' valid rows joined, and building it allocates little beyond the bank itself (joining a list of
    # the batches would hold every row twice)
    import tracemalloc

    rng = np.random.default_rng(0)
    batches = [(rng.random((4, 8, 8, 152), dtype=np.float32), np.arange(4) < (2 if i == 19 else 4)) for i in range(20)]
    expected = np.concatenate([f[v].reshape(-1, 152) for f, v in batches])

    def stream():  # each batch made as it is read, as the backbone's features are
        for f, v in batches:
            yield f.copy(), v

    tracemalloc.start()
    bank = patchcore.fill_bank(stream(), len(batches))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(bank, expected)
    assert bank.dtype == np.float32 and peak < 1.5 * expected.nbytes
    if jax.default_backend() == "cpu":  # the device array shares the bank's memory
        assert jax.device_put(bank, may_alias=True).unsafe_buffer_pointer() == bank.ctypes.data


def test_an_empty_stream_is_refused():
    with pytest.raises(NumericsError, match="training set is empty"):
        patchcore.fill_bank(iter([]), 0)
