"""Fuzzing the corpus and question loaders with hypothesis (issue #14 §3).

Every generated file must either load into exactly the documents / questions an independent oracle
expects, or raise one `DataFormatError` whose single-line message names the file, the line (or JSON
path) and the field. Any other exception (a traceback from inside `json`, the tokenizer or numpy)
fails the test. Inputs: malformed JSON lines, missing and mistyped fields, non-object lines, JSON
nested too deeply, lone-surrogate escapes, invalid UTF-8 and broken `.gz` streams, empty and huge
documents, unusual Unicode (combining marks, right-to-left text, zero-width and format characters,
emoji, a byte-order mark), repeated ids, blank questions, answers that no block could contain,
questions longer than the query length and invalid or empty-matching CuratedTrec regexes.

The number of inputs tried per loader is counted in `TRIED` and reported by the last test (run
with `-s` to see it; `REALM_FUZZ_REPORT=path` also writes it as JSON). `REALM_FUZZ_EXAMPLES` sets
the number of examples per test (150 by default).
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import os
import re
import unicodedata
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from realm_jax import evaluation
from realm_jax import tokenization
from realm_jax.data import corpus
from realm_jax.data import featurize
from realm_jax.data import questions

TRIED: collections.Counter[str] = collections.Counter()
# 150 examples per test keep the file well under a minute on a 2-core CI machine; set
# REALM_FUZZ_EXAMPLES for a longer campaign.
FUZZ = settings(max_examples=int(os.environ.get("REALM_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

# Unusual Unicode: combining marks, RTL (Hebrew, Arabic, overrides), zero-width and format
# characters, emoji with modifiers and joiners, astral letters, ligatures, a BOM, controls.
SPECIAL = ["e\u0301\u0302", "\u05e9\u05dc\u05d5\u05dd",
           "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
           "\u202eevil\u202c", "a\u200bb\u200c\u200dc", "\U0001f600\U0001f44d\U0001f3fd",
           "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\ufeff", "", " ", "\t", "\x00",
           "\ufb01ne", "\u0130stanbul", "\U0001d518x", "\u2028", "\x85", "Caf\u00e9", "\u00a0"]
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL),
                 st.lists(st.sampled_from(SPECIAL + ["Paris", "is", "big."]), max_size=8).map(
                     " ".join))
ANY_JSON = st.one_of(TEXT, st.integers(-3, 10 ** 20), st.none(), st.booleans(),
                     st.floats(allow_nan=True), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# Raw lines that are never valid JSON-lines records (the oracle knows which error each gives).
BAD_UTF8 = [b"\xff\xfe", b"\xc3(", b"\xed\xa0\x80", b"\xe2\x82", b"\x80abc"]
_SURROGATE_LINE = b'{"title": "x\\ud800", "text": "y", "question": "q\\udfff", "answer": ["a"]}'


@pytest.fixture(scope="module")
def tok() -> tokenization.WordPieceTokenizer:
  return tokenization.WordPieceTokenizer.from_vocab_file(
      tokenization.minilm_model_dir() / "vocab.txt")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("fuzz")


def _write(directory, name: str, data: bytes, compress: bool = False):
  """Writes one input file (optionally gzipped); the name counts the inputs so each is fresh."""
  TRIED["files"] += 1
  path = directory / f"{TRIED['files']}-{name}{'.gz' if compress else ''}"
  path.write_bytes(gzip.compress(data) if compress else data)
  return path


def _load(fn, path):
  """`(result, None)` or `(None, message)` for a DataFormatError that names `path`, on one line."""
  try:
    return fn(path), None
  except corpus.DataFormatError as e:
    message = str(e)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert message.count(str(path)) == 1, message  # named once, not wrapped twice
    return None, message


def _valid_text(s: str) -> bool:
  return not re.search("[\ud800-\udfff]", s)


# --------------------------------------------------------------------------------- JSON lines


def _record_line(draw) -> tuple[bytes, object]:
  """One line of a JSON-lines file and what it is (`("ok", record)`, `("bad", field)`)."""
  kind = draw(st.sampled_from(["ok", "ok", "ok", "fields", "malformed", "non_object", "blank",
                               "utf8", "surrogate", "deep", "bom"]))
  if kind in ("ok", "bom"):
    record = {"title": draw(TEXT), "text": draw(TEXT)}
    if draw(st.booleans()):
      record["id"] = draw(st.one_of(st.text(max_size=3), st.integers(0, 5)))
    line = json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8")
    return line, ("ok", record)
  if kind == "fields":
    record = draw(st.dictionaries(st.sampled_from(["title", "text", "id", "x"]), ANY_JSON,
                                  max_size=4))
    return json.dumps(record).encode("utf-8"), ("record", record)
  if kind == "malformed":
    good = json.dumps({"title": draw(TEXT), "text": draw(TEXT)})
    cut = draw(st.integers(1, len(good) - 1))
    return good[:cut].encode("utf-8"), ("bad", "invalid JSON")
  if kind == "non_object":
    value = draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=4),
                           st.none()))
    return json.dumps(value).encode("utf-8"), ("bad", "expected a JSON object")
  if kind == "blank":
    return draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])), ("blank", None)
  if kind == "utf8":
    good = json.dumps({"title": "t", "text": "x"}).encode()
    at = draw(st.integers(0, len(good)))
    return good[:at] + draw(st.sampled_from(BAD_UTF8)) + good[at:], ("bad", "not UTF-8 text")
  if kind == "surrogate":
    return _SURROGATE_LINE, ("bad", "lone surrogate")
  return b"[" * 100_000 + b"]" * 100_000, ("bad", "nested too deeply")


@st.composite
def jsonl_corpus(draw):
  lines = [_record_line(draw) for _ in range(draw(st.integers(0, 8)))]
  bom = draw(st.booleans())
  return lines, bom


def _expected_jsonl_documents(path, lines, drop_excluded=True):
  """Oracle: the documents, or `(line, words that the error must contain)`."""
  docs, seen_titles, ids = [], {}, {}
  for n, (raw, (kind, value)) in enumerate(lines, start=1):
    if kind == "blank":
      continue
    if kind == "bad":
      return n, [value]
    record = value
    if not isinstance(record, dict):
      return n, ["expected a JSON object"]
    for field, kinds in (("title", (str,)), ("text", (str,)), ("id", (str, int))):
      if field not in record:
        if field == "id":
          continue
        return n, [f"missing field '{field}'"]
      v = record[field]
      if not isinstance(v, kinds) or isinstance(v, bool):
        return n, [f"field '{field}' must be"]
      if isinstance(v, str) and not _valid_text(v):
        return n, [f"field '{field}' holds a lone surrogate"]
    if drop_excluded and corpus.is_excluded_title(record["title"]):
      continue
    if "id" in record:
      doc_id, field = str(record["id"]), "id"
    else:
      k = seen_titles.get(record["title"], 0)
      seen_titles[record["title"]] = k + 1
      doc_id, field = f"{record['title']}#{k}", "title"
    if doc_id in ids:
      return n, [f"field '{field}' gives doc id", f"already used at line {ids[doc_id]}"]
    ids[doc_id] = n
    docs.append(corpus.Document(doc_id, record["title"], record["text"]))
  return docs


@FUZZ
@given(data=jsonl_corpus(), compress=st.booleans())
def test_fuzz_jsonl_corpus(fuzz_dir, data, compress):
  lines, bom = data
  content = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(raw for raw, _ in lines)
  path = _write(fuzz_dir, "corpus.jsonl", content, compress)
  TRIED["jsonl corpus"] += 1
  expected = _expected_jsonl_documents(path, lines)
  docs, error = _load(corpus.read_documents, path)
  if isinstance(expected, list):
    assert error is None and docs == expected
  else:
    line, words = expected
    assert error is not None, (lines, docs)
    assert f"{path}:{line}:" in error, (error, line)
    assert all(w in error for w in words), (error, words)


# --------------------------------------------------------------------------------- SQuAD JSON


@st.composite
def squad_file(draw):
  """A SQuAD-like tree with random defects; the oracle is the validity of each field."""
  def maybe_break(value, kinds):
    choice = draw(st.integers(0, 12))
    if choice == 0:
      return "__missing__"
    if choice == 1:
      return draw(ANY_JSON.filter(lambda v: not isinstance(v, kinds) or isinstance(v, bool)))
    return value

  articles = []
  titles = draw(st.lists(st.sampled_from(["A", "B", "C", "List of x", "\u05e9", "e\u0301"]),
                         max_size=3))
  for title in titles:
    paragraphs = []
    for _ in range(draw(st.integers(0, 2))):
      qas = []
      for _ in range(draw(st.integers(0, 2))):
        answers = [{"text": maybe_break(draw(TEXT), (str,)), "answer_start": 0}
                   for _ in range(draw(st.integers(0, 2)))]
        qas.append({"id": maybe_break(draw(st.sampled_from(["q1", "q2", "q3", "q4"])), (str,)),
                    "question": maybe_break(draw(TEXT), (str,)),
                    "answers": maybe_break(answers, (list,))})
      paragraphs.append({"context": maybe_break(draw(TEXT), (str,)),
                         "qas": maybe_break(qas, (list,))})
    articles.append({"title": maybe_break(title, (str,)),
                     "paragraphs": maybe_break(paragraphs, (list,))})
  root = {"data": maybe_break(articles, (list,)), "version": "1.1"}

  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if not (isinstance(v, str)
                                                           and v == "__missing__")}
    if isinstance(tree, list):
      return [strip(v) for v in tree]
    return tree

  return strip(root)


def _squad_documents_oracle(root):
  """The documents of a SQuAD tree, or the JSON path and field the error must name."""
  if not isinstance(root.get("data"), list):
    return "top level", "'data'"
  docs, titles = [], set()
  for i, article in enumerate(root["data"]):
    if not isinstance(article, dict):
      return f"data[{i}]", "JSON object"
    title = article.get("title")
    if not isinstance(title, str):
      return f"data[{i}]", "'title'"
    if title in titles:
      return f"data[{i}]", "field 'title' repeats"
    titles.add(title)
    if not isinstance(article.get("paragraphs"), list):
      return f"data[{i}]", "'paragraphs'"
    for j, p in enumerate(article["paragraphs"]):
      if not isinstance(p, dict):
        return f"data[{i}].paragraphs[{j}]", "JSON object"
      if not isinstance(p.get("context"), str):
        return f"data[{i}].paragraphs[{j}]", "'context'"
      if not _valid_text(p["context"]):
        return f"data[{i}].paragraphs[{j}]", "lone surrogate"
      if not corpus.is_excluded_title(title):
        docs.append(corpus.Document(f"{title}#{j}", title.replace("_", " "), p["context"]))
  return docs


def _squad_questions_oracle(root):
  docs = _squad_documents_oracle(root)
  if not isinstance(docs, list):
    return docs
  out, seen = [], set()
  for i, article in enumerate(root["data"]):
    for j, p in enumerate(article["paragraphs"]):
      where = f"data[{i}].paragraphs[{j}]"
      if not isinstance(p.get("qas"), list):
        return where, "'qas'"
      for k, qa in enumerate(p["qas"]):
        w = f"{where}.qas[{k}]"
        if not isinstance(qa, dict):
          return w, "JSON object"
        if not isinstance(qa.get("id"), str):
          return w, "'id'"
        if not isinstance(qa.get("question"), str):
          return w, "'question'"
        if not _valid_text(qa["question"]):
          return w, "lone surrogate"
        if not qa["question"].strip():
          return w, "'question' is blank"
        if not isinstance(qa.get("answers"), list):
          return w, "'answers'"
        answers = []
        for m, a in enumerate(qa["answers"]):
          if not isinstance(a, dict):
            return f"{w}.answers[{m}]", "JSON object"
          if not isinstance(a.get("text"), str):
            return f"{w}.answers[{m}]", "'text'"
          if not _valid_text(a["text"]):
            return f"{w}.answers[{m}]", "lone surrogate"
          if not evaluation.simple_tokenize(unicodedata.normalize("NFD", a["text"])):
            return f"{w}.answers[{m}]", "has no token"
          if a["text"] not in answers:
            answers.append(a["text"])
        if not answers:
          return w, "'answers' is empty"
        if qa["id"] in seen:
          return w, "duplicate question id"
        seen.add(qa["id"])
        out.append(questions.Question(qa["id"], qa["question"], answers, False,
                                      (f"{article['title']}#{j}",)))
  return out


@FUZZ
@given(root=squad_file(), compress=st.booleans())
def test_fuzz_squad_json_corpus_and_questions(fuzz_dir, root, compress):
  path = _write(fuzz_dir, "squad.json", json.dumps(root).encode(), compress)
  for name, reader, oracle in (
      ("squad corpus", corpus.read_documents, _squad_documents_oracle),
      ("squad_open questions", lambda p: questions.read_questions(p, "squad_open"),
       _squad_questions_oracle)):
    TRIED[name] += 1
    expected = oracle(root)
    result, error = _load(reader, path)
    if isinstance(expected, list):
      assert error is None and result == expected, error
    else:
      where, words = expected
      assert error is not None, result
      assert f"{path}: {where}" in error and words in error, (error, expected)


def test_squad_json_broken_bytes(fuzz_dir):
  """Invalid UTF-8, a truncated and a corrupt .gz stream, deep nesting: one clear error each."""
  good = json.dumps({"data": [{"title": "A", "paragraphs": [{"context": "c", "qas": []}]}]})
  text = good.replace('"c"', '"c"\n').encode()
  cases = [
      (_write(fuzz_dir, "bad-utf8.json", text.replace(b'"c"', b'"\xc3("')), ":1: not UTF-8 text"),
      (_write(fuzz_dir, "later-line.json", text + b"\n\xff"), ":3: not UTF-8 text"),
      (_write(fuzz_dir, "deep.json", b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
  ]
  truncated = _write(fuzz_dir, "cut.json.gz", gzip.compress(text * 50)[:-30])
  corrupt_bytes = bytearray(gzip.compress(text * 50))
  corrupt_bytes[40:60] = b"\x00" * 20
  corrupt = _write(fuzz_dir, "corrupt.json.gz", bytes(corrupt_bytes))
  cases += [(truncated, "broken .gz file"), (corrupt, "broken .gz file")]
  for path, words in cases:
    TRIED["squad corpus"] += 1
    _, error = _load(corpus.read_documents, path)
    assert error is not None and words in error, (path, error)
  # A byte-order mark is not an error.
  bom = _write(fuzz_dir, "bom.json", b"\xef\xbb\xbf" + text)
  assert [d.doc_id for d in corpus.read_documents(bom)] == ["A#0"]


# -------------------------------------------------------------------------------- plain text


@FUZZ
@given(lines=st.lists(st.one_of(TEXT, st.sampled_from(["", "", "= Heading =", "= = Sub = =",
                                                        "a @-@ b"])), max_size=12),
       bad_line=st.one_of(st.none(), st.integers(0, 11)), compress=st.booleans())
def test_fuzz_text_corpus(fuzz_dir, lines, bad_line, compress):
  lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
  encoded = [line.encode("utf-8", "surrogatepass") for line in lines]
  if bad_line is not None and bad_line < len(encoded):
    encoded[bad_line] += b"\xff"
  path = _write(fuzz_dir, "corpus.txt", b"\n".join(encoded), compress)
  TRIED["text corpus"] += 1
  first_bad = next((n for n, raw in enumerate(encoded, start=1) if not _decodes(raw)), None)
  docs, error = _load(corpus.read_documents, path)
  if first_bad is not None:
    assert error is not None and f"{path}:{first_bad}: not UTF-8 text" in error, error
    return
  assert error is None
  assert len({d.doc_id for d in docs}) == len(docs)  # ids are unique
  content = set(path_lines(lines))
  for d in docs:
    assert d.title and path_lines([d.title]) == [d.title]
    assert not corpus.is_excluded_title(d.title)
  if not docs or _first_is_heading(path_lines(lines)):
    return
  # Plain text: every page is a title line and body lines of the file; writing the pages back
  # and reading them again gives the same documents (round trip).
  for d in docs:
    assert d.title in content and all(b in content for b in d.text.split("\n") if b)
  again = _write(fuzz_dir, "again.txt", "\n\n".join(
      f"{d.title}\n{d.text}" for d in docs).encode("utf-8"))
  assert corpus.read_documents(again) == docs


def _decodes(raw: bytes) -> bool:
  try:
    raw.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


def path_lines(lines):
  """The lines as the reader sees them: without whitespace or format characters at the ends."""
  out = []
  for line in lines:
    chars = list(line)
    while chars and (chars[0].isspace() or unicodedata.category(chars[0]) == "Cf"):
      chars.pop(0)
    while chars and (chars[-1].isspace() or unicodedata.category(chars[-1]) == "Cf"):
      chars.pop()
    out.append("".join(chars))
  return out


def _is_wikitext(line: str) -> bool:
  return bool(re.match(r"^\s*=\s(?!=)(.*?)\s=\s*$", line))


def _first_is_heading(lines) -> bool:
  first = next((line for line in lines if line.strip()), "")
  return _is_wikitext(first)


@FUZZ
@given(data=jsonl_corpus())
def test_fuzz_jsonl_corpus_through_the_store(fuzz_dir, tok, data):
  """`corpus_store.build_corpus` streams the same reader: the same documents, or an error."""
  from realm_jax.data import corpus_store  # pylint: disable=g-import-not-at-top
  lines, _ = data
  path = _write(fuzz_dir, "store.jsonl", b"\n".join(raw for raw, _ in lines))
  TRIED["jsonl corpus (store)"] += 1
  expected = _expected_jsonl_documents(path, lines)
  try:
    store = corpus_store.build_corpus([str(path)], tok, fuzz_dir / f"data-{TRIED['files']}", 64,
                                      show_progress=False)
  except corpus.DataFormatError as e:
    assert not isinstance(expected, list), e
    line, words = expected
    assert "\n" not in str(e) and f"{path}:{line}:" in str(e), (str(e), line)
    assert all(w in str(e) for w in words), (str(e), words)
    return
  assert isinstance(expected, list), expected
  blocked = [d for d in expected if tok.encode(d.text)]
  assert list(dict.fromkeys(store.doc_ids)) == [d.doc_id for d in blocked]


def test_store_names_the_file_once(fuzz_dir, tok):
  from realm_jax.data import corpus_store  # pylint: disable=g-import-not-at-top
  path = _write(fuzz_dir, "twice.jsonl", b'{"title": "A", "text": "x"}\n{"title": 3, "text": "y"}')
  with pytest.raises(corpus.DataFormatError) as e:
    corpus_store.build_corpus([str(path)], tok, fuzz_dir / "twice-data", 64, show_progress=False)
  assert str(e.value) == f"{path}:2: field 'title' must be str, got int 3"


# ------------------------------------------------------------------ empty and huge documents


def test_empty_and_huge_documents_block_with_a_counted_warning(fuzz_dir, tok, caplog):
  """Blank documents give no block (one warning counts them); a 300,000-character document
  gives blocks that cover all of its text, each within the length limit."""
  huge = " ".join(f"Sentence {i} is about Caf\u00e9 \u05e9\u05dc\u05d5\u05dd \U0001f600."
                  for i in range(12_000))
  records = [{"title": "Empty", "text": ""}, {"title": "Blank", "text": " \t\u200b\u200d "},
             {"title": "Huge", "text": huge}, {"title": "Small", "text": "Paris is big."}]
  path = _write(fuzz_dir, "sizes.jsonl", "\n".join(json.dumps(r) for r in records).encode())
  TRIED["jsonl corpus"] += 1
  docs = corpus.read_documents(path)
  assert len(huge) > 300_000 and [d.doc_id for d in docs] == [
      "Empty#0", "Blank#0", "Huge#0", "Small#0"]
  with caplog.at_level(logging.WARNING, logger="realm_jax.data.corpus"):
    blocks = corpus.split_into_blocks(docs, tok, 128, show_progress=False)
  warnings = [r.getMessage() for r in caplog.records if "without any token" in r.getMessage()]
  assert warnings == ["skipped 2 document(s) without any token in the body (empty, blank or only "
                      "characters the tokenizer drops): 'Empty#0', 'Blank#0'"]
  huge_blocks = [b for b in blocks if b.doc_id == "Huge#0"]
  assert all(b.num_tokens <= 128 for b in blocks)
  assert sum(len(b.body_ids) for b in huge_blocks) == len(tok.encode(huge))
  # Consecutive blocks tile the document: their texts, rejoined, give it back.
  assert re.sub(r"\s+", " ", " ".join(b.text for b in huge_blocks)) == huge
  assert [b.doc_id for b in blocks][-1] == "Small#0"


# ----------------------------------------------------------------------- JSON-lines questions


def _question_line(draw, regex: bool) -> tuple[bytes, object]:
  kind = draw(st.sampled_from(["ok", "ok", "ok", "fields", "malformed", "utf8", "surrogate",
                               "blank"]))
  if kind == "ok":
    answers = draw(st.lists(st.one_of(TEXT, st.sampled_from(
        ["Paris", "(unclosed", "a*", "x|", "\\", "[a-z]+", "U.S.", "\u200b", "Sn\\\u011bka"])),
        min_size=1,
        max_size=3))
    record = {"question": draw(TEXT), "answer": answers}
    if draw(st.booleans()):
      record["id"] = draw(st.one_of(st.sampled_from(["q1", "q2"]), st.integers(0, 2)))
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode(), ("record", record)
  if kind == "fields":
    record = draw(st.dictionaries(st.sampled_from(["question", "answer", "id"]), st.one_of(
        ANY_JSON, st.lists(ANY_JSON, max_size=2)), max_size=3))
    return json.dumps(record).encode(), ("record", record)
  if kind == "malformed":
    good = json.dumps({"question": "q", "answer": ["a"]})
    return good[:draw(st.integers(1, len(good) - 1))].encode(), ("bad", "invalid JSON")
  if kind == "utf8":
    return b'{"question": "q\xff", "answer": ["a"]}', ("bad", "not UTF-8 text")
  if kind == "surrogate":
    return _SURROGATE_LINE, ("bad", "lone surrogate")
  return b"   ", ("blank", None)


def _expected_questions(path, lines, regex: bool):
  """Oracle: the questions and the numbers of patterns that never match (invalid; invalid once
  NFD-normalised), or `(line, error words)`."""
  out, seen, invalid, nfd_invalid = [], {}, 0, 0
  for n, (_, (kind, value)) in enumerate(lines, start=1):
    if kind == "blank":
      continue
    if kind == "bad":
      return n, value
    r = value
    if not isinstance(r, dict):
      return n, "expected a JSON object"
    if not isinstance(r.get("question"), str) or isinstance(r.get("question"), bool):
      return n, "'question'"
    if not _valid_text(r["question"]):
      return n, "lone surrogate"
    if not r["question"].strip():
      return n, "'question' is blank"
    if not isinstance(r.get("answer"), list):
      return n, "'answer'"
    if not r["answer"]:
      return n, "'answer' is empty"
    for m, a in enumerate(r["answer"]):
      if not isinstance(a, str):
        return n, f"'answer'[{m}] must be str"
      if not _valid_text(a):
        return n, "lone surrogate"
      if regex:
        try:
          compiled = re.compile(a, re.I | re.U | re.M)
        except re.error:
          invalid += 1
          continue
        if compiled.fullmatch(""):
          return n, "matches the empty string"
        try:
          re.compile(unicodedata.normalize("NFD", a), re.I | re.U | re.M)
        except re.error:
          nfd_invalid += 1
      elif not evaluation.simple_tokenize(unicodedata.normalize("NFD", a)):
        return n, "has no token"
    if "id" in r and (not isinstance(r["id"], (str, int)) or isinstance(r["id"], bool)):
      return n, "'id' must be"
    qid = str(r["id"]) if "id" in r else f"{path.name}:{n}"
    if qid in seen:
      return n, "duplicate question id"
    seen[qid] = n
    out.append(questions.Question(qid, r["question"], list(r["answer"]), regex))
  return out, (invalid, nfd_invalid)


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["nq_open", "webquestions", "curatedtrec"]))
def test_fuzz_question_jsonl(fuzz_dir, caplog, data, fmt):
  regex = fmt == "curatedtrec"
  lines = [_question_line(data.draw, regex) for _ in range(data.draw(st.integers(0, 6)))]
  path = _write(fuzz_dir, f"{fmt}.jsonl", b"\n".join(raw for raw, _ in lines))
  TRIED[f"{fmt} questions"] += 1
  expected = _expected_questions(path, lines, regex)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="realm_jax.data.questions"):
    result, error = _load(lambda p: questions.read_questions(p, fmt), path)
  if isinstance(expected[0], list):
    assert error is None and result == expected[0], error
    warnings = [r.getMessage() for r in caplog.records]
    # Patterns that never match are kept and counted: one warning per kind.
    expected_warnings = [f"{path}: {count} answer(s) {what}" for count, what in zip(
        expected[1], ("are not valid regular expressions", "do not compile once NFD-normalised"))
                         if count]
    assert len(warnings) == len(expected_warnings), warnings
    assert all(w.startswith(e) for w, e in zip(warnings, expected_warnings)), warnings
  else:
    line, words = expected
    assert error is not None and f"{path}:{line}:" in error and words in error, (error, expected)


def test_question_ids_repeated_across_files(fuzz_dir):
  a = _write(fuzz_dir, "a.jsonl", b'{"question": "q?", "answer": ["x"], "id": "7"}')
  b = _write(fuzz_dir, "b.jsonl", b'{"question": "r?", "answer": ["y"], "id": 7}')
  TRIED["nq_open questions"] += 2
  with pytest.raises(corpus.DataFormatError, match=(
      rf"{re.escape(str(b))}: field 'id': question id '7' is also used in {re.escape(str(a))}")):
    questions.read_questions([a, b], "nq_open")


# ------------------------------------------------------------- questions meeting the model


@FUZZ
@given(question=TEXT, words=st.integers(0, 200), query_length=st.integers(3, 40))
def test_fuzz_long_questions_are_truncated_and_counted(tok, question, words, query_length):
  """A question longer than the query length keeps its first wordpieces; the cut is counted."""
  TRIED["long questions"] += 1
  text = (question + " ") * words if words else question
  ids = tok.encode(text)
  before = featurize.TRUNCATED_QUERIES["query"]
  out = featurize.query_inputs([ids], query_length, tok.cls_id, tok.sep_id, tok.pad_id)
  kept = min(len(ids), query_length - 2)
  assert out["input_ids"].shape == (1, query_length)
  assert out["input_ids"][0, :kept + 2].tolist() == [tok.cls_id] + ids[:kept] + [tok.sep_id]
  assert out["input_mask"][0].sum() == kept + 2 and not out["input_ids"][0, kept + 2:].any()
  assert featurize.TRUNCATED_QUERIES["query"] - before == int(len(ids) > query_length - 2)


@FUZZ
@given(block=st.lists(st.one_of(TEXT, st.sampled_from(["Paris", "France", "U.S.", "big"])),
                      min_size=1, max_size=10).map(" ".join),
       answers=st.lists(st.one_of(TEXT, st.sampled_from(["Lyon", "Rome", "Paris"])), min_size=1,
                        max_size=3),
       regex=st.booleans())
def test_fuzz_answers_found_in_no_block_label_nothing(tok, block, answers, regex):
  """An answer the block does not contain gives no positive span; one it contains is found."""
  TRIED["answers vs blocks"] += 1
  ids, offsets = tok.encode_with_offsets(block)
  offsets = np.asarray(offsets, np.int32).reshape(-1, 2)
  joined = featurize.join_inputs(tok.encode("q"), ids, 160, tok.cls_id, tok.sep_id, tok.pad_id)
  starts, ends = np.arange(160, dtype=np.int32), np.arange(160, dtype=np.int32)
  labels = featurize.span_answer_labels(block, offsets, joined["body_start"], joined["body_len"],
                                        answers, starts, ends, answers_are_regex=regex)
  has = evaluation.has_answer(block, answers, answers_are_regex=regex)
  assert has or not labels.any()
  needles = [_accentless_tokens(a) for a in answers]
  for i in np.nonzero(labels)[0]:
    span = featurize.span_text(block, offsets, joined["body_start"], starts[i], ends[i])
    if regex:
      assert evaluation.regex_fullmatch(span, answers)
    else:  # the span is an answer, up to the accents WordPiece offsets leave out
      assert _accentless_tokens(span) in needles, (span, answers)


def _accentless_tokens(text: str) -> list[str]:
  tokens = evaluation.simple_tokenize(unicodedata.normalize("NFD", text))
  stripped = ["".join(c for c in t if unicodedata.category(c) != "Mn") for t in tokens]
  return [t for t in stripped if t]


# ------------------------------------------------- the defects the fuzzing found, one by one


@pytest.mark.parametrize("name, content, message", [
    # RecursionError from inside json.
    ("deep.jsonl", b'{"title": "A", "text": "x"}\n' + b"[" * 50_000 + b"]" * 50_000,
     ":2: invalid JSON (nested too deeply)"),
    # A "\\ud800" escape: accepted, then the tokenizer failed ("TextInputSequence must be str").
    ("surrogate.jsonl", b'{"title": "A", "text": "x\\ud800y"}',
     ":1: field 'text' holds a lone surrogate \\ud800 at character 1 (not Unicode text)"),
    # A boolean id was taken for an int (doc id "True").
    ("bool.jsonl", b'{"title": "A", "text": "x", "id": true}',
     ":1: field 'id' must be str/int, got bool True"),
    # A repeated id: no line (split_into_blocks: no file either).
    ("dup.jsonl", b'{"title": "A", "text": "x", "id": 7}\n\n{"title": "B", "text": "y", "id": "7"}',
     ":3: field 'id' gives doc id '7', already used at line 1"),
    ("dup-title.jsonl", b'{"title": "A", "text": "x", "id": "A#0"}\n{"title": "A", "text": "y"}',
     ":2: field 'title' gives doc id 'A#0', already used at line 1"),
    # Invalid UTF-8 was reported at the line after the last one parsed, not at its own line.
    ("utf8.jsonl", b'{"title": "A", "text": "x"}\n[]\n{"title": "\xff"}',
     ":2: expected a JSON object, got list"),
    ("utf8-later.jsonl", b'{"title": "A", "text": "x"}\n' * 500 + b'{"title": "\xc3("}',
     ":501: not UTF-8 text (byte 12 of the line: invalid continuation byte)"),
    # Two SQuAD articles with one title: repeated doc ids, named by neither file nor field.
    ("dup.json", json.dumps({"data": [{"title": "T", "paragraphs": []},
                                      {"title": "T", "paragraphs": []}]}).encode(),
     ": data[1]: field 'title' repeats data[0]'s title 'T'"),
    ("text.txt", b"Title\nbody\n\n\xe2\x82\nmore", ":4: not UTF-8 text"),
])
def test_loader_defects_found_by_fuzzing(fuzz_dir, name, content, message):
  path = _write(fuzz_dir, name, content)
  TRIED["known defects"] += 1
  with pytest.raises(corpus.DataFormatError) as e:
    corpus.read_documents(path)
  assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_corrupt_gz_is_a_format_error_not_a_zlib_traceback(fuzz_dir):
  data = bytearray(gzip.compress(b'{"title": "A", "text": "x"}\n' * 200))
  data[30:50] = bytes(20)
  path = _write(fuzz_dir, "corrupt.jsonl", bytes(data), compress=False)
  path = path.rename(path.with_suffix(".jsonl.gz"))
  TRIED["known defects"] += 1
  with pytest.raises(zlib.error):
    gzip.decompress(bytes(data))
  with pytest.raises(corpus.DataFormatError, match=rf"{re.escape(str(path))}:1: broken \.gz file"):
    corpus.read_documents(path)


def test_invisible_lines_are_blank_and_a_bom_is_not_text(fuzz_dir):
  path = _write(fuzz_dir, "bom.txt",
                "\ufeffTitle\nBody\n\u200b\u200d \nNext\n\u2066\ufeff\nx".encode())
  TRIED["known defects"] += 1
  assert [(d.doc_id, d.text) for d in corpus.read_documents(path)] == [
      ("Title#0", "Body"), ("Next#0", ""), ("x#0", "")]  # invisible lines separate pages
  bom = _write(fuzz_dir, "bom.jsonl", b'\xef\xbb\xbf{"title": "A", "text": "x"}')
  assert corpus.read_documents(bom) == [corpus.Document("A#0", "A", "x")]


@pytest.mark.parametrize("fmt, line, message", [
    ("nq_open", {"question": " \t", "answer": ["x"]}, ":1: field 'question' is blank"),
    ("nq_open", {"question": "q?", "answer": ["\u200b"]}, "field 'answer'[0] is '\\u200b', "
     "which has no token"),
    ("webquestions", {"question": "q?", "answer": ["ok", "x\udc00"]},
     "field 'answer'[1] holds a lone surrogate"),
    ("curatedtrec", {"question": "q?", "answer": ["Paris", "(\\d+)?"]},
     "field 'answer'[1] is the regular expression '(\\\\d+)?', which matches the empty string"),
])
def test_question_defects_found_by_fuzzing(fuzz_dir, fmt, line, message):
  path = _write(fuzz_dir, f"{fmt}.jsonl", json.dumps(line).encode())
  TRIED["known defects"] += 1
  with pytest.raises(corpus.DataFormatError) as e:
    questions.read_questions(path, fmt)
  assert str(e.value).startswith(f"{path}:1: ") and message in str(e.value), str(e.value)


def test_curatedtrec_patterns_that_never_match_are_kept_and_counted(fuzz_dir, caplog):
  """As in the real CuratedTrec files: a lone trailing backslash (train line 701) never compiles;
  "Sn\\ě\\žka" (test line 159) compiles, but its NFD form has the bad escape "\\e"."""
  lines = [{"question": "a?", "answer": ["Paris"]}, {"question": "b?", "answer": ["x|y\\"]},
           {"question": "c?", "answer": ["Sne[zž]ka|Sn\\ě\\žka"]}]
  path = _write(fuzz_dir, "ct.txt", "\n".join(json.dumps(x) for x in lines).encode())
  TRIED["known defects"] += 1
  with caplog.at_level(logging.WARNING, logger="realm_jax.data.questions"):
    qs = questions.read_questions(path, "curatedtrec")
  assert [q.answers for q in qs] == [x["answer"] for x in lines]
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 2
  assert messages[0].startswith(f"{path}: 1 answer(s) are not valid regular expressions and will "
                                "never match: line 2, field 'answer'[0] 'x|y\\\\': ")
  assert messages[1].startswith(f"{path}: 1 answer(s) do not compile once NFD-normalised, so "
                                "has_answer never finds them in a block (exact match, on the raw "
                                "pattern, still uses them): line 3, field 'answer'[0]")
  assert evaluation.exact_match("Sněžka", qs[2].answers, answers_are_regex=True)
  assert not evaluation.has_answer("Sněžka is a mountain.", qs[2].answers, answers_are_regex=True)


def test_duplicate_question_ids_in_one_jsonl_file(fuzz_dir):
  path = _write(fuzz_dir, "dup.jsonl", b'{"question": "a?", "answer": ["x"], "id": 3}\n'
                b'{"question": "b?", "answer": ["y"], "id": "3"}')
  TRIED["known defects"] += 1
  with pytest.raises(corpus.DataFormatError, match=(
      rf"{re.escape(str(path))}:2: field 'id': duplicate question id '3' \(first at line 1\)")):
    questions.read_questions(path, "nq_open")


# ------------------------------------------------------------------------------- the report


def test_zz_report_inputs_tried():
  """Reports how many inputs the fuzz tests above tried (they run first, in file order)."""
  total = sum(v for k, v in TRIED.items() if k != "files")
  report = {"inputs_tried": total, "files_written": TRIED["files"],
            "by_loader": {k: v for k, v in sorted(TRIED.items()) if k != "files"}}
  print(f"\nfuzz inputs tried: {json.dumps(report, sort_keys=True)}")
  if os.environ.get("REALM_FUZZ_REPORT"):
    with open(os.environ["REALM_FUZZ_REPORT"], "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1, sort_keys=True)
  if all(TRIED[k] for k in ("jsonl corpus", "squad corpus", "text corpus", "long questions")):
    assert total >= 100, report  # the fuzz tests ran (not a -k selection without them)
