"""Config overrides, the patch-feature pipeline and map post-processing."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from jaxad import checkpoint, features, pipeline, postprocess
from jaxad.config import apply_overrides, config_path, load_config
from jaxad.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_keep_types():
    c = load_config(config_path("crd", CONFIGS))
    c = apply_overrides(c, ["--config.lam=3", "--config.blur_sigma=3", "--config.taps=('stage1','stage2')", "--config.lam_mode=trace", "--config.aggregate=1"])
    assert c.lam == "3" and c.blur_sigma == 3.0 and isinstance(c.blur_sigma, float)  # lam is "auto" or a number
    assert c.taps == ("stage1", "stage2")
    assert c.lam_mode == "trace" and c.aggregate == 1


def test_a_config_saved_before_a_key_existed_loads_with_the_value_it_was_fitted_with(tmp_path):
    """A CPR model saved before ``aggregate``, ``compute_dtype``, ``train_images`` and ``seed``
    existed reads them as 1 / float32 / 0 / 0; keys it has stay as saved."""
    saved = load_config(config_path("cpr_fast", CONFIGS))
    for key in ("aggregate", "compute_dtype", "train_images", "seed"):
        del saved[key]
    saved.lrb_width = 7
    checkpoint.save(tmp_path, saved, {"x": np.zeros(2, np.float32)})
    config, _ = checkpoint.load(tmp_path)
    assert (config.aggregate, config.compute_dtype, config.train_images, config.seed) == (1, "float32", 0, 0)
    assert config.lrb_width == 7


@pytest.mark.parametrize(
    "override, fragment",
    [("--config.nope=1", "unknown key"), ("--config.aggregate=abc", "expected a int"), ("config.lam", "look like")],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(load_config(config_path("crd", CONFIGS)), [override])


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match="crd"):
        config_path("nosuchmethod", CONFIGS)


def test_a_config_of_no_method_is_not_offered_as_one():
    """configs/distill_teacher.py configures a script, not a method: --method refuses it by name."""
    with pytest.raises(ConfigError, match=r"distill_teacher\.py: configures no method; known methods: cpr, ") as info:
        config_path("distill_teacher", CONFIGS)
    assert "distill_teacher," not in str(info.value)


def test_local_average_counts_padding_like_torch():
    x = jnp.ones((1, 4, 4, 1))
    y = np.asarray(features.local_average(x, 3))[0, ..., 0]
    assert y[1, 1] == pytest.approx(1.0) and y[0, 0] == pytest.approx(4 / 9)


def test_local_average_over_in_image_neighbours_only():
    x = jnp.asarray(np.random.default_rng(0).random((2, 5, 6, 3)), jnp.float32)
    y = np.asarray(features.local_average(x, 3, count_padding=False))
    xn = np.asarray(x)
    for i, j in [(0, 0), (0, 3), (2, 2), (4, 5)]:
        rows, cols = slice(max(i - 1, 0), i + 2), slice(max(j - 1, 0), j + 2)
        np.testing.assert_allclose(y[:, i, j], xn[:, rows, cols].mean((1, 2)), rtol=1e-6)


def test_embed_concatenates_on_finest_grid():
    maps = {"a": jnp.ones((2, 8, 8, 3)), "b": jnp.ones((2, 4, 4, 5))}
    out = features.embed(maps, ("a", "b"), aggregate=1)
    assert out.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(out, 1.0)


def test_gaussian_blur_matches_scipy_reflect():
    x = np.random.default_rng(0).random((2, 40, 52)).astype(np.float32)
    ours = np.asarray(postprocess.gaussian_blur(jnp.asarray(x), 4.0))
    ref = np.stack([gaussian_filter(a, 4, mode="mirror", truncate=4.0) for a in x])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_anomaly_maps_upsample_then_blur():
    patch = jnp.zeros((1, 8, 8)).at[0, 4, 4].set(1.0)
    maps = postprocess.anomaly_maps(patch, (64, 64), sigma=2.0)
    assert maps.shape == (1, 64, 64)
    peak = np.unravel_index(np.argmax(np.asarray(maps[0])), (64, 64))
    assert abs(peak[0] - 36) <= 2 and abs(peak[1] - 36) <= 2


@pytest.mark.parametrize("hw, size", [((8, 8), (64, 64)), ((7, 11), (50, 90)), ((32, 32), (256, 256))])
def test_anomaly_maps_equal_resize_then_blur(hw, size):
    """The folded matrices reproduce torch-style bilinear upsampling followed by the scipy blur."""
    import jax

    patch = np.random.default_rng(1).random((2, *hw)).astype(np.float32)
    up = np.asarray(jax.image.resize(jnp.asarray(patch), (2, *size), "bilinear", antialias=False))
    ref = np.stack([gaussian_filter(a, 4, mode="mirror", truncate=4.0) for a in up])
    np.testing.assert_allclose(np.asarray(postprocess.anomaly_maps(jnp.asarray(patch), size, 4.0)), ref, atol=1e-5)


def test_blur_of_map_smaller_than_kernel_is_finite_and_normalised():
    x = jnp.ones((1, 5, 5))
    np.testing.assert_allclose(np.asarray(postprocess.gaussian_blur(x, 4.0)), 1.0, atol=1e-6)


@pytest.mark.parametrize("method, overrides, deepest", [
    ("patchcore", [], "stage4"),
    ("cpr_faster", [], "stage2"),
    ("paap", [], "stage6"),
    ("paap", ["--config.taps=('stage2',)"], "stage4"),  # the dense matcher's match_tap
    ("paap", ["--config.taps=('stage2',)", "--config.matcher=orb"], "stage2"),
])
def test_a_methods_backbone_holds_the_layers_up_to_the_deepest_tap_it_reads(method, overrides, deepest):
    config = apply_overrides(load_config(config_path(method, CONFIGS)), overrides)
    assert list(pipeline.load_backbone(config).taps)[-1] == deepest
