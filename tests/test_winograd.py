"""The frozen-backbone convolution and its fast paths: Winograd F(4×4, 3×3), taken only where the
variables carry the transformed kernel and the input is small, shifted multiply-adds for stems over
RGB, and a folded squeeze-excite gate, all with the values of XLA's convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import backbones
from jaxad.backbones import layers, winograd
from jaxad.backbones.layers import FrozenConv
from jaxad.runtime import compilation


def _direct(x, kernel, stride=1):
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape", [(1, 8, 8, 4), (2, 7, 9, 5), (1, 1, 1, 3), (3, 2, 5, 6)])
def test_winograd_equals_the_direct_convolution(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 7)), jnp.float32)
    ref = _direct(x, kernel)
    got = winograd.conv3x3(x, winograd.kernel_transform(kernel))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def _ops(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("kernel,stride,bias", [(3, 1, False), (3, 2, False), (1, 1, True), (1, 2, False), (7, 2, False)])
def test_frozen_conv_matches_flax_conv(kernel, stride, bias):
    x = jnp.asarray(np.random.default_rng(1).random((2, 9, 12, 6)), jnp.float32)
    ours = FrozenConv(5, kernel, stride, use_bias=bias)
    pad = kernel // 2
    ref = nn.Conv(5, (kernel, kernel), (stride, stride), padding=[(pad, pad)] * 2, use_bias=bias)
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a non-zero bias
    with_kernels = {**variables, winograd.COLLECTION: winograd.transformed_kernels(variables["params"])}
    for v in (variables, with_kernels):
        np.testing.assert_allclose(ours.apply(v, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
    winograd_taken = (kernel, stride) == (3, 1) and jax.default_backend() == "cpu"
    assert ("conv_general_dilated" in _ops(lambda v: ours.apply(v, x), with_kernels)) == (kernel != 1 and not winograd_taken)
    assert ("conv_general_dilated" in _ops(lambda v: ours.apply(v, x), variables)) == (kernel != 1)


def test_large_inputs_keep_the_direct_convolution():
    small = (1, 16, 16, 64)
    large = (2, 128, 128, 64)  # its tile tensor (2.25× the input) would leave the cache
    assert np.prod(large) > winograd.MAX_INPUT >= np.prod(small)
    conv = FrozenConv(8, 3)
    variables = conv.init(jax.random.key(0), jnp.zeros(small))
    variables = {**variables, winograd.COLLECTION: winograd.transformed_kernels(variables["params"])}
    big = jax.ShapeDtypeStruct(large, jnp.float32)
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: conv.apply(variables, x))(big))


def test_bfloat16_keeps_the_direct_convolution():
    """bf16 is for accelerators, which run the direct convolution: its error is measured on that."""
    x = jnp.zeros((1, 16, 16, 8))
    conv = FrozenConv(8, 3, dtype=jnp.bfloat16)
    variables = conv.init(jax.random.key(0), x)
    variables = {**variables, winograd.COLLECTION: winograd.transformed_kernels(variables["params"])}
    assert "conv_general_dilated" in _ops(lambda v: conv.apply(v, x), variables)


def test_a_bfloat16_backbone_carries_no_transformed_kernels():
    """It never takes the Winograd path, so the kernels (4× the 3×3 weights) would be dead memory."""
    assert winograd.COLLECTION not in backbones.random_init("resnet18", dtype=jnp.bfloat16).variables


def test_only_dense_3x3_kernels_are_transformed():
    params = {"a": {"kernel": jnp.ones((3, 3, 4, 8))}, "dw": {"kernel": jnp.ones((3, 3, 1, 8))},
              "pw": {"kernel": jnp.ones((1, 1, 4, 8)), "bias": jnp.ones(8)}, "bn": {"scale": jnp.ones(8)}}
    out = winograd.transformed_kernels(params)
    assert list(out) == ["a"] and out["a"]["kernel"].shape == (6, 6, 4, 8)


def test_backbones_on_cpu_carry_the_transformed_kernels():
    bb = backbones.random_init("resnet18")
    kernels = bb.variables.get(winograd.COLLECTION)
    assert (kernels is not None) == (jax.default_backend() == "cpu")
    if kernels is not None:
        conv2 = bb.variables["params"]["layer1_0"]["conv2"]["kernel"]
        expected = compilation.jit(winograd.kernel_transform)(conv2)  # compiled as at load
        np.testing.assert_array_equal(kernels["layer1_0"]["conv2"]["kernel"], expected)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (3, 1), (5, 2)])
def test_frozen_conv_pads_like_tensorflow_when_asked(kernel, stride):
    x = jnp.asarray(np.random.default_rng(2).random((1, 9, 12, 4)), jnp.float32)
    ours = FrozenConv(6, kernel, stride, symmetric=False)
    ref = nn.Conv(6, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False)
    variables = ours.init(jax.random.key(0), x)
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,symmetric", [(3, 2, True), (3, 2, False), (3, 1, True), (7, 2, True)])
def test_stems_over_rgb_match_flax_conv(kernel, stride, symmetric):
    """A 3×3 kernel over 3 channels (27 taps) runs as shifted multiply-adds on CPU; a 7×7 one keeps
    XLA's convolution. Both give nn.Conv's values for either padding on odd sizes."""
    x = jnp.asarray(np.random.default_rng(3).random((2, 11, 8, 3)), jnp.float32)
    ours = FrozenConv(5, kernel, stride, symmetric=symmetric)
    pad = [(kernel // 2, kernel // 2)] * 2 if symmetric else "SAME"
    ref = nn.Conv(5, (kernel, kernel), (stride, stride), padding=pad, use_bias=False)
    variables = ours.init(jax.random.key(0), x)
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
    shifted = layers.shifted_sum_pays(kernel * kernel * 3)
    assert shifted == (kernel == 3 and jax.default_backend() == "cpu")
    assert ("conv_general_dilated" in _ops(lambda v: ours.apply(v, x), variables)) == (not shifted)


@pytest.mark.parametrize("kernel,batch", [(1, 1), (1, 2), (3, 1)])
def test_a_gate_scales_the_input_channels(kernel, batch):
    """conv(x, gate) = conv(x · gate), whether the gate is folded into a 1×1 kernel (one image) or
    scales the map."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((batch, 6, 7, 5)), jnp.float32)
    gate = jnp.asarray(rng.random((batch, 5)), jnp.float32)
    conv = FrozenConv(4, kernel, use_bias=True)
    variables = jax.tree.map(lambda p: p + 0.1, conv.init(jax.random.key(0), x))
    np.testing.assert_allclose(conv.apply(variables, x, gate), conv.apply(variables, x * gate[:, None, None, :]),
                               rtol=1e-5, atol=1e-6)


def test_shifted_multiply_adds_sum_in_float32():
    """In bfloat16 a stem over RGB equals the float32 convolution of the bf16-rounded image and kernel
    to within one bf16 rounding of the output (summing 27 terms in bf16 would be off by several)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.random((2, 33, 31, 3)), jnp.bfloat16)
    conv = FrozenConv(16, 3, 2, dtype=jnp.bfloat16)
    variables = conv.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
    ref = _direct(x.astype(jnp.float32), kernel, stride=2)
    ours = conv.apply(variables, x)
    assert ours.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(ours.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))) <= 2.0**-8


def test_depthwise_kernels_of_any_size_are_shifted_on_cpu():
    """Depthwise convolutions take the shifted multiply-adds on CPU whatever their taps (XLA:CPU's
    grouped convolution is far slower); dense ones only up to MAX_SHIFTED_TAPS."""
    on_cpu = jax.default_backend() == "cpu"
    assert layers.shifted_sum_pays(49, depthwise=True) == on_cpu
    assert not layers.shifted_sum_pays(layers.MAX_SHIFTED_TAPS + 1)
    x = jnp.ones((1, 9, 9, 4), jnp.float32)
    dw = layers.DepthwiseConv(7)
    variables = dw.init(jax.random.key(0), x)
    assert ("conv_general_dilated" in _ops(lambda v: dw.apply(v, x), variables)) == (not on_cpu)
