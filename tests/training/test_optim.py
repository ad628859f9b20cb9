"""Tests for realm_jax.training.optim: BERT's learning-rate schedule and the AdamW update.

The reference schedule is BERT's `optimization.create_optimizer` (TF1), written out in numpy:
`tf.train.polynomial_decay(lr, step, num_train_steps, end_learning_rate=0, power=1, cycle=False)`
replaced by `lr · step / num_warmup_steps` while `step < num_warmup_steps`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realm_jax.training import optim


def _bert_learning_rate(step: int, init_lr: float, num_train_steps: int,
                        num_warmup_steps: int) -> float:
  """BERT's create_optimizer schedule, transcribed from its TF1 graph."""
  global_step = np.float32(min(step, num_train_steps))  # polynomial_decay clips the step
  decayed = (init_lr - 0.0) * (1.0 - global_step / num_train_steps) ** 1.0 + 0.0
  if num_warmup_steps:
    warmup_lr = init_lr * (np.float32(step) / np.float32(num_warmup_steps))
    is_warmup = np.float32(step < num_warmup_steps)
    return float((1.0 - is_warmup) * decayed + is_warmup * warmup_lr)
  return float(decayed)


@pytest.mark.parametrize("lr, total, warmup", [
    (1e-5, 1000, 100),  # the ORQA/REALM fine-tuning rule: min(10000, max(100, total // 10))
    (3e-5, 200_000, 10_000),
    (1e-4, 50, 0),
    (2e-4, 10, 10),  # warm-up over the whole run
])
def test_schedule_matches_bert_polynomial_decay(lr, total, warmup):
  config = optim.OptimizerConfig(learning_rate=lr, num_train_steps=total, warmup_steps=warmup)
  schedule = optim.learning_rate_schedule(config)
  steps = sorted({0, 1, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, (warmup + total) // 2,
                  total - 1, total, total + 5})
  for step in steps:
    expected = _bert_learning_rate(step, lr, total, warmup)
    # float32, as the TF graph: optax's warm-up loses ~1e-7 · lr to cancellation near step 0.
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=lr * 1e-6), step


def test_schedule_known_values():
  """Hand-computed: lr 1e-4, 1000 steps, 100 warm-up steps."""
  schedule = optim.learning_rate_schedule(
      optim.OptimizerConfig(learning_rate=1e-4, num_train_steps=1000, warmup_steps=100))
  got = [float(schedule(s)) for s in (0, 50, 99, 100, 550, 1000, 2000)]
  # The warm-up reaches 0.99 lr; the decay, counted from step 0, starts at 0.9 lr (BERT's drop).
  np.testing.assert_allclose(got, [0.0, 5e-5, 9.9e-5, 9e-5, 4.5e-5, 0.0, 0.0], rtol=1e-5,
                             atol=1e-12)
  # The default warm-up is the ORQA rule, capped by the run length.
  assert optim.OptimizerConfig(num_train_steps=5000).resolved_warmup_steps == 500
  assert optim.OptimizerConfig(num_train_steps=50).resolved_warmup_steps == 50
  assert optim.OptimizerConfig(num_train_steps=10 ** 6).resolved_warmup_steps == 10_000


def test_first_update_is_bias_corrected_adamw():
  """The documented difference from BERT's AdamWeightDecayOptimizer (no bias correction)."""
  config = optim.OptimizerConfig(learning_rate=0.1, num_train_steps=10, warmup_steps=0,
                                 clip_norm=0.0)
  params = {"dense": {"kernel": jnp.array([2.0, -1.0]), "bias": jnp.array([0.5])}}
  grads = {"dense": {"kernel": jnp.array([0.3, 0.4]), "bias": jnp.array([-2.0])}}
  tx = optim.bert_adamw(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  g, p = np.array([0.3, 0.4]), np.array([2.0, -1.0])
  lr, b1, b2, eps, wd = 0.1, config.b1, config.b2, config.eps, config.weight_decay
  m, v = (1 - b1) * g, (1 - b2) * g ** 2
  m_hat, v_hat = m / (1 - b1), v / (1 - b2)
  ours = -lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
  np.testing.assert_allclose(updates["dense"]["kernel"], ours, rtol=1e-5)
  # BERT's optimiser would step (1 − β1) / sqrt(1 − β2) ≈ 3.16 times further on the Adam part.
  bert = -lr * (m / (np.sqrt(v) + eps) + wd * p)
  assert not np.allclose(updates["dense"]["kernel"], bert, rtol=1e-2)
  # Biases get no weight decay: the update is −lr · sign(g) (up to ε).
  np.testing.assert_allclose(updates["dense"]["bias"], [lr * (2.0 / (2.0 + eps))], rtol=1e-5)


def test_schedule_is_the_one_the_optimizer_applies():
  """The AdamW step size follows `learning_rate_schedule` step by step (warm-up then decay)."""
  config = optim.OptimizerConfig(learning_rate=1.0, num_train_steps=8, warmup_steps=4,
                                 weight_decay=0.0, clip_norm=0.0, eps=0.0)
  tx = optim.bert_adamw(config)
  params = {"w": jnp.zeros((1,))}
  state = tx.init(params)
  seen = []
  for step in range(9):
    updates, state = tx.update({"w": jnp.ones((1,))}, state, params)
    seen.append(-float(updates["w"][0]))  # constant gradient: m̂ / sqrt(v̂) = 1
  expected = [_bert_learning_rate(s, 1.0, 8, 4) for s in range(9)]
  np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-7)
  assert expected[3] == pytest.approx(0.75) and expected[4] == pytest.approx(0.5)


def test_part_learning_rate_scales_scale_one_part_only():
  config = optim.OptimizerConfig(learning_rate=1e-3, num_train_steps=10, warmup_steps=0,
                                 weight_decay=0.0,
                                 part_learning_rate_scales=(("retriever", 0.1),))
  tx = optim.bert_adamw(config)
  params = {"retriever": {"kernel": jnp.ones((3,))}, "reader": {"kernel": jnp.ones((3,))}}
  grads = {"retriever": {"kernel": jnp.full((3,), 0.5)}, "reader": {"kernel": jnp.full((3,), 0.5)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["retriever"]["kernel"], 0.1 * updates["reader"]["kernel"],
                             rtol=1e-6)
  assert float(jnp.abs(updates["reader"]["kernel"]).min()) > 0
  bad = optim.bert_adamw(dataclasses.replace(config, part_learning_rate_scales=(("encoder", 0.),)))
  with pytest.raises(ValueError, match="encoder"):
    bad.update(grads, bad.init(params), params)


def test_part_frozen_steps_freeze_one_part_then_train_it():
  """Frozen for 2 updates: no update (weight decay neither), no share in the clipping norm or in
  Adam's moments; from update 2 on a bias-corrected Adam step from zero moments."""
  config = optim.OptimizerConfig(learning_rate=0.1, num_train_steps=10, warmup_steps=0,
                                 weight_decay=0.01, clip_norm=1.0,
                                 part_frozen_steps=(("retriever", 2),))
  tx = optim.bert_adamw(config)
  # The reference: the same optimiser without freezing, fed zero retriever gradients.
  ref = optim.bert_adamw(dataclasses.replace(config, part_frozen_steps=()))
  params = {"retriever": {"kernel": jnp.ones((3,))}, "reader": {"kernel": jnp.ones((3,))}}
  grads = {"retriever": {"kernel": jnp.full((3,), 100.0)}, "reader": {"kernel": jnp.full((3,), 0.5)}}
  no_retriever = {"retriever": {"kernel": jnp.zeros((3,))}, "reader": grads["reader"]}
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    expected, ref_state = ref.update(no_retriever, ref_state, params)
    np.testing.assert_array_equal(updates["retriever"]["kernel"], np.zeros(3))
    np.testing.assert_allclose(updates["reader"]["kernel"], expected["reader"]["kernel"],
                               rtol=1e-6)
  updates, state = tx.update(grads, state, params)  # update 2 (Adam's count 3): it trains
  g = 100.0 / np.sqrt(3 * 100.0 ** 2 + 3 * 0.5 ** 2)  # clipped by the global norm, both parts
  b1, b2 = config.b1, config.b2
  m_hat, v_hat = (1 - b1) * g / (1 - b1 ** 3), (1 - b2) * g ** 2 / (1 - b2 ** 3)
  lr = 0.1 * (1 - 2 / 10)
  np.testing.assert_allclose(updates["retriever"]["kernel"],
                             np.full(3, -lr * (m_hat / (np.sqrt(v_hat) + config.eps) + 0.01)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=">= 0"):
    optim.OptimizerConfig(part_frozen_steps=(("retriever", -1),))
  bad = optim.bert_adamw(dataclasses.replace(config, part_frozen_steps=(("encoder", 3),)))
  with pytest.raises(ValueError, match="part_frozen_steps names parts .*encoder"):
    bad.update(grads, bad.init(params), params)
  # (part, 0) is no freezing at all: the same optimiser state as without the setting.
  plain = optim.bert_adamw(dataclasses.replace(config, part_frozen_steps=(("retriever", 0),)))
  assert jax.tree_util.tree_structure(plain.init(params)) == jax.tree_util.tree_structure(
      ref.init(params))


def test_zero_train_steps_is_an_evaluation_only_config():
  config = optim.OptimizerConfig(num_train_steps=0)  # `realm-jax finetune` with TRAIN_STEPS=0
  assert config.resolved_warmup_steps == 0
  assert np.isfinite(float(optim.learning_rate_schedule(config)(0)))
  with pytest.raises(ValueError, match=">= 0"):
    optim.OptimizerConfig(num_train_steps=-1)
