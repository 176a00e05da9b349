"""Work split over 8 fake CPU devices: training steps give the parameters of one device, and the
backbone forward keeps each device on its own images.

Each check runs in a fresh process: the number of CPU devices is fixed when JAX starts.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 8)
from jaxad import backbones
from jaxad.runtime import parallel
assert len(jax.devices()) == 8, jax.devices()
one, eight = parallel.batch_mesh(jax.devices()[:1]), parallel.batch_mesh()

def assert_same_params(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.sharding.num_devices == 1 or y.sharding.num_devices == 1
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol)

def adam_bound(lr, steps):
    # Adam moves a weight by ~lr per step whatever its gradient's size, so one whose gradient is
    # ~0 may go either way as float noise tips it: two runs' weights may differ by 2·lr·steps.
    return 2 * lr * steps

def assert_within_adam_bound(a, b, lr, steps):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= adam_bound(lr, steps)

def fit_on_one_and_eight(method, config, columns, seed):
    # fit on 12 random 64-px images with one device, then eight; per run: the fitted state and
    # the `columns` of its training history, step by step
    import json, tempfile
    from pathlib import Path
    from jaxad.data import Batch
    bb = backbones.load(config.backbone)
    images = np.random.default_rng(seed).random((12, 64, 64, 3)).astype(np.float32)
    data = [Batch(images[i:i + 4], None, np.zeros(4, np.int32), np.ones(4, bool), tuple(map(str, range(4))))
            for i in range(0, 12, 4)]

    def run(mesh):
        config.workdir = tempfile.mkdtemp()
        state = method.fit(config, data, bb, mesh=mesh)
        history = json.loads((Path(config.workdir) / "train_history.json").read_text())["history"]
        return state, np.array([[h[c] for c in columns] for h in history])

    return run(one), run(eight)
"""


def _run(body: str) -> None:
    code = PRELUDE + textwrap.dedent(body) + "\nprint('OK')\n"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_teacher_distillation_step_is_data_parallel():
    """Batch of 8 split one image per device; the replicated PDN gets the all-reduced gradient."""
    _run("""
        from jaxad.train import distillation
        bb = backbones.load("efficientnet_lite0")
        images = np.random.default_rng(0).random((8, 32, 32, 3)).astype(np.float32)
        settings = distillation.Settings(image_size=32, target_size=32, steps=2, batch_size=8, stats_images=8,
                                         grayscale=0.5)
        run = lambda mesh: distillation.distil(settings, bb, iter([images] * 2), stats_batches=iter([images]),
                                               mesh=mesh)["params"]
        sharded = run(eight)
        assert all(x.sharding.num_devices == 8 for x in jax.tree.leaves(sharded))
        # Adam's first steps move each weight by ~lr = 1e-4 whatever the gradient's size, so a weight whose
        # gradient is at rounding level moves differently in the two runs: compare at a tenth of a step
        assert_same_params(run(one), sharded, atol=1e-5)
    """)


@pytest.mark.slow
def test_cpr_local_branch_training_is_data_parallel():
    """CPR's pairs are synthesised on the device and sharded inside the step; BatchNorm statistics
    and gradients over the sharded batch equal the one-device ones."""
    _run("""
        from jaxad.config import load_config
        from jaxad.methods import cpr
        config = load_config("configs/cpr_faster.py")
        config.update(image_size=64, train_steps=2, validate_every=1, train_batch_size=8, procedural_textures=4,
                      kmeans_samples=2000, kmeans_restarts=1, foreground_samples=500, batch_size=4)
        (single, h1), (sharded, h8) = fit_on_one_and_eight(cpr, config, ("loss", "val_auroc"), seed=1)
        assert all(x.sharding.num_devices == 8 for x in jax.tree.leaves(sharded["params"]))
        assert h1.shape == (2, 2)
        np.testing.assert_allclose(h8, h1, rtol=1e-4)  # same losses, same validation, step by step
        assert_same_params(single["batch_stats"], sharded["batch_stats"], atol=1e-4)  # same forward statistics
        assert_within_adam_bound(single["params"], sharded["params"], config.learning_rate, config.train_steps)
    """)


def test_simplenet_heads_training_is_data_parallel():
    """SimpleNet's step splits its images over the devices; BatchNorm statistics, losses and the
    selected heads equal the one-device ones."""
    _run("""
        from jaxad.config import load_config
        from jaxad.methods import simplenet
        config = load_config("configs/simplenet.py")
        config.update(image_size=64, train_steps=3, validate_every=1, train_batch_size=8, hidden_dim=32,
                      target_dim=64, batch_size=4)
        (single, h1), (sharded, h8) = fit_on_one_and_eight(simplenet, config, ("loss", "val_loss"), seed=2)
        assert all(x.sharding.num_devices == 8 for x in jax.tree.leaves(sharded["adaptor"]))
        assert h1.shape == (3, 2)
        np.testing.assert_allclose(h8[:, 0], h1[:, 0], rtol=1e-4)  # same training losses, step by step
        np.testing.assert_allclose(h8[:, 1], h1[:, 1], rtol=1e-3)  # validation after updates (Adam: see below)
        # after the first step the statistics are of features made by weights that may differ by
        # Adam's bound, so they get that bound too
        lr = max(config.dsc_lr, config.adaptor_lr)  # the larger step bounds both heads
        assert_same_params(single["batch_stats"], sharded["batch_stats"], atol=adam_bound(lr, config.train_steps))
        for name in ("adaptor", "discriminator"):
            assert_within_adam_bound(single[name], sharded[name], lr, config.train_steps)
    """)


def test_backbone_forward_on_a_sharded_batch_gathers_nothing():
    """Each device extracts features of its own images: no all-gather of the batch in the program."""
    _run("""
        bb = backbones.random_init("resnet18")
        images = parallel.shard_batch(np.zeros((16, 32, 32, 3), np.float32), eight)
        variables = parallel.replicate(bb.variables, eight)
        hlo = jax.jit(bb.features_fn("layer1")).lower(variables, images).compile().as_text()
        assert "all-gather" not in hlo, "the batch is gathered onto every device"
        assert bb.apply(variables, images, "layer1")["layer1"].sharding.num_devices == 8
    """)
