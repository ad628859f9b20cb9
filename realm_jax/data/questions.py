"""Open-QA question sets: SQuAD-open, NQ-open, WebQuestions and CuratedTrec.

REALM (Guu et al., 2020, §4.1) fine-tunes and evaluates on NaturalQuestions-Open, WebQuestions and
CuratedTrec in the open-domain setting of ORQA (Lee et al., 2019, §6): only the question and its
answer strings are given, never a gold passage. CuratedTrec answers are regular expressions
(DrQA format, Chen et al., 2017). SQuAD-open (DrQA, ORQA §6) asks the SQuAD v1.1 questions against
the pool of all paragraphs; its gold paragraph id is kept only for retrieval diagnostics.

Every format error names the file, the line (or JSON path) and the field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Sequence

from realm_jax import fileio
from realm_jax.data import corpus
from realm_jax.data.corpus import DataFormatError
from realm_jax.data.corpus import json_field
from realm_jax.data.corpus import squad_doc_id

_LOG = logging.getLogger(__name__)

QUESTION_FORMATS = ("squad_open", "nq_open", "webquestions", "curatedtrec")


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
        text = json_field(qa, "question", str, where)
        answers: list[str] = []
        for m, answer in enumerate(json_field(qa, "answers", list, where)):
          a = json_field(answer, "text", str, f"{where}.answers[{m}]")
          if a not in answers:
            answers.append(a)
        if not answers:
          raise DataFormatError(f"{where}: field 'answers' is empty (question {qid!r})")
        if qid in seen:
          raise DataFormatError(f"{where}: duplicate question id {qid!r} (first at {seen[qid]})")
        seen[qid] = where
        questions.append(Question(qid, text, answers, False,
                                  (squad_doc_id(article["title"], j),)))
  return questions


def _read_question_answer_jsonl(path: str | os.PathLike, answers_are_regex: bool) -> list[Question]:
  """Reads `{"question": str, "answer": [str, ...], "id"?: str}` lines (NQ-open / DrQA format)."""
  path = fileio.as_path(path)
  questions = []
  for line_number, record in corpus.iter_jsonl(path):
    where = f"{path}:{line_number}"
    text = json_field(record, "question", str, where)
    answers = json_field(record, "answer", list, where)
    if not answers:
      raise DataFormatError(f"{where}: field 'answer' is empty")
    for m, a in enumerate(answers):
      if not isinstance(a, str):
        raise DataFormatError(f"{where}: field 'answer'[{m}] must be str, got {type(a).__name__}")
      if answers_are_regex:
        try:
          re.compile(a, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
        except re.error as e:
          # DrQA keeps such questions and scores the pattern as never matching; so do we.
          _LOG.warning("%s: field 'answer'[%d] is not a valid regular expression (%s); "
                          "it will never match: %r", where, m, e, a)
    qid = json_field(record, "id", (str, int), where, required=False)
    qid = f"{fileio.basename(path)}:{line_number}" if qid is None else str(qid)
    questions.append(Question(qid, text, list(answers), answers_are_regex))
  return questions


def read_nq_open(path: str | os.PathLike) -> list[Question]:
  """Reads NaturalQuestions-Open JSON lines `{"question": str, "answer": [str, ...]}`.

  The files of google-research-datasets/natural-questions `nq_open/` already keep only short
  answers of at most 5 tokens (ORQA §6). `qid = "{file name}:{line}"` unless the line has an "id".

  Raises:
    FileNotFoundError: if `path` is missing.
    DataFormatError: naming the line and field (bad JSON, missing / empty / non-string answers).
  """
  return _read_question_answer_jsonl(path, answers_are_regex=False)


def read_drqa(path: str | os.PathLike, answers_are_regex: bool = False) -> list[Question]:
  """Reads DrQA-format question files: WebQuestions (strings) or CuratedTrec (regexes).

  Same JSON-lines layout as NQ-open. With `answers_are_regex`, answers are compiled with
  `re.IGNORECASE | re.UNICODE | re.MULTILINE`; one that does not compile is logged as a warning
  (file, line, field) and kept: like DrQA's `regex_match_score`, evaluation scores it as never
  matching (the real CuratedTrec-train.txt has one such pattern, line 701, ending in a lone "\\").

  Raises:
    FileNotFoundError: if `path` is missing.
    DataFormatError: naming the line and field.
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
    DataFormatError, KeyError: from the reader (naming file, line and field).
  """
  readers = {"squad_open": read_squad_open, "nq_open": read_nq_open,
             "webquestions": lambda p: read_drqa(p, answers_are_regex=False),
             "curatedtrec": lambda p: read_drqa(p, answers_are_regex=True)}
  if format not in readers:
    raise ValueError(f"unknown question format {format!r}; expected one of {QUESTION_FORMATS}")
  questions: list[Question] = []
  for file in fileio.expand_patterns(path, what="question file"):
    questions.extend(readers[format](file))
  return questions
