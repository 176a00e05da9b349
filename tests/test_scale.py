"""The scale benchmark's parts: the generated feature stream, a streaming fit equal to CRD's own
fit, host memory flat in n for a streaming distance (and not for a memory bank), and the section."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxad.bench import scale
from jaxad.distances import crd
from jaxad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_stream_yields_n_patches_in_whole_maps():
    per_map = scale.GRID[0] * scale.GRID[1]
    n = 3 * scale.BATCH_IMAGES * per_map + 5 * per_map - 7  # three full batches, five maps (the last partial)
    batches = list(scale.feature_stream(n, 8))
    assert [int(v.sum()) for _, v in batches] == [scale.BATCH_IMAGES] * 3 + [5]
    assert sum(int(v.sum()) for _, v in batches) * per_map == scale.streamed_patches(n) == n + 7


def test_streaming_crd_equals_crd_on_every_streamed_patch():
    config = ml_collections.ConfigDict({"lam": 5.0, "lam_mode": "trace"})
    n, d = 5 * scale.BATCH_IMAGES * 256 + 3 * 256, 12
    params, row = scale.fit_streaming(scale.GLOBAL_CRD, config, n, d)
    f = np.concatenate([np.asarray(x)[np.asarray(v)].reshape(-1, d) for x, v in scale.feature_stream(n, d)])
    assert row["n"] == len(f) == scale.streamed_patches(n)
    G = f.astype(np.float64).T @ f.astype(np.float64)
    M = crd.matrix(G, crd.effective_lambda(G, len(f), 5.0, "trace"))
    np.testing.assert_allclose(np.asarray(params["M"]), np.asarray(M), atol=1e-5)
    q = jnp.asarray(f[:256].reshape(1, 16, 16, d))
    np.testing.assert_allclose(np.asarray(scale.GLOBAL_CRD.score(params, q)), np.asarray(crd.score(M, q)), rtol=1e-4)


def test_any_object_with_the_four_functions_plugs_in():
    """A distance given as bare functions (no FLOP count) is measured under its name; NN stops at
    once when no bank fits."""
    crd_fns = SimpleNamespace(init=scale.GLOBAL_CRD.init, update=scale.GLOBAL_CRD.update,
                              finalize=scale.GLOBAL_CRD.finalize, score=scale.GLOBAL_CRD.score)
    rows = scale.measure(max_n=1e4, d=8, nn_gb=0.0, distances={"plain": crd_fns}, log=lambda line: None)
    assert [(r["distance"], r["how"]) for r in rows][0] == ("plain", "measured")
    assert "gflops" not in rows[0] and rows[0]["score_s"] > 0
    assert all(r["how"].startswith("not run") for r in rows[1:]) and len(rows) == 3


MEMORY = """
import json, ml_collections
from jaxad.bench import scale
config = ml_collections.ConfigDict({"lam": 5.0, "lam_mode": "absolute"})
out = {}
for n in (2**15, 2**19):
    out[f"crd_{n}"] = scale.fit_streaming(scale.GLOBAL_CRD, config, n, 152)[1]["peak_rss_bytes"]
out["bank"] = scale.fit_bank(2**19, 152)[1]["peak_rss_bytes"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_host_memory_of_a_streaming_fit_stays_flat_in_n():
    """16× more patches (2^19 of d = 152: 304 MiB of features) raise the streaming fit's peak RSS by
    less than 32 MiB; the same measurement sees the nearest-neighbour bank grow by its size."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    features = 2**19 * 152 * 4
    assert peaks[f"crd_{2**19}"] - peaks[f"crd_{2**15}"] < 32 * 2**20, peaks
    assert peaks["bank"] - peaks[f"crd_{2**19}"] > 0.9 * features, peaks


@pytest.mark.slow
def test_the_section_has_every_row_and_plot(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    name = scale.write_scale(out, "python scripts/bench.py --scale", "scale-test", max_n=1e5, d=16,
                             budget_s=1e-3, nn_gb=16 * 1e5 * 4 / 2**30 * 0.5, coreset_budget_s=5.0)
    text = out.read_text()
    assert f"<!-- begin {name} -->" in text
    assert "| crd | 10240 | measured" in text and "| crd | 100096 | extrapolated" in text  # 1e5 predicted past 1 ms
    assert "| exact NN | 10240 | measured" in text and "| 1%-coreset NN | 10240 | selection measured" in text
    assert "| exact NN | 100096 | not run: bank" in text  # its bank exceeds nn_gb
    for key in ("patches_per_s", "peak_rss_bytes", "score_s"):
        assert (tmp_path / "benchmarks" / f"{name}_{key}.png").stat().st_size > 0


def test_every_protocol_distance_streams_and_says_where_it_stops():
    """Each protocol distance runs through the same measurement (its own init, update, finalize and
    score); a budget it overruns at once stops it at the first size, and the section says so."""
    names = [k for k in scale.DISTANCES if k != "crd"]
    rows = scale.measure(max_n=1e5, d=8, budget_s=1e-6, distances=scale.chosen(names), nn=False, log=lambda line: None)
    assert [(r["distance"], r["how"]) for r in rows] == [(k, h) for k in names for h in ("measured", "extrapolated")]
    assert all(r["score_s"] > 0 and r["gflops"] > 0 for r in rows if r["how"] == "measured")
    lines = scale.stops(rows, 1e-6)
    assert len(lines) == len(names) and all("measured to n = 1.02e+04" in line and "budget" in line for line in lines)


def test_unknown_scale_distances_are_refused_by_name():
    with pytest.raises(ConfigError, match="--scale-distances: unknown gauss"):
        scale.chosen(["crd", "gauss"])
