"""The λ sweep: every candidate and category scored by one compiled program, equal to a separate fit
at each λ; the section it writes says it is a test-set curve."""

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxad import pipeline
from jaxad.bench import harness, summary, sweep
from jaxad.config import apply_overrides, load_config
from jaxad.data import iterate_batches, synthetic
from jaxad.distances import crd, protocol
from jaxad.errors import ConfigError
from jaxad.eval import metrics
from jaxad.methods import crd as crd_method

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [1.0, 0.1, 0.01]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "d", seed=2, categories=["gear", "weave"],
                              image_size=64, n_train=5, n_test_good=3, n_per_defect=1)
    for image in sorted((root / "weave" / "test" / "good").iterdir())[:2]:  # fewer test batches than gear
        image.unlink()
    return harness.datasets_under(root)


def _config(*overrides):
    return apply_overrides(load_config(ROOT / "configs" / "crd.py"),
                           ["--config.image_size=64", "--config.batch_size=2", "--config.taps=('stage2',)", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["--config.distance=kernel_crd", "--config.rff_dim=64"]])
def test_one_program_scores_every_candidate_as_a_fit_at_that_lambda(datasets, monkeypatch, overrides):
    config = _config(*overrides)
    backbone = pipeline.load_backbone(config)
    traced = []
    real = crd.candidate_scores
    monkeypatch.setattr(crd, "candidate_scores", lambda *args: traced.append(1) or real(*args))
    fits = [sweep.fit(config, backbone, data, CANDIDATES) for data in datasets]
    scored = sweep.patch_scores(config, backbone, fits)
    assert len(traced) == 1  # one trace: every candidate, both categories and every test batch in one program
    assert len({len(f.dataset.test) for f in fits}) == 2, "the categories should differ in test images (padding)"
    predict = jax.jit(lambda state, images: crd_method.predict(config, backbone, {"backbone": backbone.variables, **state},
                                                               images))
    features_of = jax.jit(lambda images: crd_method.patch_features(config, backbone, backbone.variables, images))
    for f, (scores, masks) in zip(fits, scored):
        assert scores.shape[:2] == (len(CANDIDATES), len(f.dataset.test)) and len(f.dataset.test) > config.batch_size
        labels = np.array([s.label for s in f.dataset.test])
        swept = sweep.candidate_metrics(config, scores, masks, labels)
        for k, lam in enumerate(CANDIDATES):
            one = apply_overrides(config, [f"--config.lam={lam}"])
            state = crd_method.fit(one, iterate_batches(f.dataset.train, (64, 64), 2), backbone)
            images = np.stack([b.images[i] for b in iterate_batches(f.dataset.test, (64, 64), 2)
                               for i in np.flatnonzero(b.valid)])
            want = np.asarray(protocol.get(config.distance).score(state, features_of(images)))
            np.testing.assert_allclose(scores[k], want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
            image_scores, maps = predict(state, images)
            result = metrics.evaluate(np.asarray(image_scores), labels, np.asarray(maps), masks)
            for key, value in swept[k].items():
                assert value == pytest.approx(result[key], abs=1e-4), (lam, key)


@pytest.mark.slow
def test_the_section_has_a_table_a_plot_per_dataset_and_says_it_reads_the_test_set(datasets, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    sweep.write_sweep(out, "python scripts/bench.py --sweep lam=1,0.1", "sweep-test", "lam=1,0.1",
                      {("crd", "default"): _config()}, datasets, note="A note.")
    text = out.read_text()
    assert sweep.NOTE in text and "A note." in text and text.count("| gear | default | ") == 2
    assert "| gear | default | 0.1 |" in text  # λ as written, not rounded to a fixed number of decimals
    # the summary of BENCHMARKS.md lists default-config rows; a curve on the test set must not stand there
    assert "sweep-test" not in summary.summary(out.read_text(), tmp_path / "benchmarks", ROOT / "configs").split("### Sections")[0]
    for data in datasets:
        assert (tmp_path / "benchmarks" / "sweep-test" / f"default-{data.name}_lam.png").stat().st_size > 1000


@pytest.mark.parametrize("spec", ["lam=", "reg=1,2", "lam=1,x", "lam=0,1"])
def test_bad_sweeps_are_refused_by_name(spec):
    with pytest.raises(ConfigError, match="--sweep"):
        sweep.parse(spec)


def test_only_distances_that_read_lambda_are_swept():
    with pytest.raises(ConfigError, match="distance that reads λ"):
        sweep.check(_config("--config.distance=mahalanobis"))
