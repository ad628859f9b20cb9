"""Length-bucketed corpus embedding (`retrieval/embedding.py`): same rows, few shapes."""

import jax
import numpy as np
import pytest

from realm_jax import sharding
from realm_jax.models import bert
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import embedding

MAX_LENGTH = 96


def _config():
  tiny = bert.BertConfig(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position_embeddings=MAX_LENGTH)
  return retriever_lib.RetrieverConfig(bert=tiny, pooling="cls_projection", projection_size=16)


def _inputs(lengths, seed=0):
  """`[CLS] title [SEP] body [SEP]` rows of the given real lengths, right-padded to MAX_LENGTH."""
  rng = np.random.default_rng(seed)
  num = len(lengths)
  pos = np.arange(MAX_LENGTH)[None, :]
  mask = (pos < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = rng.integers(5, 200, size=(num, MAX_LENGTH)).astype(np.int32) * mask
  ids[:, 0] = 1
  seg = ((pos >= 3) & (mask == 1)).astype(np.int32)
  return {"input_ids": ids, "input_mask": mask, "segment_ids": seg}


@pytest.fixture(scope="module")
def setup():
  cfg = _config()
  mesh = sharding.make_mesh()
  params = retriever_lib.Retriever(cfg).init(
      jax.random.key(0), input_ids=np.ones((1, 8), np.int32), input_mask=np.ones((1, 8), np.int32),
      segment_ids=np.zeros((1, 8), np.int32), method=retriever_lib.Retriever.embed_documents
  )["params"]
  return cfg, mesh, params


def test_bucket_lengths_are_a_small_fixed_set():
  assert embedding.bucket_lengths(288, 32) == (32, 64, 96, 128, 160, 192, 224, 256, 288)
  assert embedding.bucket_lengths(288, 64) == (64, 128, 192, 256, 288)
  assert embedding.bucket_length(0, 288, 32) == 32
  assert embedding.bucket_length(33, 288, 32) == 64
  assert embedding.bucket_length(287, 288, 32) == 288
  assert embedding.bucket_length(20, 16, 32) == 16
  with pytest.raises(ValueError, match="bucket"):
    embedding.bucket_length(5, 288, 0)


def test_plan_sorts_longest_first_and_counts_padding():
  lengths = np.array([10, 90, 40, 70, 5, 33])
  plan = embedding.plan_batches(lengths, batch_size=4, max_length=MAX_LENGTH, bucket=32)
  assert [rows.tolist() for rows, _ in plan.batches] == [[1, 3, 2, 5], [0, 4]]
  assert [length for _, length in plan.batches] == [96, 32]
  assert plan.shapes == (32, 96)
  assert plan.real_tokens == lengths.sum()
  assert plan.computed_tokens == 4 * 96 + 4 * 32
  assert plan.padded_share == pytest.approx(1 - lengths.sum() / (4 * 96 + 4 * 32))
  fixed = embedding.plan_batches(lengths, 4, MAX_LENGTH, bucket=None, sort=False)
  assert [rows.tolist() for rows, _ in fixed.batches] == [[0, 1, 2, 3], [4, 5]]
  assert fixed.shapes == (MAX_LENGTH,) and fixed.padded_share > plan.padded_share
  with pytest.raises(ValueError, match="batch_size"):
    embedding.plan_batches(lengths, 0, MAX_LENGTH)


def test_bucketed_embedding_equals_unbucketed_in_block_order(setup):
  cfg, mesh, params = setup
  rng = np.random.default_rng(1)
  lengths = rng.integers(4, MAX_LENGTH + 1, size=37)  # several buckets, a short last batch
  lengths[5] = MAX_LENGTH
  inputs = _inputs(lengths)
  embed_fn = embedding.make_document_embed_fn(cfg, mesh)
  bucketed = embedding.run_batched(embed_fn, params, inputs, 8, mesh, bucket=16, progress=False)
  plan = embedding.plan_batches(lengths, 8, MAX_LENGTH, bucket=16)
  assert len(plan.shapes) >= 4
  # Bounded compilations: one per bucket length used, never more than the fixed set.
  compiles = embed_fn._cache_size()  # pylint: disable=protected-access
  assert compiles == len(plan.shapes) <= len(embedding.bucket_lengths(MAX_LENGTH, 16))

  unbucketed_fn = embedding.make_document_embed_fn(cfg, mesh)
  unbucketed = embedding.run_batched(unbucketed_fn, params, inputs, 8, mesh, bucket=MAX_LENGTH,
                                     progress=False)
  assert unbucketed_fn._cache_size() == 1  # pylint: disable=protected-access
  assert bucketed.shape == (37, 16) and bucketed.dtype == np.float32
  np.testing.assert_allclose(bucketed, unbucketed, rtol=1e-5, atol=1e-5)
  # Row i is block i: each block embedded on its own (padded to its full width) gives the same row.
  model = retriever_lib.Retriever(cfg)
  for i in (0, 5, 36):
    one = model.apply({"params": params}, input_ids=inputs["input_ids"][i:i + 1],
                      input_mask=inputs["input_mask"][i:i + 1],
                      segment_ids=inputs["segment_ids"][i:i + 1],
                      method=retriever_lib.Retriever.embed_documents)
    np.testing.assert_allclose(bucketed[i], np.asarray(one)[0], rtol=1e-5, atol=1e-5)
  # A second pass over the same corpus compiles nothing new.
  embedding.run_batched(embed_fn, params, inputs, 8, mesh, bucket=16, progress=False)
  assert embed_fn._cache_size() == len(plan.shapes)  # pylint: disable=protected-access


def test_empty_input_raises(setup):
  cfg, mesh, params = setup
  with pytest.raises(ValueError, match="empty"):
    embedding.run_batched(embedding.make_document_embed_fn(cfg, mesh), params, _inputs([]), 8,
                          mesh, progress=False)
