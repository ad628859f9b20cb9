"""Pre-training examples: masked query sentences for REALM, and ICT pairs for its warm start.

REALM pre-training (Guu et al., 2020, §2.3, §3.4): the input x is ONE sentence of the pre-training
corpus, `[CLS] sentence [SEP]` padded to `query_length` (96), with one salient span masked
(Table 2 ablations: random tokens, random spans). The spans are found ONCE, here, in preprocessing,
and stored per sentence; the training loop never runs the tagger.

Pipeline (each stage a pure function, the TFDS builders only persist their output):

    blocks ──tagger──> SentenceRecord per sentence (ids, char offsets, salient spans)
           ──mask────> PretrainingExample per usable sentence (masked ids + masked-LM targets)

- `make_sentence_records`: splits each block's `text` into sentences (spaCy, in the pass that
  finds the salient spans), maps them onto the block's wordpieces through `body_offsets`, keeps
  the spans lying inside each sentence.
- `mask_sentence` / `make_pretraining_examples`: applies `masking.salient_span_mask` (default),
  `random_token_mask` or `random_span_mask`. The random generator of a sentence is seeded by
  `(seed, masking kind, block_id, sentence_index)`, so the masks do not depend on the order, the
  batching or the number of processes, and re-masking stored records reproduces them exactly.
- `make_ict_examples`: the Inverse Cloze Task of ORQA (Lee et al., 2019, §5) used as REALM's warm
  start: query = one sentence of a block, positive = the block with that sentence removed 90% of
  the time.

Storage (TFDS, `file_format='array_record'`, order = generation order, read without TensorFlow):

- `RealmSalientSentences` — the `SentenceRecord`s. Config name:
  `q{query_length}-{hash(corpus fingerprint, tokenizer, tagger model + labels + date regex)}`.
- `RealmPretrainingExamples` — the masked examples, built from the stored sentences (NER is NOT
  re-run when the masking ablation changes). Masking is applied deterministically at BUILD time,
  one dataset per masking kind. Config name:
  `{masking}-q{query_length}-m{max_masks}-s{seed}-{hash(sentences config, masking, lengths, seed)}`.

`build_pretraining_dataset` runs both (each is skipped when already prepared) and
`load_pretraining_examples` reads the result into a numpy-backed `PretrainingDataset`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from realm_jax import fileio
from realm_jax import tokenization
from realm_jax.data import corpus
from realm_jax.data import masking as masking_lib
from realm_jax.data import salient_spans
from realm_jax.data import tfds_builders

MASKING_KINDS: tuple[str, ...] = ("salient", "random_token", "random_span")
QUERY_LENGTH = 96          # REALM pre-training query length.
MAX_MASKS = 10             # masked-LM slots (official local launcher).
ICT_QUERY_LENGTH = 64      # ORQA ICT.
ICT_BLOCK_LENGTH = 288
ICT_REMOVE_SENTENCE_PROB = 0.9


# --------------------------------------------------------------------------------------------------
# Records and examples
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SentenceRecord:
  """One query sentence, unmasked, with its salient spans (stored once, masked per ablation).

  Attributes:
    block_id: the block the sentence comes from (int, ≥ 0).
    sentence_index: index of the sentence within its block (0-based).
    token_ids: `[query_length]` int32, `[CLS] sentence [SEP]` then [PAD]; a sentence longer than
      `query_length - 2` wordpieces is truncated.
    token_offsets: `[query_length, 2]` int32 character `(start, end)` of each wordpiece in
      `Block.text`; -1 for [CLS], [SEP] and padding.
    spans: `[num_spans, 2]` int32 character `(start, end)` in `Block.text` of the salient spans
      lying inside the sentence (REALM §3.4), sorted and disjoint.
    span_labels: `[num_spans]` int32, index of each span's label in `salient_spans.SPAN_LABELS`.
  """

  block_id: int
  sentence_index: int
  token_ids: np.ndarray
  token_offsets: np.ndarray
  spans: np.ndarray
  span_labels: np.ndarray

  @property
  def num_tokens(self) -> int:
    """Wordpieces of the sentence kept in the query ([CLS] and [SEP] excluded)."""
    return int((self.token_offsets[:, 0] >= 0).sum())


@dataclasses.dataclass(frozen=True)
class PretrainingExample:
  """One REALM pre-training example (REALM §2.3, §3.4): a masked query sentence.

  Attributes:
    query_input_ids: `[query_length]` int32, `[CLS] sentence [SEP]` with masks applied, [PAD] after.
    query_input_mask: `[query_length]` int32, 1 on real tokens ([CLS] … [SEP]), 0 on padding.
    query_segment_ids: `[query_length]` int32, all 0.
    mlm_positions: `[max_masks]` int32, positions of the masked-LM targets (0 in unused slots).
    mlm_targets: `[max_masks]` int32, original ids at `mlm_positions` (0 in unused slots).
    mlm_weights: `[max_masks]` float32, 1.0 for a real target, 0.0 for an unused slot.
    source_block_id: int64, the block the sentence came from; the trainer drops it from the
      retrieved candidates (REALM §3.4 "trivial retrievals").
    sentence_index: int32, the sentence's index within the block.
    masking: the masking kind, one of `MASKING_KINDS`.
  """

  query_input_ids: np.ndarray
  query_input_mask: np.ndarray
  query_segment_ids: np.ndarray
  mlm_positions: np.ndarray
  mlm_targets: np.ndarray
  mlm_weights: np.ndarray
  source_block_id: int
  sentence_index: int
  masking: str


ARRAY_FIELDS: tuple[str, ...] = ("query_input_ids", "query_input_mask", "query_segment_ids",
                                 "mlm_positions", "mlm_targets", "mlm_weights", "source_block_id",
                                 "sentence_index")


def stack_examples(examples: Sequence[PretrainingExample]) -> dict[str, np.ndarray]:
  """Stacks examples into arrays: `query_*` `[n, query_length]` int32, `mlm_*` `[n, max_masks]`
  (weights float32), `source_block_id` `[n]` int64, `sentence_index` `[n]` int32.

  Raises:
    ValueError: if `examples` is empty or mixes shapes.
  """
  if not examples:
    raise ValueError("stack_examples: no examples")
  out = {}
  for name in ARRAY_FIELDS:
    out[name] = np.stack([np.asarray(getattr(e, name)) for e in examples])
  out["source_block_id"] = out["source_block_id"].astype(np.int64)
  out["sentence_index"] = out["sentence_index"].astype(np.int32)
  return out


# --------------------------------------------------------------------------------------------------
# Blocks -> sentences
# --------------------------------------------------------------------------------------------------


def _special_ids(tokenizer: tokenization.Tokenizer) -> tuple[int, ...]:
  return tuple(sorted(int(i) for i in tokenizer.special_ids))


def _body_offsets(block: corpus.Block) -> np.ndarray:
  """Validated `[num_body_tokens, 2]` int64 offsets of a block.

  Raises:
    ValueError: naming the block and the field, if the block is inconsistent.
  """
  where = f"block {block.block_id!r} (doc {block.doc_id!r})"
  if not isinstance(block.block_id, (int, np.integer)) or block.block_id < 0:
    raise ValueError(f"{where}: field block_id must be a non-negative int")
  offsets = np.asarray(block.body_offsets, np.int64).reshape(-1, 2)
  if len(offsets) != len(block.body_ids):
    raise ValueError(f"{where}: field body_offsets has {len(offsets)} entries but body_ids has "
                     f"{len(block.body_ids)}")
  if len(offsets):
    bad = np.flatnonzero((offsets[:, 0] < 0) | (offsets[:, 1] < offsets[:, 0]) |
                         (offsets[:, 1] > len(block.text)))
    if len(bad):
      raise ValueError(f"{where}: field body_offsets[{bad[0]}]={offsets[bad[0]].tolist()} is not "
                       f"inside text (length {len(block.text)})")
    if (np.diff(offsets[:, 0]) < 0).any():
      i = int(np.flatnonzero(np.diff(offsets[:, 0]) < 0)[0]) + 1
      raise ValueError(f"{where}: field body_offsets is not sorted at index {i}")
  return offsets


def sentence_token_ranges(offsets: np.ndarray, sentences: Sequence[tuple[int, int]]
                          ) -> list[tuple[int, int]]:
  """Wordpiece range `[first, last)` of each sentence: the pieces that start inside it.

  Args:
    offsets: `[num_tokens, 2]` character offsets of the wordpieces, sorted by start.
    sentences: `[(char_start, char_end), ...]` sorted, disjoint.

  Returns:
    One `(first, last)` per sentence (empty when `first == last`).
  """
  starts = np.asarray(offsets).reshape(-1, 2)[:, 0]
  return [(int(np.searchsorted(starts, s, "left")), int(np.searchsorted(starts, e, "left")))
          for s, e in sentences]


def _query(ids: np.ndarray, offsets: np.ndarray, tokenizer: tokenization.Tokenizer, length: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] ids [SEP] [PAD]...` (truncated to `length`) and its offsets (-1 for specials)."""
  n = min(len(ids), length - 2)
  token_ids = np.full(length, tokenizer.pad_id, np.int32)
  token_offsets = np.full((length, 2), -1, np.int32)
  token_ids[0] = tokenizer.cls_id
  token_ids[1:n + 1] = ids[:n]
  token_ids[n + 1] = tokenizer.sep_id
  token_offsets[1:n + 1] = offsets[:n]
  return token_ids, token_offsets


def make_sentence_records(blocks: Sequence[corpus.Block], tokenizer: tokenization.Tokenizer,
                          tagger: salient_spans.SalientSpanTagger, query_length: int = QUERY_LENGTH,
                          batch_size: int = 64, n_process: int = 1, progress: bool = True
                          ) -> list[SentenceRecord]:
  """Splits blocks into query sentences and finds their salient spans (REALM §3.4 preprocessing).

  Sentences and spans come from one `tagger.tag_documents` pass over `Block.text`; each sentence is
  mapped onto the block's wordpieces (`body_ids`, `body_offsets`) so that the query uses exactly the
  block's tokenisation. Sentences without any wordpiece are skipped; spans crossing a sentence
  boundary are dropped.

  Args:
    blocks: corpus blocks (`realm_jax.data.corpus.Block`).
    tokenizer: supplies the [CLS], [SEP] and [PAD] ids.
    tagger: the salient span tagger.
    query_length: query length in wordpieces, specials included (96).
    batch_size, n_process: passed to `tagger.tag_documents`.
    progress: show progress bars.

  Returns:
    The records, block by block, sentence by sentence.

  Raises:
    ValueError: on an inconsistent block (naming it and the field) or `query_length < 3`.
  """
  if query_length < 3:
    raise ValueError(f"query_length must be >= 3, got {query_length}")
  all_offsets = [_body_offsets(b) for b in blocks]
  tagged = tagger.tag_documents([b.text for b in blocks], batch_size=batch_size,
                                n_process=n_process, progress=progress)
  label_index = {label: i for i, label in enumerate(salient_spans.SPAN_LABELS)}
  records = []
  for block, offsets, tags in zip(tqdm.tqdm(blocks, desc="sentences", unit="block",
                                            disable=not progress), all_offsets, tagged):
    body_ids = np.asarray(block.body_ids, np.int32)
    spans = np.asarray([(s.start, s.end) for s in tags.spans], np.int32).reshape(-1, 2)
    labels = np.asarray([label_index[s.label] for s in tags.spans], np.int32)
    for index, ((s, e), (a, b)) in enumerate(
        zip(tags.sentences, sentence_token_ranges(offsets, tags.sentences))):
      if b <= a:
        continue
      token_ids, token_offsets = _query(body_ids[a:b], offsets[a:b], tokenizer, query_length)
      inside = (spans[:, 0] >= s) & (spans[:, 1] <= e)
      records.append(SentenceRecord(int(block.block_id), index, token_ids, token_offsets,
                                    spans[inside], labels[inside]))
  return records


# --------------------------------------------------------------------------------------------------
# Sentences -> masked examples
# --------------------------------------------------------------------------------------------------


def sentence_rng(seed: int, masking: str, block_id: int, sentence_index: int
                 ) -> np.random.Generator:
  """The random generator of one sentence: a function of its identity only (order-independent)."""
  return np.random.default_rng([seed, MASKING_KINDS.index(masking), block_id, sentence_index])


def _word_start(token_ids: np.ndarray, tokenizer: tokenization.Tokenizer) -> np.ndarray:
  """`[len(token_ids)]` bool: True where a wordpiece starts a word (not a "##" continuation)."""
  return np.fromiter((not tokenizer.is_continuation(i) for i in token_ids.tolist()), bool,
                     count=len(token_ids))


def _check_masking(masking: str) -> None:
  if masking not in MASKING_KINDS:
    raise ValueError(f"masking must be one of {MASKING_KINDS}, got {masking!r}")


def mask_sentence(record: SentenceRecord, masking: str, tokenizer: tokenization.Tokenizer,
                  max_masks: int = MAX_MASKS, seed: int = 0) -> PretrainingExample | None:
  """Masks one sentence (REALM §3.4 salient spans; Table 2 random tokens / random spans).

  Args:
    record: the sentence.
    masking: 'salient' (`masking.salient_span_mask`), 'random_token' (`random_token_mask`) or
      'random_span' (`random_span_mask`, whole words via `tokenizer.is_continuation`).
    tokenizer: supplies the [MASK], special ids and vocabulary size.
    max_masks: masked-LM slots (10).
    seed: global seed; the sentence's generator is `sentence_rng(seed, masking, block, sentence)`.

  Returns:
    The example, or None if nothing can be masked (salient: no usable span).

  Raises:
    ValueError: on an unknown masking kind.
  """
  _check_masking(masking)
  rng = sentence_rng(seed, masking, record.block_id, record.sentence_index)
  if masking == "salient":
    masked = masking_lib.salient_span_mask(record.token_ids, record.token_offsets, record.spans,
                                           rng, tokenizer.mask_id, max_masks)
  else:
    fn = (masking_lib.random_token_mask if masking == "random_token"
          else masking_lib.random_span_mask)
    kwargs = {}
    if masking == "random_span":
      kwargs["word_start"] = _word_start(record.token_ids, tokenizer)
    masked = fn(record.token_ids, rng, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                special_ids=_special_ids(tokenizer), max_masks=max_masks, **kwargs)
  if masked is None:
    return None
  length = len(record.token_ids)
  input_mask = (np.arange(length) < record.num_tokens + 2).astype(np.int32)
  return PretrainingExample(
      query_input_ids=masked.input_ids, query_input_mask=input_mask,
      query_segment_ids=np.zeros(length, np.int32), mlm_positions=masked.mlm_positions,
      mlm_targets=masked.mlm_targets, mlm_weights=masked.mlm_weights,
      source_block_id=record.block_id, sentence_index=record.sentence_index, masking=masking)


def mask_sentences(records: Iterable[SentenceRecord], masking: str,
                   tokenizer: tokenization.Tokenizer, max_masks: int = MAX_MASKS, seed: int = 0,
                   progress: bool = True) -> list[PretrainingExample]:
  """`mask_sentence` over many records, dropping the unusable ones (with a progress bar)."""
  _check_masking(masking)
  out = []
  for record in tqdm.tqdm(records, desc=f"masking ({masking})", unit="sentence",
                          disable=not progress):
    example = mask_sentence(record, masking, tokenizer, max_masks, seed)
    if example is not None:
      out.append(example)
  return out


def make_pretraining_examples(blocks: Sequence[corpus.Block], tokenizer: tokenization.Tokenizer,
                              tagger: salient_spans.SalientSpanTagger, masking: str = "salient",
                              query_length: int = QUERY_LENGTH, max_masks: int = MAX_MASKS,
                              seed: int = 0, progress: bool = True) -> list[PretrainingExample]:
  """REALM pre-training examples: one masked query per usable sentence of each block (REALM §3.4).

  Equivalent to `mask_sentences(make_sentence_records(...), ...)`: the tagger runs once, here.

  Args:
    blocks: corpus blocks (`realm_jax.data.corpus.Block`).
    tokenizer: the WordPiece tokenizer of the blocks.
    tagger: the salient span tagger.
    masking: 'salient' | 'random_token' | 'random_span' (REALM §3.4, Table 2).
    query_length: query length in wordpieces (96).
    max_masks: masked-LM slots (10).
    seed: masking seed (see `sentence_rng`).
    progress: show progress bars.

  Returns:
    The examples, in block and sentence order.

  Raises:
    ValueError: on an unknown masking kind or an inconsistent block.
  """
  _check_masking(masking)
  records = make_sentence_records(blocks, tokenizer, tagger, query_length, progress=progress)
  return mask_sentences(records, masking, tokenizer, max_masks, seed, progress)


# --------------------------------------------------------------------------------------------------
# ICT (ORQA §5)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IctExamples:
  """Inverse Cloze Task pairs (Lee et al., 2019, §5), one per block used.

  Attributes:
    query_input_ids: `[n, query_length]` int32, `[CLS] sentence [SEP]` then [PAD].
    query_input_mask: `[n, query_length]` int32, 1 on real tokens.
    query_segment_ids: `[n, query_length]` int32, all 0.
    block_input_ids: `[n, block_length]` int32, `[CLS] title [SEP] body [SEP]` then [PAD], the
      query sentence removed from the body where `sentence_removed`.
    block_input_mask: `[n, block_length]` int32, 1 on real tokens.
    block_segment_ids: `[n, block_length]` int32, 0 on `[CLS] title [SEP]`, 1 on `body [SEP]`,
      0 on padding.
    block_id: `[n]` int64, the positive block's id.
    sentence_index: `[n]` int32, the query sentence's index within the block.
    sentence_removed: `[n]` bool, whether the sentence was removed from the block.
  """

  query_input_ids: np.ndarray
  query_input_mask: np.ndarray
  query_segment_ids: np.ndarray
  block_input_ids: np.ndarray
  block_input_mask: np.ndarray
  block_segment_ids: np.ndarray
  block_id: np.ndarray
  sentence_index: np.ndarray
  sentence_removed: np.ndarray

  def __len__(self) -> int:
    return len(self.block_id)


def _ict_block(title_ids: np.ndarray, body_ids: np.ndarray, tokenizer: tokenization.Tokenizer,
               length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`[CLS] title [SEP] body [SEP]` (body, then title, truncated to fit), mask, segment ids."""
  title_ids = title_ids[:max(0, length - 4)]  # keep room for 3 specials + 1 body piece
  body_ids = body_ids[:length - 3 - len(title_ids)]
  head = np.concatenate([[tokenizer.cls_id], title_ids, [tokenizer.sep_id]]).astype(np.int32)
  tail = np.concatenate([body_ids, [tokenizer.sep_id]]).astype(np.int32)
  ids = np.full(length, tokenizer.pad_id, np.int32)
  segments = np.zeros(length, np.int32)
  mask = np.zeros(length, np.int32)
  n = len(head) + len(tail)
  ids[:n] = np.concatenate([head, tail])
  segments[len(head):n] = 1
  mask[:n] = 1
  return ids, mask, segments


def make_ict_examples(blocks: Sequence[corpus.Block], tokenizer: tokenization.Tokenizer,
                      query_length: int = ICT_QUERY_LENGTH, block_length: int = ICT_BLOCK_LENGTH,
                      remove_sentence_prob: float = ICT_REMOVE_SENTENCE_PROB, seed: int = 0, *,
                      sentence_splitter: salient_spans.SentenceSplitter | None = None,
                      min_sentences: int = 2, progress: bool = True) -> IctExamples:
  """Inverse Cloze Task examples for the retriever warm start (ORQA §5; REALM §3.4 initialisation).

  For each block with at least `min_sentences` sentences, one sentence is drawn uniformly as the
  pseudo-query `[CLS] sentence [SEP]`; the positive is the block `[CLS] title [SEP] body [SEP]`
  with that sentence removed with probability `remove_sentence_prob` (ORQA's "mask rate" 0.9: the
  sentence stays in the block 10% of the time, so the encoder still learns word matching). The
  generator of a block is seeded by `(seed, block_id)`: call again with another seed for another
  epoch's draw. Blocks with fewer sentences are skipped (their evidence would be empty).

  Args:
    blocks: corpus blocks (`realm_jax.data.corpus.Block`).
    tokenizer: supplies the special ids.
    query_length: query length in wordpieces, specials included (64); longer sentences truncated.
    block_length: block length in wordpieces, specials included (288); the body is truncated.
    remove_sentence_prob: probability of removing the query sentence from its block (0.9).
    seed: random seed.
    sentence_splitter: maps texts to their sentence boundaries (one `[(start, end), ...]` per text);
      None uses `corpus.split_sentences`, the rule-based splitter the blocks were packed with (no
      spaCy needed); `SalientSpanTagger(entities=False).split_sentences` gives spaCy's sentences.
    min_sentences: minimum number of non-empty sentences of a block used.
    progress: show progress bars.

  Returns:
    `IctExamples` (arrays described there), in block order.

  Raises:
    ValueError: on bad lengths or probability, or an inconsistent block.
  """
  if query_length < 3 or block_length < 4:
    raise ValueError(f"need query_length >= 3 and block_length >= 4, got {query_length}, "
                     f"{block_length}")
  if not 0.0 <= remove_sentence_prob <= 1.0:
    raise ValueError(f"remove_sentence_prob must be in [0, 1], got {remove_sentence_prob}")
  all_offsets = [_body_offsets(b) for b in blocks]
  texts = [b.text for b in blocks]
  all_sentences = (sentence_splitter(texts) if sentence_splitter is not None
                   else [corpus.split_sentences(t) for t in texts])
  rows: dict[str, list[Any]] = {k: [] for k in (
      "query_input_ids", "query_input_mask", "block_input_ids", "block_input_mask",
      "block_segment_ids", "block_id", "sentence_index", "sentence_removed")}
  for block, offsets, sentences in zip(tqdm.tqdm(blocks, desc="ICT", unit="block",
                                                 disable=not progress), all_offsets, all_sentences):
    ranges = [(i, r) for i, r in enumerate(sentence_token_ranges(offsets, sentences))
              if r[1] > r[0]]
    if len(ranges) < max(1, min_sentences):
      continue
    rng = np.random.default_rng([seed, int(block.block_id)])
    index, (a, b) = ranges[int(rng.integers(len(ranges)))]
    removed = bool(rng.random() < remove_sentence_prob)
    body_ids = np.asarray(block.body_ids, np.int32)
    query_ids, _ = _query(body_ids[a:b], offsets[a:b], tokenizer, query_length)
    evidence = np.concatenate([body_ids[:a], body_ids[b:]]) if removed else body_ids
    block_ids, block_mask, block_segments = _ict_block(
        np.asarray(block.title_ids, np.int32), evidence, tokenizer, block_length)
    rows["query_input_ids"].append(query_ids)
    rows["query_input_mask"].append((np.arange(query_length) < min(b - a, query_length - 2) + 2
                                     ).astype(np.int32))
    rows["block_input_ids"].append(block_ids)
    rows["block_input_mask"].append(block_mask)
    rows["block_segment_ids"].append(block_segments)
    rows["block_id"].append(int(block.block_id))
    rows["sentence_index"].append(index)
    rows["sentence_removed"].append(removed)
  shapes = {"query_input_ids": (0, query_length), "query_input_mask": (0, query_length),
            "block_input_ids": (0, block_length), "block_input_mask": (0, block_length),
            "block_segment_ids": (0, block_length)}
  dtypes = {"block_id": np.int64, "sentence_removed": bool}
  arrays = {k: (np.stack(v) if v else np.zeros(shapes.get(k, (0,))))
            .astype(dtypes.get(k, np.int32)) for k, v in rows.items()}
  return IctExamples(query_segment_ids=np.zeros_like(arrays["query_input_ids"]), **arrays)


# --------------------------------------------------------------------------------------------------
# TFDS storage
# --------------------------------------------------------------------------------------------------


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose data comes from memory: nothing to download, no checksums file to look for.

  (`code_path = None` also keeps TFDS from resolving this package's resource path, which under an
  editable install needs the `importlib_resources` backport.)
  """

  code_path = None

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}


class RealmSalientSentences(_LocalBuilder):
  """TFDS builder: query sentences with their salient spans (REALM §3.4), one record per sentence.

  Features: `block_id` int64, `sentence_index` int32, `token_ids` `[query_length]` int32,
  `token_offsets` `[query_length, 2]` int32, `spans` `[None, 2]` int32, `span_labels` `[None]` int32
  (indices into `salient_spans.SPAN_LABELS`). Examples keep the generation order.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Sentences + salient spans (spaCy NER + date regex)."}

  def __init__(self, *, records: Callable[[], Iterable[SentenceRecord]] | None = None,
               query_length: int = QUERY_LENGTH, **kwargs):
    """Args: records: produces the records when preparing; query_length; TFDS builder kwargs."""
    self._records = records
    self._query_length = query_length
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    q = self._query_length
    return tfds_builders.LocalDatasetInfo(
        builder=self, disable_shuffling=True,
        description=("REALM query sentences: [CLS] sentence [SEP] wordpieces, their character "
                     "offsets in Block.text, and salient spans; span_labels index "
                     f"{list(salient_spans.SPAN_LABELS)}."),
        features=tfds.features.FeaturesDict({
            "block_id": np.int64,
            "sentence_index": np.int32,
            "token_ids": tfds.features.Tensor(shape=(q,), dtype=np.int32),
            "token_offsets": tfds.features.Tensor(shape=(q, 2), dtype=np.int32),
            "spans": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
            "span_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }))

  def _generate_examples(self):
    if self._records is None:
      raise ValueError(f"RealmSalientSentences: {self.data_dir} is not prepared and no records "
                       "were given")
    n = 0
    for n, r in enumerate(self._records(), start=1):
      yield n - 1, {"block_id": r.block_id, "sentence_index": r.sentence_index,
                    "token_ids": r.token_ids, "token_offsets": r.token_offsets, "spans": r.spans,
                    "span_labels": r.span_labels}
    if n == 0:  # TFDS cannot store an empty split
      raise ValueError(f"RealmSalientSentences {self.builder_config.name}: the blocks hold no "
                       "sentence with a wordpiece")


class RealmPretrainingExamples(_LocalBuilder):
  """TFDS builder: masked REALM pre-training queries (REALM §3.4, Table 2), masked at build time.

  Features: the `ARRAY_FIELDS` of `PretrainingExample` (same shapes and dtypes), `masking` (text).
  Examples keep the generation order.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Masked queries built from RealmSalientSentences."}

  def __init__(self, *, examples: Callable[[], Iterable[PretrainingExample]] | None = None,
               query_length: int = QUERY_LENGTH, max_masks: int = MAX_MASKS, **kwargs):
    """Args: examples: produces the examples when preparing; lengths; TFDS builder kwargs."""
    self._examples = examples
    self._query_length = query_length
    self._max_masks = max_masks
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    q, m = self._query_length, self._max_masks
    ids = lambda n: tfds.features.Tensor(shape=(n,), dtype=np.int32)  # noqa: E731
    return tfds_builders.LocalDatasetInfo(
        builder=self, disable_shuffling=True,
        description="REALM pre-training examples (masked query sentences).",
        features=tfds.features.FeaturesDict({
            "query_input_ids": ids(q), "query_input_mask": ids(q), "query_segment_ids": ids(q),
            "mlm_positions": ids(m), "mlm_targets": ids(m),
            "mlm_weights": tfds.features.Tensor(shape=(m,), dtype=np.float32),
            "source_block_id": np.int64, "sentence_index": np.int32,
            "masking": tfds.features.Text(),
        }))

  def _generate_examples(self):
    if self._examples is None:
      raise ValueError(f"RealmPretrainingExamples: {self.data_dir} is not prepared and no "
                       "examples were given")
    n = 0
    for n, e in enumerate(self._examples(), start=1):
      yield n - 1, {name: getattr(e, name) for name in ARRAY_FIELDS + ("masking",)}
    if n == 0:  # TFDS cannot store an empty split
      raise ValueError(f"RealmPretrainingExamples {self.builder_config.name}: no sentence could be "
                       "masked (salient masking needs sentences with a salient span)")


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sentences_config_name(corpus_fingerprint: str, tokenizer_fp: str, tagger_fp: str,
                          query_length: int) -> str:
  """Config name of `RealmSalientSentences`: the query length and a hash of every input."""
  return f"q{query_length}-" + _digest(["sentences-v1", corpus_fingerprint, tokenizer_fp,
                                        tagger_fp, query_length])


def examples_config_name(sentences_config: str, masking: str, max_masks: int, seed: int) -> str:
  """Config name of `RealmPretrainingExamples` (the inputs are hashed into `sentences_config`)."""
  query = sentences_config.split("-")[0]
  return f"{masking}-{query}-m{max_masks}-s{seed}-" + _digest(
      ["examples-v1", sentences_config, masking, max_masks, seed, masking_lib.MASK_PROB,
       masking_lib.REPLACE_PROBS, masking_lib.GEOMETRIC_P, masking_lib.MAX_SPAN_LENGTH])


def _read_split(builder_dir: str, split: str = "train", progress: bool = True,
                chunk: int = 4096) -> tuple[dict[str, list[Any]], Any]:
  """All examples of a prepared TFDS dataset, field by field (numpy decoding, no TensorFlow)."""
  info_path = fileio.join(builder_dir, "dataset_info.json")
  if not fileio.exists(info_path):
    raise FileNotFoundError(f"{info_path}: no prepared TFDS dataset here (build it with "
                            "build_pretraining_dataset)")
  builder = tfds.builder_from_directory(builder_dir)
  source = builder.as_data_source(split=split)
  fields: dict[str, list[Any]] = {}
  bar = tqdm.tqdm(total=len(source), desc=f"reading {os.path.basename(builder_dir)}",
                  unit="example", disable=not progress)
  for start in range(0, len(source), chunk):
    for item in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      for k, v in item.items():
        fields.setdefault(k, []).append(v)
    bar.update(min(chunk, len(source) - start))
  bar.close()
  return fields, builder


def load_sentence_records(builder_dir: str, progress: bool = True) -> list[SentenceRecord]:
  """Reads a prepared `RealmSalientSentences` directory back into `SentenceRecord`s.

  Raises:
    FileNotFoundError: if `builder_dir` holds no prepared dataset.
  """
  f, _ = _read_split(builder_dir, progress=progress)
  n = len(f.get("block_id", []))
  return [SentenceRecord(int(f["block_id"][i]), int(f["sentence_index"][i]), f["token_ids"][i],
                         f["token_offsets"][i], f["spans"][i].reshape(-1, 2), f["span_labels"][i])
          for i in range(n)]


class PretrainingDataset:
  """Pre-training examples held as numpy arrays (`__len__`, `__getitem__`, `batch`).

  Attributes:
    arrays: `query_input_ids`, `query_input_mask`, `query_segment_ids` `[n, query_length]` int32;
      `mlm_positions`, `mlm_targets` `[n, max_masks]` int32; `mlm_weights` `[n, max_masks]` float32;
      `source_block_id` `[n]` int64; `sentence_index` `[n]` int32.
    masking: the masking kind of every example.
  """

  def __init__(self, arrays: dict[str, np.ndarray], masking: str):
    missing = [k for k in ARRAY_FIELDS if k not in arrays]
    if missing:
      raise ValueError(f"PretrainingDataset: missing arrays {missing}")
    sizes = {k: len(arrays[k]) for k in ARRAY_FIELDS}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"PretrainingDataset: arrays have different lengths {sizes}")
    self.arrays = {k: arrays[k] for k in ARRAY_FIELDS}
    self.masking = masking

  @classmethod
  def from_examples(cls, examples: Sequence[PretrainingExample]) -> PretrainingDataset:
    """Stacks in-memory examples (all of one masking kind)."""
    kinds = {e.masking for e in examples}
    if len(kinds) != 1:
      raise ValueError(f"PretrainingDataset: need examples of one masking kind, got {kinds}")
    return cls(stack_examples(examples), kinds.pop())

  def __len__(self) -> int:
    return len(self.arrays["source_block_id"])

  def __getitem__(self, index: int) -> PretrainingExample:
    values = {k: v[index] for k, v in self.arrays.items()}
    values["source_block_id"] = int(values["source_block_id"])
    values["sentence_index"] = int(values["sentence_index"])
    return PretrainingExample(masking=self.masking, **values)

  def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` stacked: every array gains a leading `[len(indices)]` axis."""
    idx = np.asarray(indices, np.int64)
    return {k: v[idx] for k, v in self.arrays.items()}


def load_pretraining_examples(builder_dir: str, progress: bool = True) -> PretrainingDataset:
  """Reads a prepared `RealmPretrainingExamples` directory into a `PretrainingDataset`.

  Args:
    builder_dir: `<data_dir>/realm_pretraining_examples/<config>/<version>` (as returned by
      `build_pretraining_dataset`).
    progress: show a progress bar.

  Raises:
    FileNotFoundError: if `builder_dir` holds no prepared dataset.
  """
  fields, builder = _read_split(builder_dir, progress=progress)
  features = builder.info.features
  arrays = {}
  for name in ARRAY_FIELDS:
    feature = features[name]
    values = fields.get(name)
    arrays[name] = (np.stack(values) if values else np.zeros((0, *feature.shape))
                    ).astype(feature.np_dtype)
  masking = builder.builder_config.name.split("-")[0]  # "{masking}-q..-m..-s..-{hash}"
  return PretrainingDataset(arrays, masking)


def build_pretraining_dataset(blocks: Sequence[corpus.Block], tokenizer: tokenization.Tokenizer,
                              data_dir: str | os.PathLike, *,
                              tagger: salient_spans.SalientSpanTagger | None = None,
                              masking: str = "salient", query_length: int = QUERY_LENGTH,
                              max_masks: int = MAX_MASKS, seed: int = 0,
                              corpus_fingerprint: str | None = None, batch_size: int = 64,
                              n_process: int = 1, progress: bool = True) -> str:
  """Builds (or finds) the stored sentences + spans, then the masked examples (REALM §3.4).

  Stage 1, `RealmSalientSentences`, runs the tagger over every block; it is keyed by the corpus,
  tokenizer, tagger and query length, so a new masking kind, `max_masks` or seed reuses it. Stage 2,
  `RealmPretrainingExamples`, masks the stored sentences (deterministically, see `sentence_rng`).
  Both write atomically (TFDS prepares into a temporary directory and renames it) and are skipped
  when already prepared.

  When `data_dir` is a URL (`gs://…`), both datasets are prepared in a local cache instead,
  `fileio.default_cache_dir() / "tfds"` (`$REALM_JAX_CACHE`, else `~/.cache/realm_jax`), as
  `tfds_builders.build_questions` does: array_record reads and writes through local file handles, and
  the examples are derived data (a deterministic function of the corpus, tokenizer, tagger and
  masking arguments), so each host prepares its own copy rather than sharing one in the bucket.

  Args:
    blocks: corpus blocks.
    tokenizer: the blocks' WordPiece tokenizer.
    data_dir: TFDS data directory (created if missing); a URL is replaced by the local cache.
    tagger: the salient span tagger; None loads `SalientSpanTagger()` (spaCy, ~1 s).
    masking: 'salient' | 'random_token' | 'random_span'.
    query_length: query length (96).
    max_masks: masked-LM slots (10).
    seed: masking seed.
    corpus_fingerprint: the corpus' fingerprint; None computes `corpus.corpus_fingerprint(blocks)`.
    batch_size, n_process: spaCy batching.
    progress: show progress bars.

  Returns:
    The prepared examples' directory (local), for `load_pretraining_examples`.

  Raises:
    ValueError: on an unknown masking kind or an inconsistent block.
  """
  _check_masking(masking)
  if fileio.is_url(data_dir):
    data_dir = fileio.default_cache_dir() / "tfds"
  tagger = tagger or salient_spans.SalientSpanTagger()
  corpus_fp = corpus_fingerprint or corpus.corpus_fingerprint(blocks)
  s_name = sentences_config_name(corpus_fp, tokenizer.fingerprint(), tagger.fingerprint,
                                 query_length)
  sentences = RealmSalientSentences(
      records=lambda: make_sentence_records(blocks, tokenizer, tagger, query_length, batch_size,
                                            n_process, progress),
      query_length=query_length, data_dir=data_dir, file_format="array_record",
      config=tfds.core.BuilderConfig(name=s_name, description=(
          f"corpus {corpus_fp}, tagger {tagger.model_name} ({tagger.fingerprint}), "
          f"query_length {query_length}")))
  sentences.download_and_prepare()
  e_name = examples_config_name(s_name, masking, max_masks, seed)
  sentences_dir = str(sentences.data_dir)
  examples = RealmPretrainingExamples(
      examples=lambda: mask_sentences(load_sentence_records(sentences_dir, progress), masking,
                                      tokenizer, max_masks, seed, progress),
      query_length=query_length, max_masks=max_masks, data_dir=data_dir,
      file_format="array_record",
      config=tfds.core.BuilderConfig(name=e_name, description=(
          f"{masking} masking of {s_name}, max_masks {max_masks}, seed {seed}")))
  examples.download_and_prepare()
  return str(examples.data_dir)
