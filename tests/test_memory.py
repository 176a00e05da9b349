"""Fits under a memory limit: a fit too large for the memory the process may take is refused before
any image is read, with a MemoryLimitError naming the limit and the config keys that lower it; one
that fits completes. Statistics solved in memory-sized chunks equal those solved at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jaxad.data import synthetic
from jaxad.distances import mahalanobis, protocol
from jaxad.methods import paap
from jaxad.runtime import memory

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
LIMIT = 3 * 2**30  # RLIMIT_DATA for the fits below: jax, a backbone and a small fit take well under 1 GiB of it

# Sets RLIMIT_DATA (argv[1] bytes), counts the images the loader decodes, then runs scripts/fit.py with argv[2:].
_LIMITED_FIT = """
import atexit, resource, runpy, sys
resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[1]), int(sys.argv[1])))
from jaxad.data import loader
decoded = []
def counted(*args, _load=loader.load_sample):
    decoded.append(1)
    return _load(*args)
loader.load_sample = counted
atexit.register(lambda: print(f"decoded {len(decoded)}"))
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def gear(tmp_path_factory) -> Path:
    root = synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=1, categories=["gear"],
                              image_size=64, n_train=8, n_test_good=2, n_per_defect=1)
    return root / "gear"


def _limited_fit(gear: Path, workdir: Path, method: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [str(ROOT / "scripts" / "fit.py"), "--method", method, "--data", str(gear), "--workdir", str(workdir),
            "--config.batch_size=4", "--config.num_overlays=1", *overrides]
    return subprocess.run([sys.executable, "-c", _LIMITED_FIT, str(LIMIT), *args], env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)


def test_available_memory_names_the_smallest_limit():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_DATA, (2**30, 2**30)); "
            "from jaxad.runtime import memory; a = memory.available(); print(a.bytes, a.limit)")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    free, limit = out.split(" ", 1)
    assert limit.startswith("RLIMIT_DATA = 1.00 GiB") and 0 < int(free) < 2**30


def test_peak_rss_restarts_after_a_reset():
    held = np.ones(2**29 // 8)  # 512 MiB, resident
    with_it = memory.peak_rss()
    del held
    assert memory.reset_peak_rss()
    assert memory.peak_rss() < with_it - 2**28


@pytest.mark.parametrize("method, overrides, keys", [
    ("patchcore", ["--config.image_size=4096"], "--config.image_size, --config.train_images, --config.taps or --config.batch_size"),
    pytest.param("padim", ["--config.image_size=1024"], "--config.num_channels, --config.image_size or --config.batch_size",
                 marks=pytest.mark.slow),
    pytest.param("cpr_faster", ["--config.image_size=2048", "--config.use_feb=false"], "--config.image_size",
                 marks=pytest.mark.slow),
    pytest.param("paap", ["--config.image_size=2048"], "--config.image_size, --config.num_channels", marks=pytest.mark.slow),
])
def test_a_fit_too_large_for_the_limit_is_refused_before_reading_an_image(gear, tmp_path, method, overrides, keys):
    done = _limited_fit(gear, tmp_path / "w", method, *overrides)
    assert done.returncode == 2, done.stderr[-2000:]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in done.stderr
    assert f"RLIMIT_DATA = {memory.gib(LIMIT)}" in error and keys in error, error
    assert "decoded 0" in done.stdout  # refused before the first image was decoded
    assert not (tmp_path / "w" / "complete.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides", [
    ("patchcore", []), ("padim", []),
    ("cpr_faster", ["--config.train_steps=4", "--config.validate_every=2", "--config.use_feb=false"]),
])
def test_a_fit_within_the_limit_completes(gear, tmp_path, method, overrides):
    done = _limited_fit(gear, tmp_path / "w", method, "--config.image_size=64", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "w" / "complete.json").read_text())["format_version"] >= 2


def _moments(groups: int, d: int, seed: int = 0) -> protocol.Stats:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, 40, d))
    sums = {"n": np.full(groups, 40.0), "s1": x.sum(1), "s2": np.einsum("gnd,gne->gde", x, x)}
    return protocol.Stats({"group": np.arange(groups), "shift": np.zeros((groups, d), np.float32)}, sums)


def test_gaussians_solved_in_chunks_equal_those_solved_at_once():
    stats, config = _moments(7, 5), ml_collections.ConfigDict({"reg": 0.01})
    whole = mahalanobis.finalize(stats, config, budget_bytes=2**40)
    chunked = mahalanobis.finalize(stats, config, budget_bytes=1)  # one group per chunk
    for key in ("mean", "whiten_t"):
        np.testing.assert_array_equal(np.asarray(whole[key]), np.asarray(chunked[key]))


@pytest.mark.parametrize("mode", paap.SHRINKAGE)
def test_group_gaussians_solved_in_blocks_of_locations_equal_those_solved_at_once(mode):
    feats = np.random.default_rng(1).standard_normal((9, 6, 4)).astype(np.float32)
    members = paap.group_members(np.array([0, 1, 0, 1, 0, 2, 2, 1, 0]))
    whole = paap.group_gaussians(feats, members, mode, 0.01, budget_bytes=2**40)
    blocks = paap.group_gaussians(feats, members, mode, 0.01, budget_bytes=1)  # one location per block
    for key in whole:
        np.testing.assert_array_equal(whole[key], blocks[key])
