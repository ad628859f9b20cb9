"""Masking of one query sentence for REALM's masked-LM pre-training (REALM §3.4, Table 2).

Every function works on the wordpiece ids of ONE query sentence laid out as
`[CLS] sentence [SEP] [PAD]...` (length `query_length`, 96 in the paper) and returns a
`MaskedExample`: the masked ids plus the masked-LM targets padded to `max_masks` (10 in the official
local launcher). All are pure numpy and deterministic given the `np.random.Generator`.

- `salient_span_mask` — REALM §3.4 salient span masking: ONE salient span (named entity or date)
  is chosen and every wordpiece overlapping it becomes [MASK] (no 80/10/10 replacement).
- `random_token_mask` — Table 2 ablation "random uniform masks" (BERT, Devlin et al. 2019): 15% of
  the sentence's wordpieces, each replaced by [MASK] 80% / a random token 10% / itself 10%.
- `random_span_mask` — Table 2 ablation "random span masks" (SpanBERT, Joshi et al. 2020): whole
  spans with lengths ~ Geometric(p=0.2) truncated to 10 words (mean 3.8), until ~15% of the
  wordpieces are masked; the 80/10/10 replacement is drawn once per span, as in SpanBERT.

Positions that are never masked: [CLS], [SEP], padding — in `salient_span_mask` these are the
positions whose `token_offsets` are negative; in the random maskers, positions whose id is in
`special_ids` (which must contain the [CLS], [SEP] and [PAD] ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# BERT / SpanBERT masked-LM defaults.
MASK_PROB = 0.15
REPLACE_PROBS = (0.8, 0.1, 0.1)  # [MASK], random token, unchanged
GEOMETRIC_P = 0.2
MAX_SPAN_LENGTH = 10


@dataclasses.dataclass(frozen=True)
class MaskedExample:
  """One masked query sentence.

  Attributes:
    input_ids: `[query_length]` int32, the ids with the masked positions replaced.
    mlm_positions: `[max_masks]` int32, indices into `input_ids` of the masked-LM targets (sorted),
      0 in the padding slots.
    mlm_targets: `[max_masks]` int32, the ORIGINAL ids at `mlm_positions`, 0 in the padding slots.
    mlm_weights: `[max_masks]` float32, 1.0 for a real target, 0.0 for a padding slot.
  """

  input_ids: np.ndarray
  mlm_positions: np.ndarray
  mlm_targets: np.ndarray
  mlm_weights: np.ndarray

  @property
  def num_masks(self) -> int:
    """Number of real masked-LM targets (≤ max_masks)."""
    return int(self.mlm_weights.sum())


def _check_ids(token_ids: np.ndarray, max_masks: int) -> np.ndarray:
  ids = np.asarray(token_ids)
  if ids.ndim != 1:
    raise ValueError(f"token_ids must be [query_length], got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
  if max_masks <= 0:
    raise ValueError(f"max_masks must be positive, got {max_masks}")
  return ids.astype(np.int32)


def _pack(input_ids: np.ndarray, original: np.ndarray, positions: Sequence[int],
          max_masks: int) -> MaskedExample:
  positions = np.sort(np.asarray(positions, np.int32))
  n = len(positions)
  if n > max_masks:
    raise AssertionError(f"{n} masks > max_masks={max_masks}")
  pos = np.zeros(max_masks, np.int32)
  tgt = np.zeros(max_masks, np.int32)
  wts = np.zeros(max_masks, np.float32)
  pos[:n] = positions
  tgt[:n] = original[positions]
  wts[:n] = 1.0
  return MaskedExample(input_ids.astype(np.int32), pos, tgt, wts)


def salient_span_mask(token_ids: np.ndarray, token_offsets: np.ndarray,
                      spans: Sequence[tuple[int, int]] | np.ndarray, rng: np.random.Generator,
                      mask_id: int, max_masks: int) -> MaskedExample | None:
  """Masks every wordpiece of ONE salient span (REALM §3.4 salient span masking).

  A span is usable if it overlaps at least one wordpiece, lies entirely within the characters of the
  sentence's wordpieces (a truncated query may have lost its end), and overlaps at most `max_masks`
  wordpieces. Spans that wholly cover at least one wordpiece are preferred: a span that only covers
  part of a wordpiece (e.g. "1990" inside "1990s" tokenised as one piece) is chosen only when no
  other is usable. The span is chosen uniformly at random among the preferred usable spans; every
  wordpiece overlapping it becomes `mask_id` (no 80/10/10 replacement, as in the official code).

  Args:
    token_ids: `[query_length]` int, `[CLS] sentence [SEP]` then padding.
    token_offsets: `[query_length, 2]` int, the character `(start, end)` of each wordpiece in the
      text the spans refer to; negative for [CLS], [SEP] and padding (never masked).
    spans: `[num_spans, 2]` character `(start, end)` of the salient spans (extra columns, such as a
      label, are ignored); may be empty.
    rng: the random generator (the only source of randomness).
    mask_id: id of [MASK].
    max_masks: number of masked-LM slots (10 in the official launcher).

  Returns:
    The `MaskedExample`, or None if no span is usable.

  Raises:
    ValueError: on inconsistent shapes.
  """
  ids = _check_ids(token_ids, max_masks)
  offsets = np.asarray(token_offsets)
  if offsets.shape != (len(ids), 2):
    raise ValueError(f"token_offsets must be [{len(ids)}, 2], got {np.shape(token_offsets)}")
  real = offsets[:, 0] >= 0
  if not real.any():
    return None
  starts, ends = offsets[:, 0], offsets[:, 1]
  lo, hi = starts[real].min(), ends[real].max()
  whole, partial = [], []
  for span in spans:
    s, e = int(span[0]), int(span[1])
    if e <= s or s < lo or e > hi:
      continue
    overlap = np.flatnonzero(real & (starts < e) & (ends > s))
    if not 1 <= len(overlap) <= max_masks:
      continue
    covered = real & (starts >= s) & (ends <= e)
    (whole if covered.any() else partial).append(overlap)
  candidates = whole or partial
  if not candidates:
    return None
  positions = candidates[int(rng.integers(len(candidates)))]
  masked = ids.copy()
  masked[positions] = mask_id
  return _pack(masked, ids, positions, max_masks)


def _is_special(ids: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
  out = np.zeros(ids.shape, bool)
  for special in special_ids:  # a handful of ids: faster than np.isin on short rows
    out |= ids == special
  return out


def _maskable(ids: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
  return np.flatnonzero(~_is_special(ids, special_ids))


def _num_to_mask(num_maskable: int, mask_prob: float, max_masks: int) -> int:
  return min(max_masks, max(1, int(round(num_maskable * mask_prob))))


def _random_ids(rng: np.random.Generator, n: int, vocab_size: int,
                special_ids: Sequence[int]) -> np.ndarray:
  """`n` ids drawn uniformly from `[0, vocab_size)` minus the special ids (rejection sampling)."""
  if n == 0:
    return np.zeros(0, np.int32)
  if len(set(int(i) for i in special_ids if 0 <= i < vocab_size)) >= vocab_size:
    raise ValueError(f"vocab_size={vocab_size} leaves no non-special id to draw")
  out = rng.integers(vocab_size, size=n)
  while (bad := _is_special(out, special_ids)).any():
    out[bad] = rng.integers(vocab_size, size=int(bad.sum()))
  return out.astype(np.int32)


def _draw(rng: np.random.Generator, weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
  """`[n]` int64 indices drawn with probabilities proportional to `weights` (inverse CDF)."""
  cdf = np.cumsum(np.asarray(weights, np.float64))
  return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n), side="right"), len(cdf) - 1)


def _check_probs(mask_prob: float, replace_probs: Sequence[float]) -> None:
  if not 0.0 < mask_prob <= 1.0:
    raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
  if len(replace_probs) != 3 or min(replace_probs) < 0 or abs(sum(replace_probs) - 1.0) > 1e-6:
    raise ValueError(f"replace_probs must be 3 non-negative numbers summing to 1, got "
                     f"{replace_probs}")


def random_token_mask(token_ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                      vocab_size: int, special_ids: Sequence[int], max_masks: int,
                      mask_prob: float = MASK_PROB,
                      replace_probs: Sequence[float] = REPLACE_PROBS) -> MaskedExample | None:
  """BERT-style random token masking (REALM Table 2 ablation "random uniform masks").

  `min(max_masks, max(1, round(mask_prob * n)))` of the `n` non-special positions are chosen
  uniformly without replacement; each is replaced by [MASK] with probability `replace_probs[0]`,
  by a random non-special id with `replace_probs[1]`, and kept with `replace_probs[2]` (Devlin et
  al., 2019, §3.1). Targets are the original ids either way.

  Args:
    token_ids: `[query_length]` int, `[CLS] sentence [SEP]` then padding.
    rng: the random generator.
    mask_id: id of [MASK].
    vocab_size: ids of random replacements are in `[0, vocab_size)`, minus `special_ids`.
    special_ids: ids never masked nor drawn as replacements ([PAD], [CLS], [SEP], [MASK], ...).
    max_masks: number of masked-LM slots.
    mask_prob: fraction of the non-special positions to mask (0.15).
    replace_probs: probabilities of [MASK] / random id / unchanged (0.8, 0.1, 0.1).

  Returns:
    The `MaskedExample`, or None if the sentence has no non-special position.

  Raises:
    ValueError: on bad shapes or probabilities.
  """
  ids = _check_ids(token_ids, max_masks)
  _check_probs(mask_prob, replace_probs)
  maskable = _maskable(ids, special_ids)
  if not len(maskable):
    return None
  n = _num_to_mask(len(maskable), mask_prob, max_masks)
  positions = np.sort(maskable[rng.permutation(len(maskable))[:n]])
  action = _draw(rng, replace_probs, n)
  masked = ids.copy()
  masked[positions[action == 0]] = mask_id
  randomised = positions[action == 1]
  masked[randomised] = _random_ids(rng, len(randomised), vocab_size, special_ids)
  return _pack(masked, ids, positions, max_masks)


def _word_starts(maskable: np.ndarray, word_start: np.ndarray | None) -> np.ndarray:
  """Indices into `maskable` where a new word begins (every wordpiece when `word_start` is None)."""
  if word_start is None or len(maskable) == 0:
    return np.arange(len(maskable))
  new_word = np.asarray(word_start, bool)[maskable].copy()
  new_word[0] = True
  new_word[1:] |= np.diff(maskable) != 1  # a gap (special token) always starts a new word
  return np.flatnonzero(new_word)


def random_span_mask(token_ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                     vocab_size: int, special_ids: Sequence[int], max_masks: int,
                     word_start: np.ndarray | None = None, mask_prob: float = MASK_PROB,
                     geometric_p: float = GEOMETRIC_P, max_span_length: int = MAX_SPAN_LENGTH,
                     replace_probs: Sequence[float] = REPLACE_PROBS,
                     max_attempts: int = 100) -> MaskedExample | None:
  """SpanBERT-style random span masking (REALM Table 2 ablation "random span masks").

  Following SpanBERT (Joshi et al., 2020, §3.1): the budget is
  `min(max_masks, max(1, round(mask_prob * n)))` wordpieces of the `n` non-special ones. Repeatedly
  a span length ℓ (in words) is drawn from Geometric(`geometric_p`) truncated to `max_span_length`
  (ℓ ∈ [1, 10], mean 3.8 for p = 0.2), a starting word uniformly, and the span is masked if it stays
  inside the sentence, does not overlap an earlier span, and fits the remaining budget; otherwise it
  is redrawn (at most `max_attempts` draws). A span is replaced as a whole: all [MASK], all random
  ids, or unchanged, with `replace_probs`.

  Args:
    token_ids: `[query_length]` int, `[CLS] sentence [SEP]` then padding.
    rng: the random generator.
    mask_id: id of [MASK].
    vocab_size: ids of random replacements are in `[0, vocab_size)`, minus `special_ids`.
    special_ids: ids never masked and never drawn as replacements.
    max_masks: number of masked-LM slots.
    word_start: optional `[query_length]` bool, True where a wordpiece begins a word (False on "##"
      pieces, see `Tokenizer.is_continuation`); when given, spans are whole words and their
      lengths count words, as in SpanBERT; otherwise every wordpiece is a word.
    mask_prob: masking budget as a fraction of the non-special wordpieces (0.15).
    geometric_p: parameter of the span-length distribution (0.2).
    max_span_length: longest span, in words (10).
    replace_probs: per-span probabilities of [MASK] / random ids / unchanged.
    max_attempts: number of span draws before giving up on filling the budget.

  Returns:
    The `MaskedExample`, or None if nothing could be masked.

  Raises:
    ValueError: on bad shapes or probabilities.
  """
  ids = _check_ids(token_ids, max_masks)
  _check_probs(mask_prob, replace_probs)
  if not 0.0 < geometric_p <= 1.0 or max_span_length < 1:
    raise ValueError(f"need 0 < geometric_p <= 1 and max_span_length >= 1, got {geometric_p}, "
                     f"{max_span_length}")
  if word_start is not None and np.shape(word_start) != ids.shape:
    raise ValueError(f"word_start must be [{len(ids)}], got {np.shape(word_start)}")
  maskable = _maskable(ids, special_ids)
  if not len(maskable):
    return None
  budget = _num_to_mask(len(maskable), mask_prob, max_masks)
  word_starts = _word_starts(maskable, word_start)
  word_ends = np.append(word_starts[1:], len(maskable))  # exclusive, indices into `maskable`
  num_words = len(word_starts)
  lengths = np.arange(1, max_span_length + 1)
  # All draws up front (one call each): lengths ~ truncated Geometric, first words ~ uniform.
  span_lengths = 1 + _draw(rng, geometric_p * (1 - geometric_p) ** (lengths - 1), max_attempts)
  first_words = rng.integers(num_words, size=max_attempts)
  taken = np.zeros(len(maskable), bool)
  spans: list[np.ndarray] = []
  used = 0
  for length, first in zip(span_lengths.tolist(), first_words.tolist()):
    if used >= budget:
      break
    last = first + length - 1
    if last >= num_words:
      continue
    piece = np.arange(word_starts[first], word_ends[last])
    if used + len(piece) > budget or taken[piece].any():
      continue
    taken[piece] = True
    spans.append(maskable[piece])
    used += len(piece)
  if not spans:
    return None
  masked = ids.copy()
  for positions, action in zip(spans, _draw(rng, replace_probs, len(spans)).tolist()):
    if action == 0:
      masked[positions] = mask_id
    elif action == 1:
      masked[positions] = _random_ids(rng, len(positions), vocab_size, special_ids)
  return _pack(masked, ids, np.concatenate(spans), max_masks)
