"""Tests for realm_jax.data.questions: SQuAD-open, NQ-open, WebQuestions, CuratedTrec readers."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest

from realm_jax import evaluation
from realm_jax import tokenization
from realm_jax.data import corpus
from realm_jax.data import questions

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "data"


def test_read_squad_open():
  qs = questions.read_squad_open(FIXTURES / "squad_dev_tiny.json")
  assert len(qs) == 9
  first = qs[0]
  assert first.qid == "56be4db0acb8001400a502ec"
  assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
  assert first.answers == ["Denver Broncos"]  # three identical references collapse to one
  assert first.gold_doc_ids == ("Super_Bowl_50#0",) and not first.answers_are_regex
  assert [q.gold_doc_ids[0] for q in qs] == ["Super_Bowl_50#0"] * 3 + ["Super_Bowl_50#1"] * 3 + [
      "Warsaw#0"] * 3
  # Distinct answers keep first-seen order.
  multi = [q for q in qs if len(q.answers) > 1]
  assert multi and all(len(set(q.answers)) == len(q.answers) for q in multi)
  # Gold doc ids name real documents of the corpus reader.
  doc_ids = {d.doc_id for d in corpus.read_squad_documents(FIXTURES / "squad_dev_tiny.json")}
  assert all(set(q.gold_doc_ids) <= doc_ids for q in qs)


def test_read_squad_open_article_filter():
  path = FIXTURES / "squad_dev_tiny.json"
  assert {q.gold_doc_ids[0].split("#")[0] for q in questions.read_squad_open(
      path, articles=slice(1, None))} == {"Warsaw"}
  assert len(questions.read_squad_open(path, articles=["Super Bowl 50"])) == 6
  with pytest.raises(KeyError, match="Atlantis"):
    questions.read_squad_open(path, articles=["Atlantis"])


def test_squad_open_errors(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"data": [{"title": "A", "paragraphs": [{"context": "c", "qas": [
      {"id": "q1", "question": "?", "answers": []}]}]}]}), encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=(
      r"bad.json: data\[0\].paragraphs\[0\].qas\[0\]: field 'answers' is empty")):
    questions.read_squad_open(bad)
  qa = {"id": "q1", "question": "?", "answers": [{"text": "c"}]}
  bad.write_text(json.dumps({"data": [{"title": "A", "paragraphs": [
      {"context": "c", "qas": [qa, qa]}]}]}), encoding="utf-8")
  with pytest.raises(corpus.DataFormatError,
                     match=r"qas\[1\]: field 'id': duplicate question id 'q1'"):
    questions.read_squad_open(bad)


def test_read_nq_open():
  qs = questions.read_questions(FIXTURES / "nq_open_dev_head5.jsonl", "nq_open")
  assert len(qs) == 5
  assert qs[0] == questions.Question(
      "nq_open_dev_head5.jsonl:1", "when was the last time anyone was on the moon",
      ["14 December 1972 UTC", "December 1972"])
  assert qs[2].answers == ["one", "one season"]


def test_read_webquestions_and_curatedtrec(caplog):
  wq = questions.read_questions(FIXTURES / "webquestions_test_head5.txt", "webquestions")
  assert wq[0].question == "what does jamaican people speak?"
  assert wq[0].answers == ["Jamaican Creole English Language", "Jamaican English"]
  assert not any(q.answers_are_regex for q in wq)
  with caplog.at_level(logging.WARNING):
    ct = questions.read_questions(FIXTURES / "curatedtrec_head5_plus_train701.txt", "curatedtrec")
  assert len(ct) == 6 and all(q.answers_are_regex for q in ct)
  assert ct[1].answers == ["After the Fall|Finishing the Play"]
  # The real train line 701 ends in a lone backslash: kept, and reported with file, line and field.
  assert ct[5].answers[0].endswith("\\(Sv\\)\\")
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings  # one warning per file, counting the patterns
  assert ("curatedtrec_head5_plus_train701.txt: 1 answer(s) are not valid regular expressions and "
          "will never match: line 6, field 'answer'[0] 'RAO|") in warnings[0]


def test_question_file_errors(tmp_path):
  path = tmp_path / "q.jsonl"
  path.write_text('{"question": "a?", "answer": ["x"]}\n{"question": "b?"}\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"q.jsonl:2: missing field 'answer'"):
    questions.read_nq_open(path)
  path.write_text('{"question": "a?", "answer": []}\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"q.jsonl:1: field 'answer' is empty"):
    questions.read_drqa(path)
  path.write_text('\n\n{"question": "a?", "answer": ["x", 3]}\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"q.jsonl:3: field 'answer'\[1\] must be str"):
    questions.read_drqa(path)
  path.write_text('{"question": 5, "answer": ["x"]}\n', encoding="utf-8")
  with pytest.raises(corpus.DataFormatError, match=r"q.jsonl:1: field 'question' must be str"):
    questions.read_nq_open(path)
  with pytest.raises(ValueError, match="unknown question format 'trivia'"):
    questions.read_questions(path, "trivia")
  with pytest.raises(FileNotFoundError):
    questions.read_nq_open(tmp_path / "missing.jsonl")


def test_squad_open_answers_occur_in_their_gold_blocks():
  """Every SQuAD answer is a span of its paragraph, so a block of the gold doc must contain it."""
  path = FIXTURES / "squad_dev_tiny.json"
  tok = tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")
  blocks = corpus.split_into_blocks(corpus.read_squad_documents(path), tok, 64,
                                    show_progress=False)
  for q in questions.read_squad_open(path):
    gold = [b.text for b in blocks if b.doc_id in q.gold_doc_ids]
    assert gold and any(evaluation.has_answer(text, q.answers) for text in gold), q
