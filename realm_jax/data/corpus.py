"""The knowledge corpus Z: documents → blocks of at most 288 wordpieces, ids and fingerprints.

REALM (Guu et al., 2020, §3.4, "Knowledge corpus") and ORQA (Lee et al., 2019, §9.1) split Wikipedia
into blocks of at most 288 wordpieces: whole sentences are packed greedily so that
`3 + len(title) + len(body) <= 288` (the 3 counts `[CLS] title [SEP] body [SEP]`), and pages titled
"List of…", "Index of…", "Outline of…" or "…(disambiguation)" are dropped. The document tower of the
retriever embeds `[CLS] title [SEP] body [SEP]` with segment ids 0 for `[CLS] title [SEP]` and 1 for
`body [SEP]` (§3.4 and the official `orqa` preprocessing); `retrieval_inputs` builds exactly that.

Readers accept SQuAD v1.1 JSON (each paragraph is one document), JSON lines and plain text
(including WikiText's `= Title =` headings). Every format error is one `DataFormatError` naming
the file, the line (or JSON path) and the field: invalid JSON or UTF-8, JSON nested too deeply, a
missing or mistyped field (a boolean is not an integer id), a string holding a lone UTF-16 surrogate
(`"\\ud800"` escapes, which no tokenizer can encode) and a repeated document id. A UTF-8 byte-order
mark is accepted. Documents without any token are skipped by `iter_blocks` with one warning that
counts them.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import unicodedata
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tqdm

from realm_jax import fileio
from realm_jax import tokenization
from realm_jax.data import resources

DEFAULT_MAX_BLOCK_LENGTH = 288
# `[CLS] title [SEP] body [SEP]`: three special tokens per block.
NUM_SPECIAL_TOKENS_PER_BLOCK = 3

_EXCLUDED_PREFIXES = ("list of", "index of", "outline of")
_EXCLUDED_MARK = "(disambiguation)"

# Words ending in "." that rarely end a sentence (lower-cased, without the final period).
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof st jr sr mt ft vs etc e.g i.e u.s u.k a.d b.c no nos vol vols fig figs
    gen col lt sgt capt cmdr adm gov sen rep rev fr hon inc ltd co corp bros dept univ assn approx
    ca c cf al est jan feb mar apr jun jul aug sep sept oct nov dec pp op ed eds
""".split())
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_OPENING = "\"'\u201c\u2018([{"
_WIKITEXT_HEADING = re.compile(r"^\s*=\s(?!=)(.*?)\s=\s*$")
_WIKITEXT_SUBHEADING = re.compile(r"^\s*=\s=.*=\s=\s*$")
_WIKITEXT_DETOKENIZE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


_LOG = logging.getLogger(__name__)

# What reading a broken text file raises: bad UTF-8, or a truncated / corrupt `.gz` stream.
TEXT_ERRORS = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error)
# What parsing JSON raises besides JSONDecodeError: nesting deeper than the interpreter's stack.
_JSON_ERRORS = (RecursionError,)
# A lone UTF-16 surrogate (from a "\ud800" JSON escape): not Unicode text, no tokenizer encodes it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataFormatError(ValueError):
  """An input file does not have the expected format; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class Document:
  """One page of the knowledge corpus before blocking.

  Attributes:
    doc_id: unique, stable id (SQuAD: `"{article_title}#{paragraph_index}"`).
    title: page title with spaces (kept in every block of the page, REALM §3.4).
    text: page body.
  """
  doc_id: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
  """One retrievable unit z of the knowledge corpus (REALM §3.4: ≤ 288 wordpieces with the title).

  Attributes:
    block_id: position of the block in the corpus (consecutive ints in document order).
    doc_id: the `Document.doc_id` it came from (used to exclude trivial retrievals).
    title: the document title.
    text: the block body: the document text from its first to its last token.
    title_ids: `[num_title_tokens]` int32 token ids of the title.
    body_ids: `[num_body_tokens]` int32 token ids of `text`.
    body_offsets: `[num_body_tokens, 2]` int32 character offsets `[start, end)` of each body token
      into `text`.
    sentence_starts: `[num_sentences]` int32 index into `body_ids` where each sentence of the
      block starts (0 first; a block that begins inside a cut sentence also starts with 0), as in
      the official ORQA/REALM block examples; salient-span masking picks its query sentence from
      these. Empty when unknown.
  """
  block_id: int
  doc_id: str
  title: str
  text: str
  title_ids: np.ndarray
  body_ids: np.ndarray
  body_offsets: np.ndarray
  sentence_starts: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), dtype=np.int32))

  @property
  def num_tokens(self) -> int:
    """Length of `[CLS] title [SEP] body [SEP]` in tokens."""
    return NUM_SPECIAL_TOKENS_PER_BLOCK + len(self.title_ids) + len(self.body_ids)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def is_excluded_title(title: str) -> bool:
  """Whether REALM drops this page: "List of…", "Index of…", "Outline of…", "…(disambiguation)…".

  Follows `remove_doc` of the official ORQA `wiki_preprocessor.py` (REALM §3.4 re-uses ORQA's
  corpus), except that underscores count as spaces and case is ignored.
  """
  t = title.replace("_", " ").strip().lower()
  return t.startswith(_EXCLUDED_PREFIXES) or _EXCLUDED_MARK in t


def squad_doc_id(article_title: str, paragraph_index: int) -> str:
  """The document id of one SQuAD paragraph: `"{article_title}#{paragraph_index}"` (raw title)."""
  return f"{article_title}#{paragraph_index}"


def open_text(path: fileio.PathLike) -> io.TextIOBase:
  """Opens a local or URL text file (`.gz` decompressed on the fly) as UTF-8 text, via `fileio`.

  Corpus and question readers open their files here; decoding errors surface while reading (see
  `TEXT_ERRORS`).

  Raises:
    FileNotFoundError: "data file not found: {path}".
  """
  path = fileio.as_path(path)
  return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig")


def _open_binary(path: fileio.Path) -> io.BufferedIOBase:
  if not fileio.isfile(path):
    raise FileNotFoundError(f"data file not found: {path}")
  raw = fileio.open_file(path, "rb")
  if os.fspath(path).endswith(".gz"):
    raw = gzip.open(raw, "rb")
  return raw


def _text_error(path: fileio.Path, error: BaseException) -> DataFormatError:
  """The `DataFormatError` for a file `open_text` could not read, naming the line at fault.

  Text is decoded in chunks, so the failing line is found again by decoding the file line by line
  (only on this error path).
  """
  line_number = 0
  try:
    with _open_binary(path) as f:
      for line_number, line in enumerate(f, start=1):
        try:
          line.decode("utf-8")
        except UnicodeDecodeError as e:
          return DataFormatError(f"{path}:{line_number}: not UTF-8 text (byte {e.start + 1} of the "
                                 f"line: {e.reason})")
  except TEXT_ERRORS as e:
    return DataFormatError(f"{path}:{line_number + 1}: broken .gz file ({e})")
  return DataFormatError(f"{path}: not UTF-8 text or a broken .gz file ({error})")


def json_field(record: Any, key: str, kind: type | tuple[type, ...], where: str,
               required: bool = True) -> Any:
  """Reads one field of a parsed JSON object, checking its presence and type.

  Args:
    record: the parsed JSON value expected to be an object (dict).
    key: the field name.
    kind: accepted Python type(s) of the value.
    where: location for error messages: "file:line" or "file: json.path".
    required: raise when the field is absent (else return None).

  Raises:
    DataFormatError: "{where}: missing field 'key'", "{where}: field 'key' must be str, got
      int …" or "{where}: expected a JSON object".
  """
  if not isinstance(record, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if key not in record:
    if required:
      raise DataFormatError(f"{where}: missing field {key!r}")
    return None
  value = record[key]
  kinds = (kind,) if isinstance(kind, type) else tuple(kind)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    names = "/".join(k.__name__ for k in kinds)
    raise DataFormatError(
        f"{where}: field {key!r} must be {names}, got {type(value).__name__} {value!r:.80}")
  if isinstance(value, str):
    check_text(value, where, repr(key))
  return value


def check_text(value: str, where: str, field: str) -> str:
  """Returns `value` if it is Unicode text that UTF-8 can encode.

  Raises:
    DataFormatError: "{where}: field {field} holds a lone surrogate \\ud800 at character k (not
      Unicode text)".
  """
  if not value.isascii():
    bad = _SURROGATE.search(value)
    if bad:
      raise DataFormatError(f"{where}: field {field} holds a lone surrogate "
                            f"{bad.group().encode('unicode_escape').decode()} at character "
                            f"{bad.start()} (not Unicode text)")
  return value


def load_squad_json(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Loads and validates a SQuAD v1.1 file (plain `.json` or `.json.gz`).

  Returns:
    The `data` list: articles `{"title": str, "paragraphs": [{"context": str, "qas": [...]}]}`.

  Raises:
    FileNotFoundError: if `path` does not exist.
    DataFormatError: invalid JSON or UTF-8 (with its line), a missing / mistyped field (with its
      JSON path, e.g. `data[3].paragraphs[2]: missing field 'context'`), or two articles with the
      same title (their doc ids would repeat).
  """
  path = fileio.as_path(path)
  with open_text(path) as f:
    try:
      root = json.load(f)
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except _JSON_ERRORS as e:
      raise DataFormatError(f"{path}: invalid JSON (nested too deeply)") from e
    except TEXT_ERRORS as e:
      raise _text_error(path, e) from e
  articles = json_field(root, "data", list, f"{path}: top level")
  titles: dict[str, int] = {}
  for i, article in enumerate(articles):
    title = json_field(article, "title", str, f"{path}: data[{i}]")
    if title in titles:  # its paragraphs' doc ids would repeat data[k]'s
      raise DataFormatError(f"{path}: data[{i}]: field 'title' repeats data[{titles[title]}]'s "
                            f"title {title!r:.80} (doc ids \"title#paragraph\" must be unique)")
    titles[title] = i
    paragraphs = json_field(article, "paragraphs", list, f"{path}: data[{i}]")
    for j, paragraph in enumerate(paragraphs):
      json_field(paragraph, "context", str, f"{path}: data[{i}].paragraphs[{j}]")
  return articles


def read_squad_documents(path: str | os.PathLike,
                         drop_excluded_titles: bool = True) -> list[Document]:
  """Reads a SQuAD v1.1 file: each paragraph becomes one `Document`.

  Args:
    path: `.json` or `.json.gz` SQuAD file.
    drop_excluded_titles: skip articles that `is_excluded_title` rejects.

  Returns:
    Documents in file order, `doc_id = squad_doc_id(article_title, paragraph_index)`,
    title = article title with underscores replaced by spaces.

  Raises:
    FileNotFoundError, DataFormatError: see `load_squad_json`.
  """
  documents = []
  for article in load_squad_json(path):
    raw_title = article["title"]
    if drop_excluded_titles and is_excluded_title(raw_title):
      continue
    title = raw_title.replace("_", " ")
    for j, paragraph in enumerate(article["paragraphs"]):
      documents.append(Document(squad_doc_id(raw_title, j), title, paragraph["context"]))
  return documents


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
  """Yields `(line_number, parsed_value)` for every non-blank line of a JSON-lines file.

  Line numbers start at 1; lines end at "\\n" (a "\\r\\n" ending is whitespace to JSON); each line
  is decoded on its own, so an error names the first bad line; a UTF-8 byte-order mark is skipped;
  `.gz` files are decompressed on the fly.

  Raises:
    FileNotFoundError: if `path` is missing.
    DataFormatError: "{path}:{line}: invalid JSON (…)" or non-UTF-8 text.
  """
  path = fileio.as_path(path)
  with _open_binary(path) as f:
    line_number = 0
    try:
      for line_number, raw in enumerate(f, start=1):
        if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
          raw = raw[len(codecs.BOM_UTF8):]
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataFormatError(f"{path}:{line_number}: not UTF-8 text (byte {e.start + 1} of the "
                                f"line: {e.reason})") from e
        if not line.strip():
          continue
        try:
          value = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataFormatError(f"{path}:{line_number}: invalid JSON ({e.msg})") from e
        except _JSON_ERRORS as e:
          raise DataFormatError(f"{path}:{line_number}: invalid JSON (nested too deeply)") from e
        yield line_number, value
    except TEXT_ERRORS as e:
      raise DataFormatError(f"{path}:{line_number + 1}: broken .gz file ({e})") from e


def _strip_invisible(line: str) -> str:
  """`line` without whitespace or format characters (Unicode Cf: U+200B, U+FEFF) at its ends."""
  start, end = 0, len(line)
  while start < end and (line[start].isspace() or unicodedata.category(line[start]) == "Cf"):
    start += 1
  while end > start and (line[end - 1].isspace() or unicodedata.category(line[end - 1]) == "Cf"):
    end -= 1
  return line[start:end]


def _unique_doc_id(title: str, seen: dict[str, int]) -> str:
  k = seen.get(title, 0)
  seen[title] = k + 1
  return f"{title}#{k}"


def read_jsonl_documents(path: str | os.PathLike,
                         drop_excluded_titles: bool = True) -> list[Document]:
  """Reads JSON lines `{"title": str, "text": str, "id": str|int (optional)}` (`.gz` allowed).

  Without an `id`, `doc_id = f"{title}#{k}"` with k the 0-based count of earlier pages with that
  title (the SQuAD convention).

  Raises:
    FileNotFoundError: if `path` does not exist.
    DataFormatError: naming the line and the field at fault (invalid JSON or UTF-8, a missing or
      mistyped field, a doc id used by an earlier line).
  """
  return list(iter_jsonl_documents(path, drop_excluded_titles))


def iter_jsonl_documents(path: str | os.PathLike,
                         drop_excluded_titles: bool = True) -> Iterator[Document]:
  """Streams the documents of a JSON-lines file one line at a time (see `read_jsonl_documents`).

  Memory holds one line, the per-title counters of the titles seen in this file and an 8-byte
  hash per document (to refuse a repeated doc id; the file is read again to name the first line
  only when one repeats).

  Raises:
    FileNotFoundError, DataFormatError: as `read_jsonl_documents`.
  """
  path = fileio.as_path(path)
  seen: dict[str, int] = {}
  ids: set[bytes] = set()
  for line_number, record in iter_jsonl(path):
    where = f"{path}:{line_number}"
    title = json_field(record, "title", str, where)
    text = json_field(record, "text", str, where)
    doc_id = json_field(record, "id", (str, int), where, required=False)
    if drop_excluded_titles and is_excluded_title(title):
      continue
    field = "'title'" if doc_id is None else "'id'"
    doc_id = _unique_doc_id(title, seen) if doc_id is None else str(doc_id)
    key = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    if key in ids:
      first = next(document_line for document_line, document in _jsonl_doc_ids(
          path, drop_excluded_titles) if document == doc_id)
      if first < line_number:
        raise DataFormatError(f"{where}: field {field} gives doc id {doc_id!r:.80}, already used "
                              f"at line {first}; doc ids identify gold and trivial documents and "
                              "must be unique")
    ids.add(key)
    yield Document(doc_id, title, text)


def _jsonl_doc_ids(path: fileio.Path, drop_excluded_titles: bool) -> Iterator[tuple[int, str]]:
  """`(line, doc id)` of a JSON-lines corpus, as `iter_jsonl_documents` assigns them."""
  seen: dict[str, int] = {}
  for line_number, record in iter_jsonl(path):
    title, doc_id = record["title"], record.get("id")
    if not (drop_excluded_titles and is_excluded_title(title)):
      yield line_number, _unique_doc_id(title, seen) if doc_id is None else str(doc_id)


def read_text_documents(path: str | os.PathLike,
                        drop_excluded_titles: bool = True) -> list[Document]:
  """Reads plain text: pages separated by blank lines, the first line of a page is its title.

  A file whose first non-blank line is a WikiText heading (`= Title =`) is read as WikiText
  instead: each top-level heading starts a page, sub-headings (`= = Section = =`) are dropped,
  paragraphs are joined with a blank line, and the `@-@`, `@,@`, `@.@` escapes are undone.
  `doc_id = f"{title}#{k}"` as in `read_jsonl_documents`. Lines are stripped of whitespace and of
  invisible format characters (zero-width spaces and joiners, direction marks, U+FEFF) at both
  ends, so a line that shows nothing is blank.

  Raises:
    FileNotFoundError: if `path` does not exist.
    DataFormatError: for text that is not UTF-8 (naming the line).
  """
  path = fileio.as_path(path)
  with open_text(path) as f:
    try:
      lines = f.read().split("\n")
    except TEXT_ERRORS as e:
      raise _text_error(path, e) from e
  lines = [_strip_invisible(line) for line in lines]
  first = next((line for line in lines if line), "")
  pages: list[tuple[str, list[str]]] = []
  if _WIKITEXT_HEADING.match(first):
    for line in lines:
      heading = _WIKITEXT_HEADING.match(line)
      if heading:
        pages.append((heading.group(1).strip(), []))
      elif line and not _WIKITEXT_SUBHEADING.match(line) and pages:
        text = line
        for escaped, plain in _WIKITEXT_DETOKENIZE:
          text = text.replace(escaped, plain)
        pages[-1][1].append(text)
    pages = [(title, ["\n\n".join(paragraphs)]) for title, paragraphs in pages]
  else:
    current: list[str] = []
    for line in lines + [""]:
      if line:
        current.append(line)
      elif current:
        pages.append((current[0], current[1:]))
        current = []
  documents, seen = [], {}
  for title, body in pages:
    if drop_excluded_titles and is_excluded_title(title):
      continue
    documents.append(Document(_unique_doc_id(title, seen), title, "\n".join(body)))
  return documents


def read_documents(path: str | os.PathLike, drop_excluded_titles: bool = True) -> list[Document]:
  """Reads documents, choosing the reader by extension.

  `.json` / `.json.gz` → SQuAD, `.jsonl` / `.jsonl.gz` → JSON lines, `.txt` / `.tokens` (WikiText)
  / `.txt.gz` → plain text.

  Raises:
    ValueError: for an unknown extension.
    FileNotFoundError, DataFormatError: from the reader.
  """
  return list(iter_documents(path, drop_excluded_titles))


def iter_documents(path: str | os.PathLike, drop_excluded_titles: bool = True) -> Iterator[Document]:
  """Yields the documents of one local or URL file, choosing the reader by extension.

  JSON lines are streamed line by line (the format of a Wikipedia dump); a SQuAD file or a plain
  text file is parsed whole (these formats are one JSON value, or pages split by blank lines).

  Raises:
    ValueError: for an unknown extension.
    FileNotFoundError, DataFormatError: from the reader.
  """
  name = fileio.basename(path).lower()
  if name.endswith(".gz"):
    name = name[:-3]
  if name.endswith(".json"):
    yield from read_squad_documents(path, drop_excluded_titles)
  elif name.endswith(".jsonl"):
    yield from iter_jsonl_documents(path, drop_excluded_titles)
  elif name.endswith((".txt", ".tokens")):
    yield from read_text_documents(path, drop_excluded_titles)
  else:
    raise ValueError(f"{path}: unknown corpus format; expected .json(.gz) (SQuAD), "
                     ".jsonl(.gz) or .txt(.gz)")


def embedded_squad_paths() -> dict[str, pathlib.Path]:
  """The SQuAD v1.1 files embedded under `data/squad/` (the checkout's, or the installed package's).

  Returns:
    `{"dev": .../dev-v1.1.json.gz, "train": .../train-v1.1.first30.json.gz}`: the full dev set and
    the first 30 train articles (see `data/ATTRIBUTION.md`).

  Raises:
    FileNotFoundError: if the files are absent (a checkout without `data/`, or a broken install).
  """
  root = resources.path("data/squad")
  paths = {"dev": root / "dev-v1.1.json.gz", "train": root / "train-v1.1.first30.json.gz"}
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(
        f"embedded SQuAD data missing: {missing}; it ships with the repository's data/ folder and "
        "inside the realm-jax wheel: reinstall realm-jax")
  return paths


# ---------------------------------------------------------------------------------------------
# Sentences and blocks
# ---------------------------------------------------------------------------------------------


def _is_abbreviation(text: str, end: int) -> bool:
  """Whether the word that ends right before the period at `text[end]` is an abbreviation."""
  start = end
  while start > 0 and not text[start - 1].isspace():
    start -= 1
  word = text[start:end].lstrip(_OPENING).lower()
  if not word:
    return False
  if len(word) == 1 and word.isalpha():  # An initial: "J. R. R. Tolkien", "H. americanus".
    return True
  return word in _ABBREVIATIONS


def split_sentences(text: str) -> list[tuple[int, int]]:
  """Splits text into sentences with a rule-based splitter.

  A sentence ends at `.`, `!` or `?` (plus closing quotes / brackets) followed by whitespace and
  then an upper-case letter, a digit or an opening quote / bracket, unless the period closes a
  known abbreviation ("Dr.", "U.S.", "etc.") or an initial ("J."). Blank lines always end a
  sentence.

  Args:
    text: any string.

  Returns:
    `[(start, end)]` character spans into `text`, in order, stripped of surrounding whitespace;
    together they cover every non-whitespace character.
  """
  spans = []
  for paragraph in _split_keep_spans(text, _PARAGRAPH_BREAK):
    p_start, p_end = paragraph
    cut = p_start
    for m in _SENTENCE_END.finditer(text, p_start, p_end):
      nxt = m.end()
      while nxt < p_end and text[nxt].isspace():
        nxt += 1
      if nxt >= p_end:
        continue
      follower = text[nxt]
      k = nxt
      while follower in _OPENING and k + 1 < p_end:
        k += 1
        follower = text[k]
      if not (follower.isupper() or follower.isdigit()):
        continue
      if text[m.start()] == "." and m.group().count(".") == 1 and _is_abbreviation(text, m.start()):
        continue
      spans.append((cut, m.end()))
      cut = nxt
    spans.append((cut, p_end))
  out = []
  for start, end in spans:
    while start < end and text[start].isspace():
      start += 1
    while end > start and text[end - 1].isspace():
      end -= 1
    if start < end:
      out.append((start, end))
  return out


def _split_keep_spans(text: str, separator: re.Pattern[str]) -> list[tuple[int, int]]:
  spans, start = [], 0
  for m in separator.finditer(text):
    spans.append((start, m.start()))
    start = m.end()
  spans.append((start, len(text)))
  return spans


def _cut_point(tokenizer: tokenization.Tokenizer, ids: Sequence[int], start: int,
               limit: int) -> int:
  """End of a chunk `[start, end)` with `end <= limit`, at a word boundary when there is one."""
  if limit >= len(ids):
    return len(ids)
  for end in range(limit, start, -1):
    if not tokenizer.is_continuation(ids[end]):
      return end
  return limit  # One word longer than a block: cut inside it.


def _pack_document(document: Document, ids: Sequence[int], offsets: np.ndarray,
                   tokenizer: tokenization.Tokenizer, budget: int
                   ) -> tuple[list[tuple[int, int]], list[int]]:
  """Groups a document's tokens into blocks of at most `budget` tokens.

  Returns:
    `(ranges, sentence_starts)`: block token ranges `[start, end)` in order, and the token index
    at which each sentence of the document starts.
  """
  n = len(ids)
  if n == 0:
    return [], []
  char_starts = np.asarray([s for s, _ in split_sentences(document.text)], dtype=np.int64)
  # Sentence of each token = the last sentence that starts at or before the token's start.
  token_sentence = np.searchsorted(char_starts, offsets[:, 0], side="right")
  firsts = [0] + (np.flatnonzero(np.diff(token_sentence)) + 1).tolist()
  sentences = list(zip(firsts, firsts[1:] + [n]))  # token ranges of the sentences
  ranges = []
  block_start, block_end = 0, 0  # the block being filled: tokens [block_start, block_end)
  for s_start, s_end in sentences:
    if s_end - block_start <= budget:  # the sentence fits in the current block
      block_end = s_end
      continue
    if block_end > block_start:
      ranges.append((block_start, block_end))
    block_start = block_end = s_start
    while s_end - block_start > budget:  # a sentence longer than a block: cut it
      cut = _cut_point(tokenizer, ids, block_start, block_start + budget)
      ranges.append((block_start, cut))
      block_start = block_end = cut
    block_end = s_end
  if block_end > block_start:
    ranges.append((block_start, block_end))
  return ranges, firsts


def split_into_blocks(documents: Iterable[Document], tokenizer: tokenization.Tokenizer,
                      max_block_length: int = DEFAULT_MAX_BLOCK_LENGTH, *,
                      batch_size: int = 256, show_progress: bool = True) -> list[Block]:
  """Splits documents into blocks of whole sentences (REALM §3.4, ORQA §9.1).

  Sentences are packed greedily so that `3 + len(title_ids) + len(body_ids) <= max_block_length`;
  a sentence longer than a whole block is cut at the token limit (at the last word boundary before
  it when there is one). The title is repeated in every block of its document; a title longer than
  `(max_block_length - 3) // 2` tokens is truncated to that length. Documents without any token
  produce no block. For corpora that do not fit in memory, `iter_blocks` streams the same blocks
  and `data.corpus_store.build_corpus` writes them to disk.

  Args:
    documents: the pages, in the order that defines the block ids.
    tokenizer: tokenizes titles and bodies (the body is tokenized once, whole, so block token ids
      equal the document's token ids).
    max_block_length: the longest `[CLS] title [SEP] body [SEP]`, in tokens (288 in REALM).
    batch_size: documents tokenized per call (WordPiece tokenizes a batch in parallel).
    show_progress: show a tqdm bar over documents.

  Returns:
    Blocks with `block_id` 0, 1, 2, … in document order; the same input always gives the same
    blocks. `text` is the document text from the first to the last token of the block and
    `body_offsets` index into it.

  Raises:
    ValueError: if `max_block_length < 5` or two documents share a `doc_id`.
  """
  documents = list(documents)
  seen: dict[str, int] = {}
  for k, d in enumerate(documents):
    if d.doc_id in seen:
      raise ValueError(f"duplicate doc_id {d.doc_id!r} (documents {seen[d.doc_id]} and {k}); "
                       "doc_ids identify gold and trivial documents and must be unique")
    seen[d.doc_id] = k
  with tqdm.tqdm(total=len(documents), desc="Splitting documents into blocks", unit="doc",
                 disable=not show_progress) as bar:
    return list(iter_blocks(documents, tokenizer, max_block_length, batch_size=batch_size,
                            on_documents=bar.update))


def iter_blocks(documents: Iterable[Document], tokenizer: tokenization.Tokenizer,
                max_block_length: int = DEFAULT_MAX_BLOCK_LENGTH, *, batch_size: int = 256,
                first_block_id: int = 0,
                on_documents: Callable[[int], Any] | None = None) -> Iterator[Block]:
  """Streams `split_into_blocks`: blocks come out `batch_size` documents at a time.

  Memory holds one batch of documents and their blocks, whatever the corpus size. Documents are
  not checked for duplicate ids here (the caller sees every id once; see `corpus_store`).

  Args:
    documents: the pages, any iterable (consumed once).
    tokenizer, max_block_length, batch_size: as in `split_into_blocks`.
    first_block_id: the `block_id` of the first block.
    on_documents: called with the number of documents of each batch once it is blocked (progress).

  Yields:
    `Block`s with consecutive ids from `first_block_id`, in document order. A document without
    any body token gives no block; once the documents are consumed, one warning counts them and
    names the first few.

  Raises:
    ValueError: if `max_block_length < 5`.
  """
  if max_block_length < NUM_SPECIAL_TOKENS_PER_BLOCK + 2:
    raise ValueError(f"max_block_length must be at least 5 tokens, got {max_block_length}")
  max_title = (max_block_length - NUM_SPECIAL_TOKENS_PER_BLOCK) // 2
  next_id = first_block_id
  num_empty, empty = 0, []  # documents without any body token: how many, the first doc ids
  for batch in _batched(documents, batch_size):
    bodies = tokenizer.encode_batch_with_offsets([d.text for d in batch])
    titles = tokenizer.encode_batch_with_offsets([d.title for d in batch])
    for document, (ids, offsets), (title_ids, _) in zip(batch, bodies, titles):
      title_arr = np.asarray(title_ids[:max_title], dtype=np.int32)
      budget = max_block_length - NUM_SPECIAL_TOKENS_PER_BLOCK - len(title_arr)
      ids_arr = np.asarray(ids, dtype=np.int32)
      off_arr = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
      ranges, sentence_starts = _pack_document(document, ids, off_arr, tokenizer, budget)
      if not ranges:
        num_empty += 1
        empty = empty if len(empty) == 5 else empty + [document.doc_id]
      for start, end in ranges:
        char_start = int(off_arr[start:end, 0].min())
        char_end = int(off_arr[start:end, 1].max())
        first = bisect.bisect_right(sentence_starts, start)
        last = bisect.bisect_left(sentence_starts, end)
        starts = [0] + [k - start for k in sentence_starts[first:last]]
        yield Block(
            block_id=next_id, doc_id=document.doc_id, title=document.title,
            text=document.text[char_start:char_end], title_ids=title_arr,
            body_ids=ids_arr[start:end].copy(), body_offsets=off_arr[start:end] - char_start,
            sentence_starts=np.asarray(starts, dtype=np.int32))
        next_id += 1
    if on_documents is not None:
      on_documents(len(batch))
  if num_empty:
    _LOG.warning("skipped %d document(s) without any token in the body (empty, blank or only "
                 "characters the tokenizer drops): %s%s", num_empty,
                 ", ".join(repr(d) for d in empty), " ..." if num_empty > len(empty) else "")


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  """Consecutive lists of `size` items (the last may be shorter)."""
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def corpus_fingerprint(blocks: Iterable[Block], max_block_length: int | None = None) -> str:
  """A sha256 hex digest identifying a blocked corpus.

  Covers, for every block in order: block id, doc id, title, text, title ids and body ids (so a
  different tokenizer gives a different fingerprint), and `max_block_length` when given. Snapshots
  of document embeddings record it to detect a stale or foreign corpus.
  """
  h = hashlib.sha256(b"realm_jax corpus v1\n")
  h.update(f"max_block_length={max_block_length}\n".encode())
  for b in blocks:
    h.update(int(b.block_id).to_bytes(8, "little", signed=True))
    for s in (b.doc_id, b.title, b.text):
      data = s.encode("utf-8")
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
    for arr in (b.title_ids, b.body_ids):
      data = np.ascontiguousarray(arr, dtype="<i4").tobytes()
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Retriever inputs
# ---------------------------------------------------------------------------------------------


def bucketed_length(n_tokens: int, buckets: Sequence[int]) -> int:
  """The smallest bucket length that holds `n_tokens` tokens.

  Args:
    n_tokens: a sequence length (tokens).
    buckets: allowed padded lengths, any order.

  Raises:
    ValueError: if `n_tokens` exceeds every bucket or `buckets` is empty.
  """
  fitting = [b for b in buckets if b >= n_tokens]
  if not fitting:
    raise ValueError(f"{n_tokens} tokens exceed the largest bucket of {sorted(buckets)}")
  return min(fitting)


def padded_length(longest: int, max_length: int, pad_to_multiple_of: int | None) -> int:
  """Width of a batch: `max_length`, or `longest` rounded up to `pad_to_multiple_of` (≤ max)."""
  if pad_to_multiple_of is None:
    return max_length
  if pad_to_multiple_of <= 0:
    raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
  rounded = -(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of
  return min(max_length, rounded)


def _fill_retrieval_inputs(title_ids: Sequence[np.ndarray], body_ids: Sequence[np.ndarray],
                           tokenizer: tokenization.Tokenizer, max_length: int,
                           pad_to_multiple_of: int | None) -> dict[str, np.ndarray]:
  if max_length < NUM_SPECIAL_TOKENS_PER_BLOCK:
    raise ValueError(f"max_length must be at least 3, got {max_length}")
  room = max_length - NUM_SPECIAL_TOKENS_PER_BLOCK
  lengths = []
  for t, b in zip(title_ids, body_ids):
    n_title = min(len(t), room)
    lengths.append((n_title, min(len(b), room - n_title)))
  longest = max((NUM_SPECIAL_TOKENS_PER_BLOCK + a + b for a, b in lengths), default=0)
  width = padded_length(longest, max_length, pad_to_multiple_of)
  n = len(lengths)
  input_ids = np.full((n, width), tokenizer.pad_id, dtype=np.int32)
  segment_ids = np.zeros((n, width), dtype=np.int32)
  input_mask = np.zeros((n, width), dtype=np.int32)
  for row, (t, b, (n_title, n_body)) in enumerate(zip(title_ids, body_ids, lengths)):
    body_start = n_title + 2
    total = body_start + n_body + 1
    ids = input_ids[row]
    ids[0] = tokenizer.cls_id
    ids[1:1 + n_title] = t[:n_title]
    ids[1 + n_title] = tokenizer.sep_id
    ids[body_start:body_start + n_body] = b[:n_body]
    ids[total - 1] = tokenizer.sep_id
    segment_ids[row, body_start:total] = 1
    input_mask[row, :total] = 1
  return {"input_ids": input_ids, "segment_ids": segment_ids, "input_mask": input_mask}


def retrieval_inputs(blocks_or_arrays: Sequence[Block] | Mapping[str, Sequence[np.ndarray]],
                     tokenizer: tokenization.Tokenizer,
                     max_length: int = DEFAULT_MAX_BLOCK_LENGTH,
                     pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
  """Document-tower inputs `[CLS] title [SEP] body [SEP]` (REALM §3.4, Embed_doc).

  Args:
    blocks_or_arrays: blocks, or a mapping with "title_ids" and "body_ids", each a sequence of
      1-D int arrays (one per block).
    tokenizer: supplies the [CLS] / [SEP] / [PAD] ids.
    max_length: the longest row; a longer block loses body tokens first, then title tokens.
    pad_to_multiple_of: None pads every row to `max_length`; an int pads to the longest row of
      this batch rounded up to a multiple of it (capped at `max_length`), for length bucketing.

  Returns:
    `{"input_ids", "segment_ids", "input_mask"}`, each `[num_blocks, width]` int32, right-padded
    with `tokenizer.pad_id` / 0 / 0. Segment id 0 covers `[CLS] title [SEP]`, 1 covers
    `body [SEP]`; the mask is 1 on real tokens.

  Raises:
    ValueError: if `max_length < 3`, `pad_to_multiple_of <= 0`, or the mapping lacks a key or
      its two sequences differ in length.
  """
  if isinstance(blocks_or_arrays, Mapping):
    for key in ("title_ids", "body_ids"):
      if key not in blocks_or_arrays:
        raise ValueError(f"retrieval_inputs: the mapping has no {key!r}")
    title_ids, body_ids = blocks_or_arrays["title_ids"], blocks_or_arrays["body_ids"]
    if len(title_ids) != len(body_ids):
      raise ValueError(f"retrieval_inputs: {len(title_ids)} title_ids but {len(body_ids)} body_ids")
  else:
    title_ids = [b.title_ids for b in blocks_or_arrays]
    body_ids = [b.body_ids for b in blocks_or_arrays]
  return _fill_retrieval_inputs(title_ids, body_ids, tokenizer, max_length, pad_to_multiple_of)


def embedded_dev_subset(num_articles: int, directory: fileio.PathLike) -> fileio.Path:
  """Writes (once) the first `num_articles` articles of the embedded SQuAD v1.1 dev set (SQuAD JSON).

  The file is `<directory>/squad-dev-first<N>.json` (local or URL); its bytes depend only on N, so
  the corpus built from it is reused across runs. Its questions serve zero-shot retrieval
  evaluations.

  Raises:
    ValueError: if `num_articles` is not positive.
    FileNotFoundError: if the embedded data is missing.
  """
  if num_articles <= 0:
    raise ValueError(f"embedded_dev_subset: num_articles must be positive, got {num_articles}")
  path = fileio.join(directory, f"squad-dev-first{num_articles}.json")
  if fileio.isfile(path):
    return path
  with gzip.open(embedded_squad_paths()["dev"], "rt", encoding="utf-8") as f:
    squad = json.load(f)
  squad["data"] = squad["data"][:num_articles]
  fileio.makedirs(directory)
  fileio.write_atomic(path, json.dumps(squad))
  return path
