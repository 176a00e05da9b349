"""One fit over several processes: the file list shared out, the batch counts kept in step, the
command-line settings checked, and (slow) two CPU processes of four devices each fitting global
CRD through scripts/fit.py to the parameters of one process on one device."""

import json
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
from jaxad.methods import crd as crd_method
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


def test_shares_hold_out_the_images_one_process_holds_out():
    """lam=auto's held-out images go by their place in the whole list (Batch.index), so shares of it
    (as processes read them) hold out what the whole list does."""
    load = lambda i: (np.full((2, 2, 3), i, np.float32), None, 0, f"img{i}")

    def held(batches) -> list[int]:
        kept: list[np.ndarray] = []
        for _ in crd_method._hold_out(batches, 7, kept):
            pass
        return [int(k[0, 0, 0]) for k in kept]

    whole = held(loader.stream(17, load, batch_size=4))
    shares = [held(loader.stream(stop - start, lambda i, start=start: load(start + i), batch_size=4, first=start))
              for start, stop in ((0, 8), (8, 17))]
    assert whole == [1, 8, 15] and shares == [[1], [8, 15]]


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


# fit on all images; auto λ among candidates ≥ 0.1: on a few tiny images G is rank-deficient, and M moves by ‖ΔG‖/λ
# when float32 sums are added in another order (at λ = 1e-4 of G's mean eigenvalue, by 7e-3 of its largest entry in
# tests/test_crd.py's 8-device fit)
SMALL = ["--config.image_size=64", "--config.batch_size=8", "--config.calibration_fraction=0",
         "--config.lam_candidates=(1.0,0.3,0.1)"]
VARIANTS = {  # every protocol distance; the CRD ones choose λ on held-out images (configs/crd.py: lam=auto)
    "crd_global": [],
    "crd_blocks": ["--config.position=blocks", "--config.position_blocks=2"],
    "crd_location": ["--config.position=location", "--config.lam=0.1"],
    "kernel_crd": ["--config.distance=kernel_crd", "--config.rff_dim=256"],
    "mahalanobis": ["--config.distance=mahalanobis"],
    "mahalanobis_location": ["--config.distance=mahalanobis", "--config.position=location"],  # PaDiM's Gaussian
}


def _run_fits(images: Path, workdir: Path, devices: int, processes: int) -> None:
    """tests/fit_distances.py over every variant in ``processes`` processes of ``devices`` CPU devices each."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1", "JAX_NUM_CPU_DEVICES": str(devices)}
    for var in cli.DISTRIBUTED_ENV.values():
        env.pop(var, None)
    command = [sys.executable, str(ROOT / "tests" / "fit_distances.py"), str(images), str(workdir),
               json.dumps({name: [*SMALL, *overrides] for name, overrides in VARIANTS.items()})]
    joined = [[]] if processes == 1 else [["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                                           "--process-id", str(i)] for port in [_free_port()] for i in range(processes)]
    procs = [subprocess.Popen([*command, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for flags in joined]
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * processes, "\n".join(log[-3000:] for log in logs)


@pytest.mark.slow
def test_every_distance_fits_alike_on_one_device_eight_devices_and_two_processes_of_four(tmp_path):
    """Each protocol distance fitted through the pipeline on 17 images: one process on one device, one
    on 8 devices, and two processes of 4 devices (shares of 8 and 9 images, so process 0 steps through a
    batch of padding; of the images held out to choose λ, 1 and 8 and 15, process 0 holds one and
    process 1 two). Every setup must choose the same λ, on the same curve, and reach the same params."""
    data = synthetic.generate(tmp_path / "syn", seed=3, categories=["gear"], image_size=64, n_train=17,
                              n_test_good=1, n_per_defect=1)
    images = tmp_path / "images"  # a plain folder: training images only, so nothing to evaluate
    shutil.copytree(data / "gear" / "train" / "good", images)
    setups = {"two_processes": (4, 2), "eight_devices": (8, 1), "one_device": (1, 1)}
    for name, (devices, processes) in setups.items():
        _run_fits(images, tmp_path / name, devices, processes)
    assert not (tmp_path / "two_processes" / "1").exists(), "a process other than 0 wrote its workdir"
    for variant in VARIANTS:
        _, one = checkpoint.load(tmp_path / "one_device" / "0" / variant)
        for name in ("eight_devices", "two_processes"):
            _, other = checkpoint.load(tmp_path / name / "0" / variant)
            assert other.keys() == one.keys(), (variant, name)
            assert float(other["n"]) == float(one["n"]) == 17 * 16 * 16, (variant, name)  # every patch once (the stride-4 grid of 64 px), padding none
            if "lam" in one:
                assert float(other["lam"]) == float(one["lam"]), (variant, name, other.get("lam_curve"), one.get("lam_curve"))
            # lam_ratio, λ over G's smallest eigenvalue, is a diagnostic: with fewer patches than a well-conditioned
            # G needs, that eigenvalue is float32 rounding itself and moves by percents between setups
            for key in one.keys() - {"lam_ratio"}:
                a, b = np.asarray(other[key], np.float64), np.asarray(one[key], np.float64)
                # float32 batch sums added in another order: M moved by at most 7e-6 of its largest entry, the
                # whitening matrix by 3e-5, the λ curve not at all (measured)
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(np.abs(b).max(), 1e-30),
                                           err_msg=f"{variant} on {name}: {key}")
