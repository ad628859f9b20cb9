"""Host-side featurisation: token ids → the fixed-shape arrays of the jitted steps.

* `query_inputs`: `[CLS] x [SEP]` for the query embedder (REALM §3.1).
* `join_inputs`: `[CLS] x [SEP] z_body [SEP]` for the knowledge-augmented encoder (§3.2; titles are
  dropped, as in the official code), with the mask of z's body tokens and their character offsets.
* `span_answer_labels`: which reader spans are answers, by the rule that marks blocks as
  answer-bearing (`evaluation.has_answer`, see `evaluation`'s module docstring).

Everything here is numpy on the host; it runs before a step, never inside it.
"""

from __future__ import annotations

import collections
import logging
import unicodedata
from typing import Callable, Sequence

import numpy as np

from realm_jax import evaluation

_LOG = logging.getLogger(__name__)
_INSIGNIFICANT = frozenset(("Mn", "Me", "Cc", "Cf"))

# Queries cut to fit their input, by kind ("query": `query_inputs`, "reader_query": `join_inputs`),
# since the process started; a warning is logged at the 1st, 2nd, 4th, 8th, ... truncation.
TRUNCATED_QUERIES: collections.Counter[str] = collections.Counter()


def _count_truncated(kind: str, longest: int, limit: int) -> None:
  before = TRUNCATED_QUERIES[kind]
  TRUNCATED_QUERIES[kind] += 1
  if before & (before + 1) == 0:  # before + 1 is a power of two
    _LOG.warning("%d %s(s) longer than %d wordpieces truncated so far, keeping their first "
                 "wordpieces (this one had %d)", before + 1, kind.replace("_", " "), limit, longest)


def query_inputs(token_ids: Sequence[Sequence[int]], max_length: int, cls_id: int, sep_id: int,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
  """Pads `[CLS] x [SEP]` queries (x truncated to `max_length − 2` wordpieces).

  Args:
    token_ids: one list of wordpiece ids per query (no special tokens).
    max_length: the query length (64 for ICT / ORQA questions, 96 for REALM pre-training).

  Returns:
    `input_ids`, `input_mask`, `segment_ids`: each `[num_queries, max_length]` int32. A query
    longer than `max_length − 2` keeps its first wordpieces and is counted in
    `TRUNCATED_QUERIES["query"]` (with a warning at the 1st, 2nd, 4th, ... one).

  Raises:
    ValueError: if `max_length < 3`.
  """
  if max_length < 3:
    raise ValueError(f"query max_length must be at least 3, got {max_length}")
  n = len(token_ids)
  ids = np.full((n, max_length), pad_id, np.int32)
  mask = np.zeros((n, max_length), np.int32)
  for i, toks in enumerate(token_ids):
    if len(toks) > max_length - 2:
      _count_truncated("query", len(toks), max_length - 2)
    seq = [cls_id] + list(toks[:max_length - 2]) + [sep_id]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return {"input_ids": ids, "input_mask": mask, "segment_ids": np.zeros_like(ids)}


def join_inputs(query_ids: Sequence[int], body_ids: Sequence[int], max_length: int,
                cls_id: int, sep_id: int, pad_id: int = 0,
                max_query_length: int | None = None) -> dict[str, np.ndarray]:
  """One `[CLS] x [SEP] z_body [SEP]` input of the knowledge-augmented encoder (REALM §3.2).

  Args:
    query_ids: wordpieces of x (no special tokens); truncated to `max_query_length − 2` when given
      (counted in `TRUNCATED_QUERIES["reader_query"]`).
    body_ids: wordpieces of the block body (no title); truncated to fit `max_length`.
    max_length: total length (288 + 32 for the Open-QA reader).

  Returns:
    `input_ids`, `segment_ids` (0 for `[CLS] x [SEP]`, 1 for `z [SEP]`), `input_mask`, `body_mask`
    (1 on z's body tokens): each `[max_length]` int32; and `body_start` (position of z's first token)
    and `body_len` (body tokens kept) as Python ints.

  Raises:
    ValueError: if the query alone does not leave room for one body token.
  """
  q = list(query_ids)
  if max_query_length is not None and len(q) > max(max_query_length - 2, 0):
    _count_truncated("reader_query", len(q), max(max_query_length - 2, 0))
    q = q[:max(max_query_length - 2, 0)]
  body_start = len(q) + 2
  room = max_length - body_start - 1
  if room < 1:
    raise ValueError(f"query of {len(q)} wordpieces leaves no room for the block in "
                     f"max_length={max_length}")
  body = list(body_ids[:room])
  seq = [cls_id] + q + [sep_id] + body + [sep_id]
  ids = np.full((max_length,), pad_id, np.int32)
  ids[:len(seq)] = seq
  seg = np.zeros((max_length,), np.int32)
  seg[body_start:len(seq)] = 1
  mask = np.zeros((max_length,), np.int32)
  mask[:len(seq)] = 1
  body_mask = np.zeros((max_length,), np.int32)
  body_mask[body_start:body_start + len(body)] = 1
  return {"input_ids": ids, "segment_ids": seg, "input_mask": mask, "body_mask": body_mask,
          "body_start": body_start, "body_len": len(body)}


def span_answer_labels(text: str, body_offsets: np.ndarray, body_start: int, body_len: int,
                       answers: Sequence[str], starts: np.ndarray, ends: np.ndarray,
                       answers_are_regex: bool = False) -> np.ndarray:
  """Marks the reader spans that are answers (ORQA §4.2 / REALM §3.4 fine-tuning labels).

  A span (s, e) of the joined input covers the body wordpieces `s' = s − body_start` to
  `e' = e − body_start`; its text is `text[offsets[s'][0]:offsets[e'][1]]`. Strings: the span is a
  positive when its text is exactly an occurrence of an answer's DrQA token sequence in the block
  (`evaluation.answer_token_spans`, the rule of `evaluation.has_answer` that marks the block as
  answer-bearing), so "U.S." is not a positive for "US" and "Paris" inside "Parisian" is not one
  for "Paris"; both ranges are compared without the characters WordPiece offsets leave out
  (stripped accents, zero-width and other format characters). An occurrence is labelled only if
  WordPiece splits the text where DrQA does (a word read as one [UNK], e.g. "Paris\u200b😀", has
  no span for "😀"), it lies in the part of the block the reader sees, and it is at most
  `max_span_width` wordpieces long. Regexes (CuratedTrec): the pattern must match the whole span
  text (`evaluation.regex_fullmatch`), not just its beginning as evaluation's `re.match` does.

  Args:
    text: the block body text; `body_offsets` `[num_body_tokens, 2]` int32 char offsets into it.
    body_start / body_len: from `join_inputs`.
    answers: reference answers.
    starts / ends: `[num_spans]` int32 span endpoints (`encoder.span_candidates`).
    answers_are_regex: the answers are regular expressions.

  Returns:
    `[num_spans]` bool; all False when no answer occurs in the part of the block the reader sees.
  """
  labels = np.zeros(starts.shape, bool)
  if body_len == 0 or not answers:
    return labels
  rel_s = starts - body_start
  rel_e = ends - body_start
  in_body = np.nonzero((rel_s >= 0) & (rel_e < body_len) & (rel_s <= rel_e))[0]
  if not len(in_body):
    return labels
  offsets = np.asarray(body_offsets, dtype=np.int64)
  char_s = offsets[rel_s[in_body], 0]
  char_e = offsets[rel_e[in_body], 1]
  if answers_are_regex:
    for i, cs, ce in zip(in_body, char_s, char_e):
      labels[i] = evaluation.regex_fullmatch(text[cs:ce], answers)
    return labels
  found = evaluation.answer_token_spans(text, answers)
  if not found:
    return labels
  # WordPiece offsets leave out what BERT's tokenizer drops (stripped accents, control and format
  # characters) where DrQA tokens keep them: both ranges are compared without those characters.
  first, end = _significant_bounds(text)
  width = len(text) + 1
  keys = np.asarray([first[a] * width + end[b] for a, b in found if first[a] < end[b]], np.int64)
  labels[in_body] = np.isin(first[char_s] * width + end[char_e], keys)
  return labels


def _significant_bounds(text: str) -> tuple[np.ndarray, np.ndarray]:
  """`first[i]`: the first significant character at or after i; `end[j]`: 1 + the last before j.

  Insignificant: whitespace, combining marks that do not take space (Unicode Mn / Me: the accents
  an uncased WordPiece tokenizer strips), control and format characters (Cc / Cf: zero-width
  spaces, direction marks) and U+FFFD. Both arrays have `len(text) + 1` entries.
  """
  n = len(text)
  significant = np.fromiter(
      (not (ch.isspace() or ch == "\ufffd" or unicodedata.category(ch) in _INSIGNIFICANT)
       for ch in text), dtype=bool, count=n)
  positions = np.flatnonzero(significant)
  first = np.full(n + 1, n, np.int64)
  end = np.zeros(n + 1, np.int64)
  if len(positions):
    idx = np.searchsorted(positions, np.arange(n + 1), side="left")
    has_next = idx < len(positions)
    first[has_next] = positions[idx[has_next]]
    before = idx - 1
    has_prev = before >= 0
    end[has_prev] = positions[before[has_prev]] + 1
  return first, end


def span_text(text: str, body_offsets: np.ndarray, body_start: int, start: int, end: int) -> str:
  """The block text of the reader span `start … end` (joined-input positions, inclusive)."""
  s, e = start - body_start, end - body_start
  return text[int(body_offsets[s][0]):int(body_offsets[e][1])]


def full_word_span(body_ids: Sequence[int], body_start: int, start: int, end: int,
                   is_continuation: Callable[[int], bool]) -> tuple[int, int]:
  """Widens a reader span to whole words, as DPR's reader does (`_extend_span_to_full_words`).

  A span may start or end inside a word (`"##ing"` pieces); its text would then be a word
  fragment ("inghouse" for "Westinghouse"). The start moves left over continuation pieces and the
  end moves right while the next piece continues the word, both inside the block body.

  Args:
    body_ids: the block's body wordpiece ids (`Block.body_ids`), int.
    body_start: the joined-input position of the first body token.
    start / end: the span's first and last joined-input positions (inclusive).
    is_continuation: `tokenizer.is_continuation(token_id) -> bool`.

  Returns:
    `(start, end)`: joined-input positions (inclusive) of the widened span; unchanged for a span
    outside the body.
  """
  s, e = int(start) - body_start, int(end) - body_start
  n = len(body_ids)
  if not 0 <= s <= e < n:
    return int(start), int(end)
  while s > 0 and is_continuation(int(body_ids[s])):
    s -= 1
  while e + 1 < n and is_continuation(int(body_ids[e + 1])):
    e += 1
  return s + body_start, e + body_start
