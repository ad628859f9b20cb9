"""Tests for realm_jax.evaluation: the ORQA/SQuAD exact match, regex match, has_answer, recall@k."""

from __future__ import annotations

import json
import os
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from realm_jax import evaluation

# From CuratedTrec-test.txt (DrQA format), lines 1, 2 and 5.
MCKINLEY = ("20\\s?,?\\s?(32|40)0\\s?-?\\s?f(ee|oo)t|6,194-meter|20,?237\\s*f(oo|ee)?t|"
            "20,?073\\s*f(oo|ee)?t|6,?168\\s*m|6,118\\s*m|6\\,194 m|20\\,322 feet")
MILLER = "After the Fall|Finishing the Play"
JERUSALEM = "\\b2,?[4567][0-9][0-9]\\b"


@pytest.mark.parametrize("raw, normalized", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   Apple, a day ", "apple day"),
    ("Theatre of the absurd", "theatre of absurd"),  # "the" only as a whole word
    ("U.S.-based", "usbased"),
    ("$5 million", "5 million"),
    ("Denver Broncos", "denver broncos"),
    ("“Quoted”", "“quoted”"),  # only ASCII punctuation is removed, as in the official script
])
def test_normalize_answer(raw, normalized):
  assert evaluation.normalize_answer(raw) == normalized


def test_exact_match_strings():
  assert evaluation.exact_match("The Eiffel Tower!", ["eiffel tower"])
  assert evaluation.exact_match("Broncos", ["Denver Broncos", "the Broncos"])
  assert not evaluation.exact_match("Denver", ["Denver Broncos"])
  assert not evaluation.exact_match("anything", [])
  assert evaluation.exact_match("", ["a", "the"])  # both normalise to ""
  # NFD keeps combining accents, so an accent still matters (official behaviour).
  assert evaluation.exact_match("Beyonce\u0301", ["Beyoncé"])
  assert not evaluation.exact_match("Beyonce", ["Beyoncé"])


def test_exact_match_curatedtrec_regexes():
  assert evaluation.exact_match("20,320 feet", [MCKINLEY], answers_are_regex=True)
  assert evaluation.exact_match("20320 ft", [MCKINLEY], answers_are_regex=True) is False
  assert evaluation.exact_match("6,194-meter", [MCKINLEY], answers_are_regex=True)
  assert evaluation.exact_match("after the fall", [MILLER], answers_are_regex=True)  # IGNORECASE
  assert evaluation.exact_match("2,550", [JERUSALEM], answers_are_regex=True)
  assert not evaluation.exact_match("2,950", [JERUSALEM], answers_are_regex=True)
  # ORQA/DrQA use re.match: anchored at the start of the prediction, not at its end.
  assert not evaluation.exact_match("about 2,550 feet", [JERUSALEM], answers_are_regex=True)
  assert evaluation.exact_match("Sweden, Europe", ["Sweden"], answers_are_regex=True)
  # A pattern that does not compile never matches (CuratedTrec-train.txt line 701).
  assert not evaluation.exact_match("radiation", ["radiation|Sievert \\(Sv\\)\\"],
                                    answers_are_regex=True)


def test_simple_tokenize_like_drqa():
  assert evaluation.simple_tokenize("Denver Broncos' 24–10 win, U.S.!") == [
      "denver", "broncos", "'", "24", "–", "10", "win", ",", "u", ".", "s", ".", "!"]
  # Combining marks stay inside a word; astral-plane letters and emoji are handled too.
  assert evaluation.simple_tokenize("Beyonce\u0301 \U0001d518x 😀") == [
      "beyonce\u0301", "\U0001d518x", "😀"]
  assert evaluation.simple_tokenize(" \t\u200b ") == []


def test_has_answer():
  block = "The Denver Broncos defeated the Carolina Panthers 24–10 (Super Bowl 50)."
  assert evaluation.has_answer(block, ["denver broncos"])
  assert evaluation.has_answer(block, ["Panthers 24–10"])
  assert evaluation.has_answer(block, ["nothing", "Super Bowl 50"])
  assert not evaluation.has_answer(block, ["Bronco"])  # token boundaries
  assert not evaluation.has_answer(block, ["Broncos Carolina"])  # contiguous only
  assert not evaluation.has_answer(block, [""])
  assert evaluation.has_answer("Beyoncé sang.", ["beyoncé"])  # both sides NFD
  assert evaluation.has_answer("Mount McKinley is 20,320 feet tall.", [MCKINLEY],
                               answers_are_regex=True)  # regex: searched anywhere
  assert not evaluation.has_answer("It is tall.", [MCKINLEY], answers_are_regex=True)


def test_recall_at_k():
  hits = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=bool)
  assert evaluation.recall_at_k(hits, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}
  with pytest.raises(ValueError, match="recall@5 needs 5"):
    evaluation.recall_at_k(hits, ks=(5,))
  with pytest.raises(ValueError, match="num_questions"):
    evaluation.recall_at_k(np.zeros((0, 3), bool))


def test_write_predictions_jsonl_round_trip_and_atomicity(tmp_path):
  path = tmp_path / "preds" / "dev.jsonl"
  records = [{"qid": "q1", "prediction": "Denver Broncos", "correct": np.bool_(True),
              "score": np.float32(1.5), "top_block_ids": np.array([3, 1])},
             {"qid": "q2", "prediction": "Beyoncé", "correct": False, "score": 0.0,
              "top_block_ids": []}]
  assert evaluation.write_predictions_jsonl(path, records) == 2
  back = evaluation.read_predictions_jsonl(path)
  assert back == [{"qid": "q1", "prediction": "Denver Broncos", "correct": True, "score": 1.5,
                   "top_block_ids": [3, 1]},
                  {"qid": "q2", "prediction": "Beyoncé", "correct": False, "score": 0.0,
                   "top_block_ids": []}]
  before = path.read_bytes()
  with pytest.raises(TypeError, match="not JSON serialisable"):
    evaluation.write_predictions_jsonl(path, [{"qid": "q3"}, {"qid": object()}])
  assert path.read_bytes() == before  # the old file survives a failed write
  assert os.listdir(path.parent) == ["dev.jsonl"]  # no temporary file left behind
  path.write_text(json.dumps({"a": 1}) + "\n{broken\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"dev.jsonl:2: invalid JSON"):
    evaluation.read_predictions_jsonl(path)


def test_answer_token_spans_locate_has_answer():
  text = "The U.S. army and the US navy; Parisian Paris."
  assert evaluation.answer_token_spans(text, ["US"]) == {(22, 24)}
  assert evaluation.answer_token_spans(text, ["u.s.", "paris"]) == {(4, 8), (40, 45)}
  assert evaluation.answer_token_spans(text, ["the us NAVY"]) == {(18, 29)}
  assert evaluation.answer_token_spans(text, ["", "!!", "Pari"]) == set()
  # Offsets index the original text, even where NFD adds combining characters.
  text = "Café Beyoncé, cafe\u0301."
  assert evaluation.answer_token_spans(text, ["cafe\u0301"]) == {(0, 4), (14, 19)}
  assert evaluation.answer_token_spans(text, ["BEYONCÉ"]) == {(5, 12)}
  assert evaluation.answer_token_spans("x 😀 \U0001d518y", ["😀", "\U0001d518Y"]) == {
      (2, 3), (4, 6)}


def test_regex_fullmatch_for_span_labels():
  assert evaluation.regex_fullmatch("Paris", ["Paris"])
  assert not evaluation.regex_fullmatch("Paris, France is big.", ["Paris"])
  assert evaluation.regex_match("Paris, France is big.", "Paris")  # evaluation: official re.match
  assert evaluation.regex_fullmatch("20,320 feet", [MCKINLEY])
  assert not evaluation.regex_fullmatch("20,320 feet tall", [MCKINLEY])
  assert evaluation.regex_fullmatch("beyoncé", ["Beyonce\u0301"])  # NFD on both sides, I flag
  assert not evaluation.regex_fullmatch("radiation", ["radiation|Sievert \\(Sv\\)\\"])


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60), answer=st.text(max_size=8), cut=st.integers(0, 60),
       take=st.booleans())
def test_property_answer_token_spans_agree_with_has_answer(text, answer, cut, take):
  """Any unicode: `answer_token_spans` is non-empty exactly when `has_answer` holds, and each
  range tokenises back to the answer; its tokens equal `simple_tokenize(NFD(text))`."""
  if take:
    answer = text[cut % (len(text) + 1):][:len(answer) + 1]
  found = evaluation.answer_token_spans(text, [answer])
  assert bool(found) == evaluation.has_answer(text, [answer])
  needle = evaluation.simple_tokenize(unicodedata.normalize("NFD", answer))
  for start, end in found:
    assert evaluation.simple_tokenize(unicodedata.normalize("NFD", text[start:end])) == needle
  tokens, _, _ = evaluation._tokens_with_offsets(text)  # pylint: disable=protected-access
  assert tokens == evaluation.simple_tokenize(unicodedata.normalize("NFD", text))
