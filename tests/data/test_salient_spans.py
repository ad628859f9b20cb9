"""Tests for realm_jax.data.salient_spans: the date regex, span merging and the spaCy tagger."""

from __future__ import annotations

import importlib.util

import pytest

from realm_jax.data import salient_spans as ss
from realm_jax.data.salient_spans import Span

HAS_MODEL = any(importlib.util.find_spec(m) is not None for m in ss.DEFAULT_MODELS)
needs_model = pytest.mark.skipif(not HAS_MODEL, reason=f"no spaCy model: {ss.MODEL_INSTALL_HINT}")


def _dates(text: str) -> list[str]:
  return [text[s.start:s.end] for s in ss.find_dates(text)]


@pytest.mark.parametrize("text, expected", [
    ("He was born on 12 March 1998 in Paris.", ["12 March 1998"]),
    ("It opened on March 12, 1998, in Rome.", ["March 12, 1998"]),
    ("In March 1998 it rained.", ["March 1998"]),
    ("It was founded in 1998.", ["1998"]),
    ("Music of the 1990s and the early 1960s.", ["the 1990s", "the early 1960s"]),
    ("The 1990s were loud; 1980s too.", ["The 1990s", "1980s"]),
    ("Art of the 19th century and 19th-century styles.", ["the 19th century", "19th-century"]),
    ("Caesar died in 44 BC; Vesuvius erupted in AD 79.", ["44 BC", "AD 79"]),
    ("The war (1939–1945) and the war of 1914-18.", ["1939–1945", "1914-18"]),
    ("Signed on 4th July, 1776 and ratified on May 5.", ["4th July, 1776", "May 5"]),
    ("Released in Sept. 2002 and Jan 2003.", ["Sept. 2002", "Jan 2003"]),
    ("On 3 June he left.", ["3 June"]),
])
def test_find_dates_positive(text, expected):
  assert _dates(text) == expected
  assert all(s.label == ss.DATE_LABEL for s in ss.find_dates(text))


@pytest.mark.parametrize("text", [
    "About 1,500 people and 12345 sheep.",
    "Pi is 3.1415 and e is 2.71828.",
    "It cost $1999 and rose 1998% in value.",
    "The value 1998.5 is not a year, nor is 999 or 2150.",
    "They march 5 miles; you may 4 times.",
])
def test_find_dates_negative(text):
  assert _dates(text) == []


def test_merge_spans_longer_wins_sorted_disjoint():
  spans = [Span(20, 24, "DATE"), Span(10, 35, "EVENT"), Span(0, 5, "PERSON"), Span(3, 8, "ORG"),
           Span(40, 40, "ORG")]
  assert ss.merge_spans(spans) == [Span(0, 5, "PERSON"), Span(10, 35, "EVENT")]


@pytest.fixture(scope="module")
def tagger():
  if not HAS_MODEL:
    pytest.skip(f"no spaCy model: {ss.MODEL_INSTALL_HINT}")
  return ss.SalientSpanTagger()


TEXT = ("Barack Obama was born on 4 August 1961 in Honolulu, Hawaii. He served as the 44th "
        "president of the United States from 2009 to 2017.")


@needs_model
def test_tagger_entities_and_dates(tagger):
  found = {(TEXT[s.start:s.end], s.label) for s in tagger.find_salient_spans(TEXT)}
  assert {("Barack Obama", "PERSON"), ("4 August 1961", "DATE"), ("Honolulu", "GPE"),
          ("Hawaii", "GPE"), ("2009", "DATE"), ("2017", "DATE")} <= found
  # Numeric OntoNotes labels ("44th" is ORDINAL) are not salient spans.
  assert all(label in ss.SPAN_LABELS for _, label in found)
  assert "44th" not in {t for t, _ in found}


@needs_model
def test_tagger_spans_sorted_disjoint_and_stripped(tagger):
  spans = tagger.find_salient_spans(TEXT)
  for a, b in zip(spans, spans[1:]):
    assert a.end <= b.start
  for s in spans:
    assert TEXT[s.start:s.end] == TEXT[s.start:s.end].strip()


@needs_model
def test_sentences(tagger):
  text = "  The cat sat on the mat. Then it left for Paris in 1998!  \n"
  sents = tagger.sentences(text)
  assert [text[s:e] for s, e in sents] == ["The cat sat on the mat.",
                                           "Then it left for Paris in 1998!"]
  assert tagger.tag(text).sentences == sents
  assert tagger.split_sentences([text, TEXT], progress=False) == [sents, tagger.sentences(TEXT)]


@needs_model
def test_tag_documents_matches_single_calls(tagger):
  texts = [TEXT, "", "Angela Merkel met Emmanuel Macron in Berlin in May 2019."]
  batch = tagger.tag_documents(texts, batch_size=2, progress=False)
  assert batch == [tagger.tag(t) for t in texts]
  assert batch[1] == ss.TaggedText([], [])


@needs_model
def test_label_subset_and_fingerprint(tagger):
  people = ss.SalientSpanTagger(entity_labels=("PERSON",), find_dates=False)
  spans = people.find_salient_spans(TEXT)
  assert [TEXT[s.start:s.end] for s in spans] == ["Barack Obama"]
  assert people.fingerprint != tagger.fingerprint
  assert ss.SalientSpanTagger().fingerprint == tagger.fingerprint


def test_bad_label_raises():
  with pytest.raises(ValueError, match="CARDINAL"):
    ss.SalientSpanTagger(entity_labels=("PERSON", "CARDINAL"))


def test_missing_model_names_pip_line():
  if importlib.util.find_spec("spacy") is None:
    pytest.skip("spaCy not installed")
  with pytest.raises(ImportError, match="pip install"):
    ss.SalientSpanTagger(model="no_such_spacy_model_xyz")
