"""Which knowledge corpus a job uses: sources, block length, tokenizer (REALM §3.4).

The trainer and the index-builder job must embed the same corpus (same fingerprint), so both resolve
it here. `CorpusConfig` is THE corpus configuration: ICT's data configuration, and the `corpus` field
of the fine-tuning (`finetune.OpenQADataConfig`) and pre-training (`pretrain.PretrainDataConfig`)
data configurations; the index builder takes either. `corpus_sources` lists the files in blocking
order and `load_corpus` resolves the tokenizer and opens the streamed corpus.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from realm_jax import fileio


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """The knowledge corpus Z: what the trainers train over and the index builder embeds.

  Attributes:
    sources: corpus files (SQuAD JSON, JSONL or text; `data.corpus`). Empty: the embedded SQuAD v1.1
      files (dev + the first 30 train articles, 3,997 blocks of ≤ 288 wordpieces).
    extra_sources: files appended after `sources` (e.g. a WikiText `.tokens` file, JSONL pages).
    embedded_dev_articles: with empty `sources`, > 0 keeps only the first this many embedded SQuAD
      dev articles (`data.corpus.embedded_dev_subset`, about 43 paragraphs each): a corpus small
      enough to embed in a minute on a CPU.
    max_block_length: `3 + title + body` wordpieces per block (288 in the paper).
    tokenizer: `"wordpiece"` or `"sentencepiece"`.
    tokenizer_path: vocab / model file; empty: the model checkpoint's `vocab.txt`, or the MiniLM
      package's when the model is randomly initialised.
    data_dir: TFDS data directory; empty: `WORKDIR/tfds` (shared with the trainer).

  Raises:
    ValueError: in `__post_init__` if `max_block_length < 8` or `embedded_dev_articles < 0`.
  """

  sources: tuple[str, ...] = ()
  extra_sources: tuple[str, ...] = ()
  embedded_dev_articles: int = 0
  max_block_length: int = 288
  tokenizer: str = "wordpiece"
  tokenizer_path: str = ""
  data_dir: str = ""

  def __post_init__(self):
    if self.max_block_length < 8:
      raise ValueError(f"CorpusConfig.max_block_length={self.max_block_length} is too small")
    if self.embedded_dev_articles < 0:
      raise ValueError(f"CorpusConfig.embedded_dev_articles={self.embedded_dev_articles} must be "
                       ">= 0")
    object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
    object.__setattr__(self, "extra_sources", tuple(str(s) for s in self.extra_sources))


def as_corpus_config(data: Any) -> CorpusConfig:
  """The `CorpusConfig` of `data`: itself, or the `corpus` field of a trainer's data configuration.

  The index builder takes the trainer's data configuration this way, so that one gin macro
  configures both jobs and they block the same corpus.

  Raises:
    TypeError: if `data` is neither a `CorpusConfig` nor has a `corpus` field holding one.
  """
  if isinstance(data, CorpusConfig):
    return data
  corpus = getattr(data, "corpus", None)
  if not isinstance(corpus, CorpusConfig):
    raise TypeError(f"expected a CorpusConfig or a data config with a CorpusConfig `corpus` field, "
                    f"got {type(data).__name__}")
  return corpus


def corpus_sources(config: CorpusConfig, data_dir: str) -> list[str]:
  """The corpus files of `config` in blocking order; the trainer resolves its corpus the same way.

  Empty `sources` mean the embedded SQuAD v1.1 files (dev, then train), or with
  `embedded_dev_articles` > 0 a file of the first dev articles written once under
  `data_dir/squad_subsets`; `extra_sources` follow.

  Raises:
    ValueError: if `embedded_dev_articles` is negative.
  """
  from realm_jax.data import corpus as corpus_lib
  sources = list(config.sources)
  if not sources and config.embedded_dev_articles:
    sources = [str(corpus_lib.embedded_dev_subset(config.embedded_dev_articles,
                                                  fileio.join(data_dir, "squad_subsets")))]
  elif not sources:
    embedded = corpus_lib.embedded_squad_paths()
    sources = [str(embedded["dev"]), str(embedded["train"])]
  return sources + list(config.extra_sources)


def load_corpus(data: Any, checkpoint_dir: fileio.PathLike | None, workdir: fileio.PathLike, *,
                show_progress: bool = True, process_index: int = 0, process_count: int = 1):
  """The tokenizer and the blocked knowledge corpus of a job: one resolution for every job.

  The trainers (ICT, REALM pre-training) and the index-builder job call this, so they embed the
  same corpus (same fingerprint, REALM §3.4). The corpus is streamed to `data_dir/realm_corpus/`
  once and memory-mapped (`data.corpus_store`); with a `gs://` data directory every host builds its
  share of the source files. Two jobs preparing the same corpus at the same moment commit identical
  files atomically; an `OSError` from that race is retried twice.

  Args:
    data: a `CorpusConfig`, or any job's data config (`as_corpus_config`).
    checkpoint_dir: the model's pretrained checkpoint folder (`ModelConfig.checkpoint_dir()`), whose
      vocabulary and casing the tokenizer takes (`tokenization.resolve_tokenizer`); None for a
      randomly initialised model.
    workdir: the run's work directory; the data directory defaults to `WORKDIR/tfds`.
    show_progress: progress bars while building.
    process_index, process_count: `jax.process_index()`, `jax.process_count()`.

  Returns:
    `(tokenizer, corpus)`: a `tokenization.Tokenizer` and a `data.corpus_store.Corpus`.

  Raises:
    FileNotFoundError: for a missing tokenizer or source file (or a glob that matches nothing).
    data.corpus.DataFormatError: for a malformed source (naming file, line and field).
  """
  import logging  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from realm_jax import tokenization  # pylint: disable=g-import-not-at-top
  from realm_jax.data import corpus_store  # pylint: disable=g-import-not-at-top

  config = as_corpus_config(data)
  tokenizer = tokenization.resolve_tokenizer(config.tokenizer, config.tokenizer_path, checkpoint_dir)
  data_dir = config.data_dir or fileio.join(workdir, "tfds")
  sources = corpus_sources(config, data_dir)
  for attempt in range(3):
    try:
      corpus = corpus_store.build_corpus(sources, tokenizer, data_dir, config.max_block_length,
                                         show_progress=show_progress, process_index=process_index,
                                         process_count=process_count)
      break
    except OSError as e:
      if attempt == 2 or isinstance(e, FileNotFoundError):
        raise
      logging.warning("preparing the corpus under %s raced with another job (%s); loading theirs",
                      data_dir, e)
      time.sleep(1.0 + attempt)
  logging.info("corpus: %d blocks from %d files (%s)", len(corpus), len(sources),
               corpus.fingerprint[:12])
  return tokenizer, corpus
