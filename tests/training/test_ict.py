"""ICT warm start: the in-batch softmax spans the GLOBAL batch (blocks of every device), agrees
with a numpy reference and across device counts, learns a tiny batch, and batches resume."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import realm_fixtures as fx
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.training import ict
from realm_jax.training import loop
from realm_jax.training import optim
from realm_jax.training import train_state
from realm_jax import sharding

TASK = ict.IctConfig(query_length=16, block_length=32, remove_sentence_prob=0.9)
MODEL = fx.tiny_model()


@pytest.fixture(scope="module")
def batcher():
  tok = fx.tokenizer()
  corp = fx.corpus(tok)
  return ict.IctBatcher(list(corp), tok, TASK, global_batch_size=16, seed=0)


def _params():
  return {"retriever": realm.init_params(MODEL, jax.random.key(0),
                                         parts=("retriever",))["retriever"]}


def test_logits_span_the_global_batch_and_match_numpy(batcher):
  batch = batcher.next_local_batch()
  assert len(np.unique(batch["block_id"])) == 10  # 10 usable blocks: 6 appear twice
  mesh = sharding.make_mesh()
  assert mesh.shape["data"] == 8  # 2 examples per device
  eval_fn = ict.make_eval_step(MODEL, mesh)
  params = _params()
  out = jax.device_get(eval_fn(params, sharding.global_batch_from_local(batch, mesh)))
  assert out["logits"].shape == (16, 16)
  # Reference: every query against every block of the batch, computed unsharded in numpy.
  model = retriever_lib.Retriever(MODEL.retriever_config())
  q = np.asarray(model.apply({"params": params["retriever"]}, input_ids=batch["query_input_ids"],
                             input_mask=batch["query_input_mask"],
                             segment_ids=batch["query_segment_ids"],
                             method=retriever_lib.Retriever.embed_queries), np.float64)
  d = np.asarray(model.apply({"params": params["retriever"]}, input_ids=batch["block_input_ids"],
                             input_mask=batch["block_input_mask"],
                             segment_ids=batch["block_segment_ids"],
                             method=retriever_lib.Retriever.embed_documents), np.float64)
  ref = MODEL.score_scale * q @ d.T
  ids = batch["block_id"]
  duplicate = (ids[:, None] == ids[None, :]) & ~np.eye(16, dtype=bool)
  np.testing.assert_allclose(out["logits"][~duplicate], ref[~duplicate], rtol=1e-4, atol=1e-5)
  assert (out["logits"][duplicate] <= -1e8).all()
  # Off-device negatives are real: row 0 (device 0) scores blocks held by devices 1..7.
  assert np.isfinite(out["logits"][0, 2:]).all() and np.abs(out["logits"][0, 2:]).max() > 0
  masked = np.where(duplicate, -np.inf, ref)
  log_p = masked - np.log(np.exp(masked - masked.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - masked.max(1, keepdims=True)
  np.testing.assert_allclose(out["loss"], -np.mean(np.diag(log_p)), rtol=1e-4)
  # Accuracy from the step's own logits: at initialisation the tiny model scores every block within
  # 2e-4 of the others (and a block held twice ties exactly), so an argmax over the float64 reference
  # can flip where the logits agree to 1e-4.
  np.testing.assert_allclose(out["accuracy"],
                             np.mean(np.argmax(out["logits"], 1) == np.arange(16)))


def _run(batch, mesh, steps, lr=5e-3):
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=lr, num_train_steps=100,
                                              warmup_steps=0))
  state = train_state.create_train_state(_params(), tx, mesh)
  train_fn = loop.jit_train_step(ict.step_parts(MODEL, ict.IctConfig(), 8, tx, mesh).train_step,
                                 mesh)
  out = []
  for _ in range(steps):
    state, m = train_fn(state, sharding.global_batch_from_local(batch, mesh), jax.random.key(1))
    out.append({k: float(v) for k, v in jax.device_get(m).items()})
  return out


def test_overfits_a_tiny_batch_and_agrees_across_device_counts(batcher):
  batch = batcher.next_local_batch()
  m8 = _run(batch, sharding.make_mesh(), 12)
  losses = [m["train/loss"] for m in m8]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  assert m8[-1]["train/accuracy"] >= m8[0]["train/accuracy"]
  m1 = _run(batch, sharding.make_mesh(devices=jax.devices()[:1]), 2)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=2e-4)


def test_batcher_is_resumable_and_redraws_each_epoch():
  tok = fx.tokenizer()
  corp = fx.corpus(tok)
  a = ict.IctBatcher(list(corp), tok, TASK, global_batch_size=4, seed=1)
  first = [a.next_local_batch() for _ in range(3)]
  state = a.state()
  rest = [a.next_local_batch() for _ in range(4)]
  b = ict.IctBatcher(list(corp), tok, TASK, global_batch_size=4, seed=1)
  b.restore(state)
  for x, y in zip(rest, [b.next_local_batch() for _ in range(4)]):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  e0, e1 = a.examples(0), a.examples(1)
  np.testing.assert_array_equal(e0.block_id, e1.block_id)
  assert not (np.array_equal(e0.query_input_ids, e1.query_input_ids)
              and np.array_equal(e0.sentence_removed, e1.sentence_removed))
  # The query sentence is removed from its block ~90% of the time.
  removed = np.concatenate([a.examples(e).sentence_removed for e in range(2, 8)])
  assert 0.7 < removed.mean() <= 1.0
  del first
