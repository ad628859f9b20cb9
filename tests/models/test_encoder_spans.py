"""Tests for the span helpers of realm_jax.models.encoder against brute-force enumerations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.models import bert
from realm_jax.models import encoder


def test_span_index_matches_a_lookup_table():
  starts, ends = encoder.span_candidates(7, 3)
  table = {(int(s), int(e)): i for i, (s, e) in enumerate(zip(starts, ends))}
  # Width-major, as Hugging Face's RealmReaderProjection enumerates them.
  hf = [(s, s + w) for w in range(3) for s in range(7) if s + w < 7]
  got = encoder.span_index(7, 3, np.array([s for s, _ in hf]), np.array([e for _, e in hf]))
  assert got.tolist() == [table[span] for span in hf]
  assert sorted(got.tolist()) == list(range(len(starts)))
  with pytest.raises(ValueError, match=r"span \(2, 5\) is not among the spans of width < 3"):
    encoder.span_index(7, 3, np.array([2]), np.array([5]))
  with pytest.raises(ValueError, match=r"span \(6, 7\)"):
    encoder.span_index(7, 3, np.array([6]), np.array([7]))


def test_spans_of_a_shorter_input_are_a_prefix_and_counted_in_closed_form():
  """End-major order: the spans of n tokens are the first `num_span_candidates(n)` spans of any
  longer input (what lets a reader batch be cut to a length bucket), each listed once."""
  for width in (1, 3, 10):
    long_starts, long_ends = encoder.span_candidates(40, width)
    for n in (1, 2, 3, 9, 10, 11, 25, 40):
      starts, ends = encoder.span_candidates(n, width)
      brute = {(s, e) for s in range(n) for e in range(s, min(n, s + width))}
      assert len(starts) == len(brute) == encoder.num_span_candidates(n, width)
      assert set(zip(starts.tolist(), ends.tolist())) == brute
      np.testing.assert_array_equal(long_starts[:len(starts)], starts)
      np.testing.assert_array_equal(long_ends[:len(ends)], ends)


def test_gold_span_mask_marks_exactly_the_gold_spans():
  starts, ends = encoder.span_candidates(6, 2)
  gold_s = np.array([[1, 4, -1], [0, -1, -1]])
  gold_e = np.array([[2, 4, -1], [0, -1, -1]])
  mask = encoder.gold_span_mask(6, 2, gold_s, gold_e)
  want = np.array([[(s, e) in {(1, 2), (4, 4)} for s, e in zip(starts, ends)],
                   [(s, e) == (0, 0) for s, e in zip(starts, ends)]])
  np.testing.assert_array_equal(mask, want)


def test_model_inputs_are_keyword_only():
  """Hugging Face's `(input_ids, attention_mask, token_type_ids)` order passed positionally is refused
  by every model (it used to be accepted and give wrong numbers); by keyword, any order is the same."""
  from realm_jax.models import realm
  from realm_jax.models import retriever as retriever_lib
  model = realm.ModelConfig(init_checkpoint=None, projection_size=8, span_hidden_size=8,
                            bert=bert.BertConfig(vocab_size=64, hidden_size=16, num_layers=1,
                                                 num_heads=2, intermediate_size=32,
                                                 max_position_embeddings=32))
  params = realm.init_retriever(model.retriever_config(), jax.random.key(0))
  ids = jnp.array([[2, 9, 7, 3, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  seg = jnp.array([[0, 0, 1, 1, 0]], jnp.int32)
  apply = retriever_lib.Retriever(model.retriever_config()).apply
  with pytest.raises(TypeError):
    apply({"params": params}, ids, mask, seg, method=retriever_lib.Retriever.embed_documents)
  a = apply({"params": params}, input_ids=ids, input_mask=mask, segment_ids=seg,
            method=retriever_lib.Retriever.embed_documents)
  b = apply({"params": params}, segment_ids=seg, input_ids=ids, input_mask=mask,
            method=retriever_lib.Retriever.embed_documents)
  np.testing.assert_array_equal(a, b)
  reader = encoder.SpanReader(model.reader_config())
  reader_params = realm.init_reader(model.reader_config(), jax.random.key(1))
  with pytest.raises(TypeError):
    reader.apply({"params": reader_params}, ids[None], mask[None], seg[None], mask[None])
