"""The shared training loop: resuming from a checkpoint equals training straight through, and
only a run's own checkpoints are resumed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxad.errors import DataError, NumericsError
from jaxad.train import loop


def _problem(lr: float = 0.1):
    opt = optax.adam(lr)
    params = {"w": jnp.zeros(3, jnp.float32)}
    target = jnp.array([1.0, -2.0, 0.5])

    @jax.jit
    def step(state, batch, key):
        def loss(p):
            noise = 0.01 * jax.random.normal(key, (3,))
            return jnp.mean((p["w"] - target - noise) ** 2) * jnp.mean(batch)

        value, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, {"loss": value}

    return step, {"params": params, "opt": opt.init(params)}


def _batches():
    return loop.random_batches(np.ones((10, 2), np.float32), 4, seed=0)


def test_resume_matches_a_continuous_run(tmp_path):
    step, state = _problem()
    key = jax.random.key(0)
    straight, history = loop.train(step, state, _batches(), 60, key, log_every=20)
    assert [h["step"] for h in history] == [20, 40, 60]
    loop.train(step, state, _batches(), 12, key, checkpoint_dir=tmp_path, checkpoint_every=5)
    resumed, _ = loop.train(step, state, _batches(), 60, key, checkpoint_dir=tmp_path, checkpoint_every=5)
    np.testing.assert_allclose(resumed["params"]["w"], straight["params"]["w"], rtol=1e-6)
    assert float(jnp.abs(straight["params"]["w"] - jnp.array([1.0, -2.0, 0.5])).max()) < 0.1


def test_checkpoints_of_another_run_are_not_resumed(tmp_path, capsys):
    key = jax.random.key(0)
    step, state = _problem(lr=0.1)
    loop.train(step, state, _batches(), 12, key, checkpoint_dir=tmp_path, checkpoint_every=5, run={"lr": 0.1})
    step, state = _problem(lr=0.5)
    straight, _ = loop.train(step, state, _batches(), 12, key)
    again, _ = loop.train(step, state, _batches(), 12, key, checkpoint_dir=tmp_path, checkpoint_every=5,
                              run={"lr": 0.5})
    np.testing.assert_allclose(again["params"]["w"], straight["params"]["w"], rtol=1e-6)
    assert "another configuration or data wrote them" in capsys.readouterr().err


def test_checkpoints_past_the_steps_asked_for_or_of_no_recorded_run_are_not_resumed(tmp_path, capsys):
    step, state = _problem()
    key = jax.random.key(0)
    loop.train(step, state, _batches(), 12, key, checkpoint_dir=tmp_path, checkpoint_every=5, run={"a": 1})
    straight, _ = loop.train(step, state, _batches(), 6, key)
    shorter, _ = loop.train(step, state, _batches(), 6, key, checkpoint_dir=tmp_path, checkpoint_every=5,
                                run={"a": 1})
    np.testing.assert_allclose(shorter["params"]["w"], straight["params"]["w"], rtol=1e-6)
    assert "past the 6 asked for" in capsys.readouterr().err
    (tmp_path / loop.RUN_FILE).unlink()
    unrecorded, _ = loop.train(step, state, _batches(), 6, key, checkpoint_dir=tmp_path, run={"a": 1})
    np.testing.assert_allclose(unrecorded["params"]["w"], straight["params"]["w"], rtol=1e-6)
    assert "record no run" in capsys.readouterr().err


def test_run_identity_leaves_out_length_and_checkpointing():
    config = {"lr": 0.1, "train_steps": 400, "checkpoint_every": 100, "workdir": "/w", "data": "/d"}
    assert loop.run_identity(config) == {"lr": 0.1, "data": "/d"}
    assert loop.run_identity({**config, "steps": 9}, ("steps",)) == {"lr": 0.1, "train_steps": 400, "data": "/d"}


def test_non_finite_loss_names_the_step():
    step, state = _problem(lr=float("nan"))
    with pytest.raises(NumericsError, match="step 5"):
        loop.train(step, state, _batches(), 10, jax.random.key(0), log_every=5)


def test_hold_out_keeps_both_sides_non_empty():
    train, val = loop.hold_out(2, 0.1, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = loop.hold_out(100, 0.1, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100


def test_collect_images_rejects_an_empty_stream():
    with pytest.raises(DataError, match="empty"):
        loop.collect_images(iter(()))
