"""scripts/bench.py --select: a setting chosen on held-out training images with synthetic anomalies."""

import re

import numpy as np
import pytest
from helpers import record_opened_files
from test_pipeline import CONFIGS_DIR, run_script

from jaxad.bench import harness, select
from jaxad.data import open_dataset, synthetic
from jaxad.errors import ConfigError

SMALL = "small:image_size=64,batch_size=4,lam=0.1"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=4, categories=["gear"], image_size=64,
                              n_train=10, n_test_good=2, n_per_defect=1)


@pytest.mark.slow
def test_the_selector_never_reads_test_data(root, tmp_path, capsys, monkeypatch):
    """Every file opened during the selection is recorded (builtins.open and PIL): none is a test image."""
    out = tmp_path / "B.md"
    opened = record_opened_files(monkeypatch)
    code, _, err = run_script("bench.py", "--method", "crd", "--data-root", root, "--out", out, "--section", "sel",
                              "--no-default", "--variant", SMALL, "--select", "aggregate=1,3", capsys=capsys)
    monkeypatch.undo()
    assert code == 0, err
    gear = open_dataset(root / "gear")
    test_files = {str(s.path) for s in gear.test} | {str(m) for s in gear.test for m in s.mask_paths}
    assert {str(s.path) for s in gear.train} <= set(opened)  # the recording sees the reads
    assert not test_files & set(opened), sorted(test_files & set(opened))
    text = out.read_text()
    rows = re.findall(r"^\| gear \| crd \| small \| ([13]) \| ([01]\.\d{4}) \| [01]\.\d{4} \| ([01]\.\d{4}) \|"
                      r".*\| 8 \| 2 \| [\d.]+ \| (✓?) \|$", text, re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "3"] and [r[3] for r in rows].count("✓") == 1
    total = [float(r[1]) + float(r[2]) for r in rows]  # image AUROC + AUPRO, to the table's 4 digits
    assert total[[r[3] for r in rows].index("✓")] >= max(total) - 2e-4
    assert "Chosen (largest image AUROC + AUPRO on the held-out images): crd/small gear: aggregate = " in text
    assert (tmp_path / "benchmarks" / "sel" / "gear_aggregate.png").read_bytes()[:4] == b"\x89PNG"
    assert "| crd | gear |" not in text.split("<!-- begin sel -->")[0]  # no held-out number enters the summary


def test_first_among_equals_and_nan_never_wins():
    rows = [{"synthetic_image_auroc": a, "synthetic_aupro": b} for a, b in [(0.9, 0.5), (1.0, 0.4), (np.nan, 1.0)]]
    assert select.chosen(rows) == 0
    assert select.chosen(rows[1:]) == 0


@pytest.mark.parametrize("spec", ["feature_sigma=", "=1,2", "feature_sigma"])
def test_a_bad_spec_is_refused(spec):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        select.parse(spec)


def test_an_unknown_key_is_refused(root):
    configs = harness.variants(["crd"], [SMALL], CONFIGS_DIR, with_default=False)
    with pytest.raises(ConfigError, match="crd has no config key 'feature_sigma'"):
        select.sweep(configs, [root / "gear"], "feature_sigma", ["0"])
