"""TFDS builders (array_record, no TensorFlow) for the Open-QA questions.

The Open-QA question sets (REALM §4.1, ORQA §6) are prepared once into a TFDS data directory and
read back by random access. The builder-config name is a hash of the source file contents, so
different question sets never collide in one data_dir and a second `build_questions` call with the
same inputs re-uses the prepared dataset. The knowledge corpus has its own streamed, memory-mapped
store (`data/corpus_store.py`): at Wikipedia scale a TFDS read-back of 13.35M examples would be
materialised in Python objects.

TensorFlow is never imported: the array_record file format and `as_data_source` run on numpy only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from realm_jax import fileio
from realm_jax.data import questions as questions_lib

# Bump when the blocking or the stored layout changes, so old prepared data is not re-used.
_QUESTIONS_FORMAT = 1
_READ_BATCH = 512


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The `DatasetInfo` of this package's builders: datasets that exist only where they are prepared.

  A TFDS builder whose data directory is not prepared yet calls `info.initialize_from_bucket()`,
  which looks the dataset up on `gs://tfds-data` and first creates a temporary directory that it
  never deletes when nothing is found there: each preparation left an empty `tmp*tfds` directory in
  the system temp directory (found by the soak test, tests/test_soak.py). These datasets are never
  on that bucket, so the look-up is skipped.
  """

  def initialize_from_bucket(self) -> None:
    return None


def _file_sha256(path: fileio.PathLike) -> str:
  """sha256 of a local or URL file; FileNotFoundError "source file not found: {path}"."""
  if not fileio.isfile(path):
    raise FileNotFoundError(f"source file not found: {path}")
  return fileio.sha256(path)


def _resolved(path: fileio.Path) -> str:
  return os.fspath(path.resolve()) if isinstance(path, pathlib.Path) else path


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> list[str]:
  return [_text(v) for v in values]


def _read_all(data_source: Any, desc: str, show_progress: bool) -> list[dict[str, Any]]:
  """All examples of a TFDS data source, in index order, with a progress bar."""
  n = len(data_source)
  out: list[dict[str, Any]] = []
  with tqdm.tqdm(total=n, desc=desc, unit="ex", disable=not show_progress) as bar:
    for lo in range(0, n, _READ_BATCH):
      out.extend(data_source.__getitems__(list(range(lo, min(n, lo + _READ_BATCH)))))
      bar.update(min(n, lo + _READ_BATCH) - lo)
  return out



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

  A split's path may be a glob pattern (local or URL): its matches, sorted by name, are read one
  after the other into that split.

  Raises:
    ValueError: for an unknown format or no split.
    FileNotFoundError: for a missing file, or a glob that matches nothing.
  """
  if format not in questions_lib.QUESTION_FORMATS:
    raise ValueError(f"unknown question format {format!r}; "
                     f"expected one of {questions_lib.QUESTION_FORMATS}")
  if not split_to_path:
    raise ValueError("give at least one split")
  split_paths = tuple(
      (s, _resolved(fileio.as_path(path)))
      for s, pattern in sorted(split_to_path.items())
      for path in fileio.expand_patterns(pattern, f"{s} questions"))
  digests = tuple(_file_sha256(p) for _, p in split_paths)
  key = "\n".join([f"questions-format={_QUESTIONS_FORMAT}", f"format={format}",
                   *(f"{s}:{d}" for (s, _), d in zip(split_paths, digests))])
  return OpenQAConfig(
      name="q" + hashlib.sha256(key.encode()).hexdigest()[:20],
      description=f"{format}: " + ", ".join(f"{s}={fileio.basename(p)}" for s, p in split_paths),
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
    return LocalDatasetInfo(
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
    files: dict[str, list[tuple[str, str]]] = {}
    for (split, path), digest in zip(config.split_paths, config.split_sha256):
      files.setdefault(split, []).append((path, digest))
    return {split: self._generate_examples(paths) for split, paths in files.items()}

  def _generate_examples(self, paths: list[tuple[str, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    i = 0
    for path, digest in paths:
      if _file_sha256(path) != digest:
        raise RuntimeError(f"{path} changed after the question config was made")
      for q in questions_lib.read_questions(path, self.builder_config.question_format):
        yield i, {"qid": q.qid, "question": q.question, "answers": list(q.answers),
                  "answers_are_regex": q.answers_are_regex, "gold_doc_ids": list(q.gold_doc_ids)}
        i += 1


def build_questions(split_to_path: Mapping[str, str | os.PathLike],
                    format: str,  # pylint: disable=redefined-builtin
                    data_dir: str | os.PathLike, *,
                    show_progress: bool = False) -> dict[str, list[questions_lib.Question]]:
  """Prepares (once) and loads Open-QA question splits.

  Args:
    split_to_path: e.g. `{"train": ".../train.json.gz", "dev": ".../dev.json.gz"}`.
    format: "squad_open", "nq_open", "webquestions" or "curatedtrec".
    data_dir: TFDS data directory. For a URL (`gs://…`) the prepared questions are kept in a local
      cache instead (`$REALM_JAX_CACHE` or `~/.cache/realm_jax`, under `tfds/`): array_record files
      are read through local file handles, and a question set is small enough to prepare per host.
    show_progress: show a bar while reading back.

  Returns:
    `{split: [Question, …]}` in file order.

  Raises:
    ValueError: for an unknown format.
    FileNotFoundError, corpus.DataFormatError: from the readers.
  """
  if fileio.is_url(data_dir):
    data_dir = fileio.default_cache_dir() / "tfds"
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
