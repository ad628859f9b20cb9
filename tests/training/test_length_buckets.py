"""Length buckets of the train steps' inputs (realm_jax.training.length_buckets): which length a
group needs, what a cut keeps, what it refuses, and that REALM's and ICT's outputs do not change."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

import realm_fixtures as fx
from realm_jax import sharding
from realm_jax.models import realm
from realm_jax.training import ict
from realm_jax.training import length_buckets
from realm_jax.training import pretrain


def _batch(lengths_a, lengths_b, full_a=20, full_b=12):
  """Two groups, `a_` `[n, 2, full_a]` and `b_` `[n, full_b]`, rows of the given real lengths."""
  def group(lengths, shape):
    mask = (np.arange(shape[-1]) < np.asarray(lengths)[..., None]).astype(np.int32)
    ids = (np.arange(np.prod(shape)).reshape(shape) + 1).astype(np.int32) * mask
    return {"input_ids": ids, "input_mask": mask, "segment_ids": mask.copy()}
  batch = {f"a_{k}": v for k, v in group(lengths_a, (len(lengths_a), 2, full_a)).items()}
  batch.update({f"b_{k}": v for k, v in group(lengths_b, (len(lengths_b), full_b)).items()})
  batch["a_valid"] = np.ones((len(lengths_a), 2), bool)  # named like a group, not a token field
  return batch


def test_group_length_is_the_bucket_of_the_longest_row():
  batch = _batch([[3, 9], [5, 2]], [4, 7])
  assert length_buckets.group_length(batch, "a_", 4) == 12  # longest 9 → 12
  assert length_buckets.group_length(batch, "a_", 8) == 16
  assert length_buckets.group_length(batch, "a_", 32) == 20  # capped at the full length
  assert length_buckets.group_length(batch, "a_", 0) == 20  # 0: no bucketing
  assert length_buckets.group_length(batch, "b_", 4) == 8
  empty = _batch([[0, 0]], [0])
  assert length_buckets.group_length(empty, "a_", 4) == 4  # at least one bucket


def test_cut_keeps_every_real_token_and_nothing_else_changes():
  batch = _batch([[3, 9], [5, 2]], [4, 7])
  out, lengths = length_buckets.cut_to_buckets(batch, ("a_", "b_"), 4)
  assert lengths == {"a_": 12, "b_": 8}
  for prefix, n in lengths.items():
    for field in ("input_ids", "input_mask", "segment_ids"):
      np.testing.assert_array_equal(out[prefix + field], batch[prefix + field][..., :n])
      assert out[prefix + field].flags.c_contiguous
    assert out[prefix + "input_mask"].sum() == batch[prefix + "input_mask"].sum()
  assert out["a_valid"] is batch["a_valid"]
  same, lengths = length_buckets.cut_to_buckets(batch, ("a_",), 0)
  assert lengths == {"a_": 20} and same["a_input_ids"] is batch["a_input_ids"]
  # On one process, agreeing across processes is the identity.
  agreed, lengths = length_buckets.cut_to_buckets(batch, ("a_", "b_"), 4, across_processes=True)
  assert lengths == {"a_": 12, "b_": 8}
  assert sharding.max_over_processes([12, 8]) == (12, 8)


def test_cut_refuses_to_drop_a_real_token():
  batch = _batch([[3, 9], [5, 2]], [4, 7])
  with pytest.raises(ValueError, match=r"a_\*: a row is longer than 8 tokens"):
    length_buckets.cut(batch, {"a_": 8})
  with pytest.raises(ValueError, match=r"b_\*: length 13 outside \(0, 12\]"):
    length_buckets.cut(batch, {"b_": 13})
  with pytest.raises(ValueError, match="outside"):
    length_buckets.cut(batch, {"b_": 0})


def test_realm_loss_and_gradients_do_not_change_when_cut():
  """REALM pre-training (§3.4): the marginal likelihood and its gradients for a batch cut to
  8-token buckets equal those at the full query / candidate / joined lengths."""
  task = pretrain.PretrainConfig(num_candidates=4, query_length=40, candidate_length=48,
                                 max_masks=3)
  tok = fx.tokenizer()
  corp = fx.corpus(tok)  # Blocks of 17–28 body wordpieces: every group has padding to cut.
  model = fx.tiny_model(share_embedders=False)
  model = dataclasses.replace(model, bert=dataclasses.replace(model.bert,
                                                              max_position_embeddings=128))
  examples = fx.masked_examples(corp, tok, task.query_length, task.max_masks, n=4)
  featurizer = pretrain.PretrainFeaturizer(tok, corp, task)
  src = examples.arrays["source_block_id"]
  retrieved = np.stack([np.roll(corp.block_ids, -int(s))[:5] for s in src])
  full = featurizer.featurize(examples.batch(np.arange(4)),
                              featurizer.select_candidates(retrieved, src))
  cut, lengths = length_buckets.cut_to_buckets(full, pretrain.BUCKETED_GROUPS, 8)
  assert lengths == {"query_": 32, "candidate_": 40, "joint_": 64}, lengths
  params = realm.init_params(model, jax.random.key(0), parts=("retriever", "encoder"))
  loss_and_grads = jax.jit(jax.value_and_grad(functools.partial(
      pretrain.pretraining_loss, rng=None, retriever_cfg=model.retriever_config(),
      encoder_cfg=model.bert_config(), deterministic=True), has_aux=True))
  (loss_full, aux_full), g_full = loss_and_grads(params, full)
  (loss_cut, aux_cut), g_cut = loss_and_grads(params, cut)
  np.testing.assert_allclose(float(loss_cut), float(loss_full), rtol=1e-5)
  np.testing.assert_allclose(aux_cut["retriever_logits"], aux_full["retriever_logits"], rtol=1e-4,
                             atol=1e-5)
  flat_cut = dict(jax.tree_util.tree_leaves_with_path(g_cut))
  for path, g in jax.tree_util.tree_leaves_with_path(g_full):
    np.testing.assert_allclose(flat_cut[path], g, rtol=1e-3, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_ict_logits_and_loss_do_not_change_when_cut():
  task = ict.IctConfig(query_length=40, block_length=48)
  tok = fx.tokenizer()
  batch = ict.IctBatcher(list(fx.corpus(tok)), tok, task, global_batch_size=8,
                         seed=0).next_local_batch()
  cut, lengths = length_buckets.cut_to_buckets(batch, ("query_", "block_"), 8)
  assert lengths["query_"] < 40 and lengths["block_"] < 48, lengths
  model = fx.tiny_model()
  params = {"retriever": realm.init_params(model, jax.random.key(0),
                                           parts=("retriever",))["retriever"]}
  mesh = sharding.make_mesh()
  eval_fn = ict.make_eval_step(model, mesh)
  out_full, out_cut = (jax.device_get(eval_fn(params, sharding.global_batch_from_local(b, mesh)))
                       for b in (batch, cut))
  np.testing.assert_allclose(out_cut["logits"], out_full["logits"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out_cut["loss"], out_full["loss"], rtol=1e-5)
