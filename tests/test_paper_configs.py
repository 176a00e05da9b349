"""configs/paper/: each names a registered backbone and taps it has; missing weights say the command."""

from pathlib import Path

import pytest
from test_pipeline import ROOT, run_script

from jaxad import backbones, methods
from jaxad.config import load_config

PAPER = sorted((ROOT / "configs" / "paper").glob("*.py"))


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_names_a_backbone_and_its_taps(path: Path):
    config = load_config(path)
    assert config.backbone in backbones.names()
    methods.get(config.method)
    taps = backbones.tap_info(config.backbone)
    assert set(config.taps) <= set(taps), f"{path.name}: {config.taps} not in {list(taps)}"


def test_fit_without_ported_weights_says_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))
    code, _, err = run_script("fit.py", "--config", ROOT / "configs" / "paper" / "crd.py", "--data", tmp_path,
                              "--workdir", tmp_path / "w", capsys=capsys)
    assert code == 2 and "python scripts/port_weights.py wide_resnet50_2 --from" in err
