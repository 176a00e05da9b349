"""The generated summary at the top of BENCHMARKS.md, and retired sections."""

import json

import pytest
from helpers import markdown_rows
from test_pipeline import CONFIGS_DIR, run_script

from jaxad.bench import harness, summary
from jaxad.config import apply_overrides, config_path, load_config
from jaxad.errors import ConfigError

CPU = "Machine: x86_64 with 2 CPU cores, 1× cpu (cpu), jax 0.10.2  "
GPU = "Machine: x86_64 with 16 CPU cores, 1× NVIDIA H200 (gpu), jax 0.11.2  "
HEADER = "| dataset | method | variant | image_auroc | pixel_auroc | aupro | pixel_ap | latency_ms_b1 |\n|---|---|---|---:|---:|---:|---:|---:|"


def _section(title, command, machine, date, rows):
    return "\n".join([f"## {title}", "", f"Command: `{command}`  ", machine, f"Date: {date}", "", HEADER, *rows, "", "a note"])


@pytest.fixture
def bench(tmp_path):
    """A BENCHMARKS.md with sections of both kinds: markdown only (written before rows.json), and recorded."""
    out = tmp_path / "BENCHMARKS.md"
    harness.write_section(out, "old", _section(
        "crd on data", "python scripts/bench.py --variant default:lam=3 --variant x:lam=1", CPU, "2026-11-20",
        ["| bottle | crd | default | 0.9100 | 0.9200 | 0.8000 | 0.5000 | 12.0000 |",
         "| bottle | crd | x | 0.9900 | 0.9900 | 0.9900 | 0.9000 | 12.0000 |"]))
    harness.write_section(out, "gpu", _section(
        "crd on data", "python scripts/bench.py", GPU, "2026-11-21",
        ["| bottle | crd | default | 0.9300 | 0.9400 | 0.8200 | 0.5200 | 1.5000 |"]))
    harness.write_section(out, "speed", _section(
        "padim on data", "python scripts/bench.py --no-default --variant fast:x=1", CPU, "2026-11-22",
        ["| tile | padim | fast | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 3.0000 |"]))
    crd = load_config(config_path("crd", CONFIGS_DIR))
    configs = {("crd", "default"): crd, ("patchcore", "default"):
               apply_overrides(load_config(config_path("patchcore", CONFIGS_DIR)), ["--config.coreset_ratio=0.01"])}
    rows = [{"dataset": "bottle", "method": "crd", "variant": "default", "image_auroc": 0.95, "pixel_auroc": 0.96,
             "aupro": 0.9, "pixel_ap": 0.6, "latency_ms_b1": 11.04, "plots": []},
            {"dataset": "bottle", "method": "patchcore", "variant": "default", "image_auroc": 0.99, "pixel_auroc": 0.98,
             "aupro": 0.93, "pixel_ap": 0.7, "latency_ms_b1": 19.0}]
    (tmp_path / "benchmarks" / "new").mkdir(parents=True)
    harness.write_rows(tmp_path / "benchmarks" / "new" / harness.ROWS_FILE, rows, configs)
    harness.write_section(out, "new", _section("crd, patchcore on data", "python scripts/bench.py", CPU, "2026-11-25",
                                               ["| bottle | crd | default | 0.9500 | 0.9600 | 0.9000 | 0.6000 | 11.0400 |"]))
    return out


def _summary_rows(text):
    block = text.split("<!-- begin summary -->", 1)[1].split("<!-- end summary -->", 1)[0]
    return markdown_rows(block, "| method | dataset"), block


def test_summary_is_generated_at_the_top_from_the_sections(bench):
    harness.write_section(bench, "later", _section(
        "crd on data", "python scripts/bench.py", CPU, "2026-11-28",
        ["| bottle | crd | default | 0.9700 | 0.9700 | 0.9700 | 0.9700 | 10.0000 |"]))
    summary.write_summary(bench, CONFIGS_DIR)
    text = bench.read_text()
    assert text.index("<!-- begin summary -->") < text.index("<!-- begin old -->")
    rows, block = _summary_rows(text)
    by_key = {(r["method"], r["dataset"], r["machine"]): r for r in rows}
    assert set(by_key) == {("crd", "bottle", "CPU, 2 cores"), ("crd", "bottle", "NVIDIA H200"),
                           ("patchcore", "bottle", "CPU, 2 cores")}
    crd = by_key[("crd", "bottle", "CPU, 2 cores")]  # the recorded row of today's default beats later unrecorded ones
    assert (crd["image AUROC"], crd["AUPRO"], crd["latency ms (batch 1)"]) == ("0.9500", "0.9000", "11.0")
    assert crd["config"] == "current default" and crd["section"] == "[new](#crd-patchcore-on-data)"
    assert by_key[("crd", "bottle", "NVIDIA H200")]["section"] == "[gpu](#crd-on-data-1)"  # a repeated title
    assert by_key[("crd", "bottle", "NVIDIA H200")]["config"] == "default of 2026-11-21; config not recorded"
    assert by_key[("patchcore", "bottle", "CPU, 2 cores")]["config"].startswith("default then; differs now: coreset_ratio=0.01 (now ")
    assert "padim on tile (speed)" in block  # measured, but never with its default config
    assert "[speed](#padim-on-data)" in block  # the index of sections

    summary.write_summary(bench, CONFIGS_DIR)  # regenerating changes nothing
    assert bench.read_text() == text


def test_an_older_markdown_row_says_what_its_default_was(bench):
    summary.write_summary(bench, CONFIGS_DIR)
    rows, _ = _summary_rows(bench.read_text())
    assert "lam=3" not in str(rows)  # the recorded row wins
    (bench.parent / "benchmarks" / "new" / harness.ROWS_FILE).unlink()
    summary.write_summary(bench, CONFIGS_DIR)
    rows, _ = _summary_rows(bench.read_text())
    crd = next(r for r in rows if r["method"] == "crd" and r["machine"] == "CPU, 2 cores")
    assert crd["section"] == "[new](#crd-patchcore-on-data)"  # now the later of two unrecorded rows
    assert crd["config"] == "default of 2026-11-25; config not recorded"
    harness.write_section(bench, "new", "## gone")
    summary.write_summary(bench, CONFIGS_DIR)
    rows, _ = _summary_rows(bench.read_text())
    crd = next(r for r in rows if r["method"] == "crd" and r["machine"] == "CPU, 2 cores")
    assert crd["config"] == "default with lam=3; config not recorded" and crd["image AUROC"] == "0.9100"


def test_a_replaced_section_is_retired_with_its_folder(bench, capsys):
    (bench.parent / "benchmarks" / "old").mkdir()
    (bench.parent / "benchmarks" / "old" / "roc.png").write_bytes(b"png")
    code, _, err = run_script("bench.py", "--summary", "--out", bench, "--section", "new", "--replaces", "old", capsys=capsys)
    assert code == 0, err
    text = bench.read_text()
    assert "<!-- begin old -->" not in text and "lam=3" not in text and "<!-- begin gpu -->" in text
    assert "\n\n\n" not in text
    assert not (bench.parent / "benchmarks" / "old").exists()
    assert "- `old` (crd on data, 2026-11-20): replaced by [new](#crd-patchcore-on-data) on " in text
    retired = json.loads((bench.parent / "benchmarks" / summary.RETIRED_FILE).read_text())
    assert [(r["section"], r["replaced_by"]) for r in retired] == [("old", "new")]
    assert "[gpu](#crd-on-data)" in text  # the first of its title now

    code, _, err = run_script("bench.py", "--summary", "--out", bench, "--section", "new", "--replaces", "nope", capsys=capsys)
    assert code != 0 and "--replaces nope: no such section" in err
    with pytest.raises(ConfigError, match="cannot replace itself"):
        summary.retire(bench, ["new"], "new")
    with pytest.raises(ConfigError, match="--section absent"):
        summary.retire(bench, ["gpu"], "absent")
