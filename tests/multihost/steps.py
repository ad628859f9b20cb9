"""Tiny models, optimisers and deterministic global batches for the multi-host equivalence tests."""

import numpy as np

from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.training import loop
from realm_jax.training import train_state

TINY = realm.ModelConfig(
    init_checkpoint=None, pooling="cls_projection", projection_size=8, span_hidden_size=8,
    max_span_width=3,
    bert=bert.BertConfig(vocab_size=128, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64, hidden_dropout=0.0,
                         attention_dropout=0.0))
LOSS_KEY = {"finetune": "train/loss", "ict": "train/loss", "pretrain": "train/loss"}


FINETUNE_BUCKET = 8


def finetune(global_batch, mesh):
  """Reads of 14 tokens in the first half of the batch, 20 in the second (reader_length 32): cut
  to 8-token buckets, the first half alone needs 16 tokens and the whole batch 24 (`prepare`)."""
  import jax
  from realm_jax.training import finetune as ft
  from realm_jax.training import optim
  task = ft.OpenQAConfig(num_retrieved=4, num_read=2, query_length=8, reader_length=32,
                         reader_query_length=8, reader_length_bucket=FINETUNE_BUCKET)
  rng = np.random.default_rng(0)
  b, k, r, length = global_batch, task.num_retrieved, task.num_read, task.reader_length
  from realm_jax.models import encoder
  starts, ends = encoder.span_candidates(length, TINY.max_span_width)
  read_length = np.where(np.arange(b) < b // 2, 14, 20)[:, None, None]
  position = np.arange(length)[None, None, :]
  mask = np.broadcast_to(position < read_length, (b, r, length)).astype(np.int32)
  body = ((position >= 10) & (position < read_length - 1)).astype(np.int32) * np.ones((b, r, 1),
                                                                                     np.int32)
  in_body = body[..., starts].astype(bool) & body[..., ends].astype(bool)
  batch = {
      "query_input_ids": rng.integers(1, 128, (b, task.query_length)).astype(np.int32),
      "query_input_mask": np.ones((b, task.query_length), np.int32),
      "query_segment_ids": np.zeros((b, task.query_length), np.int32),
      "retrieved_embeddings": rng.normal(size=(b, k, 8)).astype(np.float32),
      "retrieved_valid": np.ones((b, k), bool),
      "retrieved_has_answer": rng.random((b, k)) < 0.5,
      "reader_input_ids": rng.integers(1, 128, (b, r, length)).astype(np.int32) * mask,
      "reader_segment_ids": body.copy(),
      "reader_input_mask": mask,
      "reader_body_mask": body,
      "span_is_answer": (rng.random((b, r, len(starts))) < 0.1) & in_body,
  }
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=1e-3, num_train_steps=10,
                                              warmup_steps=0))
  params = realm.init_params(TINY, jax.random.key(0))
  state = train_state.create_train_state(params, tx, mesh)
  train_fn = loop.jit_train_step(ft.step_parts(TINY, task, b, tx).train_step, mesh)
  return state, train_fn, batch


def prepare_finetune(local_batch):
  """This process's rows cut to the reader length all processes agree on (what fine-tuning's
  `next_batch` does): the processes holding only 14-token reads must still use 24 tokens."""
  from realm_jax.training import finetune as ft
  return ft.cut_to_bucket(local_batch, FINETUNE_BUCKET, TINY.max_span_width,
                          across_processes=True)


def _random_batch(spec, rng):
  import jax.numpy as jnp
  batch = {}
  for name, s in spec.items():
    if s.dtype == jnp.bool_:
      batch[name] = np.ones(s.shape, bool)
    elif s.dtype == jnp.float32:
      batch[name] = np.ones(s.shape, np.float32)
    elif name.endswith("_ids") and "segment" not in name:
      batch[name] = rng.integers(5, 128, s.shape).astype(np.int32)
    elif name.endswith("segment_ids"):
      batch[name] = np.zeros(s.shape, np.int32)
    else:
      batch[name] = np.ones(s.shape, np.int32)
  return batch


def ict(global_batch, mesh):
  import jax
  from realm_jax.training import ict as ict_lib
  from realm_jax.training import optim
  task = ict_lib.IctConfig(query_length=8, block_length=16)
  batch = _random_batch(ict_lib.abstract_batch(task, global_batch), np.random.default_rng(0))
  batch["block_id"] = np.arange(global_batch, dtype=np.int32)
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=1e-3, num_train_steps=10,
                                              warmup_steps=0))
  params = realm.init_params(TINY, jax.random.key(0), parts=("retriever",))
  state = train_state.create_train_state(params, tx, mesh)
  train_fn = loop.jit_train_step(ict_lib.step_parts(TINY, task, global_batch, tx, mesh).train_step,
                                 mesh)
  return state, train_fn, batch


def pretrain(global_batch, mesh):
  import jax
  from realm_jax.training import optim
  from realm_jax.training import pretrain as pre
  task = pre.PretrainConfig(num_candidates=3, query_length=8, candidate_length=12, max_masks=2)
  rng = np.random.default_rng(0)
  batch = _random_batch(pre.abstract_batch(task, global_batch), rng)
  batch["mlm_positions"] = np.tile(np.array([2, 3], np.int32), (global_batch, 1))
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=1e-3, num_train_steps=10,
                                              warmup_steps=0))
  params = realm.init_params(TINY, jax.random.key(0), parts=("retriever", "encoder"))
  state = train_state.create_train_state(params, tx, mesh)
  train_fn = loop.jit_train_step(pre.step_parts(TINY, task, global_batch, tx).train_step, mesh)
  return state, train_fn, batch


BUILDERS = {"finetune": finetune, "ict": ict, "pretrain": pretrain}
PREPARE = {"finetune": prepare_finetune}  # Per-process host work on the local rows, if any.
