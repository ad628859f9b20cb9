"""Host-side featurisation: token ids → the fixed-shape arrays of the jitted steps.

* `query_inputs`: `[CLS] x [SEP]` for the query embedder (REALM §3.1).
* `join_inputs`: `[CLS] x [SEP] z_body [SEP]` for the knowledge-augmented encoder (§3.2; titles are
  dropped, as in the official code), with the mask of z's body tokens and their character offsets.
* `span_answer_labels`: which reader spans match an answer after normalisation (ORQA §4.2).

Everything here is numpy on the host; it runs before a step, never inside it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from realm_jax import evaluation


def query_inputs(token_ids: Sequence[Sequence[int]], max_length: int, cls_id: int, sep_id: int,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
  """Pads `[CLS] x [SEP]` queries (x truncated to `max_length − 2` wordpieces).

  Args:
    token_ids: one list of wordpiece ids per query (no special tokens).
    max_length: the query length (64 for ICT / ORQA questions, 96 for REALM pre-training).

  Returns:
    `input_ids`, `input_mask`, `segment_ids`: each `[num_queries, max_length]` int32.

  Raises:
    ValueError: if `max_length < 3`.
  """
  if max_length < 3:
    raise ValueError(f"query max_length must be at least 3, got {max_length}")
  n = len(token_ids)
  ids = np.full((n, max_length), pad_id, np.int32)
  mask = np.zeros((n, max_length), np.int32)
  for i, toks in enumerate(token_ids):
    seq = [cls_id] + list(toks[:max_length - 2]) + [sep_id]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return {"input_ids": ids, "input_mask": mask, "segment_ids": np.zeros_like(ids)}


def join_inputs(query_ids: Sequence[int], body_ids: Sequence[int], max_length: int,
                cls_id: int, sep_id: int, pad_id: int = 0,
                max_query_length: int | None = None) -> dict[str, np.ndarray]:
  """One `[CLS] x [SEP] z_body [SEP]` input of the knowledge-augmented encoder (REALM §3.2).

  Args:
    query_ids: wordpieces of x (no special tokens); truncated to `max_query_length − 2` when given.
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
  if max_query_length is not None:
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
  """Marks the reader spans whose text matches an answer (ORQA §4.2 / REALM §3.4 fine-tuning).

  A span (s, e) of the joined input covers body wordpieces `s − body_start … e − body_start`; its text
  is `text[offsets[s'][0]:offsets[e'][1]]`, compared with the answers after the SQuAD normalisation
  (or matched in full by the regex answers of CuratedTrec).

  Args:
    text: the block body text; `body_offsets` `[num_body_tokens, 2]` int32 char offsets into it.
    body_start / body_len: from `join_inputs`.
    answers: reference answers.
    starts / ends: `[num_spans]` int32 span endpoints (`encoder.span_candidates`).

  Returns:
    `[num_spans]` bool.
  """
  labels = np.zeros(starts.shape, bool)
  if body_len == 0 or not answers:
    return labels
  if answers_are_regex:
    first_chars = None
  else:
    normalized = {evaluation.normalize_answer(a) for a in answers}
    normalized.discard("")
    if not normalized:
      return labels
    first_chars = {a[0] for a in normalized}
  rel_s = starts - body_start
  rel_e = ends - body_start
  in_body = (rel_s >= 0) & (rel_e < body_len)
  head_ok: dict[int, bool] = {}
  for i in np.nonzero(in_body)[0]:
    s, e = int(rel_s[i]), int(rel_e[i])
    span = text[body_offsets[s][0]:body_offsets[e][1]]
    if first_chars is None:
      labels[i] = evaluation.exact_match(span, answers, answers_are_regex=True)
      continue
    if s not in head_ok:  # cheap filter: the normalised span must start like some answer
      head = evaluation.normalize_answer(text[body_offsets[s][0]:body_offsets[s][0] + 40])
      head_ok[s] = bool(head) and head[0] in first_chars
    if head_ok[s]:
      labels[i] = evaluation.normalize_answer(span) in normalized
  return labels


def span_text(text: str, body_offsets: np.ndarray, body_start: int, start: int, end: int) -> str:
  """The block text of the reader span `start … end` (joined-input positions, inclusive)."""
  s, e = start - body_start, end - body_start
  return text[int(body_offsets[s][0]):int(body_offsets[e][1])]
