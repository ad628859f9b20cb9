"""Tests for the span helpers of realm_jax.models.encoder against brute-force enumerations."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_gold_span_mask_marks_exactly_the_gold_spans():
  starts, ends = encoder.span_candidates(6, 2)
  gold_s = np.array([[1, 4, -1], [0, -1, -1]])
  gold_e = np.array([[2, 4, -1], [0, -1, -1]])
  mask = encoder.gold_span_mask(6, 2, gold_s, gold_e)
  want = np.array([[(s, e) in {(1, 2), (4, 4)} for s, e in zip(starts, ends)],
                   [(s, e) == (0, 0) for s, e in zip(starts, ends)]])
  np.testing.assert_array_equal(mask, want)
