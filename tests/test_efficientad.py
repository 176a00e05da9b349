"""EfficientAD: PDN shapes and receptive field, losses and map normalisation against numpy/torch,
teacher distillation, and fit → evaluate through scripts/fit.py on tiny data."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import run_cli

from jaxad.backbones import load
from jaxad.data import synthetic
from jaxad.features import resize_bilinear
from jaxad.methods import efficientad
from jaxad.nets import PDN, Autoencoder, pdn_output_size
from jaxad.nets.pdn import avg_pool_2x2, decoder_sizes
from jaxad.postprocess import resize_matrix
from jaxad.train import distillation

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", ["s", "m"])
@pytest.mark.parametrize("padded,side", [(True, 64), (False, 56)])
def test_pdn_output_shapes_at_256(size, padded, side):
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    for channels in (384, 768):
        net = PDN(channels, size, padded)
        params = jax.eval_shape(net.init, jax.random.key(0), x)
        assert jax.eval_shape(net.apply, params, x).shape == (2, side, side, channels)
    assert pdn_output_size(256, padded) == side


@pytest.mark.parametrize("size", ["s", "m"])
def test_unpadded_pdn_output_pixel_sees_exactly_its_33x33_patch(size):
    """Perturb one input pixel: the outputs that change are exactly those whose patch
    [4i, 4i + 32] × [4j, 4j + 32] contains it."""
    net = PDN(8, size, padded=False)
    x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3))
    pixels = [(0, 0), (20, 45), (63, 31)]
    batch = jnp.concatenate([x] + [x.at[0, p, q].add(5.0) for p, q in pixels])
    params = jax.jit(net.init)(jax.random.key(2), x)
    out = np.asarray(jax.jit(net.apply)(params, batch))
    assert out.shape[1:3] == (8, 8)
    i = np.arange(8)
    for k, (p, q) in enumerate(pixels):
        changed = np.abs(out[k + 1] - out[0]).max(-1) > 0
        inside = ((4 * i <= p) & (p <= 4 * i + 32))[:, None] & ((4 * i <= q) & (q <= 4 * i + 32))[None, :]
        assert np.array_equal(changed, inside), (p, q)


def test_padded_pool_counts_padded_zeros():
    x = jnp.ones((1, 4, 4, 1))
    out = np.asarray(avg_pool_2x2(x, 1))[0, :, :, 0]
    np.testing.assert_allclose(out, [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])


def test_autoencoder_shape_and_decoder_sizes():
    assert [h for h, _ in decoder_sizes((256, 256))] == [3, 8, 15, 32, 63, 127, 56]
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    params = jax.eval_shape(Autoencoder(384).init, jax.random.key(0), x)
    assert jax.eval_shape(Autoencoder(384).apply, params, x).shape == (1, 56, 56, 384)
    small = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(Autoencoder(384).init, jax.random.key(0), small)
    assert jax.eval_shape(Autoencoder(384).apply, params, small).shape == (1, 8, 8, 384)


@pytest.mark.parametrize("n_in,n_out", [(8, 15), (127, 56), (1, 3)])
def test_bilinear_resize_is_torch_align_corners_false(n_in, n_out):
    """The decoder's resize vs postprocess.resize_matrix, an independent numpy build of torch's rule."""
    x = np.random.default_rng(0).standard_normal((1, n_in, n_in, 2)).astype(np.float32)
    got = np.asarray(resize_bilinear(jnp.asarray(x), (n_out, n_out)))
    m = resize_matrix(n_out, n_in)
    want = np.einsum("Hh,bhwc,Ww->bHWc", m, x, m)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 7, 7, 384), (2, 5, 3, 11)])
def test_hard_feature_loss_matches_numpy(shape):
    d = np.random.default_rng(1).random(shape).astype(np.float32)
    q = 0.999
    d_q = np.quantile(d.astype(np.float64), q)
    want = d[d >= d_q].mean()
    got = float(jax.jit(efficientad.hard_feature_loss, static_argnums=1)(jnp.asarray(d), q))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_map_normalisation_padding_and_resize_match_numpy():
    rng = np.random.default_rng(2)
    st, ae = rng.random((2, 6, 6)).astype(np.float32), rng.random((2, 6, 6)).astype(np.float32)
    qs = {"st": np.quantile(st, [0.9, 0.995]), "ae": np.quantile(ae, [0.9, 0.995])}
    combined = np.asarray(efficientad.combined_map({k: jnp.asarray(v, jnp.float32) for k, v in qs.items()},
                                                   jnp.asarray(st), jnp.asarray(ae)))
    norm = lambda m, q: 0.1 * (m - q[0]) / (q[1] - q[0])  # noqa: E731
    np.testing.assert_allclose(combined, 0.5 * norm(st, qs["st"]) + 0.5 * norm(ae, qs["ae"]), rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch", reason="its torch half needs the port extra: pip install -e '.[test,port]'")
    want = torch.nn.functional.interpolate(torch.nn.functional.pad(torch.from_numpy(combined.copy())[:, None], (4, 4, 4, 4)),
                                           size=(40, 40), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(efficientad.to_image(jnp.asarray(combined), (40, 40))), want, atol=1e-5)


@pytest.mark.port
@pytest.mark.parametrize("kind,name", [(0, "adjust_brightness"), (1, "adjust_contrast"), (2, "adjust_saturation")])
def test_colour_adjustments_match_torchvision(kind, name):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = np.random.default_rng(kind).random((2, 6, 5, 3)).astype(np.float32)
    for f in (0.8, 1.17):
        want = getattr(tf, name)(torch.from_numpy(x).permute(0, 3, 1, 2), f).permute(0, 2, 3, 1).numpy()
        got = np.asarray(efficientad.adjust(jnp.asarray(x), jnp.int32(kind), jnp.float32(f)))
        np.testing.assert_allclose(got, want, atol=1e-3)  # torchvision's luma is 0.2989 r, PIL's 0.299 r


def test_distillation_targets_are_standardised_and_teacher_round_trips(tmp_path):
    bb = load("efficientnet_lite0")
    images = np.random.default_rng(5).random((4, 32, 32, 3)).astype(np.float32)
    settings = distillation.Settings(image_size=32, target_size=32, steps=2, batch_size=2, stats_images=4)
    batches = iter([images] * 100)
    teacher = distillation.distil(settings, bb, batches, stats_batches=iter([images]))
    proj = jnp.asarray(distillation.projection_matrix(152, "random", 0))
    target = jax.jit(lambda v, x: distillation.target_features(settings, bb, v, proj, x))
    raw = np.asarray(target(bb.variables, jnp.asarray(images)), np.float64)
    assert raw.shape == (4, pdn_output_size(32, True), pdn_output_size(32, True), 384)
    z = (raw - teacher["mean"]) / teacher["std"]
    np.testing.assert_allclose(z.reshape(-1, 384).mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(z.reshape(-1, 384).std(0), 1, atol=1e-3)
    path = distillation.save_teacher(tmp_path / "t", settings, teacher)
    loaded_settings, loaded = distillation.load_teacher(path)
    assert loaded_settings == settings
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.port
def test_pool_projection_is_torch_adaptive_average():
    torch = pytest.importorskip("torch")
    for dim in (1536, 152):
        x = np.random.default_rng(dim).standard_normal((3, dim)).astype(np.float32)
        want = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], 384)[:, 0].numpy()
        np.testing.assert_allclose(x @ distillation.projection_matrix(dim, "pool", 0), want, atol=1e-5)


TINY = ["--config.image_size=64", "--config.batch_size=4", "--config.num_overlays=2", "--config.train_steps=6",
        "--config.teacher_steps=3", "--config.teacher_batch_size=2", "--config.val_fraction=0.25", "--config.validate_every=3"]


@pytest.mark.slow
def test_cli_end_to_end_on_a_tiny_mvtec_category_with_penalty(tmp_path):
    root = synthetic.generate(tmp_path / "data", seed=1, categories=["gear"], image_size=64, n_train=8,
                              n_test_good=2, n_per_defect=1)
    penalty = root / "gear" / "test"  # any folder of images stands in for ImageNet here
    workdir = tmp_path / "w"
    assert run_cli("fit.py", "--method", "efficientad", "--data", root / "gear", "--workdir", workdir, *TINY,
                   f"--config.penalty_dir={penalty}") == 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and set(metrics["per_defect_image_auroc"]) >= {"crack", "missing"}
    history = json.loads((workdir / "train_history.json").read_text())
    assert history["penalty"] == str(penalty) and history["n_validation"] == 2
    assert history["history"][-1]["step"] == 6 and history["history"][-1]["penalty"] > 0
    assert history["teacher"].startswith("pretrained efficientnet_lite0") and history["channels"] == 152
    assert (workdir / "train.png").is_file() and 0 <= history["history"][-1]["val_image_auroc"] <= 1


@pytest.mark.slow
def test_in_fit_distillation_warns_that_it_is_not_a_teacher(tmp_path):
    root = synthetic.generate(tmp_path / "data", seed=2, categories=["gear"], image_size=64, n_train=8,
                              n_test_good=1, n_per_defect=1)
    workdir = tmp_path / "w"
    with pytest.warns(UserWarning, match="plumbing, not a teacher"):
        assert run_cli("fit.py", "--method", "efficientad", "--data", root / "gear", "--workdir", workdir, *TINY,
                       "--config.teacher=distil") == 0
    assert "distilled here" in json.loads((workdir / "train_history.json").read_text())["teacher"]


@pytest.mark.slow
def test_distilled_teacher_is_used_by_fit_and_never_overwritten(tmp_path, capsys, monkeypatch):
    root = synthetic.generate(tmp_path / "data", seed=4, categories=["gear"], image_size=64, n_train=6,
                              n_test_good=1, n_per_defect=1)
    teacher = tmp_path / "teacher"
    folders = f"{root / 'gear' / 'train'},{root / 'gear' / 'test' / 'good'}"  # 6 + 1 images
    distil = [f"--config.data={folders}", f"--config.out={teacher}", "--config.image_size=64",
              "--config.target_size=64", "--config.steps=2", "--config.batch_size=2", "--config.stats_images=4"]
    assert run_cli("distill_teacher.py", *distil) == 0
    assert "(7 images, 2 steps)" in capsys.readouterr().out
    written = (teacher / "teacher.json").read_text()
    assert run_cli("distill_teacher.py", *distil) == 2
    assert "already holds a teacher" in capsys.readouterr().err and (teacher / "teacher.json").read_text() == written
    workdir = tmp_path / "w"
    monkeypatch.chdir(tmp_path)  # a relative teacher path works too
    assert run_cli("fit.py", "--method", "efficientad", "--data", root / "gear", "--workdir", workdir, *TINY,
                   "--config.teacher=teacher") == 0
    assert json.loads((workdir / "train_history.json").read_text())["teacher"] == "file teacher"
    assert run_cli("fit.py", "--method", "efficientad", "--data", root / "gear", "--workdir", tmp_path / "w2", *TINY,
                   f"--config.teacher={teacher}", "--config.pdn=m") == 2
    assert "PDN-S" in capsys.readouterr().err


def synthetic_scores(backbone, size: int = 128, steps: int = 150) -> float:
    """Image AUROC of EfficientAD (default teacher) fitted on 24 normal 'grain' images and scored on
    8 normal and 8 defective ones (holes, stains, contamination), 150 steps at 128 px, lr 1e-3."""
    from jaxad.config import load_config
    from jaxad.eval.metrics import image_auroc

    rng = np.random.default_rng(0)
    train = np.stack([synthetic.render_normal("grain", rng, size) for _ in range(24)])
    defects = ["hole", "stain", "contamination", "hole", "stain", "contamination", "hole", "stain"]
    test = [synthetic.render_example("grain", rng, size, d).image for d in [None] * 8 + defects]
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "efficientad.py")
    config.image_size, config.train_steps, config.validate_every, config.lr = size, steps, steps, 1e-3
    state = efficientad.fit_images(config, train.astype(np.float32), backbone)[0]
    predict = jax.jit(lambda s, x: efficientad.predict(config, backbone, s, x))
    scores = np.asarray(predict({**state, "backbone": backbone.variables}, jnp.asarray(np.stack(test), jnp.float32))[0])
    return image_auroc(scores, np.r_[np.zeros(8), np.ones(8)])


def chance_bound(n_normal: int, n_defective: int, alpha: float) -> float:
    """The image AUROC a scorer at chance exceeds with probability ≤ ``alpha``: exact Mann–Whitney
    null distribution (every ordering of the distinct scores equally likely)."""
    pairs = n_normal * n_defective
    counts = np.zeros((n_defective + 1, n_normal + 1, pairs + 1))  # [i, j, u]: orderings of i vs j with U = u
    counts[:, 0, 0] = counts[0, :, 0] = 1
    for i in range(1, n_defective + 1):
        for j in range(1, n_normal + 1):  # the top score is defective (above all j normal) or normal
            counts[i, j, j:] = counts[i - 1, j, :pairs + 1 - j]
            counts[i, j] += counts[i, j - 1]
    tail = np.cumsum(counts[-1, -1][::-1])[::-1] / counts[-1, -1].sum()  # P(U ≥ u)
    return (int(np.argmax(tail <= alpha)) - 1) / (n_normal * n_defective)


def test_chance_bound_matches_the_mann_whitney_tables():
    assert chance_bound(8, 8, 0.05) == 48 / 64 and chance_bound(8, 8, 0.01) == 54 / 64  # P(U ≥ 49) 0.041, ≥ 55 0.007
    assert chance_bound(3, 3, 0.05) == 8 / 9  # only the perfect ordering (1 of 20) is that rare


@pytest.mark.slow
def test_default_teacher_detects_synthetic_defects_well_above_chance():
    """8 normal and 8 defective images: a scorer at chance exceeds AUROC 54/64 with probability
    0.007 (< 1 %, the bound), and 0.5 on average. Measured 55/64 = 0.859 (the aim is > 0.9)."""
    assert synthetic_scores(load("efficientnet_lite0", taps=("stage2", "stage4"))) > chance_bound(8, 8, 0.01)
