"""Open-QA question sets: SQuAD-open, NQ-open, WebQuestions and CuratedTrec.

REALM (Guu et al., 2020, §4.1) fine-tunes and evaluates on NaturalQuestions-Open, WebQuestions and
CuratedTrec in the open-domain setting of ORQA (Lee et al., 2019, §6): only the question and its
answer strings are given, never a gold passage. CuratedTrec answers are regular expressions
(DrQA format, Chen et al., 2017). SQuAD-open (DrQA, ORQA §6) asks the SQuAD v1.1 questions against
the pool of all paragraphs; its gold paragraph id is kept only for retrieval diagnostics.

Every format error is one `DataFormatError` naming the file, the line (or JSON path) and the field:
besides bad JSON, UTF-8 and field types, a question id used twice (in one file or across the files
read together), a blank question, and an answer that could never be found or would be found
everywhere (a string without any DrQA token, a regex that matches the empty string). A CuratedTrec
pattern that does not compile is kept, as DrQA keeps it (it never matches), with one warning per
file that counts them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import unicodedata
from typing import Any, Sequence

from realm_jax import evaluation
from realm_jax import fileio
from realm_jax.data import corpus
from realm_jax.data.corpus import DataFormatError
from realm_jax.data.corpus import check_text
from realm_jax.data.corpus import json_field
from realm_jax.data.corpus import squad_doc_id

_LOG = logging.getLogger(__name__)

QUESTION_FORMATS = ("squad_open", "nq_open", "webquestions", "curatedtrec")
_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE


@dataclasses.dataclass(frozen=True)
class Question:
  """One Open-QA question.

  Attributes:
    qid: unique id (SQuAD id, or `"{file name}:{line}"` for files without ids).
    question: the question text.
    answers: reference answers: strings, or regular expressions when `answers_are_regex`.
    answers_are_regex: CuratedTrec-style answers (matched with IGNORECASE | UNICODE | MULTILINE).
    gold_doc_ids: doc ids of the passages the question was written from (SQuAD only), in the
      `realm_jax.data.corpus.squad_doc_id` form; empty when unknown.
  """
  qid: str
  question: str
  answers: list[str]
  answers_are_regex: bool = False
  gold_doc_ids: tuple[str, ...] = ()


def _select_articles(articles: list[dict[str, Any]], selection: slice | Sequence[str] | None,
                     path: fileio.Path) -> list[dict[str, Any]]:
  if selection is None:
    return articles
  if isinstance(selection, slice):
    return articles[selection]
  if isinstance(selection, str):
    raise TypeError("articles must be a slice or a sequence of titles, not a single string")
  wanted = {t.replace(" ", "_") for t in selection}
  present = {a["title"].replace(" ", "_") for a in articles}
  missing = sorted(wanted - present)
  if missing:
    raise KeyError(f"{path}: no article titled {missing[:5]}")
  return [a for a in articles if a["title"].replace(" ", "_") in wanted]


def read_squad_open(path: str | os.PathLike,
                    articles: slice | Sequence[str] | None = None) -> list[Question]:
  """Reads every question of a SQuAD v1.1 file as an Open-QA question.

  Args:
    path: `.json` or `.json.gz` SQuAD file.
    articles: keep only these articles: a slice over the file's article order (e.g. `slice(0,
      30)`) or a sequence of titles (spaces or underscores).

  Returns:
    Questions in file order: `qid` = SQuAD id, `answers` = the distinct answer texts in first-seen
    order, `gold_doc_ids = (squad_doc_id(title, paragraph_index),)`.

  Raises:
    FileNotFoundError: if `path` is missing.
    DataFormatError: a missing / mistyped field (named with its JSON path), a question without
      answers, or a duplicate id.
    KeyError: if a requested title is not in the file.
  """
  path = fileio.as_path(path)
  all_articles = corpus.load_squad_json(path)
  indexed = {id(a): i for i, a in enumerate(all_articles)}
  questions: list[Question] = []
  seen: dict[str, str] = {}
  for article in _select_articles(all_articles, articles, path):
    i = indexed[id(article)]
    for j, paragraph in enumerate(article["paragraphs"]):
      where_p = f"{path}: data[{i}].paragraphs[{j}]"
      qas = json_field(paragraph, "qas", list, where_p)
      for k, qa in enumerate(qas):
        where = f"{where_p}.qas[{k}]"
        qid = json_field(qa, "id", str, where)
        text = _question_text(qa, "question", where)
        answers: list[str] = []
        for m, answer in enumerate(json_field(qa, "answers", list, where)):
          a = json_field(answer, "text", str, f"{where}.answers[{m}]")
          _check_answer(a, False, f"{where}.answers[{m}]", "'text'")
          if a not in answers:
            answers.append(a)
        if not answers:
          raise DataFormatError(f"{where}: field 'answers' is empty (question {qid!r})")
        if qid in seen:
          raise DataFormatError(f"{where}: field 'id': duplicate question id {qid!r} (first at "
                                f"{seen[qid]})")
        seen[qid] = f"data[{i}].paragraphs[{j}].qas[{k}]"
        questions.append(Question(qid, text, answers, False,
                                  (squad_doc_id(article["title"], j),)))
  return questions


def _question_text(record: Any, key: str, where: str) -> str:
  """The question string; DataFormatError when it is missing, not a string or blank."""
  text = json_field(record, key, str, where)
  if not text.strip():
    raise DataFormatError(f"{where}: field {key!r} is blank")
  return text


def _check_answer(answer: str, is_regex: bool, where: str, field: str) -> tuple[str, str] | None:
  """Refuses an answer no block or span could ever contain, or that every block would contain.

  Returns:
    None, or for a regex that never matches `(kind, re.error message)`: kind "invalid" when the
    pattern does not compile (exact match and `has_answer` both score it as never matching) or
    "nfd" when only its NFD form does not (e.g. "Sn\\ě\\žka": NFD turns "\\ě" into the bad escape
    "\\e" + caron), so `has_answer` never finds it in a block while exact match
    (`evaluation.regex_match`, on the raw pattern) can still score a prediction with it.

  Raises:
    DataFormatError: a string answer without any DrQA token (`evaluation.simple_tokenize`: blank,
      or only invisible characters), or a regex that matches the empty string (`has_answer` would
      find it in every block).
  """
  check_text(answer, where, field)
  if not is_regex:
    if not evaluation.simple_tokenize(unicodedata.normalize("NFD", answer)):
      raise DataFormatError(f"{where}: field {field} is {answer!r:.40}, which has no token: no "
                            "block could contain it")
    return None
  try:
    regex = re.compile(answer, flags=_REGEX_FLAGS)
  except re.error as e:
    return "invalid", str(e)
  if regex.fullmatch("") is not None:
    raise DataFormatError(f"{where}: field {field} is the regular expression {answer!r:.60}, "
                          "which matches the empty string: every block would contain it")
  try:
    re.compile(unicodedata.normalize("NFD", answer), flags=_REGEX_FLAGS)
  except re.error as e:
    return "nfd", str(e)
  return None


def _read_question_answer_jsonl(path: str | os.PathLike, answers_are_regex: bool) -> list[Question]:
  """Reads `{"question": str, "answer": [str, ...], "id"?: str}` lines (NQ-open / DrQA format)."""
  path = fileio.as_path(path)
  questions = []
  seen: dict[str, int] = {}
  # "line L, field 'answer'[m] 'pattern': error" of the patterns that never match, by kind.
  never: dict[str, list[str]] = {"invalid": [], "nfd": []}
  for line_number, record in corpus.iter_jsonl(path):
    where = f"{path}:{line_number}"
    text = _question_text(record, "question", where)
    answers = json_field(record, "answer", list, where)
    if not answers:
      raise DataFormatError(f"{where}: field 'answer' is empty")
    for m, a in enumerate(answers):
      if not isinstance(a, str):
        raise DataFormatError(f"{where}: field 'answer'[{m}] must be str, got {type(a).__name__}")
      problem = _check_answer(a, answers_are_regex, where, f"'answer'[{m}]")
      if problem is not None:
        never[problem[0]].append(f"line {line_number}, field 'answer'[{m}] {a!r:.60}: "
                                 f"{problem[1]}")
    qid = json_field(record, "id", (str, int), where, required=False)
    qid = f"{fileio.basename(path)}:{line_number}" if qid is None else str(qid)
    if qid in seen:
      raise DataFormatError(f"{where}: field 'id': duplicate question id {qid!r} (first at line "
                            f"{seen[qid]})")
    seen[qid] = line_number
    questions.append(Question(qid, text, list(answers), answers_are_regex))
  for kind, what in (("invalid", "are not valid regular expressions and will never match"),
                     ("nfd", "do not compile once NFD-normalised, so has_answer never finds "
                      "them in a block (exact match, on the raw pattern, still uses them)")):
    if never[kind]:
      # DrQA keeps such questions and scores the pattern as never matching; so do we.
      _LOG.warning("%s: %d answer(s) %s: %s%s", path, len(never[kind]), what,
                   "; ".join(never[kind][:3]), " ..." if len(never[kind]) > 3 else "")
  return questions


def read_nq_open(path: str | os.PathLike) -> list[Question]:
  """Reads NaturalQuestions-Open JSON lines `{"question": str, "answer": [str, ...]}`.

  The files of google-research-datasets/natural-questions `nq_open/` already keep only short
  answers of at most 5 tokens (ORQA §6). `qid = "{file name}:{line}"` unless the line has an "id".

  Raises:
    FileNotFoundError: if `path` is missing.
    DataFormatError: naming the line and field (bad JSON, missing / empty / non-string answers,
      an answer without any token, a blank question, a repeated id).
  """
  return _read_question_answer_jsonl(path, answers_are_regex=False)


def read_drqa(path: str | os.PathLike, answers_are_regex: bool = False) -> list[Question]:
  """Reads DrQA-format question files: WebQuestions (strings) or CuratedTrec (regexes).

  Same JSON-lines layout as NQ-open. With `answers_are_regex`, answers are compiled with
  `re.IGNORECASE | re.UNICODE | re.MULTILINE`; those that do not compile are kept and counted in
  one warning per file (naming line and field): like DrQA's `regex_match_score`, evaluation scores
  them as never matching (the real CuratedTrec-train.txt has one such pattern, line 701, ending in
  a lone "\\"). A second warning counts the patterns that compile but not once NFD-normalised
  ("Sn\\ě\\žka"; CuratedTrec-test has 3, -train 3): `evaluation.has_answer`, which NFD-normalises
  pattern and text, never finds them in a block.

  Raises:
    FileNotFoundError: if `path` is missing.
    DataFormatError: naming the line and field (see the module docstring).
  """
  return _read_question_answer_jsonl(path, answers_are_regex=answers_are_regex)


def read_questions(path: str | os.PathLike | Sequence[str | os.PathLike],
                   format: str) -> list[Question]:  # pylint: disable=redefined-builtin
  """Reads question files in one of `QUESTION_FORMATS`.

  Args:
    path: a file, a glob pattern (`gs://bucket/nq/NQ-open.train-*.jsonl`, `data/*.txt`), or a
      sequence of them; local paths or URLs, `.gz` decompressed. Patterns are expanded with
      `fileio.expand_patterns` (matches sorted by name) and the files read in that order.
    format: "squad_open", "nq_open", "webquestions" or "curatedtrec" (regex answers).

  Returns:
    The questions of every file, in file order.

  Raises:
    ValueError: for an unknown format.
    FileNotFoundError: naming a missing file or a pattern that matches nothing.
    DataFormatError, KeyError: from the reader (naming file, line and field), or a question id
      that two files share.
  """
  readers = {"squad_open": read_squad_open, "nq_open": read_nq_open,
             "webquestions": lambda p: read_drqa(p, answers_are_regex=False),
             "curatedtrec": lambda p: read_drqa(p, answers_are_regex=True)}
  if format not in readers:
    raise ValueError(f"unknown question format {format!r}; expected one of {QUESTION_FORMATS}")
  questions: list[Question] = []
  first_file: dict[str, str] = {}
  for file in fileio.expand_patterns(path, what="question file"):
    for q in readers[format](file):
      if q.qid in first_file:  # within one file the reader has already named the line
        raise DataFormatError(f"{file}: field 'id': question id {q.qid!r} is also used in "
                              f"{first_file[q.qid]}; ids must be unique across the files read "
                              "together")
      first_file[q.qid] = str(file)
      questions.append(q)
  return questions
