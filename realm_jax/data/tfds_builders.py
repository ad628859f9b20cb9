"""TFDS builders (array_record, no TensorFlow) for the knowledge corpus and Open-QA questions.

The blocked knowledge corpus Z (REALM §3.4) and the Open-QA question sets (REALM §4.1, ORQA §6) are
prepared once into a TFDS data directory and read back by random access. Builders take their
sources and tokenizer as parameters; the builder-config name is a hash of the source file contents,
the tokenizer fingerprint and the block length, so different corpora never collide in one data_dir
and a second `build_corpus` call with the same inputs re-uses the prepared dataset.

TensorFlow is never imported: the array_record file format and `as_data_source` run on numpy only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from realm_jax import tokenization
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import questions as questions_lib

# Bump when the blocking or the stored layout changes, so old prepared data is not re-used.
_CORPUS_FORMAT = 1
_QUESTIONS_FORMAT = 1
CORPUS_SPLIT = "blocks"
_READ_BATCH = 512


def _file_sha256(path: str | os.PathLike) -> str:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"source file not found: {path}")
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> list[str]:
  return [_text(v) for v in values]


# ---------------------------------------------------------------------------------------------
# Knowledge corpus
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KnowledgeCorpusConfig(tfds.core.BuilderConfig):
  """What determines a prepared corpus (the config name hashes all of it).

  Attributes:
    sources: corpus files, read with `corpus.read_documents` in this order.
    source_sha256: sha256 of each source file's bytes.
    tokenizer_fingerprint: `Tokenizer.fingerprint()` of the tokenizer.
    max_block_length: block length limit in tokens (288 in REALM).
    drop_excluded_titles: drop "List of…" / "(disambiguation)" pages (REALM §3.4).
  """
  sources: tuple[str, ...] = ()
  source_sha256: tuple[str, ...] = ()
  tokenizer_fingerprint: str = ""
  max_block_length: int = corpus_lib.DEFAULT_MAX_BLOCK_LENGTH
  drop_excluded_titles: bool = True


def corpus_config(sources: Sequence[str | os.PathLike], tokenizer: tokenization.Tokenizer,
                  max_block_length: int = corpus_lib.DEFAULT_MAX_BLOCK_LENGTH,
                  drop_excluded_titles: bool = True) -> KnowledgeCorpusConfig:
  """Builds the config of a corpus; its name is `"c" + sha256(contents, tokenizer, length)[:20]`.

  Paths do not enter the name (only file contents do), so moving the files keeps the name.

  Raises:
    FileNotFoundError: if a source is missing.
    ValueError: if `sources` is empty.
  """
  if not sources:
    raise ValueError("build a corpus from at least one source file")
  paths = tuple(str(pathlib.Path(s).resolve()) for s in sources)
  digests = tuple(_file_sha256(p) for p in paths)
  key = "\n".join([f"corpus-format={_CORPUS_FORMAT}", f"max_block_length={max_block_length}",
                   f"drop_excluded_titles={drop_excluded_titles}",
                   f"tokenizer={tokenizer.fingerprint()}",
                   *(f"{pathlib.Path(p).suffixes}:{d}" for p, d in zip(paths, digests))])
  name = "c" + hashlib.sha256(key.encode()).hexdigest()[:20]
  description = (f"{len(paths)} source(s): {', '.join(pathlib.Path(p).name for p in paths)}; "
                 f"max_block_length={max_block_length}; tokenizer={tokenizer!r}")
  return KnowledgeCorpusConfig(
      name=name, description=description, sources=paths, source_sha256=digests,
      tokenizer_fingerprint=tokenizer.fingerprint(), max_block_length=max_block_length,
      drop_excluded_titles=drop_excluded_titles)


class KnowledgeCorpusBuilder(tfds.core.GeneratorBasedBuilder):
  """One example per block of the knowledge corpus (REALM §3.4), in block-id order.

  Features: block_id (int64), doc_id, title, text (str), title_ids `[n_title]`, body_ids
  `[n_body]`, sentence_starts `[n_sentences]` (int32), body_offsets `[n_body, 2]` (int32, char
  offsets into text). Split: "blocks". Shuffling is disabled, so reading back gives block-id
  order.
  """

  name = "realm_knowledge_corpus"
  VERSION = tfds.core.Version("1.0.0")
  # No checksums or metadata files sit next to this module. Setting this also avoids TFDS
  # 4.9.10's `code_path` lookup, which needs the `importlib_resources` backport on Python ≥ 3.9.
  code_path = None
  RELEASE_NOTES = {"1.0.0": "Blocks of whole sentences, ≤ max_block_length wordpieces."}

  def __init__(self, *, config: KnowledgeCorpusConfig, tokenizer: tokenization.Tokenizer,
               data_dir: str | os.PathLike, show_progress: bool = True, **kwargs: Any):
    """Creates the builder.

    Args:
      config: from `corpus_config` (same tokenizer).
      tokenizer: tokenizes the documents when the dataset is prepared.
      data_dir: TFDS data directory.
      show_progress: show the blocking progress bar.
      **kwargs: passed to `GeneratorBasedBuilder` (e.g. `file_format`).

    Raises:
      ValueError: if the tokenizer's fingerprint differs from the config's.
    """
    if tokenizer.fingerprint() != config.tokenizer_fingerprint:
      raise ValueError("the tokenizer does not match the corpus config's tokenizer fingerprint")
    self._tokenizer = tokenizer
    self._show_progress = show_progress
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=os.fspath(data_dir), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    int_seq = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description="REALM knowledge corpus blocks: [CLS] title [SEP] body [SEP] ≤ max length.",
        features=tfds.features.FeaturesDict({
            "block_id": tfds.features.Scalar(dtype=np.int64),
            "doc_id": tfds.features.Text(),
            "title": tfds.features.Text(),
            "text": tfds.features.Text(),
            "title_ids": int_seq(),
            "body_ids": int_seq(),
            "sentence_starts": int_seq(),
            "body_offsets": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        }),
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/2002.08909",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Sources are local files.
    return {CORPUS_SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
    config: KnowledgeCorpusConfig = self.builder_config
    for path, digest in zip(config.sources, config.source_sha256):
      if _file_sha256(path) != digest:
        raise RuntimeError(f"{path} changed after the corpus config was made; rebuild the config")
    documents: list[corpus_lib.Document] = []
    for path in config.sources:
      documents.extend(corpus_lib.read_documents(path, config.drop_excluded_titles))
    blocks = corpus_lib.split_into_blocks(documents, self._tokenizer, config.max_block_length,
                                          show_progress=self._show_progress)
    for b in blocks:
      yield b.block_id, {
          "block_id": b.block_id, "doc_id": b.doc_id, "title": b.title, "text": b.text,
          "title_ids": b.title_ids, "body_ids": b.body_ids,
          "sentence_starts": b.sentence_starts, "body_offsets": b.body_offsets,
      }


def _read_all(data_source: Any, desc: str, show_progress: bool) -> list[dict[str, Any]]:
  """All examples of a TFDS data source, in index order, with a progress bar."""
  n = len(data_source)
  out: list[dict[str, Any]] = []
  with tqdm.tqdm(total=n, desc=desc, unit="ex", disable=not show_progress) as bar:
    for lo in range(0, n, _READ_BATCH):
      out.extend(data_source.__getitems__(list(range(lo, min(n, lo + _READ_BATCH)))))
      bar.update(min(n, lo + _READ_BATCH) - lo)
  return out


def build_corpus(sources: Sequence[str | os.PathLike], tokenizer: tokenization.Tokenizer,
                 data_dir: str | os.PathLike,
                 max_block_length: int = corpus_lib.DEFAULT_MAX_BLOCK_LENGTH, *,
                 drop_excluded_titles: bool = True,
                 show_progress: bool = True) -> corpus_lib.Corpus:
  """Prepares (once) and loads the blocked knowledge corpus of `sources`.

  The first call reads and blocks the documents (REALM §3.4) and writes an array_record TFDS
  dataset under `data_dir/realm_knowledge_corpus/<config name>/1.0.0/`; later calls with the same
  file contents, tokenizer and length re-use it.

  Args:
    sources: corpus files (`.json(.gz)` SQuAD, `.jsonl(.gz)`, `.txt`), blocked in this order.
    tokenizer: the tokenizer of the model that will embed the blocks.
    data_dir: TFDS data directory.
    max_block_length: `3 + title + body` limit in tokens.
    drop_excluded_titles: drop list / index / outline / disambiguation pages.
    show_progress: show progress bars.

  Returns:
    A `Corpus` sorted by block id.

  Raises:
    FileNotFoundError: for a missing source.
    corpus.DataFormatError: for a malformed source (naming file, line and field).
  """
  config = corpus_config(sources, tokenizer, max_block_length, drop_excluded_titles)
  builder = KnowledgeCorpusBuilder(config=config, tokenizer=tokenizer, data_dir=data_dir,
                                   show_progress=show_progress)
  builder.download_and_prepare()
  examples = _read_all(builder.as_data_source(split=CORPUS_SPLIT), "Loading corpus blocks",
                       show_progress)
  blocks = [
      corpus_lib.Block(
          block_id=int(e["block_id"]), doc_id=_text(e["doc_id"]), title=_text(e["title"]),
          text=_text(e["text"]), title_ids=np.asarray(e["title_ids"], np.int32),
          body_ids=np.asarray(e["body_ids"], np.int32),
          body_offsets=np.asarray(e["body_offsets"], np.int32).reshape(-1, 2),
          sentence_starts=np.asarray(e["sentence_starts"], np.int32))
      for e in examples
  ]
  return corpus_lib.Corpus(blocks, tokenizer, max_block_length)


# ---------------------------------------------------------------------------------------------
# Open-QA questions
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpenQAConfig(tfds.core.BuilderConfig):
  """What determines a prepared question set.

  Attributes:
    split_paths: `((split, path), …)` sorted by split name.
    split_sha256: sha256 of each file, same order.
    question_format: one of `questions.QUESTION_FORMATS`.
  """
  split_paths: tuple[tuple[str, str], ...] = ()
  split_sha256: tuple[str, ...] = ()
  question_format: str = ""


def questions_config(split_to_path: Mapping[str, str | os.PathLike],
                     format: str) -> OpenQAConfig:  # pylint: disable=redefined-builtin
  """Builds the config of a question set; its name hashes the format and the file contents.

  Raises:
    ValueError: for an unknown format or no split.
    FileNotFoundError: for a missing file.
  """
  if format not in questions_lib.QUESTION_FORMATS:
    raise ValueError(f"unknown question format {format!r}; "
                     f"expected one of {questions_lib.QUESTION_FORMATS}")
  if not split_to_path:
    raise ValueError("give at least one split")
  split_paths = tuple(sorted((s, str(pathlib.Path(p).resolve())) for s, p in split_to_path.items()))
  digests = tuple(_file_sha256(p) for _, p in split_paths)
  key = "\n".join([f"questions-format={_QUESTIONS_FORMAT}", f"format={format}",
                   *(f"{s}:{d}" for (s, _), d in zip(split_paths, digests))])
  return OpenQAConfig(
      name="q" + hashlib.sha256(key.encode()).hexdigest()[:20],
      description=f"{format}: " + ", ".join(f"{s}={pathlib.Path(p).name}" for s, p in split_paths),
      split_paths=split_paths, split_sha256=digests, question_format=format)


class OpenQABuilder(tfds.core.GeneratorBasedBuilder):
  """Open-QA questions (REALM §4.1): one example per question, file order kept.

  Features: qid, question (str), answers (list of str), answers_are_regex (bool), gold_doc_ids
  (list of str). Splits as given in the config (e.g. train from one file, dev from another).
  """

  name = "realm_open_qa"
  VERSION = tfds.core.Version("1.0.0")
  # No checksums or metadata files sit next to this module. Setting this also avoids TFDS
  # 4.9.10's `code_path` lookup, which needs the `importlib_resources` backport on Python ≥ 3.9.
  code_path = None
  RELEASE_NOTES = {"1.0.0": "Questions with answer strings or regexes."}

  def __init__(self, *, config: OpenQAConfig, data_dir: str | os.PathLike, **kwargs: Any):
    """Creates the builder; `**kwargs` go to `GeneratorBasedBuilder` (e.g. `file_format`)."""
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=os.fspath(data_dir), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Open-domain QA questions with answer strings or regular expressions.",
        features=tfds.features.FeaturesDict({
            "qid": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "answers_are_regex": tfds.features.Scalar(dtype=np.bool_),
            "gold_doc_ids": tfds.features.Sequence(tfds.features.Text()),
        }),
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/1906.00300",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager
    config: OpenQAConfig = self.builder_config
    return {split: self._generate_examples(path, digest)
            for (split, path), digest in zip(config.split_paths, config.split_sha256)}

  def _generate_examples(self, path: str, digest: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if _file_sha256(path) != digest:
      raise RuntimeError(f"{path} changed after the question config was made")
    for i, q in enumerate(questions_lib.read_questions(path, self.builder_config.question_format)):
      yield i, {"qid": q.qid, "question": q.question, "answers": list(q.answers),
                "answers_are_regex": q.answers_are_regex, "gold_doc_ids": list(q.gold_doc_ids)}


def build_questions(split_to_path: Mapping[str, str | os.PathLike],
                    format: str,  # pylint: disable=redefined-builtin
                    data_dir: str | os.PathLike, *,
                    show_progress: bool = False) -> dict[str, list[questions_lib.Question]]:
  """Prepares (once) and loads Open-QA question splits.

  Args:
    split_to_path: e.g. `{"train": ".../train.json.gz", "dev": ".../dev.json.gz"}`.
    format: "squad_open", "nq_open", "webquestions" or "curatedtrec".
    data_dir: TFDS data directory.
    show_progress: show a bar while reading back.

  Returns:
    `{split: [Question, …]}` in file order.

  Raises:
    ValueError: for an unknown format.
    FileNotFoundError, corpus.DataFormatError: from the readers.
  """
  builder = OpenQABuilder(config=questions_config(split_to_path, format), data_dir=data_dir)
  builder.download_and_prepare()
  out = {}
  for split in split_to_path:
    examples = _read_all(builder.as_data_source(split=split), f"Loading {split} questions",
                         show_progress)
    out[split] = [
        questions_lib.Question(
            qid=_text(e["qid"]), question=_text(e["question"]), answers=_texts(e["answers"]),
            answers_are_regex=bool(e["answers_are_regex"]),
            gold_doc_ids=tuple(_texts(e["gold_doc_ids"])))
        for e in examples
    ]
  return out
