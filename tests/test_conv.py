"""The fast-backward convolution layer matches flax.linen.Conv in values, gradients and parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.nets.conv import Conv


@pytest.mark.parametrize("kernel,padding,stride", [(4, 3, 1), (3, 1, 1), (4, 0, 1), (4, 1, 2), (1, 0, 1)])
def test_conv_matches_flax(kernel: int, padding: int, stride: int) -> None:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, 11, 5)), jnp.float32)
    ours = Conv(7, kernel, padding, stride)
    ref = nn.Conv(7, (kernel, kernel), (stride, stride), padding=((padding, padding), (padding, padding)))
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(1), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)

    def loss(net, p, v):
        return jnp.sum(jnp.sin(net.apply(p, v)))

    g_ours = jax.grad(lambda p, v: loss(ours, p, v), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, v: loss(ref, p, v), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
