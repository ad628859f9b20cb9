"""The one train loop (`training/loop.py`) on a task small enough to check every number.

The task is least squares, `loss = mean((x·w − y)²)`, over 32 fixed examples drawn in the resumable
`ExampleOrder`; its losses are recomputed here independently in numpy where the loop's claims need it.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realm_jax.data import example_order
from realm_jax.training import loop
from realm_jax.training import train_state

DIM, NUM_EXAMPLES, BATCH = 4, 32, 8
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(NUM_EXAMPLES, DIM)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)
SCHEDULE = optax.linear_schedule(0.1, 0.01, 20)
TX = optax.sgd(SCHEDULE)


def _train_step(state, batch, rng):
  del rng
  def loss_fn(params):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = TX.update(grads, state.opt_state, state.params)
  return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state),
          {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)})


def _run(workdir, num_steps, *, log_every=1, checkpoint_every=2, nan_at=None, nan_policy="stop",
         eval_every=0, profile=(), init_from="", evals=None):
  """Trains; returns `(trainer, state, summary, steps_seen)`."""
  trainer = loop.Trainer(str(workdir), loop.LoopConfig(
      num_train_steps=num_steps, log_every_steps=log_every, checkpoint_every_steps=checkpoint_every,
      eval_every_steps=eval_every, nan_policy=nan_policy, profile_steps=profile), BATCH)
  order = example_order.ExampleOrder(NUM_EXAMPLES, BATCH, seed=3)
  state = trainer.initial_state(
      random_params=lambda rng: {"w": jnp.zeros((DIM,), jnp.float32)}, tx=TX, data_order=order,
      initial_params=lambda: {"w": np.zeros((DIM,), np.float32)}, init_from=init_from,
      params_from=lambda path, abstract: {"w": np.full((DIM,), 7.0, np.float32)})
  seen = []

  def next_batch(step, state):
    del state
    idx = order.next_local_indices()
    seen.append((step, idx.tolist()))
    x = X[idx] * (np.nan if step == nan_at else 1.0)
    return {"x": x, "y": Y[idx]}

  def evaluate(params, step):
    if evals is not None:
      evals.append(step)
    w = np.asarray(jax.device_get(params["w"]))
    return {"mse": float(np.mean((X @ w - Y) ** 2))}

  state, summary = trainer.fit(loop.Task(
      name="least squares", train_step=_train_step, next_batch=next_batch, data_order=order,
      global_batch_size=BATCH, evaluate=evaluate, learning_rate=SCHEDULE,
      checkpoint_meta={"task": "lsq"}), state, jax.random.key(0))
  trainer.finish(dict(summary))
  return trainer, state, summary, seen


def _numpy_losses(num_steps):
  """The same SGD run in float64 numpy: `[num_steps]` pre-update losses."""
  order = example_order.ExampleOrder(NUM_EXAMPLES, BATCH, seed=3)
  w = np.zeros(DIM)
  out = []
  for step in range(num_steps):
    idx = order.next_local_indices()
    x, y = X[idx].astype(np.float64), Y[idx].astype(np.float64)
    r = x @ w - y
    out.append(np.mean(r ** 2))
    w = w - float(SCHEDULE(step)) * (2 * x.T @ r / len(y))
  return np.asarray(out)


def test_losses_match_numpy_and_windows_are_means(tmp_path):
  _, _, one, _ = _run(tmp_path / "a", 6, log_every=1)
  losses = np.array([h["train/loss"] for h in one["history"]])
  np.testing.assert_allclose(losses, _numpy_losses(6), rtol=1e-4)
  _, _, three, _ = _run(tmp_path / "b", 6, log_every=3)
  assert [h["step"] for h in three["history"]] == [3, 6]
  np.testing.assert_allclose([h["train/loss"] for h in three["history"]],
                             [losses[:3].mean(), losses[3:].mean()], rtol=1e-5)
  # The learning rate logged is the one of the window's last update; perf figures are there.
  np.testing.assert_allclose(three["history"][-1]["train/learning_rate"], float(SCHEDULE(5)))
  assert three["history"][-1]["perf/examples_per_s"] > 0
  assert 0 <= three["history"][-1]["perf/host_fraction"] <= 1.5


def test_resume_continues_with_identical_losses(tmp_path):
  _, _, full, full_seen = _run(tmp_path / "full", 8)
  _run(tmp_path / "cut", 5)  # Checkpoints at 2, 4 and 5 (the last step is always saved).
  trainer, _, resumed, seen = _run(tmp_path / "cut", 8)
  assert resumed["start_step"] == 5 and "resumed" in trainer.origin
  assert [s for s, _ in seen] == [5, 6, 7]
  assert seen == full_seen[5:]  # The example order continues where it stopped.
  np.testing.assert_allclose([h["train/loss"] for h in resumed["history"]],
                             [h["train/loss"] for h in full["history"][5:]], rtol=1e-6)


def test_restore_order_workdir_then_init_from_then_initial(tmp_path):
  trainer, state, _, _ = _run(tmp_path / "x", 0, init_from="/some/run")
  assert trainer.origin == "params from /some/run"
  np.testing.assert_array_equal(jax.device_get(state.params["w"]), np.full(DIM, 7.0))
  trainer, state, _, _ = _run(tmp_path / "y", 2)
  assert trainer.origin.startswith("initial params")
  # A checkpoint in the work directory wins over init_from.
  trainer, state, _, _ = _run(tmp_path / "y", 3, init_from="/some/run")
  assert "resumed" in trainer.origin and int(jax.device_get(state.step)) == 3


def test_nan_stop_raises_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"step\(s\) \[5, 6\]"):
    _run(tmp_path, 8, nan_at=4, log_every=3, checkpoint_every=2)
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))
                 if os.path.basename(p).isdigit())
  assert steps and max(steps) == 4  # Step 5's update saw the NaN; nothing was saved after it.
  trainer, state, summary, _ = _run(tmp_path, 4)  # The run restarts from the good checkpoint.
  assert "step 4" in trainer.origin and np.isfinite(jax.device_get(state.params["w"])).all()


def test_nan_skip_drops_the_update_and_counts_it(tmp_path):
  _, state, summary, _ = _run(tmp_path / "skip", 6, nan_at=2, nan_policy="skip")
  assert summary["nonfinite_steps"] == 1
  assert [h["train/nonfinite_steps"] for h in summary["history"]] == [0, 0, 1, 0, 0, 0]
  assert np.isfinite(jax.device_get(state.params["w"])).all()
  assert int(jax.device_get(state.step)) == 6
  # The skipped step left the params as they were: steps 0-1 then 3-5 of the same data.
  _, _, clean, _ = _run(tmp_path / "clean", 2)
  losses = [h["train/loss"] for h in summary["history"]]
  np.testing.assert_allclose(losses[:2], [h["train/loss"] for h in clean["history"]], rtol=1e-6)


def test_periodic_evaluation_and_profile(tmp_path):
  evals = []
  _, _, summary, _ = _run(tmp_path, 6, eval_every=2, profile=(2, 3), evals=evals)
  assert evals == [2, 4, 6] and [e["step"] for e in summary["evals"]] == [2, 4, 6]
  assert summary["evals"][-1]["mse"] < summary["evals"][0]["mse"]
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, os.listdir(tmp_path / "profile")


def test_loop_config_rejects_bad_settings():
  with pytest.raises(ValueError, match="nan_policy"):
    loop.LoopConfig(nan_policy="ignore")
  with pytest.raises(ValueError, match="profile_steps"):
    loop.LoopConfig(profile_steps=(3, 2))
  with pytest.raises(ValueError, match="log_every_steps"):
    loop.LoopConfig(log_every_steps=0)


def test_abstract_state_carries_shardings():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("data", "model"))
  abstract = train_state.abstract_train_state(lambda rng: {"w": jnp.zeros((DIM,))}, TX, mesh)
  assert abstract.params["w"].shape == (DIM,)
  assert abstract.params["w"].sharding.is_fully_replicated
