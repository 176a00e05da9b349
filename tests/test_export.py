"""Exported models: the file layout and batch padding of :mod:`jaxad.deploy`, and for every method
the same decisions from the exported program, loaded in a fresh Python process that never imports
flax or jaxad's methods, as from the fitted model in this one."""

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxad import checkpoint, deploy, export, pipeline
from jaxad.config import apply_overrides, load_config
from jaxad.data import synthetic
from jaxad.errors import ConfigError
from jaxad.eval import calibration
from jaxad.runtime import compilation

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.image_size=64", "--config.batch_size=4", "--config.num_overlays=0"]
TINY = {  # config file → overrides that fit it in seconds
    "crd": [],
    "padim": [],
    "patchcore": [],
    "paap": ["--config.min_group_size=3", "--config.group_size=4"],
    "simplenet": ["--config.train_steps=4", "--config.validate_every=2", "--config.hidden_dim=32"],
    "efficientad": ["--config.train_steps=4", "--config.teacher_steps=2", "--config.teacher_batch_size=2",
                    "--config.val_fraction=0.25", "--config.validate_every=2"],
    "puad": ["--config.train_steps=4", "--config.teacher_steps=2", "--config.teacher_batch_size=2",
             "--config.val_fraction=0.25", "--config.validate_every=2"],
    "cpr_faster": ["--config.train_steps=4", "--config.validate_every=2", "--config.procedural_textures=4"],
}
BANNED = ("flax", "optax", "orbax", "ml_collections", "torch")  # top-level packages the loader must not need
# Runs in a new process: load, decide, save the outputs, list the modules it imported.
LOADER = """
import json, sys
import numpy as np
import jaxad.deploy
model = jaxad.deploy.load(sys.argv[1])
scores, labels, maps = model(np.load(sys.argv[2]))
np.savez(sys.argv[3], scores=scores, labels=labels, maps=maps)
print(json.dumps(sorted(sys.modules)))
"""


def load_elsewhere(model: Path, images: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, maps) of ``images`` from ``model`` loaded by a new Python process, which
    must import nothing of jaxad but :mod:`jaxad.deploy`."""
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOADER, str(model), str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m for m in modules if m.split(".")[0] in BANNED] == []
    assert [m for m in modules if m.split(".")[0] == "jaxad"] == ["jaxad", "jaxad.deploy"]  # no jaxad.methods
    out = np.load(tmp_path / "out.npz")
    return out["scores"], out["labels"], out["maps"]


def test_the_loader_pads_the_last_batch_and_checks_its_input(tmp_path):
    """A toy program (score = weight · mean pixel) exported for batches of 3 answers 7 images, and
    each answer depends on its own image only."""
    def fn(weights, images):
        x = images.astype(jnp.float32).mean((1, 2, 3)) * weights[0]
        return x / 255, x > 100, images[..., 0].astype(jnp.float32) * weights[1]

    weights = [np.float32(2.0), np.ones((5, 6), jnp.bfloat16)]
    specs = [jax.ShapeDtypeStruct(np.shape(w), np.asarray(w).dtype) for w in weights]
    exported = jax.export.export(jax.jit(fn))(specs, jax.ShapeDtypeStruct((3, 5, 6, 3), jnp.uint8))
    path = export.write(tmp_path / "toy.jaxad", exported, weights, {"method": "toy"})
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    scores, labels, maps = load_elsewhere(path, images, tmp_path)
    means = images.astype(np.float32).mean((1, 2, 3)) * 2
    np.testing.assert_allclose(scores, means / 255, rtol=1e-6)
    assert labels.tolist() == (means > 100).tolist() and maps.shape == (7, 5, 6)
    np.testing.assert_array_equal(maps, images[..., 0])

    model = deploy.load(path)
    assert model.batch_size == 3 and model.input_size == (5, 6) and model.meta["method"] == "toy"
    with pytest.raises(ValueError, match=r"expects uint8 images of shape \[N, 5, 6, 3\]; got float32"):
        model(images.astype(np.float32))
    with pytest.raises(ValueError, match="not an exported jaxad model"):
        deploy.load(tmp_path / "images.npy")


def _concurrent_equals_serial(model: deploy.Model, batches: list[np.ndarray], threads: int = 4, rounds: int = 3) -> None:
    """Every batch scored from ``threads`` threads at once, ``rounds`` times each, gives exactly its
    serial answer: calls share no state, and no thread gets another's outputs."""
    serial = [model(b) for b in batches]
    start = threading.Barrier(threads)

    def worker(t: int) -> list[tuple[int, tuple]]:
        start.wait()
        return [(i, model(batches[i])) for _ in range(rounds) for i in range(t, len(batches), threads)]

    with ThreadPoolExecutor(threads) as pool:
        answers = [a for done in pool.map(worker, range(threads)) for a in done]
    assert len(answers) == rounds * len(batches)
    for i, got in answers:
        for g, want in zip(got, serial[i]):
            np.testing.assert_array_equal(g, want)


def test_an_exported_model_scores_from_four_threads_as_serially(tmp_path):
    def fn(weights, images):
        x = images.astype(jnp.float32)
        maps = jnp.tanh(jnp.einsum("bhwc,c->bhw", x, weights[0]) / 255)
        return maps.mean((1, 2)), maps.max((1, 2)) > 0.5, maps

    weights = [np.array([0.3, -0.2, 0.9], np.float32)]
    specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
    exported = jax.export.export(jax.jit(fn))(specs, jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.uint8))
    model = deploy.load(export.write(tmp_path / "toy.jaxad", exported, weights, {"method": "toy"}))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for n in (1, 3, 4, 5, 7, 9, 2, 6)]
    _concurrent_equals_serial(model, batches)


@pytest.mark.slow
def test_an_exported_fitted_model_scores_from_four_threads_as_serially(data, tmp_path):
    normals, images = data
    config = apply_overrides(load_config(ROOT / "configs" / "patchcore.py"), SMALL)
    pipeline.run(config, normals, tmp_path / "w")
    model = deploy.load(export.export(tmp_path / "w", tmp_path / "model.jaxad"))
    _concurrent_equals_serial(model, [images[:n] for n in (1, 2, 3, 4, 5, 6, 7, 7)])


def test_a_symbolic_batch_takes_any_number_of_images_in_chunks(tmp_path):
    """The same toy program exported once for any batch answers 1, 3 and 7 images (in calls of at
    most 3) exactly as it does in process; a symbolic program needs a chunk size."""
    def fn(weights, images):
        x = images.astype(jnp.float32).mean((1, 2, 3)) * weights[0]
        return x / 255, x > 100, images[..., 0].astype(jnp.float32)

    weights = [np.float32(2.0)]
    (b,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(fn))([jax.ShapeDtypeStruct((), np.float32)],
                                              jax.ShapeDtypeStruct((b, 5, 6, 3), jnp.uint8))
    with pytest.raises(ConfigError, match="symbolic batch needs a chunk size"):
        export.write(tmp_path / "bad.jaxad", exported, weights, {"method": "toy"})
    path = export.write(tmp_path / "toy.jaxad", exported, weights, {"method": "toy"}, chunk_size=3)
    model = deploy.load(path)
    assert model.batch_size is None and model.chunk_size == 3
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for part in (images[:1], images[1:4], images):
        for got, want in zip(model(part), jax.device_get(jax.jit(fn)(weights, part))):
            np.testing.assert_array_equal(got, want)
    scores, _, _ = load_elsewhere(path, images, tmp_path)
    np.testing.assert_array_equal(scores, model(images)[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """(a folder of 8 normal images, 7 test images as uint8 [7, 64, 64, 3])."""
    root = synthetic.generate(tmp_path_factory.mktemp("syn"), seed=5, categories=["gear"], image_size=64, n_train=8,
                              n_test_good=2, n_per_defect=1) / "gear"
    normals = tmp_path_factory.mktemp("normals")
    for p in (root / "train" / "good").glob("*.png"):
        shutil.copy(p, normals / p.name)
    test = sorted((root / "test").rglob("*.png"))[:7]
    return normals, np.stack([np.asarray(Image.open(p).convert("RGB")) for p in test])


def in_process(workdir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decisions of the fitted model as predict.py makes them: loader decoding, jitted predict,
    the stored calibration."""
    config, saved = checkpoint.load(workdir)
    predictor = pipeline.make_predictor(config, pipeline.load_backbone(config), saved)
    decoded = images.astype(np.float32) / np.float32(255)
    parts = compilation.in_fixed_batches(predictor, decoded, config.batch_size)
    scores, maps = (np.concatenate([np.asarray(p[i]) for p in parts]) for i in (0, 1))
    return jax.device_get(calibration.decide(pipeline.load_calibration(workdir), scores, maps))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_exported_decisions_match_the_fitted_model(name, data, tmp_path):
    normals, images = data
    config = apply_overrides(load_config(ROOT / "configs" / f"{name}.py"), [*SMALL, *TINY[name]])
    workdir = tmp_path / "w"
    pipeline.run(config, normals, workdir)
    path = export.export(workdir, tmp_path / "model.jaxad")  # one program for any number of images
    scores, labels, maps = load_elsewhere(path, images, tmp_path)  # in calls of 4 and 3
    want_scores, want_labels, want_maps = in_process(workdir, images)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    np.testing.assert_allclose(maps, want_maps, atol=1e-4)
    near = np.abs(want_scores - 0.5) < 1e-4  # a decision on the threshold may flip with rounding
    assert labels[~near].tolist() == want_labels[~near].tolist()
    from jaxad import deploy
    model = deploy.load(path)
    for rows in (slice(0, 1), slice(1, 4)):  # batches of 1 and 3 from the same file
        got = model(images[rows])
        np.testing.assert_allclose(got[0], want_scores[rows], atol=1e-4)
        np.testing.assert_allclose(got[2], want_maps[rows], atol=1e-4)


@pytest.mark.parametrize("shape", [(97, 83), (40, 50)])
def test_decoding_resizes_like_the_loader_within_a_grey_level(shape):
    """Images of another size are resampled in the program with PIL's filter (the loader's); PIL
    computes in fixed point, so a pixel may differ by one level of 255, and only a few do."""
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    loader = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR), np.float32) / 255
    levels = np.abs(np.asarray(export.decode(jnp.asarray(image[None]), (64, 64)))[0] - loader) * 255
    assert levels.max() <= 1.0 + 1e-4 and np.mean(levels > 0.5) < 0.25
    at_size = np.resize(image, (1, 64, 64, 3))  # at the config's size nothing is resampled
    np.testing.assert_allclose(np.asarray(export.decode(jnp.asarray(at_size), (64, 64))),
                               at_size.astype(np.float32) / np.float32(255), rtol=2e-7)  # XLA's x/255 may be 1 ulp off
