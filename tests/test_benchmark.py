"""scripts/bench.py: several methods and scoped variants in one run, written as one section."""

import re

import pytest

from jaxad import benchmark
from jaxad.data import synthetic
from jaxad.errors import ConfigError
from test_pipeline import CONFIGS_DIR, run_script


def test_variants_scope_to_their_method():
    configs = benchmark.variants(["crd", "padim"], ["padim/few:num_channels=20", "small:image_size=64"], CONFIGS_DIR)
    assert sorted(configs) == [("crd", "default"), ("crd", "small"), ("padim", "default"), ("padim", "few"), ("padim", "small")]
    assert configs[("padim", "few")].num_channels == 20 and configs[("padim", "default")].num_channels == 100
    with pytest.raises(ConfigError, match="patchcore"):
        benchmark.variants(["crd"], ["patchcore/x:coreset_ratio=0.5"], CONFIGS_DIR)


def test_bench_writes_accuracy_latency_and_state_size(tmp_path, capsys):
    root = synthetic.generate(tmp_path / "data", seed=2, categories=["gear"], image_size=64,
                              n_train=4, n_test_good=2, n_per_defect=1)
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    args = ["--method", "crd", "--method", "padim", "--data-root", root, "--out", out, "--section", "t",
            "--variant", "small:image_size=64,batch_size=4,num_overlays=1"]
    code, _, err = run_script("bench.py", *args, capsys=capsys)
    assert code == 0, err
    text = out.read_text()
    assert "kept text" in text and "<!-- begin t -->" in text
    lines = text.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("| dataset | method")))
    columns = [c.strip() for c in lines[top].strip("|").split("|")]
    rows = []
    for line in lines[top + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))))
    assert {(r["method"], r["variant"]) for r in rows} == {
        ("crd", "default"), ("crd", "small"), ("padim", "default"), ("padim", "small")}
    for cells in rows:
        assert float(cells["latency_ms_b1"]) > 0 and float(cells["images_per_s_b16"]) > 0
        assert int(re.sub(r"\D", "", cells["state_bytes"])) > 0
