"""scripts/bench.py: several methods and scoped variants in one run, written as one section."""

import json
import re

import numpy as np
import pytest
from helpers import markdown_rows
from test_pipeline import CONFIGS_DIR, run_script

from jaxad import pipeline
from jaxad.bench import harness
from jaxad.data import synthetic
from jaxad.errors import ConfigError
from jaxad.runtime import memory


def test_variants_scope_to_their_method():
    configs = harness.variants(["crd", "padim"], ["padim/few:num_channels=20", "small:image_size=64"], CONFIGS_DIR)
    assert sorted(configs) == [("crd", "default"), ("crd", "small"), ("padim", "default"), ("padim", "few"), ("padim", "small")]
    assert configs[("padim", "few")].num_channels == 20 and configs[("padim", "default")].num_channels == 100
    with pytest.raises(ConfigError, match="patchcore"):
        harness.variants(["crd"], ["patchcore/x:coreset_ratio=0.5"], CONFIGS_DIR)
    only = harness.variants(["crd", "padim"], ["small:image_size=64"], CONFIGS_DIR, with_default=False)
    assert sorted(only) == [("crd", "small"), ("padim", "small")]


def test_variant_values_may_hold_commas_inside_brackets_and_quotes():
    assert harness.split_overrides("taps=('a','b'),windows=(3, 1),note='x,y',k=2") == [
        "taps=('a','b')", "windows=(3, 1)", "note='x,y'", "k=2"]
    configs = harness.variants(["cpr_faster"], ["coarse:taps=('stage2','stage4'),use_feb=False"], CONFIGS_DIR)
    coarse = configs[("cpr_faster", "coarse")]
    assert tuple(coarse.taps) == ("stage2", "stage4") and coarse.use_feb is False


@pytest.mark.slow
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
    rows = markdown_rows(text, "| dataset | method")
    assert {(r["method"], r["variant"]) for r in rows} == {
        ("crd", "default"), ("crd", "small"), ("padim", "default"), ("padim", "small")}
    for cells in rows:
        assert float(cells["latency_ms_b1"]) > 0 and float(cells["images_per_s_b16"]) > 0
        assert int(re.sub(r"\D", "", cells["state_bytes"])) > 0
    ap_top = lines.index("Pixel AP per defect type (each type's images with all good test images):") + 2
    ap_columns = [c.strip() for c in lines[ap_top].strip("|").split("|")]
    assert ap_columns[3:] == sorted(ap_columns[3:]) and len(ap_columns) > 3
    for line in lines[ap_top + 2 : ap_top + 2 + len(rows)]:
        assert all(0 <= float(c) <= 1 for c in line.strip("|").split("|")[3:] if c.strip())
    shares = next(line for line in lines if line.startswith("Share of gear's defect pixels per type"))
    values = [float(part.rsplit(" ", 1)[1]) for part in shares.split(": ", 1)[1].split(", ")]
    assert len(values) == len(ap_columns) - 3 and sum(values) == pytest.approx(1.0, abs=0.01)
    for method, variant in (("crd", "small"), ("padim", "default")):
        for kind in ("roc", "map"):
            plot = tmp_path / "benchmarks" / "t" / f"{method}-{variant}-gear_{kind}.png"
            assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"(benchmarks/t/{plot.name})" in text
    recorded = json.loads((tmp_path / "benchmarks" / "t" / harness.ROWS_FILE).read_text())
    assert {(r["method"], r["variant"], r["config"]["image_size"]) for r in recorded} == {
        ("crd", "default", 256), ("crd", "small", 64), ("padim", "default", 256), ("padim", "small", 64)}
    assert re.search(r"^\| crd \| gear \| .* \| current default \| \[t\]\(#", text, re.MULTILINE)  # the summary


@pytest.mark.slow
def test_bench_rows_record_the_peak_rss_of_the_fit_alone(tmp_path):
    """``peak_rss_mb`` is the fit's resident high-water mark: a larger peak before it is not counted."""
    root = synthetic.generate(tmp_path / "data", seed=2, categories=["gear"], image_size=64,
                              n_train=4, n_test_good=1, n_per_defect=1) / "gear"
    configs = harness.variants(["crd"], ["small:image_size=64,batch_size=4,num_overlays=1,lam=1.0"], CONFIGS_DIR,
                               with_default=False)
    earlier = np.ones(2**30 // 8)  # 1 GiB resident, released before the fit
    before = memory.peak_rss() / 2**20
    del earlier
    rows = harness.run(configs, [root], timed=False)
    assert "peak_rss_mb" in harness.COLUMNS
    assert 50 < rows[0]["peak_rss_mb"] < before - 512
    assert "| peak_rss_mb |" in harness.accuracy_section("t", "cmd", rows)


def test_the_section_names_the_lambda_each_crd_row_ran_with():
    rows = [{"dataset": "gear", "method": "crd", "variant": "default", "image_auroc": 0.9, "lam": 0.03, "lam_ratio": 0.012},
            {"dataset": "gear", "method": "padim", "variant": "default", "image_auroc": 0.8}]
    lines = harness.accuracy_section("t", "python scripts/bench.py", rows).splitlines()
    chosen = [line for line in lines if line.startswith("λ (λ / smallest eigenvalue of G")]
    assert chosen == ["λ (λ / smallest eigenvalue of G, median over groups): crd/default gear 0.03 (0.012)"]
    assert not any(line.startswith("λ (") for line in harness.accuracy_section("t", "c", rows[1:]).splitlines())


def test_few_shot_configs_subsample_the_training_set(tmp_path):
    configs = harness.few_shot(harness.variants(["crd"], ["wide:lam=2"], CONFIGS_DIR), [3, 0])
    assert sorted(configs) == [("crd", "n=3"), ("crd", "n=all"), ("crd", "wide n=3"), ("crd", "wide n=all")]
    assert configs[("crd", "wide n=3")].train_images == 3 and configs[("crd", "wide n=3")].lam == "2"
    assert harness.few_shot_base("wide n=3") == "wide" and harness.few_shot_base("n=all") == ""
    root = synthetic.generate(tmp_path / "data", seed=3, categories=["gear"], image_size=64,
                              n_train=6, n_test_good=1, n_per_defect=1) / "gear"
    full = pipeline.open_dataset(root)
    picked = [pipeline.subsample_train(full, 3, seed).train for seed in (0, 0, 1)]
    assert len(picked[0]) == 3 and picked[0] == picked[1] and set(picked[0]) <= set(full.train)
    assert picked[0] != picked[2]  # another seed, another draw (20 possible draws of 3 from 6)
    assert pipeline.subsample_train(full, 0, 0) == full and pipeline.subsample_train(full, 9, 0) == full


@pytest.mark.slow  # test_few_shot_configs_subsample_the_training_set checks the sweep's configs
def test_few_shot_sweep_writes_table_and_curve(tmp_path, capsys):
    root = synthetic.generate(tmp_path / "data", seed=2, categories=["gear"], image_size=64,
                              n_train=6, n_test_good=2, n_per_defect=1)
    out = tmp_path / "B.md"
    args = ["--method", "crd", "--data-root", root, "--out", out, "--section", "fs", "--few-shot", "2,all",
            "--variant", "default:image_size=64,batch_size=4,num_overlays=1"]
    code, _, err = run_script("bench.py", *args, capsys=capsys)
    assert code == 0, err
    text = out.read_text()
    config = harness.variants(["crd"], ["default:image_size=64,batch_size=4,num_overlays=1"], CONFIGS_DIR)[("crd", "default")]
    every = len(pipeline.split_for_calibration(config, pipeline.open_dataset(root / "gear"))[0].train)  # "all" less calibration's
    assert every < 6 and re.search(r"\| gear \| crd \| 2 \| [01]\.\d{4} \|", text)
    assert re.search(rf"\| gear \| crd \| {every} \| [01]\.\d{{4}} \|", text)
    assert (tmp_path / "benchmarks" / "fs" / "gear_image_auroc.png").read_bytes()[:4] == b"\x89PNG"


def test_a_section_written_elsewhere_is_imported_with_its_plots(tmp_path, capsys):
    """A section (and its plots folder) from another BENCHMARKS.md replaces the same-named section
    here and leaves the others alone; a missing section is a one-line error."""
    remote, here = tmp_path / "remote" / "BENCHMARKS.md", tmp_path / "here" / "BENCHMARKS.md"
    remote.parent.mkdir()
    here.parent.mkdir()
    harness.write_section(remote, "speed-gpu", "## speed on a GPU\n\n| a |\n|---|\n| 1 |")
    harness.write_section(remote, "other", "## not asked for")
    (remote.parent / "benchmarks" / "speed-gpu").mkdir(parents=True)
    (remote.parent / "benchmarks" / "speed-gpu" / "roc.png").write_bytes(b"png")
    harness.write_section(here, "mine", "## kept")
    harness.write_section(here, "speed-gpu", "## stale")

    args = ("--import-from", remote, "--out", here)
    assert run_script("bench.py", *args, "--section", "speed-gpu", capsys=capsys)[0] == 0
    text = here.read_text()
    assert "## kept" in text and "## stale" not in text and "not asked for" not in text
    assert text.count("<!-- begin speed-gpu -->") == 1 and text.count("<!-- end speed-gpu -->") == 1
    assert "<!-- begin speed-gpu -->\n## speed on a GPU\n\n| a |\n|---|\n| 1 |\n<!-- end speed-gpu -->" in text
    assert (here.parent / "benchmarks" / "speed-gpu" / "roc.png").read_bytes() == b"png"

    code, _, err = run_script("bench.py", *args, "--section", "nope", capsys=capsys)
    assert code != 0 and f"{remote}: has no section 'nope'" in err
