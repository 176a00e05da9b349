"""CRD with the bundled backbone on the real MVTec AD bottle category (skipped without ../shared/data)."""

import json
import runpy
import sys
from pathlib import Path

import pytest
from helpers import calibration_split

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_bottle"

pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not BOTTLE.is_dir(), reason="../shared/data/mvtec_bottle is absent")]


def test_crd_on_bottle_reaches_the_target(tmp_path):
    sys_argv = sys.argv
    sys.argv = ["fit.py", "--method", "crd", "--data", str(BOTTLE), "--workdir", str(tmp_path / "w")]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(ROOT / "scripts" / "fit.py"), run_name="__main__")
    finally:
        sys.argv = sys_argv
    assert stop.value.code == 0
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    fit_count, held_count = calibration_split(tmp_path / "w", BOTTLE)  # calibration_fraction of the 209 held out
    assert metrics["n_train"] == fit_count == 209 - held_count and held_count > 0 and metrics["n_test"] == 83
    assert metrics["image_auroc"] >= 0.97
    assert metrics["pixel_auroc"] >= 0.9
