"""realm_jax.training.optim on the real parameter trees (issue #14 §7): `decay_mask` against BERT's
own exclusion rule, weight decay applied exactly where the mask says, `trainable` freezing, and the
warm-up/decay schedule as the update sizes of a run show it.

References, independent of optim.py:
- BERT's `AdamWeightDecayOptimizer._do_use_weight_decay` with
  `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`: a variable decays unless one of
  these patterns is found (`re.search`) in its name;
- the decoupled AdamW update with a zero gradient: Adam's part is 0, the update is `-lr · wd · p`;
- BERT's schedule: `lr · step / warmup` during the warm-up, then `lr · (1 − step / total)`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from realm_jax.models import realm
from realm_jax.training import optim

import realm_fixtures as fx

BERT_EXCLUDE = ("LayerNorm", "layer_norm", "bias")


def _bert_uses_weight_decay(path: tuple[str, ...]) -> bool:
  name = "/".join(path)
  return not any(re.search(pattern, name) for pattern in BERT_EXCLUDE)


@pytest.fixture(scope="module")
def params():
  """Every part (retriever with separate towers, encoder with its MLM head, reader), small values."""
  model = fx.tiny_model(share_embedders=False, hidden=8)
  shapes = jax.eval_shape(lambda: realm.init_params(
      model, jax.random.key(0), parts=("retriever", "encoder", "reader")))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(np.float32)), shapes)


def test_decay_mask_is_berts_exclusion_rule(params):
  mask = traverse_util.flatten_dict(optim.decay_mask(params))
  flat = traverse_util.flatten_dict(params)
  assert mask.keys() == flat.keys()
  expected = {path: _bert_uses_weight_decay(path) for path in flat}
  assert mask == expected
  # What that means on these towers: every kernel and embedding decays; no LayerNorm, no bias.
  names = {path[-1] for path, decays in mask.items() if decays}
  assert names == {"kernel", "embedding"}, names
  assert any(path[-1] == "output_bias" for path in flat)  # the MLM head's bias: excluded too
  assert sum(mask.values()) < len(mask) and any(mask.values())


def test_weight_decay_applies_exactly_where_the_mask_says(params):
  lr, wd = 0.5, 0.01
  config = optim.OptimizerConfig(learning_rate=lr, num_train_steps=10, warmup_steps=0,
                                 weight_decay=wd, clip_norm=1.0)
  tx = optim.bert_adamw(config)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  flat_u, flat_p = traverse_util.flatten_dict(updates), traverse_util.flatten_dict(params)
  for path, p in flat_p.items():
    expected = -lr * wd * np.asarray(p) if _bert_uses_weight_decay(path) else np.zeros(p.shape)
    np.testing.assert_allclose(flat_u[path], expected, rtol=1e-6, atol=0, err_msg=str(path))


def test_trainable_false_freezes_the_part_and_keeps_no_adam_state(params):
  """The frozen document tower gets exactly zero updates, even with gradients and weight decay, and
  the trainable parts get the updates of the same optimiser run on them alone (clipping included)."""
  config = optim.OptimizerConfig(learning_rate=1e-2, num_train_steps=10, warmup_steps=2,
                                 weight_decay=0.01, clip_norm=1.0)

  def trainable(tree):
    return traverse_util.unflatten_dict({
        path: "document_embedder" not in path for path in traverse_util.flatten_dict(tree)})

  rng = np.random.default_rng(1)
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)
  frozen_tx = optim.bert_adamw(config, trainable=trainable)
  plain_tx = optim.bert_adamw(config)

  def without_doc(tree):
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                         if "document_embedder" not in k})

  state, ref_state = frozen_tx.init(params), plain_tx.init(without_doc(params))
  p, ref_p = params, without_doc(params)
  frozen_update, plain_update = jax.jit(frozen_tx.update), jax.jit(plain_tx.update)
  add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))
  for _ in range(3):  # inside the warm-up and after it
    updates, state = frozen_update(grads, state, p)
    ref_updates, ref_state = plain_update(without_doc(grads), ref_state, ref_p)
    flat_u = traverse_util.flatten_dict(updates)
    flat_ref = traverse_util.flatten_dict(ref_updates)
    for path, u in flat_u.items():
      if "document_embedder" in path:
        assert not np.asarray(u).any(), path
      else:
        np.testing.assert_allclose(u, flat_ref[path], rtol=1e-5, atol=1e-9, err_msg=str(path))
    p, ref_p = add(p, updates), add(ref_p, ref_updates)
  frozen_leaves = traverse_util.flatten_dict(params["retriever"]["document_embedder"])
  assert all(np.array_equal(traverse_util.flatten_dict(p["retriever"]["document_embedder"])[k], v)
             for k, v in frozen_leaves.items())
  # No Adam moments for the frozen leaves: the state holds as many floats as the trainable params.
  state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
  ref_state_size = sum(x.size for x in jax.tree_util.tree_leaves(ref_state) if x.ndim)
  assert state_size == ref_state_size


def test_update_sizes_follow_warmup_then_linear_decay():
  """A run of 12 steps with a constant gradient: |update| = lr(step) (Adam's m̂/√v̂ = 1, no decay)."""
  lr, total, warmup = 2.0, 12, 4
  config = optim.OptimizerConfig(learning_rate=lr, num_train_steps=total, warmup_steps=warmup,
                                 weight_decay=0.0, clip_norm=0.0, eps=0.0)
  tx = optim.bert_adamw(config)
  params = {"dense": {"kernel": jnp.zeros((2,))}}
  state = tx.init(params)
  sizes = []
  for _ in range(total + 2):
    updates, state = tx.update({"dense": {"kernel": jnp.full((2,), 0.3)}}, state, params)
    sizes.append(-float(updates["dense"]["kernel"][0]))
  expected = [lr * s / warmup if s < warmup else lr * max(0.0, 1 - s / total)
              for s in range(total + 2)]
  # 0, 0.5, 1.0, 1.5 (warm-up), then 2·(1 − 4/12) = 1.333…, decreasing to 0 at step 12 and after.
  np.testing.assert_allclose(sizes, expected, rtol=1e-5, atol=1e-7)
  assert expected[warmup] < expected[warmup - 1] + lr / warmup  # BERT's drop at the warm-up's end
  assert sizes[total] == 0 and sizes[total + 1] == 0
