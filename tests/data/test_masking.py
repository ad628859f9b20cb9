"""Tests for realm_jax.data.masking: salient-span, random-token and random-span masking."""

from __future__ import annotations

import numpy as np
import pytest

from realm_jax.data import masking

PAD, CLS, SEP, MASK = 0, 101, 102, 103
SPECIAL = (PAD, 100, CLS, SEP, MASK)
VOCAB = 30522
LENGTH = 32


def _query(pieces: list[tuple[int, int, int]], length: int = LENGTH
           ) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] pieces [SEP] [PAD]...` from `(id, char_start, char_end)` triples."""
  ids = np.full(length, PAD, np.int32)
  offsets = np.full((length, 2), -1, np.int32)
  ids[0] = CLS
  for i, (tid, s, e) in enumerate(pieces, start=1):
    ids[i] = tid
    offsets[i] = (s, e)
  ids[len(pieces) + 1] = SEP
  return ids, offsets


# "barack obama was born in honolulu in 1961 ." with "honolulu" split into three wordpieces.
TEXT = "Barack Obama was born in Honolulu in 1961."
PIECES = [(1000, 0, 6), (1001, 7, 12), (1002, 13, 16), (1003, 17, 21), (1004, 22, 24),
          (1005, 25, 29), (1006, 29, 31), (1007, 31, 33), (1004, 34, 36), (1008, 37, 41),
          (1009, 41, 42)]
IDS, OFFSETS = _query(PIECES)
SPANS = [(0, 12, "PERSON"), (25, 33, "GPE"), (37, 41, "DATE")]
SPAN_POSITIONS = {(0, 12): [1, 2], (25, 33): [6, 7, 8], (37, 41): [10]}


def _check_common(ex: masking.MaskedExample, ids: np.ndarray, max_masks: int):
  n = ex.num_masks
  assert ex.input_ids.dtype == np.int32 and ex.input_ids.shape == ids.shape
  assert ex.mlm_positions.shape == ex.mlm_targets.shape == ex.mlm_weights.shape == (max_masks,)
  assert ex.mlm_positions.dtype == ex.mlm_targets.dtype == np.int32
  assert ex.mlm_weights.dtype == np.float32
  assert 1 <= n <= max_masks
  assert (ex.mlm_weights[:n] == 1).all() and (ex.mlm_weights[n:] == 0).all()
  pos = ex.mlm_positions[:n]
  assert (np.diff(pos) > 0).all()
  assert not np.isin(ids[pos], SPECIAL).any()  # never [CLS], [SEP], padding
  np.testing.assert_array_equal(ex.mlm_targets[:n], ids[pos])
  assert (ex.mlm_positions[n:] == 0).all() and (ex.mlm_targets[n:] == 0).all()
  untouched = np.setdiff1d(np.arange(len(ids)), pos)
  np.testing.assert_array_equal(ex.input_ids[untouched], ids[untouched])


def test_salient_masks_every_piece_of_one_span():
  chosen = set()
  for seed in range(60):
    ex = masking.salient_span_mask(IDS, OFFSETS, SPANS, np.random.default_rng(seed), MASK, 10)
    _check_common(ex, IDS, 10)
    pos = ex.mlm_positions[:ex.num_masks].tolist()
    assert pos in SPAN_POSITIONS.values()
    assert (ex.input_ids[pos] == MASK).all()  # no 80/10/10 for salient spans
    chosen.add(tuple(pos))
  assert len(chosen) == 3  # every span gets chosen (uniform choice)


def test_salient_uniform_choice():
  counts = np.zeros(3)
  keys = list(SPAN_POSITIONS.values())
  for seed in range(600):
    ex = masking.salient_span_mask(IDS, OFFSETS, SPANS, np.random.default_rng(seed), MASK, 10)
    counts[keys.index(ex.mlm_positions[:ex.num_masks].tolist())] += 1
  assert (np.abs(counts / 600 - 1 / 3) < 0.07).all(), counts


def test_salient_deterministic_given_seed():
  a = masking.salient_span_mask(IDS, OFFSETS, SPANS, np.random.default_rng(7), MASK, 10)
  b = masking.salient_span_mask(IDS, OFFSETS, SPANS, np.random.default_rng(7), MASK, 10)
  for f in ("input_ids", "mlm_positions", "mlm_targets", "mlm_weights"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_salient_unusable_spans_give_none():
  rng = np.random.default_rng(0)
  assert masking.salient_span_mask(IDS, OFFSETS, [], rng, MASK, 10) is None
  # Outside the query's characters (e.g. lost to truncation), or empty.
  assert masking.salient_span_mask(IDS, OFFSETS, [(50, 60), (3, 3)], rng, MASK, 10) is None
  # Needs more wordpieces than max_masks.
  assert masking.salient_span_mask(IDS, OFFSETS, [(0, 42)], rng, MASK, 10) is None
  assert masking.salient_span_mask(IDS, OFFSETS, [(25, 33)], rng, MASK, 2) is None
  ex = masking.salient_span_mask(IDS, OFFSETS, [(25, 33)], rng, MASK, 3)
  assert ex.mlm_positions.tolist() == [6, 7, 8]


def test_salient_prefers_spans_covering_a_whole_piece():
  # (26, 28) lies inside the single wordpiece (25, 29): it is only a fallback.
  for seed in range(20):
    ex = masking.salient_span_mask(IDS, OFFSETS, [(26, 28), (37, 41)],
                                   np.random.default_rng(seed), MASK, 10)
    assert ex.mlm_positions[:ex.num_masks].tolist() == [10]
  ex = masking.salient_span_mask(IDS, OFFSETS, [(26, 28)], np.random.default_rng(0), MASK, 10)
  assert ex.mlm_positions[:ex.num_masks].tolist() == [6]


def test_salient_accepts_label_column_and_checks_shapes():
  ex = masking.salient_span_mask(IDS, OFFSETS, np.array([[37, 41]]), np.random.default_rng(0),
                                 MASK, 10)
  assert ex.mlm_positions[0] == 10
  with pytest.raises(ValueError, match="token_offsets"):
    masking.salient_span_mask(IDS, OFFSETS[:5], SPANS, np.random.default_rng(0), MASK, 10)
  with pytest.raises(ValueError, match="max_masks"):
    masking.salient_span_mask(IDS, OFFSETS, SPANS, np.random.default_rng(0), MASK, 0)


def _long_query(n: int = 60, length: int = 64) -> np.ndarray:
  rng = np.random.default_rng(123)
  ids, _ = _query([(int(t), 0, 0) for t in rng.integers(1000, 30000, size=n)], length)
  return ids


def test_random_token_mask_budget_and_invariants():
  ids = _long_query()
  for seed in range(30):
    ex = masking.random_token_mask(ids, np.random.default_rng(seed), mask_id=MASK,
                                   vocab_size=VOCAB, special_ids=SPECIAL, max_masks=20)
    _check_common(ex, ids, 20)
    assert ex.num_masks == 9  # round(0.15 * 60)
  ex = masking.random_token_mask(ids, np.random.default_rng(0), mask_id=MASK, vocab_size=VOCAB,
                                 special_ids=SPECIAL, max_masks=5)
  assert ex.num_masks == 5  # capped by max_masks
  short, _ = _query([(2000, 0, 1), (2001, 2, 3)])
  ex = masking.random_token_mask(short, np.random.default_rng(0), mask_id=MASK, vocab_size=VOCAB,
                                 special_ids=SPECIAL, max_masks=5)
  assert ex.num_masks == 1  # at least one


def test_random_token_mask_80_10_10():
  ids = _long_query()
  stats = np.zeros(3)
  for seed in range(400):
    ex = masking.random_token_mask(ids, np.random.default_rng(seed), mask_id=MASK,
                                   vocab_size=VOCAB, special_ids=SPECIAL, max_masks=20)
    pos = ex.mlm_positions[:ex.num_masks]
    new, old = ex.input_ids[pos], ids[pos]
    stats += [(new == MASK).sum(), ((new != MASK) & (new != old)).sum(), (new == old).sum()]
    assert not np.isin(new[new != MASK], SPECIAL).any()  # random ids are never special
  frac = stats / stats.sum()
  np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.03)


def test_random_token_mask_deterministic_and_seed_dependent():
  ids = _long_query()
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, max_masks=20)
  a = masking.random_token_mask(ids, np.random.default_rng(3), **kw)
  b = masking.random_token_mask(ids, np.random.default_rng(3), **kw)
  c = masking.random_token_mask(ids, np.random.default_rng(4), **kw)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.mlm_positions, b.mlm_positions)
  assert not np.array_equal(a.mlm_positions, c.mlm_positions)


def test_random_masks_none_without_maskable_tokens():
  empty, _ = _query([])
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, max_masks=10)
  assert masking.random_token_mask(empty, np.random.default_rng(0), **kw) is None
  assert masking.random_span_mask(empty, np.random.default_rng(0), **kw) is None


def test_random_span_mask_contiguous_whole_words():
  ids = _long_query(n=60)
  # Words of 1-3 pieces: a word starts at every third position from 1, plus a few more.
  word_start = np.zeros(len(ids), bool)
  word_start[1::3] = True
  word_start[[5, 20, 40]] = True
  span_lengths = []
  for seed in range(100):
    ex = masking.random_span_mask(ids, np.random.default_rng(seed), mask_id=MASK,
                                  vocab_size=VOCAB, special_ids=SPECIAL, max_masks=20,
                                  word_start=word_start, replace_probs=(1.0, 0.0, 0.0))
    _check_common(ex, ids, 20)
    pos = ex.mlm_positions[:ex.num_masks]
    assert ex.num_masks <= 9  # budget round(0.15 * 60)
    assert (ex.input_ids[pos] == MASK).all()
    masked = np.zeros(len(ids), bool)
    masked[pos] = True
    # Whole words: a masked continuation piece has its word's previous piece masked, and the piece
    # after a masked piece, if a continuation, is masked too.
    for p in pos:
      if not word_start[p]:
        assert masked[p - 1]
      if p + 1 < 61 and not word_start[p + 1]:
        assert masked[p + 1]
    runs = np.split(pos, np.flatnonzero(np.diff(pos) != 1) + 1)
    span_lengths += [len(r) for r in runs]
  assert max(span_lengths) > 1  # spans, not single tokens


def test_random_span_lengths_are_geometric():
  # One long sentence of one-piece words, a large budget: the drawn span lengths follow the
  # truncated Geometric(0.2) on [1, 10] (mean 3.8).
  ids, _ = _query([(2000 + i, 0, 0) for i in range(500)], length=512)
  runs = []
  for seed in range(40):
    ex = masking.random_span_mask(ids, np.random.default_rng(seed), mask_id=MASK,
                                  vocab_size=VOCAB, special_ids=SPECIAL, max_masks=75,
                                  replace_probs=(1.0, 0.0, 0.0), max_attempts=30)
    masked = np.zeros(len(ids), bool)
    masked[ex.mlm_positions[:ex.num_masks]] = True
    assert ex.num_masks <= 75
    # Separate adjacent spans are indistinguishable; use the isolated runs only.
    edges = np.flatnonzero(np.diff(masked.astype(int)))
    for start, end in zip(edges[::2] + 1, edges[1::2] + 1):
      runs.append(end - start)
  runs = np.asarray(runs)
  assert 3.0 < runs.mean() < 5.0, runs.mean()


def test_random_span_replaces_whole_span_at_once():
  ids = _long_query()
  for seed in range(50):
    ex = masking.random_span_mask(ids, np.random.default_rng(seed), mask_id=MASK,
                                  vocab_size=VOCAB, special_ids=SPECIAL, max_masks=20,
                                  replace_probs=(0.0, 0.0, 1.0))
    np.testing.assert_array_equal(ex.input_ids, ids)  # "unchanged" keeps every token
    assert ex.num_masks >= 1


def test_bad_arguments():
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, max_masks=10)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="token_ids"):
    masking.random_token_mask(IDS.reshape(4, 8), rng, **kw)
  with pytest.raises(ValueError, match="replace_probs"):
    masking.random_token_mask(IDS, rng, replace_probs=(0.5, 0.5, 0.5), **kw)
  with pytest.raises(ValueError, match="mask_prob"):
    masking.random_span_mask(IDS, rng, mask_prob=0.0, **kw)
  with pytest.raises(ValueError, match="word_start"):
    masking.random_span_mask(IDS, rng, word_start=np.ones(3, bool), **kw)
