"""jaxad.runtime.compilation: jax.jit with jaxad's XLA:CPU options, usable everywhere jax.jit is."""

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.runtime import compilation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_options():
    compilation.cpu_options.cache_clear()
    yield
    compilation.cpu_options.cache_clear()


def test_top_level_and_nested_calls_agree():
    """A jaxad-jitted function runs at the top level (with the options) and inside another jitted
    function (where JAX allows no compile options) to the same result."""
    f = compilation.jit(lambda a, b: jnp.tanh(a @ b).sum(-1))
    a, b = (jnp.asarray(np.random.default_rng(i).random((64, 64)), jnp.float32) for i in (0, 1))
    top = f(a, b)
    nested = jax.jit(lambda a, b: f(a, b) * 2.0)(a, b)
    np.testing.assert_allclose(np.asarray(nested), 2.0 * np.asarray(top), rtol=1e-5)


def test_static_arguments_pass_through():
    @partial(compilation.jit, static_argnames=("power",))
    def raise_to(x, power):
        return x**power

    assert float(raise_to(jnp.float32(3.0), power=2)) == 9.0
    assert float(raise_to(jnp.float32(3.0), power=3)) == 27.0


def test_cpu_options_are_checked_against_xla(monkeypatch, fresh_options):
    """An option value this XLA rejects means compiling with XLA's defaults, not an error."""
    monkeypatch.setattr(compilation, "YNN_SETTING", "NOT_A_FUSION_TYPE")
    assert compilation.cpu_options() == {}
    assert float(compilation.jit(lambda x: x + 1)(jnp.float32(1.0))) == 2.0


def test_top_level_calls_compile_with_the_options(monkeypatch, fresh_options):
    """The options reach the top-level compilation and, where this XLA knows them, take effect:
    a compiled product is then not a YNNPACK fusion."""
    options = compilation.cpu_options()
    if jax.default_backend() != "cpu":
        assert options == {}
    seen, plain_jit = [], jax.jit
    monkeypatch.setattr(jax, "jit", lambda fun, **kw: seen.append(kw.get("compiler_options")) or plain_jit(fun, **kw))
    x = jnp.ones((128, 128), jnp.float32)
    compilation.jit(lambda a: a @ a)(x)
    assert seen[-1] == (options or None)
    if options:
        assert "__ynn_fusion" not in plain_jit(lambda a: a @ a).lower(x).compile(options).as_text()


def test_a_users_xla_flags_setting_wins():
    """With the option in XLA_FLAGS, jaxad adds nothing of its own."""
    code = "from jaxad.runtime import compilation; assert compilation.cpu_options() == {}, compilation.cpu_options()"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --{compilation.YNN_OPTION}=LIBRARY_FUSION_TYPE_REDUCE".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_compiled_init_gives_the_eager_variables_bit_for_bit():
    """One compiled init draws the same weights and batch statistics as flax's eager init, and
    keyword arguments such as ``train`` reach the module."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(8, (3, 3))(x)
            return nn.Dense(4)(nn.BatchNorm(use_running_average=not train)(x))

    key, x = jax.random.key(5), jnp.ones((2, 8, 8, 3), jnp.float32)
    eager, compiled = Net().init(key, x, train=False), compilation.init(Net(), key, x, train=False)
    assert jax.tree.structure(eager) == jax.tree.structure(compiled) and "batch_stats" in compiled
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fixed_batches_compile_once_and_drop_the_padding():
    """Ten items in batches of four: every call sees four rows (one program), the outputs hold
    exactly the ten items' results, for a pytree of inputs with numpy and jax leaves."""
    seen = []

    def fn(tree):
        seen.append((tree["a"].shape, tree["b"].shape))
        return {"sum": tree["a"].sum(-1) + tree["b"]}

    a = np.arange(30, dtype=np.float32).reshape(10, 3)
    b = jnp.arange(10, dtype=jnp.float32)
    out = compilation.in_fixed_batches(fn, {"a": a, "b": b}, 4)
    assert seen == [((4, 3), (4,))] * 3
    assert [len(o["sum"]) for o in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([o["sum"] for o in out]), a.sum(-1) + np.asarray(b))


def test_fixed_batches_on_host_fill_one_aligned_array_per_output():
    """The same ten items joined on the host: one array per output leaf, equal to the batches'
    concatenation, aligned so that a CPU device shares its memory."""
    from jaxad.runtime import shared_arrays

    a = np.arange(30, dtype=np.float32).reshape(10, 3)
    out = compilation.in_fixed_batches_on_host(lambda x: [x * 2, x.sum(-1)], a, 4)
    np.testing.assert_array_equal(out[0], a * 2)
    np.testing.assert_array_equal(out[1], a.sum(-1))
    assert all(isinstance(o, np.ndarray) and o.dtype == np.float32 for o in out)
    assert all(o.ctypes.data % shared_arrays.ALIGNMENT == 0 for o in out)
