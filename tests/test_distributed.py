"""One fit over several processes: the file list shared out, the batch counts kept in step, the
command-line settings checked, and (slow) two CPU processes of four devices each fitting global
CRD through scripts/fit.py to the parameters of one process on one device."""

import os
import shutil
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxad import checkpoint, cli
from jaxad.data import loader, synthetic
from jaxad.errors import ConfigError
from jaxad.runtime import distributed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("count, processes", [(9, 2), (10, 4), (3, 3), (1000, 7)])
def test_process_shares_cover_the_list_once_and_nearly_evenly(monkeypatch, count, processes):
    items = list(range(count))
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    shares = []
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(distributed.process_share(items))
    assert [i for share in shares for i in share] == items
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    steps = distributed.batches_per_process(count, 4)
    assert steps == loader.num_batches(max(sizes), 4)


def test_a_shorter_share_ends_on_batches_of_padding():
    load = lambda i: (np.full((2, 2, 3), i, np.float32), None, 0, f"img{i}")
    batches = list(loader.stream(5, load, batch_size=4, batches=3))
    assert [b.valid.sum() for b in batches] == [4, 1, 0]
    assert batches[2].images.shape == (4, 2, 2, 3)
    assert len(list(loader.stream(5, load, batch_size=4))) == 2  # without it, no padding batch


def _args(**kwargs) -> Namespace:
    return Namespace(**{"coordinator": None, "num_processes": None, "process_id": None, **kwargs})


@pytest.mark.parametrize("given, message", [
    ({"num_processes": "2"}, "need --coordinator"),
    ({"coordinator": "localhost:1234", "num_processes": "2"}, "also give --process-id"),
    ({"coordinator": "localhost:1234", "num_processes": "two", "process_id": "0"}, "not an integer"),
    ({"coordinator": "localhost:1234", "num_processes": "2", "process_id": "2"}, "must lie in 0 .. 1"),
])
def test_incomplete_multi_host_settings_are_refused_by_name(monkeypatch, given, message):
    for var in cli.DISTRIBUTED_ENV.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=message):
        cli.join_processes(_args(**given))


def test_without_a_coordinator_nothing_is_started(monkeypatch):
    for var in cli.DISTRIBUTED_ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "initialize", lambda *a: pytest.fail("initialize called"))
    cli.join_processes(_args())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_fit_crd_as_one_device(tmp_path):
    """scripts/fit.py on 9 images: two processes (shares of 4 and 5 images, so one ends on a batch
    of padding) with 4 CPU devices each, against one process on one device."""
    data = synthetic.generate(tmp_path / "syn", seed=3, categories=["gear"], image_size=64, n_train=9,
                              n_test_good=1, n_per_defect=1)
    images = tmp_path / "images"  # a plain folder: training images only, so nothing to evaluate
    shutil.copytree(data / "gear" / "train" / "good", images)
    small = ["--config.image_size=64", "--config.batch_size=4", "--config.lam=1",  # auto λ: one process only; λ = trace(G)/d keeps M well conditioned
             "--config.calibration_fraction=0"]  # fit on all 9
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
    for var in cli.DISTRIBUTED_ENV.values():
        env.pop(var, None)
    fit = [sys.executable, str(ROOT / "scripts" / "fit.py"), "--method", "crd", "--data", str(images), *small]
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([*fit, "--workdir", str(tmp_path / f"w{i}"), "--coordinator", coordinator,
                               "--num-processes", "2", "--process-id", str(i)],
                              env={**env, "JAX_NUM_CPU_DEVICES": "4"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert not (tmp_path / "w1").exists(), "a process other than 0 wrote its workdir"
    single = subprocess.run([*fit, "--workdir", str(tmp_path / "single")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    _, two = checkpoint.load(tmp_path / "w0")
    _, one = checkpoint.load(tmp_path / "single")
    assert float(two["n"]) == float(one["n"]) == 9 * 8 * 8  # every patch counted once, padding none
    M2, M1 = np.asarray(two["M"], np.float64), np.asarray(one["M"], np.float64)
    # the Grams are summed in another order (float32 per batch); at λ = trace(G)/d, M = λ(G + λI)⁻¹ moves by
    # less than 1e-5 of its largest entry (measured 1.7e-6); at λ = 0.01 the conditioning amplifies it to ~1e-4
    np.testing.assert_allclose(M2, M1, rtol=0, atol=1e-5 * np.abs(M1).max())
