"""The blocked knowledge corpus on disk: streamed when built, memory-mapped when read.

REALM's knowledge corpus Z (Guu et al., 2020, §3.4) is English Wikipedia cut into 13.35M blocks of at
most 288 wordpieces. Held as Python objects that is ~100 GiB per host, so the corpus is a column store
instead:

  * **Building** reads, blocks (`corpus.iter_blocks`) and writes one *part* per source file, a batch of
    documents at a time: memory does not grow with the corpus. With several processes
    (`process_count > 1`, a shared `gs://` data directory), process p builds the parts of the source
    files p, p + P, p + 2P, …; process 0 then checks and commits the corpus (`metadata.json`, written
    last: a corpus without it does not exist). Block ids and the fingerprint depend only on the
    sources, the tokenizer and the block length, never on the number of processes.
  * **Reading** memory-maps every column (`np.memmap`). Opening the corpus reads only the per-block
    index columns; a block's tokens, offsets and text are paged in when a step touches the block.
    A `gs://` corpus is first copied to the local cache (`fileio.local_copy`; memory maps need a
    local file).

Layout of a corpus directory `DATA_DIR/realm_corpus/<name>/` (`<name>` hashes the source contents,
the tokenizer and the block length, so different corpora never collide and a rebuild is skipped):

  metadata.json            committed last: config, parts, number of blocks, corpus fingerprint
  part-00000/part.json     committed last in its part: counts, dtypes, byte sizes, sha256 per file
  part-00000/blocks.bin    `BLOCK_DTYPE` record per block: cumulative ends into the other columns
  part-00000/tokens.bin    `[num_tokens]` uint16 (int32 for vocabularies > 65,536): title ids, then
                           body ids, of each block in turn
  part-00000/offsets.bin   `[num_body_tokens, 2]` uint16 (int32 if a block text is ≥ 65,536 chars):
                           character offsets `[start, end)` of body tokens into the block text
  part-00000/sentences.bin `[num_sentences]` uint16: sentence starts (token index in the body)
  part-00000/text.bin      UTF-8 block texts, back to back
  part-00000/docs.bin      `DOC_DTYPE` record per document: cumulative ends, 64-bit doc-id hash
  part-00000/doc_ids.bin, part-00000/titles.bin   UTF-8 doc ids / titles, back to back

All binary files are little-endian, without headers; `part.json` gives every dtype and length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import IO, Any, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from realm_jax import fileio
from realm_jax import tokenization
from realm_jax.data import corpus as corpus_lib

# Bump when the blocking or the stored layout changes: old prepared corpora are then not re-used.
STORE_FORMAT = 2
STORE_DIRNAME = "realm_corpus"
METADATA_FILE = "metadata.json"
PART_FILE = "part.json"

BLOCK_DTYPE = np.dtype([
    ("token_end", "<i8"),      # end of the block's title + body ids in tokens.bin
    ("body_end", "<i8"),       # end of the block's body tokens in offsets.bin (rows)
    ("sentence_end", "<i8"),   # end of its sentence starts in sentences.bin
    ("text_end", "<i8"),       # end of its text in text.bin (bytes)
    ("doc", "<i4"),            # index of its document in docs.bin
    ("title_len", "<u2"),      # number of title ids (the first ids of the block in tokens.bin)
    ("_pad", "<u2"),
])
DOC_DTYPE = np.dtype([
    ("id_end", "<i8"),         # end of the doc id in doc_ids.bin (bytes)
    ("title_end", "<i8"),      # end of the title in titles.bin (bytes)
    ("block_end", "<i8"),      # cumulative number of blocks of documents 0..d
    ("id_hash", "<u8"),        # `doc_id_hash(doc_id)`
])
_COLUMNS = ("blocks", "tokens", "offsets", "sentences", "text", "docs", "doc_ids", "titles")
_WAIT_POLL_S = 2.0

log = logging.getLogger(__name__)


class CorpusStoreError(corpus_lib.DataFormatError):
  """A prepared corpus is missing, incomplete, truncated or inconsistent, or a source cannot be read.

  The message names the path (and the field); the CLI prints it as one line (a `DataFormatError`).
  """


def doc_id_hash(doc_id: str | bytes) -> int:
  """A 64-bit hash of a doc id (blake2b, little-endian): the key of the doc-id index."""
  data = doc_id.encode("utf-8") if isinstance(doc_id, str) else doc_id
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------
# Writing one part
# ---------------------------------------------------------------------------------------------------


class _Column:
  """An append-only binary column written to a file-like object, hashed as it is written."""

  def __init__(self, f: IO[bytes]):
    self.f = f
    self.sha = hashlib.sha256()
    self.nbytes = 0

  def write(self, data: bytes | np.ndarray) -> None:
    data = data.tobytes() if isinstance(data, np.ndarray) else data
    self.f.write(data)
    self.sha.update(data)
    self.nbytes += len(data)


class PartWriter:
  """Writes the blocks of one part (one source file) column by column, never holding them all.

  `add(block)` appends a block; `close()` returns the part's description (counts, dtypes, byte sizes
  and sha256 of every column), which `write_part` commits as `part.json`.
  """

  def __init__(self, files: dict[str, IO[bytes]], tokenizer: tokenization.Tokenizer):
    """Starts a part.

    Args:
      files: one writable binary file object per name of `_COLUMNS`.
      tokenizer: the tokenizer of the ids (its `vocab_size` chooses uint16 or int32 token ids).
    """
    self.columns = {name: _Column(files[name]) for name in _COLUMNS}
    self.token_dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<i4")
    self._max_offset = 0
    self.num_blocks = self.num_docs = 0
    self._ends = dict(token_end=0, body_end=0, sentence_end=0, text_end=0)
    self._doc_ends = dict(id_end=0, title_end=0)
    self._last_doc: str | None = None
    self._seen_docs: set[int] = set()

  def add(self, block: corpus_lib.Block) -> None:
    """Appends one block; a block with a new `doc_id` starts a new document.

    Raises:
      ValueError: if a doc id comes back after another document's blocks (ids must be unique).
    """
    if block.doc_id != self._last_doc:
      key = doc_id_hash(block.doc_id)
      if key in self._seen_docs:
        raise ValueError(f"duplicate doc_id {block.doc_id!r}; doc_ids identify gold and trivial "
                         "documents and must be unique")
      self._seen_docs.add(key)
      self._close_doc()
      doc_id, title = block.doc_id.encode("utf-8"), block.title.encode("utf-8")
      self.columns["doc_ids"].write(doc_id)
      self.columns["titles"].write(title)
      self._doc_ends["id_end"] += len(doc_id)
      self._doc_ends["title_end"] += len(title)
      self._doc_hash = key
      self._last_doc = block.doc_id
      self.num_docs += 1
    title_ids = np.asarray(block.title_ids)
    body_ids = np.asarray(block.body_ids)
    self.columns["tokens"].write(np.concatenate([title_ids, body_ids]).astype(self.token_dtype))
    offsets = np.asarray(block.body_offsets, dtype="<i4").reshape(-1, 2)
    if offsets.size:
      self._max_offset = max(self._max_offset, int(offsets.max()))
    self.columns["offsets"].write(offsets)  # int32 now; narrowed to uint16 at close() if it fits.
    self.columns["sentences"].write(np.asarray(block.sentence_starts).astype("<u2"))
    text = block.text.encode("utf-8")
    self.columns["text"].write(text)
    e = self._ends
    e["token_end"] += len(title_ids) + len(body_ids)
    e["body_end"] += len(body_ids)
    e["sentence_end"] += len(block.sentence_starts)
    e["text_end"] += len(text)
    record = np.zeros(1, BLOCK_DTYPE)
    for key, value in e.items():
      record[key] = value
    record["doc"] = self.num_docs - 1
    record["title_len"] = len(title_ids)
    self.columns["blocks"].write(record)
    self.num_blocks += 1

  def _close_doc(self) -> None:
    if self._last_doc is None:
      return
    record = np.zeros(1, DOC_DTYPE)
    record["id_end"] = self._doc_ends["id_end"]
    record["title_end"] = self._doc_ends["title_end"]
    record["block_end"] = self.num_blocks
    record["id_hash"] = self._doc_hash
    self.columns["docs"].write(record)

  def close(self) -> dict[str, Any]:
    """Finishes the part; returns its description (the content of `part.json`, without `name`).

    `offsets` were written as int32; the caller narrows the file to uint16 when
    `description["offsets_dtype"] == "<u2"` (see `_narrow_offsets`).
    """
    self._close_doc()
    self._last_doc = None
    offsets_dtype = "<u2" if self._max_offset < 1 << 16 else "<i4"
    return {
        "num_blocks": self.num_blocks, "num_docs": self.num_docs,
        "num_tokens": self._ends["token_end"], "num_body_tokens": self._ends["body_end"],
        "num_sentences": self._ends["sentence_end"], "text_bytes": self._ends["text_end"],
        "token_dtype": self.token_dtype.str, "offsets_dtype": offsets_dtype,
        "files": {name: {"bytes": c.nbytes, "sha256": c.sha.hexdigest()}
                  for name, c in self.columns.items()},
    }


def _narrow_offsets(path: pathlib.Path, chunk_rows: int = 1 << 20) -> tuple[int, str]:
  """Rewrites an int32 offsets file as uint16 in place (chunk by chunk); returns (bytes, sha256).

  `path` is in `write_part`'s local staging directory (always local: parts are staged, then renamed
  or uploaded through `fileio`).
  """
  tmp = path.with_name(path.name + ".u2")
  sha = hashlib.sha256()
  nbytes = 0
  with open(path, "rb") as src, open(tmp, "wb") as dst:  # Local staging directory (docstring).
    while True:
      data = src.read(chunk_rows * 8)
      if not data:
        break
      narrow = np.frombuffer(data, "<i4").astype("<u2").tobytes()
      dst.write(narrow)
      sha.update(narrow)
      nbytes += len(narrow)
  os.replace(tmp, path)  # Local staging directory (docstring).
  return nbytes, sha.hexdigest()


def _file_name(column: str) -> str:
  return f"{column}.bin"


def part_name(index: int) -> str:
  """Directory name of part `index` (one part per source file, in source order)."""
  return f"part-{index:05d}"


def write_part(directory: fileio.PathLike, blocks: Iterable[corpus_lib.Block],
               tokenizer: tokenization.Tokenizer, extra: dict[str, Any] | None = None,
               staging_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """Writes blocks into a committed part at `directory` (local or URL); returns its description.

  The columns are written to a local staging directory first. Locally the staged directory is then
  renamed into place; on an object store every file is uploaded and `part.json` is written last, so a
  reader never sees a partial part. An existing committed part at `directory` is replaced.

  Args:
    directory: the part's directory (`…/<corpus name>/part-00003`).
    blocks: the part's blocks, consumed once.
    tokenizer: the tokenizer of the ids.
    extra: more fields for `part.json` (the source path and its sha256).
    staging_dir: a local directory for the staged files (default: next to a local `directory`,
      else the system temp directory).

  Raises:
    ValueError: for a doc id that repeats (see `PartWriter.add`).
    OSError: if writing fails; nothing is committed then.
  """
  directory = fileio.as_path(directory)
  if staging_dir is None:
    staging_dir = directory.parent if isinstance(directory, pathlib.Path) else tempfile.gettempdir()
  pathlib.Path(staging_dir).mkdir(parents=True, exist_ok=True)
  stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{fileio.basename(directory)}.", dir=staging_dir))
  try:
    files = {name: open(stage / _file_name(name), "wb") for name in _COLUMNS}
    try:
      writer = PartWriter(files, tokenizer)
      for block in blocks:
        writer.add(block)
      description = writer.close()
    finally:
      for f in files.values():
        f.close()
    if description["offsets_dtype"] == "<u2":
      nbytes, sha = _narrow_offsets(stage / _file_name("offsets"))
      description["files"]["offsets"] = {"bytes": nbytes, "sha256": sha}
    description.update(extra or {})
    description["format"] = STORE_FORMAT
    manifest = json.dumps(description, indent=1, sort_keys=True)
    if isinstance(directory, pathlib.Path):  # Local commit: a directory rename (os, not fileio).
      (stage / PART_FILE).write_text(manifest, encoding="utf-8")
      directory.parent.mkdir(parents=True, exist_ok=True)
      if _same_part_committed(directory, description):
        return description  # Another process (same sources) committed it first: keep theirs.
      if directory.exists():
        shutil.rmtree(directory)  # Local (this branch): a stale or incomplete part, replaced.
      try:
        os.replace(stage, directory)
      except OSError:
        if _same_part_committed(directory, description):  # Lost a rename race to an equal part.
          return description
        raise
      fileio.fsync_dir(directory.parent)
    else:
      fileio.remove(fileio.join(directory, PART_FILE))
      for name in _COLUMNS:
        fileio.upload_file(stage / _file_name(name), fileio.join(directory, _file_name(name)))
      fileio.write_atomic(fileio.join(directory, PART_FILE), manifest)
    return description
  finally:
    shutil.rmtree(stage, ignore_errors=True)  # The local staging directory (tempfile).


def _same_part_committed(directory: pathlib.Path, description: dict[str, Any]) -> bool:
  """True if `directory` holds a committed part with the same columns (sizes and sha256)."""
  try:
    theirs = json.loads((directory / PART_FILE).read_text(encoding="utf-8"))
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
    return False
  return theirs.get("files") == description["files"]


# ---------------------------------------------------------------------------------------------------
# Reading parts
# ---------------------------------------------------------------------------------------------------


def _column(path: fileio.Path | None, data: bytes | None, dtype: Any, length: int,
            tail: tuple[int, ...] = ()) -> np.ndarray:
  """A read-only `[length, *tail]` array over a local file (memory-mapped) or in-memory bytes."""
  dtype = np.dtype(dtype)
  if length == 0:
    return np.zeros((0,) + tail, dtype)
  if data is not None:
    return np.frombuffer(data, dtype).reshape((length,) + tail)
  # A plain ndarray view of the map (slicing an `np.memmap` subclass is several times slower).
  return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=(length,) + tail))


@dataclasses.dataclass
class Part:
  """The columns of one part (memory-mapped files, or in-memory buffers for small corpora).

  Attributes:
    blocks: `[num_blocks]` `BLOCK_DTYPE` records.
    docs: `[num_docs]` `DOC_DTYPE` records.
    tokens: `[num_tokens]` uint16/int32 title and body ids.
    offsets: `[num_body_tokens, 2]` uint16/int32 char offsets into the block texts.
    sentences: `[num_sentences]` uint16 sentence starts.
    text, doc_ids, titles: `[num_bytes]` uint8 UTF-8 strings back to back.
  """
  blocks: np.ndarray
  docs: np.ndarray
  tokens: np.ndarray
  offsets: np.ndarray
  sentences: np.ndarray
  text: np.ndarray
  doc_ids: np.ndarray
  titles: np.ndarray

  @classmethod
  def from_description(cls, description: dict[str, Any], directory: pathlib.Path | None = None,
                       buffers: dict[str, bytes] | None = None) -> "Part":
    """Opens a part from its `part.json` description and its local directory (or in-memory buffers).

    Raises:
      CorpusStoreError: if a column file is missing or its size differs from the description
        (a truncated or foreign file), naming the file.
    """
    d = description
    lengths = {"blocks": (d["num_blocks"], BLOCK_DTYPE, ()),
               "docs": (d["num_docs"], DOC_DTYPE, ()),
               "tokens": (d["num_tokens"], d["token_dtype"], ()),
               "offsets": (d["num_body_tokens"], d["offsets_dtype"], (2,)),
               "sentences": (d["num_sentences"], "<u2", ()),
               "text": (d["text_bytes"], np.uint8, ()),
               "doc_ids": (d["files"]["doc_ids"]["bytes"], np.uint8, ()),
               "titles": (d["files"]["titles"]["bytes"], np.uint8, ())}
    arrays = {}
    for name, (length, dtype, tail) in lengths.items():
      expected = d["files"][name]["bytes"]
      if length * np.dtype(dtype).itemsize * int(np.prod(tail, dtype=np.int64)) != expected:
        raise CorpusStoreError(f"{directory}/{PART_FILE}: field 'files.{name}.bytes' = {expected} "
                               f"disagrees with {length} rows of {np.dtype(dtype).str}")
      if buffers is not None:
        arrays[name] = _column(None, buffers[name], dtype, length, tail)
        continue
      path = directory / _file_name(name)
      try:
        size = path.stat().st_size
      except FileNotFoundError:
        raise CorpusStoreError(f"{path}: missing column file of a committed corpus part") from None
      if size != expected:
        raise CorpusStoreError(f"{path}: {size} bytes, but {PART_FILE} records {expected} "
                               "(truncated or replaced file); rebuild the corpus")
      arrays[name] = _column(path, None, dtype, length, tail)
    return cls(**arrays)


class _Splits:
  """`splits[r]` = start of row r = `ends[r - 1]` (0 for r = 0), over a column of cumulative ends.

  Reads the memory-mapped `ends` field in place: no per-block array is copied into memory.
  """

  __slots__ = ("ends",)

  def __init__(self, ends: np.ndarray):
    self.ends = ends

  def __getitem__(self, r: int) -> int:
    return int(self.ends[r - 1]) if r > 0 else 0


def _ends_to_splits(ends: np.ndarray) -> np.ndarray:
  """`[n]` cumulative ends → `[n + 1]` int64 splits starting at 0."""
  splits = np.zeros(len(ends) + 1, dtype=np.int64)
  splits[1:] = ends
  return splits


class _StringColumn:
  """A lazy, read-only sequence of one string per block (doc id, title or text)."""

  def __init__(self, corpus: "Corpus", kind: str):
    self._corpus = corpus
    self._kind = kind

  def __len__(self) -> int:
    return len(self._corpus)

  def __getitem__(self, i: Any) -> Any:
    if isinstance(i, (int, np.integer)):
      return self._corpus._string(int(i), self._kind)  # pylint: disable=protected-access
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    positions = np.asarray(i)
    return np.asarray([self[int(j)] for j in positions.reshape(-1)],
                      dtype=object).reshape(positions.shape)

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))


class Corpus:
  """A blocked knowledge corpus (REALM §3.4), read lazily from memory-mapped columns.

  `corpus[i]` is the block at position i as a `corpus.Block`; `corpus.block_ids[i]` its id
  (positions equal ids for corpora made by `build_corpus` or `split_into_blocks`). Per-block index
  arrays (`block_ids`, `lengths`) are in memory; token ids, offsets and strings stay in the mapped
  files until a block is touched, so memory does not grow with the corpus beyond the pages the OS
  keeps. Retriever inputs for any subset of positions come from `retrieval_inputs`.

  Attributes:
    tokenizer: the tokenizer of the ids.
    max_block_length: the block length limit (288 in REALM).
    block_ids: `[num_blocks]` int64, ascending.
    lengths: `[num_blocks]` int32 length of `[CLS] title [SEP] body [SEP]` per block.
    doc_ids, titles, texts: lazy sequences of str, one per block (`titles[i]`, `texts[5:9]`, …).
  """

  def __init__(self, blocks: Sequence[corpus_lib.Block], tokenizer: tokenization.Tokenizer,
               max_block_length: int = corpus_lib.DEFAULT_MAX_BLOCK_LENGTH):
    """Builds an in-memory corpus from blocks (small corpora and tests; see `build_corpus`).

    Args:
      blocks: the blocks, any order (they are sorted by `block_id`); blocks of one document must be
        consecutive once sorted.
      tokenizer: the tokenizer that produced the ids (supplies the special ids).
      max_block_length: the block length limit the corpus was built with.

    Raises:
      ValueError: if two blocks share a block id, or a document's blocks are not consecutive.
    """
    blocks = sorted(blocks, key=lambda b: b.block_id)
    block_ids = np.asarray([b.block_id for b in blocks], dtype=np.int64)
    if len(block_ids) > 1 and np.any(np.diff(block_ids) == 0):
      dup = block_ids[np.flatnonzero(np.diff(block_ids) == 0)[0]]
      raise ValueError(f"duplicate block_id {dup}")
    buffers = {name: io.BytesIO() for name in _COLUMNS}
    writer = PartWriter(buffers, tokenizer)
    for b in blocks:
      writer.add(b)
    description = writer.close()
    data = {name: buf.getvalue() for name, buf in buffers.items()}
    if description["offsets_dtype"] == "<u2":
      data["offsets"] = np.frombuffer(data["offsets"], "<i4").astype("<u2").tobytes()
      description["files"]["offsets"]["bytes"] = len(data["offsets"])
    self._init([Part.from_description(description, buffers=data)], tokenizer, max_block_length,
               block_ids=block_ids, fingerprint=None, directory=None)

  @classmethod
  def open(cls, directory: fileio.PathLike, tokenizer: tokenization.Tokenizer, *,
           cache_dir: str | os.PathLike | None = None, show_progress: bool = False) -> "Corpus":
    """Opens a committed corpus directory (see the module docstring) without reading its blocks.

    A URL directory (`gs://…`) is copied to `cache_dir` first (default `fileio.default_cache_dir()`:
    `$REALM_JAX_CACHE` or `~/.cache/realm_jax`) by `local_part_dirs`; files already there with the
    right size are re-used.

    Args:
      directory: `…/realm_corpus/<name>`, local or URL.
      tokenizer: must be the tokenizer the corpus was built with.
      cache_dir: where URL corpora are copied to.
      show_progress: show a bar while copying.

    Raises:
      CorpusStoreError: if the corpus is not committed, was built with another tokenizer, or a
        column file is missing or truncated (naming the path).
    """
    directory = fileio.as_path(directory)
    metadata = read_metadata(directory)
    if metadata["config"]["tokenizer_fingerprint"] != tokenizer.fingerprint():
      raise CorpusStoreError(f"{fileio.join(directory, METADATA_FILE)}: field "
                             "'config.tokenizer_fingerprint' does not match the given tokenizer")
    part_info = local_part_dirs(directory, metadata, cache_dir, show_progress)
    corpus = cls.__new__(cls)
    corpus._init([Part.from_description(d, directory=local) for local, d in part_info], tokenizer,
                 metadata["config"]["max_block_length"], block_ids=None,
                 fingerprint=metadata["fingerprint"], directory=directory)
    corpus._part_info = part_info
    if len(corpus) != metadata["num_blocks"]:
      raise CorpusStoreError(f"{fileio.join(directory, METADATA_FILE)}: field 'num_blocks' = "
                             f"{metadata['num_blocks']} but the parts hold {len(corpus)} blocks")
    return corpus

  def _init(self, parts: list[Part], tokenizer: tokenization.Tokenizer, max_block_length: int,
            block_ids: np.ndarray | None, fingerprint: str | None,
            directory: fileio.Path | None) -> None:
    self.tokenizer = tokenizer
    self.max_block_length = int(max_block_length)
    self.directory = directory
    self._parts = parts
    counts = np.asarray([len(p.blocks) for p in parts], dtype=np.int64)
    self._part_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(self._part_starts[-1])
    self.block_ids = np.arange(n, dtype=np.int64) if block_ids is None else block_ids
    # Per-part split arrays ([n_part + 1] int64): views computed once, 8 bytes per block each.
    self._splits = []
    lengths = np.empty(n, dtype=np.int32)
    for k, p in enumerate(parts):
      blocks = p.blocks
      splits = {name: _Splits(blocks[name]) for name in
                ("token_end", "body_end", "sentence_end", "text_end")}
      doc_splits = {name: _Splits(p.docs[name]) for name in ("id_end", "title_end")}
      self._splits.append((splits, doc_splits))
      lo, hi = self._part_starts[k], self._part_starts[k + 1]
      lengths[lo:hi] = corpus_lib.NUM_SPECIAL_TOKENS_PER_BLOCK + np.diff(
          blocks["token_end"], prepend=0)
    self.lengths = lengths
    self._fingerprint = fingerprint
    self._doc_index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    self.doc_ids = _StringColumn(self, "doc_id")
    self.titles = _StringColumn(self, "title")
    self.texts = _StringColumn(self, "text")

  # -- positions ------------------------------------------------------------------------------------

  def __len__(self) -> int:
    return int(self._part_starts[-1])

  def _locate(self, i: int) -> tuple[int, int]:
    """(part index, row in the part) of position `i` (negative counts from the end)."""
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"block position {i} out of range for a corpus of {n} blocks")
    i %= n
    k = int(np.searchsorted(self._part_starts, i, side="right")) - 1
    return k, i - int(self._part_starts[k])

  def _string(self, i: int, kind: str) -> str:
    k, r = self._locate(i)
    part = self._parts[k]
    splits, doc_splits = self._splits[k]
    if kind == "text":
      lo, hi = splits["text_end"][r], splits["text_end"][r + 1]
      return bytes(part.text[lo:hi]).decode("utf-8")
    d = int(part.blocks[r]["doc"])
    key, column = ("id_end", part.doc_ids) if kind == "doc_id" else ("title_end", part.titles)
    lo, hi = doc_splits[key][d], doc_splits[key][d + 1]
    return bytes(column[lo:hi]).decode("utf-8")

  def _tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    k, r = self._locate(i)
    part = self._parts[k]
    splits = self._splits[k][0]["token_end"]
    lo, hi = int(splits[r]), int(splits[r + 1])
    n_title = int(part.blocks[r]["title_len"])
    ids = np.asarray(part.tokens[lo:hi], dtype=np.int32)
    return ids[:n_title], ids[n_title:]

  def title_ids(self, i: int) -> np.ndarray:
    """`[num_title_tokens]` int32 title ids of the block at position i (a copy)."""
    return self._tokens(i)[0]

  def body_ids(self, i: int) -> np.ndarray:
    """`[num_body_tokens]` int32 body ids of the block at position i (a copy)."""
    return self._tokens(i)[1]

  def body_offsets(self, i: int) -> np.ndarray:
    """`[num_body_tokens, 2]` int32 char offsets `[start, end)` into `texts[i]` (a copy)."""
    k, r = self._locate(i)
    splits = self._splits[k][0]["body_end"]
    return np.asarray(self._parts[k].offsets[splits[r]:splits[r + 1]], dtype=np.int32)

  def sentence_starts(self, i: int) -> np.ndarray:
    """`[num_sentences]` int32 sentence start indices into `body_ids(i)` (a copy)."""
    k, r = self._locate(i)
    splits = self._splits[k][0]["sentence_end"]
    return np.asarray(self._parts[k].sentences[splits[r]:splits[r + 1]], dtype=np.int32)

  def __getitem__(self, i: int) -> corpus_lib.Block:
    """The block at position `i` (negative indices count from the end); raises `IndexError`."""
    i = self._locate(i)
    i = int(self._part_starts[i[0]]) + i[1]
    title_ids, body_ids = self._tokens(i)
    return corpus_lib.Block(int(self.block_ids[i]), self.doc_ids[i], self.titles[i], self.texts[i],
                            title_ids, body_ids, self.body_offsets(i), self.sentence_starts(i))

  def __iter__(self) -> Iterator[corpus_lib.Block]:
    return (self[i] for i in range(len(self)))

  def positions(self, block_ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """Positions of the given block ids (any shape, int64 result of the same shape).

    Raises:
      KeyError: if an id is not in the corpus.
    """
    ids = np.asarray(block_ids, dtype=np.int64)
    pos = np.searchsorted(self.block_ids, ids)
    found = np.zeros(ids.shape, dtype=bool)
    inside = pos < len(self)
    found[inside] = self.block_ids[pos[inside]] == ids[inside]
    bad = ~found
    if np.any(bad):
      raise KeyError(f"block ids not in the corpus: {ids[bad][:10].tolist()}")
    return pos

  def positions_of_doc(self, doc_id: str) -> np.ndarray:
    """`[num_blocks_of_doc]` int64 positions of the blocks cut from `doc_id` (empty if none).

    The first call sorts the 64-bit doc-id hashes of every document (16 bytes per document); a
    lookup is then a binary search plus a check of the stored id.
    """
    if self._doc_index is None:
      hashes, firsts, parts = [], [], []
      for k, p in enumerate(self._parts):
        hashes.append(np.asarray(p.docs["id_hash"]))
        block_ends = np.asarray(p.docs["block_end"])
        firsts.append(self._part_starts[k] + np.concatenate([[0], block_ends[:-1]]))
        parts.append(np.full(len(block_ends), k, dtype=np.int32))
      hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
      order = np.argsort(hashes, kind="stable")
      self._doc_index = (hashes[order],
                         (np.concatenate(firsts) if firsts else np.zeros(0, np.int64))[order])
    sorted_hashes, first_blocks = self._doc_index
    key = np.uint64(doc_id_hash(doc_id))
    lo = int(np.searchsorted(sorted_hashes, key, side="left"))
    hi = int(np.searchsorted(sorted_hashes, key, side="right"))
    for j in range(lo, hi):
      first = int(first_blocks[j])
      if self.doc_ids[first] != doc_id:
        continue  # A 64-bit hash collision with another document.
      k, r = self._locate(first)
      part = self._parts[k]
      d = int(part.blocks[r]["doc"])
      end = int(part.docs[d]["block_end"]) + int(self._part_starts[k])
      return np.arange(first, end, dtype=np.int64)
    return np.zeros(0, dtype=np.int64)

  @property
  def fingerprint(self) -> str:
    """`corpus.corpus_fingerprint` of the blocks and `max_block_length` (stored, or computed once)."""
    if self._fingerprint is None:
      self._fingerprint = fingerprint_of(self)
    return self._fingerprint

  def retrieval_inputs(self, indices: Sequence[int] | np.ndarray | None = None,
                       max_length: int | None = None,
                       pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Document-tower inputs for the blocks at `indices` (all blocks when None).

    See `corpus.retrieval_inputs` for the layout; `max_length` defaults to the corpus'
    `max_block_length`. Returns `[len(indices), width]` int32 arrays.

    Raises:
      IndexError: for a position outside the corpus.
    """
    if indices is None:
      indices = np.arange(len(self))
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"block positions outside [0, {len(self)})")
    pairs = [self._tokens(int(i)) for i in indices]
    return corpus_lib.retrieval_inputs(
        {"title_ids": [t for t, _ in pairs], "body_ids": [b for _, b in pairs]}, self.tokenizer,
        max_length or self.max_block_length, pad_to_multiple_of)

  def __repr__(self) -> str:
    where = f", directory={self.directory}" if self.directory is not None else ""
    return (f"Corpus({len(self)} blocks, max_block_length={self.max_block_length}, "
            f"tokenizer={self.tokenizer!r}{where})")


def fingerprint_of(corpus: Corpus, show_progress: bool = False,
                   parts: Iterable[Part] | None = None) -> str:
  """`corpus.corpus_fingerprint(iter(corpus), corpus.max_block_length)`, streamed over the columns.

  Hashes the stored bytes directly (no `Block` objects).

  Args:
    corpus: the corpus (its block ids, part sizes and block length).
    show_progress: show a bar over blocks.
    parts: the corpus' parts, one at a time (default: `corpus._parts`). `build_corpus` passes
      freshly mapped parts that are unmapped after use, so the pages this pass reads are released
      part by part and the peak RSS is bounded by the largest part, not by the corpus.
  """
  h = hashlib.sha256(b"realm_jax corpus v1\n")
  h.update(f"max_block_length={corpus.max_block_length}\n".encode())
  n8 = lambda x: int(x).to_bytes(8, "little")
  block_ids = corpus.block_ids
  parts = corpus._parts if parts is None else parts  # pylint: disable=protected-access
  with tqdm.tqdm(total=len(corpus), desc="Corpus fingerprint", unit="block",
                 disable=not show_progress) as bar:
    for k, part in enumerate(parts):
      base = int(corpus._part_starts[k])  # pylint: disable=protected-access
      tokens = np.asarray(part.tokens)
      token_splits = _ends_to_splits(part.blocks["token_end"])
      text_splits = _ends_to_splits(part.blocks["text_end"])
      doc_splits = {name: _ends_to_splits(part.docs[name]) for name in ("id_end", "title_end")}
      doc_of = np.asarray(part.blocks["doc"])
      title_lens = np.asarray(part.blocks["title_len"])
      last_doc, doc_bytes = -1, b""
      for r in range(len(part.blocks)):
        d = int(doc_of[r])
        if d != last_doc:
          i0, i1 = doc_splits["id_end"][d], doc_splits["id_end"][d + 1]
          t0, t1 = doc_splits["title_end"][d], doc_splits["title_end"][d + 1]
          doc_id, title = bytes(part.doc_ids[i0:i1]), bytes(part.titles[t0:t1])
          doc_bytes = n8(len(doc_id)) + doc_id + n8(len(title)) + title
          last_doc = d
        text = bytes(part.text[text_splits[r]:text_splits[r + 1]])
        ids = tokens[token_splits[r]:token_splits[r + 1]].astype("<i4")
        n_title = int(title_lens[r])
        title_ids, body_ids = ids[:n_title].tobytes(), ids[n_title:].tobytes()
        h.update(int(block_ids[base + r]).to_bytes(8, "little", signed=True))
        h.update(doc_bytes)
        h.update(n8(len(text)) + text)
        h.update(n8(len(title_ids)) + title_ids)
        h.update(n8(len(body_ids)) + body_ids)
        if r % 65536 == 65535:
          bar.update(65536)
      bar.update(len(part.blocks) % 65536)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Building a corpus
# ---------------------------------------------------------------------------------------------------


def _read_json(path: fileio.PathLike) -> dict[str, Any]:
  try:
    text = fileio.read_text(path)
  except FileNotFoundError:
    raise CorpusStoreError(f"{path}: missing") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise CorpusStoreError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def read_metadata(directory: fileio.PathLike) -> dict[str, Any]:
  """The committed `metadata.json` of a corpus directory.

  Raises:
    CorpusStoreError: if the corpus is not committed (no metadata) or the file is unreadable.
  """
  path = fileio.join(directory, METADATA_FILE)
  if not fileio.isfile(path):
    raise CorpusStoreError(f"{path}: missing; the corpus at {directory} is not built (or its build "
                           "did not finish)")
  metadata = _read_json(path)
  if metadata.get("format") != STORE_FORMAT:
    raise CorpusStoreError(f"{path}: field 'format' = {metadata.get('format')!r}, expected "
                           f"{STORE_FORMAT}")
  return metadata


def local_part_dirs(directory: fileio.PathLike, metadata: dict[str, Any],
                    cache_dir: str | os.PathLike | None = None,
                    show_progress: bool = False) -> list[tuple[pathlib.Path, dict[str, Any]]]:
  """`(local directory, part.json description)` of every part listed in `metadata`.

  A local corpus is used in place. The columns of a URL corpus are copied once into the local cache
  by `fileio.local_copy` (one cache folder per part, each file checked by size and re-used while
  unchanged), because memory maps need local files.

  Raises:
    CorpusStoreError: for a missing or malformed `part.json`.
    OSError: from the copy (a short download names the object).
  """
  out = []
  for entry in tqdm.tqdm(metadata["parts"], desc=f"Corpus parts of {fileio.basename(directory)}",
                         unit="part", disable=not show_progress or not fileio.is_url(directory)):
    part = fileio.join(directory, entry["name"])
    description = _read_json(fileio.join(part, PART_FILE))
    if isinstance(part, pathlib.Path):
      out.append((part, description))
      continue
    copies = [fileio.local_copy(fileio.join(part, _file_name(name)), cache_dir) for name in _COLUMNS]
    out.append((copies[0].parent, description))
  return out


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """What determines a prepared corpus; `name` hashes all of it.

  Attributes:
    sources: the source files (globs expanded), in block order.
    source_sha256: sha256 of each source file's bytes.
    tokenizer_fingerprint: `Tokenizer.fingerprint()`.
    max_block_length: block length limit in tokens (288 in REALM).
    drop_excluded_titles: drop "List of…" / "(disambiguation)" pages (REALM §3.4).
  """
  sources: tuple[str, ...]
  source_sha256: tuple[str, ...]
  tokenizer_fingerprint: str
  max_block_length: int
  drop_excluded_titles: bool

  @property
  def name(self) -> str:
    """`"c" + sha256(format, length, flags, tokenizer, source suffixes and contents)[:20]`.

    Paths do not enter the name (only file contents do), so moving the files keeps the name.
    """
    key = "\n".join([f"corpus-store-format={STORE_FORMAT}", f"max_block_length={self.max_block_length}",
                     f"drop_excluded_titles={self.drop_excluded_titles}",
                     f"tokenizer={self.tokenizer_fingerprint}",
                     *(f"{_suffixes(p)}:{d}" for p, d in zip(self.sources, self.source_sha256))])
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:20]


def _suffixes(path: str) -> list[str]:
  """`pathlib`-style suffixes of a local path or URL (`['.jsonl', '.gz']`)."""
  return pathlib.PurePosixPath(fileio.basename(path)).suffixes


def corpus_spec(sources: str | os.PathLike | Sequence[str | os.PathLike],
                tokenizer: tokenization.Tokenizer,
                max_block_length: int = corpus_lib.DEFAULT_MAX_BLOCK_LENGTH,
                drop_excluded_titles: bool = True) -> CorpusSpec:
  """Expands the sources (paths or glob patterns, local or URL) and hashes their contents.

  Raises:
    FileNotFoundError: for a missing source or a glob that matches nothing, naming it.
    ValueError: if `sources` is empty.
  """
  paths = [fileio.as_path(p) for p in fileio.expand_patterns(sources, "corpus source")]
  resolved = tuple(os.fspath(p.resolve()) if isinstance(p, pathlib.Path) else p for p in paths)
  digests = []
  for p in resolved:
    try:
      digests.append(fileio.sha256(p))
    except FileNotFoundError:
      raise
    except OSError as e:  # Permission denied, an object store's 403, a read error.
      raise CorpusStoreError(f"{p}: cannot read the corpus source ({type(e).__name__}: {e})") from e
  digests = tuple(digests)
  return CorpusSpec(resolved, digests, tokenizer.fingerprint(), int(max_block_length),
                    bool(drop_excluded_titles))


def corpus_directory(data_dir: fileio.PathLike, spec: CorpusSpec) -> fileio.Path:
  """`data_dir/realm_corpus/<spec.name>`."""
  return fileio.join(data_dir, STORE_DIRNAME, spec.name)


def _build_part(spec: CorpusSpec, index: int, directory: fileio.Path,
                tokenizer: tokenization.Tokenizer, show_progress: bool,
                extra: dict[str, Any]) -> dict[str, Any]:
  """Reads, blocks and writes the part of source `index` (block ids restart at 0 in each part)."""
  path, digest = spec.sources[index], spec.source_sha256[index]
  if fileio.sha256(path) != digest:
    raise CorpusStoreError(f"{path}: its content differs from the one the corpus config was made "
                           "from (changed between processes, or during the build); rebuild")
  bar = tqdm.tqdm(desc=f"Blocking {fileio.basename(path)}", unit="doc", disable=not show_progress)
  documents = _unique_documents(corpus_lib.iter_documents(path, spec.drop_excluded_titles), path)
  blocks = corpus_lib.iter_blocks(documents, tokenizer, spec.max_block_length,
                                  on_documents=bar.update)
  try:
    description = write_part(fileio.join(directory, part_name(index)), blocks, tokenizer,
                             extra={"source": path, "source_sha256": digest, **extra})
  except ValueError as e:
    if isinstance(e, corpus_lib.DataFormatError):  # Already names the file, line and field.
      raise
    raise corpus_lib.DataFormatError(f"{path}: {e}") from e
  finally:
    bar.close()
  if fileio.sha256(path) != digest:  # Changed while being read: the part may mix two versions.
    fileio.rmtree(fileio.join(directory, part_name(index)))
    raise CorpusStoreError(f"{path}: changed while the corpus was being built; rebuild")
  return description


def _unique_documents(documents: Iterable[corpus_lib.Document],
                      path: str) -> Iterator[corpus_lib.Document]:
  """Passes documents through; DataFormatError on a doc id seen before in this source file.

  Keeps an 8-byte hash per document of the file (the ids themselves are not kept).
  """
  seen: set[int] = set()
  for k, document in enumerate(documents):
    key = doc_id_hash(document.doc_id)
    if key in seen:
      raise corpus_lib.DataFormatError(
          f"{path}: duplicate doc_id {document.doc_id!r} (document {k}); doc_ids identify gold and "
          "trivial documents and must be unique")
    seen.add(key)
    yield document


def _part_committed(directory: fileio.Path, index: int, spec: CorpusSpec) -> dict[str, Any] | None:
  path = fileio.join(directory, part_name(index), PART_FILE)
  if not fileio.isfile(path):
    return None
  description = _read_json(path)
  if (description.get("format") != STORE_FORMAT
      or description.get("source_sha256") != spec.source_sha256[index]):
    raise CorpusStoreError(f"{path}: field 'source_sha256' belongs to another version of "
                           f"{spec.sources[index]} (a corpus shard changed between processes)")
  return description


def _check_unique_doc_ids(corpus: Corpus, directory: fileio.Path) -> None:
  """Raises `CorpusStoreError` naming a doc id that two parts share (ids must be unique)."""
  hashes = np.concatenate([np.asarray(p.docs["id_hash"]) for p in corpus._parts]  # pylint: disable=protected-access
                          ) if corpus._parts else np.zeros(0, np.uint64)  # pylint: disable=protected-access
  order = np.argsort(hashes, kind="stable")
  same = np.flatnonzero(np.diff(hashes[order]) == 0)
  if not len(same):
    return
  key = np.uint64(hashes[order][same[0]])
  for k, p in enumerate(corpus._parts):  # pylint: disable=protected-access
    for d in np.flatnonzero(np.asarray(p.docs["id_hash"]) == key):
      first = int(corpus._part_starts[k]) + (int(p.docs[d - 1]["block_end"]) if d else 0)  # pylint: disable=protected-access
      raise CorpusStoreError(f"{directory}: duplicate doc_id {corpus.doc_ids[first]!r} in two "
                             "source files; doc_ids identify gold and trivial documents and must "
                             "be unique")


def build_corpus(sources: str | os.PathLike | Sequence[str | os.PathLike],
                 tokenizer: tokenization.Tokenizer, data_dir: fileio.PathLike,
                 max_block_length: int = corpus_lib.DEFAULT_MAX_BLOCK_LENGTH, *,
                 drop_excluded_titles: bool = True, show_progress: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 split_across_processes: bool | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 wait_timeout_s: float = 24 * 3600.0, spec_wait_s: float = 600.0) -> Corpus:
  """Prepares (once) and opens the blocked knowledge corpus of `sources` (REALM §3.4).

  The first call reads and blocks the documents of every source file and writes one part per file
  under `data_dir/realm_corpus/<name>/`, streaming (memory does not grow with the corpus); later
  calls with the same file contents, tokenizer and length open the prepared corpus at once.

  With `split_across_processes` (default: when `process_count > 1` and `data_dir` is a URL, i.e.
  shared by all hosts), process p builds the parts of sources p, p + P, …; process 0 waits for
  every part, checks doc ids, computes the fingerprint and commits `metadata.json`; the others wait
  for it. Otherwise each process builds every missing part itself (local data directories are not
  shared between hosts; processes sharing one commit identical files atomically).

  Args:
    sources: corpus files or glob patterns (local or URL; `.json(.gz)` SQuAD, `.jsonl(.gz)`,
      `.txt`), blocked in this order (each glob's matches sorted by name).
    tokenizer: the tokenizer of the model that will embed the blocks.
    data_dir: the data directory (local or URL).
    max_block_length: `3 + title + body` limit in tokens.
    drop_excluded_titles: drop list / index / outline / disambiguation pages.
    show_progress: show progress bars.
    process_index, process_count: this process and how many build together
      (`jax.process_index()`, `jax.process_count()` in a job).
    split_across_processes: see above.
    cache_dir: where a URL corpus is copied for memory mapping (see `Corpus.open`).
    wait_timeout_s: how long a process waits for the others' parts or the commit.
    spec_wait_s: how long a process waits for process 0's view of the sources to match its own
      before it reports a source that changed between processes.

  Returns:
    The `Corpus`, memory-mapped.

  Raises:
    FileNotFoundError: for a missing source or a glob that matches nothing.
    corpus.DataFormatError: for a malformed source (naming file, line and field) or a doc id
      repeated inside a source.
    CorpusStoreError: a source changed between processes or during the build, a doc id shared by
      two sources, a truncated column file, or a wait that timed out. Nothing is committed then.
  """
  spec = corpus_spec(sources, tokenizer, max_block_length, drop_excluded_titles)
  directory = corpus_directory(data_dir, spec)
  if fileio.isfile(fileio.join(directory, METADATA_FILE)):
    return Corpus.open(directory, tokenizer, cache_dir=cache_dir, show_progress=show_progress)
  if split_across_processes is None:
    split_across_processes = process_count > 1 and fileio.is_url(data_dir)
  num_parts = len(spec.sources)
  mine = (range(process_index, num_parts, process_count) if split_across_processes
          else range(num_parts))
  if split_across_processes:
    _agree_on_spec(data_dir, spec, process_index, min(wait_timeout_s, spec_wait_s))
  start = time.perf_counter()
  for index in mine:
    if _part_committed(directory, index, spec) is None:
      _build_part(spec, index, directory, tokenizer, show_progress,
                  extra={"process_index": process_index, "process_count": process_count})
  if split_across_processes and process_index != 0:
    _wait_for(lambda: fileio.isfile(fileio.join(directory, METADATA_FILE)),
              f"{fileio.join(directory, METADATA_FILE)} (process 0 commits the corpus)",
              wait_timeout_s)
    return Corpus.open(directory, tokenizer, cache_dir=cache_dir, show_progress=show_progress)
  descriptions = []
  for index in range(num_parts):
    if split_across_processes:
      _wait_for(lambda i=index: _part_committed(directory, i, spec) is not None,
                f"{fileio.join(directory, part_name(index), PART_FILE)}", wait_timeout_s)
    descriptions.append(_part_committed(directory, index, spec))
  metadata = {
      "format": STORE_FORMAT,
      "config": {"sources": list(spec.sources), "source_sha256": list(spec.source_sha256),
                 "tokenizer_fingerprint": spec.tokenizer_fingerprint,
                 "max_block_length": spec.max_block_length,
                 "drop_excluded_titles": spec.drop_excluded_titles},
      "parts": [{"name": part_name(i), "num_blocks": d["num_blocks"], "num_docs": d["num_docs"]}
                for i, d in enumerate(descriptions)],
      "num_blocks": int(sum(d["num_blocks"] for d in descriptions)),
      "num_docs": int(sum(d["num_docs"] for d in descriptions)),
      "fingerprint": None,
  }
  corpus = _open_uncommitted(directory, metadata, tokenizer, cache_dir)
  _check_unique_doc_ids(corpus, directory)
  metadata["fingerprint"] = fingerprint_of(
      corpus, show_progress=show_progress,
      parts=remapped_parts(corpus._part_info))  # pylint: disable=protected-access
  metadata["build_seconds"] = round(time.perf_counter() - start, 3)
  fileio.write_atomic(fileio.join(directory, METADATA_FILE),
                      json.dumps(metadata, indent=1, sort_keys=True))
  log.info("corpus %s: %d blocks from %d documents, fingerprint %s…", fileio.basename(directory),
           metadata["num_blocks"], metadata["num_docs"], metadata["fingerprint"][:12])
  return Corpus.open(directory, tokenizer, cache_dir=cache_dir, show_progress=show_progress)


def _open_uncommitted(directory: fileio.Path, metadata: dict[str, Any],
                      tokenizer: tokenization.Tokenizer,
                      cache_dir: str | os.PathLike | None) -> Corpus:
  """Opens the parts listed in a not-yet-written `metadata` (to check and fingerprint them)."""
  part_info = local_part_dirs(directory, metadata, cache_dir)
  corpus = Corpus.__new__(Corpus)
  corpus._init([Part.from_description(d, directory=local) for local, d in part_info], tokenizer,  # pylint: disable=protected-access
               metadata["config"]["max_block_length"], block_ids=None, fingerprint=None,
               directory=directory)
  corpus._part_info = part_info  # pylint: disable=protected-access
  return corpus


def _agree_on_spec(data_dir: fileio.PathLike, spec: CorpusSpec, process_index: int,
                   timeout_s: float) -> None:
  """Makes every process build the same corpus: process 0 publishes its view of the sources.

  Process 0 writes `realm_corpus/specs/<key>.json` (key: the source paths, tokenizer and length;
  value: the content hashes); the others wait until it names their own corpus.

  Raises:
    CorpusStoreError: naming the first source whose content differs between this process and
      process 0 (a corpus shard that changed between processes), after `timeout_s`.
  """
  key = hashlib.sha256(json.dumps([list(spec.sources), spec.tokenizer_fingerprint,
                                   spec.max_block_length, spec.drop_excluded_titles]
                                  ).encode()).hexdigest()[:20]
  path = fileio.join(data_dir, STORE_DIRNAME, "specs", f"{key}.json")
  mine = {"name": spec.name, "source_sha256": list(spec.source_sha256)}
  if process_index == 0:
    fileio.makedirs(fileio.dirname(path))
    fileio.write_atomic(path, json.dumps(mine, sort_keys=True))
    return
  deadline = time.monotonic() + timeout_s
  theirs = None
  while time.monotonic() <= deadline:
    if fileio.isfile(path):
      try:
        theirs = json.loads(fileio.read_text(path))
      except (json.JSONDecodeError, FileNotFoundError):
        theirs = None
      if theirs and theirs.get("name") == spec.name:
        return
    time.sleep(_WAIT_POLL_S)
  if theirs is None:
    raise CorpusStoreError(f"{path}: process 0 did not publish its corpus sources within "
                           f"{timeout_s:.0f} s")
  for source, a, b in zip(spec.sources, theirs.get("source_sha256", []), spec.source_sha256):
    if a != b:
      raise CorpusStoreError(f"{source}: changed between processes (process 0 hashed {a[:12]}…, "
                             f"process {process_index} hashes {b[:12]}…); rebuild once the "
                             "sources are stable")
  raise CorpusStoreError(f"{path}: process 0 builds corpus {theirs.get('name')}, process "
                         f"{process_index} expected {spec.name}")


def remapped_parts(part_info: Sequence[tuple[pathlib.Path, dict[str, Any]]]) -> Iterator[Part]:
  """The parts of `local_part_dirs`, each freshly memory-mapped when it is reached.

  For one pass over a whole corpus (the fingerprint): each part is unmapped once the pass moves on,
  so the pages it read leave the process' RSS, which stays bounded by the largest part.
  """
  for local, description in part_info:
    yield Part.from_description(description, directory=local)


def _wait_for(predicate: Any, what: str, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise CorpusStoreError(f"{what}: still missing after {timeout_s:.0f} s of waiting")
    time.sleep(_WAIT_POLL_S)
