"""Open-QA metrics: exact match, regex match, answer containment, recall@k, predictions files.

REALM (Guu et al., 2020, §4.2) reports exact match with the official ORQA evaluation
(`language/orqa/utils/eval_utils.py`, itself the SQuAD v1.1 / DrQA normalisation): NFD unicode →
lowercase → strip ASCII punctuation → drop the articles a / an / the → collapse whitespace, maximum
over the reference answers. CuratedTrec answers are regular expressions compiled with
IGNORECASE | UNICODE | MULTILINE and applied with `re.match` to the raw prediction (anchored at its
start, as ORQA's and DrQA's `regex_match_score` do). Retrieval recall@k (REALM Table 2, ORQA §9.3)
counts a question as covered when one of its top-k blocks contains an answer, with DrQA's
`has_answer`: the uncased token sequence of an answer occurs in the block's token sequence (or a
regex answer is found anywhere in the block).

Training labels follow one rule, the `has_answer` token match, for blocks and spans alike: a block
is answer-bearing when an answer's DrQA token sequence occurs in it, and a reader span is a positive
when it covers exactly such an occurrence (`answer_token_spans`), so a block is a positive exactly
when it holds a positive span that the reader can see. SQuAD normalisation is for scoring
predictions only (`exact_match`), never for labels: "U.S." is not the answer "US" in training
("u . s ." ≠ "us"), although evaluation would score the prediction "U.S." correct. Regex answers
label a span when the pattern matches its whole text (`regex_fullmatch`); evaluation keeps the
official `re.match`, which accepts any prediction that merely starts with a match.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import sys
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from realm_jax import fileio

_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """The ORQA / SQuAD v1.1 answer normalisation.

  NFD unicode, lowercase, remove ASCII punctuation (`string.punctuation`), replace the words
  a / an / the by spaces, collapse runs of whitespace to one space and strip.
  E.g. "The Eiffel Tower!" → "eiffel tower".
  """
  s = unicodedata.normalize("NFD", s).lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


@functools.lru_cache(maxsize=4096)
def _compile_answer_regex(pattern: str) -> re.Pattern[str] | None:
  try:
    return re.compile(pattern, flags=_REGEX_FLAGS)
  except re.error:
    return None  # ORQA/DrQA: a pattern that does not compile never matches.


def regex_match(prediction: str, pattern: str) -> bool:
  """ORQA's `regex_match_score`: `re.match` (anchored at the start) with I | U | M flags.

  A pattern that does not compile scores False, as in ORQA and DrQA.
  """
  regex = _compile_answer_regex(pattern)
  return regex is not None and regex.match(prediction) is not None


def exact_match(prediction: str, answers: Sequence[str], answers_are_regex: bool = False) -> bool:
  """Whether a predicted answer string is correct (max over reference answers).

  Args:
    prediction: the predicted answer text.
    answers: reference answers (strings, or regular expressions for CuratedTrec).
    answers_are_regex: use `regex_match` instead of normalised string equality.

  Returns:
    True if any reference matches; False for an empty `answers`.
  """
  if answers_are_regex:
    return any(regex_match(prediction, a) for a in answers)
  p = normalize_answer(prediction)
  return any(p == normalize_answer(a) for a in answers)


def _class_ranges(flags: Sequence[bool], lo: int) -> str:
  """A regex character-class body (`a-zA-Z…`) for the code points `lo + i` with `flags[i]`."""
  parts, start = [], None
  for i, inside in enumerate(list(flags) + [False]):
    if inside and start is None:
      start = i
    elif not inside and start is not None:
      a, b = re.escape(chr(lo + start)), re.escape(chr(lo + i - 1))
      parts.append(a if start == i - 1 else f"{a}-{b}")
      start = None
  return "".join(parts)


@functools.lru_cache(maxsize=1)
def _simple_tokenizer_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
  """DrQA's SimpleTokenizer `[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]` for Python's `re`.

  `re` has no `\\p{…}` classes, so they are built once (about 0.5 s) from `unicodedata`. Returns
  a pattern for text inside the Basic Multilingual Plane (fast: `re` turns BMP classes into
  bitmaps) and one for any text.
  """
  first = [unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1)]
  alnum = [c in "LNM" for c in first]
  visible = [c not in "ZC" for c in first]
  a_bmp, v_bmp = _class_ranges(alnum[:0x10000], 0), _class_ranges(visible[:0x10000], 0)
  a_astral = _class_ranges(alnum[0x10000:], 0x10000)
  v_astral = _class_ranges(visible[0x10000:], 0x10000)
  bmp = re.compile(f"[{a_bmp}]+|[{v_bmp}]")
  full = re.compile(f"(?:[{a_bmp}]|[{a_astral}])+|[{v_bmp}]|[{v_astral}]")
  return bmp, full


def simple_tokenize(text: str) -> list[str]:
  """DrQA's `SimpleTokenizer().tokenize(text, uncased=True)`.

  Runs of letters, digits and combining marks (Unicode categories L, N, M) are one token; every
  other visible character is a token of its own; separators (Z) and control / format characters
  (C) are dropped. Tokens are lower-cased.
  """
  bmp, full = _simple_tokenizer_patterns()
  text = text.lower()
  pattern = bmp if not text or max(text) <= "\uffff" else full
  return pattern.findall(text)


def _tokens_with_offsets(text: str) -> tuple[list[str], list[int], list[int]]:
  """`simple_tokenize(NFD(text))` with each token's `[start, end)` character range in `text`.

  `text` is normalised character by character, so that offsets map back to the original string;
  each token is then NFD-normalised again (which restores the canonical order of combining marks
  across characters) and lower-cased: the tokens equal `simple_tokenize(NFD(text))`.
  """
  pieces = [unicodedata.normalize("NFD", ch) for ch in text] if not text.isascii() else list(text)
  nfd = "".join(pieces)
  origin = None
  if len(nfd) != len(text):
    origin = [i for i, piece in enumerate(pieces) for _ in piece]
  bmp, full = _simple_tokenizer_patterns()
  pattern = bmp if not nfd or max(nfd) <= "\uffff" else full
  tokens, starts, ends = [], [], []
  for m in pattern.finditer(nfd):
    tokens.append(unicodedata.normalize("NFD", m.group()).lower())
    if origin is None:
      starts.append(m.start())
      ends.append(m.end())
    else:
      starts.append(origin[m.start()])
      ends.append(origin[m.end() - 1] + 1)
  return tokens, starts, ends


def answer_token_spans(text: str, answers: Sequence[str]) -> set[tuple[int, int]]:
  """Where `has_answer` finds a string answer: the character ranges of every occurrence.

  An occurrence is a contiguous run of `text`'s DrQA tokens (NFD, uncased, `simple_tokenize`)
  equal to an answer's tokens; its range runs from the first token's first character to the last
  token's last character. `has_answer(text, answers)` is True exactly when this set is not empty.
  Reader span labels use it (`data.featurize.span_answer_labels`): a span is a positive when its
  text covers exactly one of these ranges, so a span never cuts a token ("Paris" inside
  "Parisian" is not the answer "Paris", as `has_answer` agrees).

  Args:
    text: the block text.
    answers: reference answer strings (not regexes).

  Returns:
    `{(start, end)}` character offsets into `text`, `end` exclusive; empty when no answer occurs.
  """
  tokens, starts, ends = _tokens_with_offsets(text)
  found: set[tuple[int, int]] = set()
  for answer in answers:
    needle = simple_tokenize(unicodedata.normalize("NFD", answer))
    n = len(needle)
    if n == 0:
      continue
    for i in range(len(tokens) - n + 1):
      if tokens[i] == needle[0] and tokens[i:i + n] == needle:
        found.add((starts[i], ends[i + n - 1]))
  return found


def regex_fullmatch(text: str, patterns: Sequence[str]) -> bool:
  """Whether a regex answer matches the whole of `text` (the training label of a span).

  Both sides are NFD-normalised and the pattern compiled with I | U | M, as in `has_answer`; unlike
  evaluation's `regex_match` (`re.match`, official), the match must end where the text ends, so
  the pattern "Paris" does not label the span "Paris, France is big." A pattern that does not
  compile never matches.
  """
  text = unicodedata.normalize("NFD", text)
  for pattern in patterns:
    regex = _compile_answer_regex(unicodedata.normalize("NFD", pattern))
    if regex is not None and regex.fullmatch(text) is not None:
      return True
  return False


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
  n = len(needle)
  if n == 0:
    return False
  first = needle[0]
  for i in range(len(haystack) - n + 1):
    if haystack[i] == first and list(haystack[i:i + n]) == list(needle):
      return True
  return False


def has_answer(block_text: str, answers: Sequence[str], answers_are_regex: bool = False) -> bool:
  """Whether a retrieved block contains an answer (DrQA / DPR `has_answer`, ORQA §9.3 recall).

  Strings: both texts are NFD-normalised and tokenised with `simple_tokenize` (uncased); the block
  contains the answer if the answer's token sequence occurs contiguously in the block's
  (`answer_token_spans` lists where; training labels its spans by the same rule).
  Regexes: the NFD-normalised pattern is searched (`re.search`, I | U | M flags) anywhere in the
  NFD-normalised block; a pattern that does not compile never matches.

  Args:
    block_text: the block body (and title, if the caller wants titles to count).
    answers: reference answers.
    answers_are_regex: CuratedTrec-style answers.

  Returns:
    True if any answer is found. An answer with no tokens (e.g. "!!" has tokens, "" has none)
    never matches.
  """
  text = unicodedata.normalize("NFD", block_text)
  if answers_are_regex:
    for a in answers:
      regex = _compile_answer_regex(unicodedata.normalize("NFD", a))
      if regex is not None and regex.search(text) is not None:
        return True
    return False
  tokens = simple_tokenize(text)
  return any(_contains(tokens, simple_tokenize(unicodedata.normalize("NFD", a)))
             for a in answers)


def recall_at_k(hits: np.ndarray | Sequence[Sequence[bool]],
                ks: Sequence[int] = (1, 5, 20, 100)) -> dict[int, float]:
  """Retrieval recall@k: the fraction of questions with an answer in their top-k blocks.

  Args:
    hits: `[num_questions, num_retrieved]` bool; `hits[q, r]` says whether the r-th ranked block
      of question q contains an answer (see `has_answer`).
    ks: cut-offs, each in `[1, num_retrieved]`.

  Returns:
    `{k: recall}` with recall a Python float in [0, 1].

  Raises:
    ValueError: if `hits` is not 2-D, has no question, or a k is outside `[1, num_retrieved]`.
  """
  hits = np.asarray(hits, dtype=bool)
  if hits.ndim != 2 or hits.shape[0] == 0:
    raise ValueError(f"hits must be [num_questions > 0, num_retrieved], got shape {hits.shape}")
  covered = np.logical_or.accumulate(hits, axis=1)
  out = {}
  for k in ks:
    if not 1 <= k <= hits.shape[1]:
      raise ValueError(f"recall@{k} needs {k} retrieved blocks per question, got {hits.shape[1]}")
    out[int(k)] = float(covered[:, k - 1].mean())
  return out


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (set, frozenset, tuple)):
    return list(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_predictions_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes one JSON object per line, atomically (local path or URL, through `realm_jax.fileio`).

  numpy scalars and arrays are converted to Python numbers and lists. The folder is created.
  Locally the file appears by rename of a fsync-ed temporary file; on object stores as one object
  write (see `fileio.atomic_writer`).

  Args:
    path: destination file (local path or URL such as `gs://bucket/run/predictions/x.jsonl`).
    records: e.g. `{"qid", "question", "prediction", "answers", "correct", "top_block_ids"}`.

  Returns:
    The number of records written.

  Raises:
    TypeError: if a record holds a value JSON cannot represent (nothing is written then).
    OSError: from the file system.
  """
  lines = [json.dumps(dict(record), ensure_ascii=False, default=_json_default) + "\n"
           for record in records]  # TypeError before anything is written.
  fileio.makedirs(fileio.dirname(path))
  fileio.write_atomic(path, "".join(lines))
  return len(lines)


def read_predictions_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a file written by `write_predictions_jsonl` (blank lines skipped; local path or URL).

  Raises:
    FileNotFoundError: if `path` is missing.
    ValueError: naming the line of invalid JSON.
  """
  out = []
  with fileio.open_file(path, "r", encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from e
  return out
