"""Open-QA fine-tuning of REALM/ORQA: pure train / eval steps and their loop.

REALM §3.4 (fine-tuning) and ORQA §4 (Lee et al., 2019). For each question x:
  1. the query embedder (trained) embeds x and MIPS over the frozen document index returns the top
     `num_retrieved` blocks (5,000 in the paper) — on the host, before the step;
  2. retriever loss: −log Σ_{z ∋ answer} p(z|x) over the retrieved blocks, with
     p(z|x) ∝ exp(score_scale · Embed_input(x)ᵀ Embed_doc(z)) and Embed_doc(z) read from the snapshot;
  3. reader loss over the top `num_read` (5) blocks × spans ≤ `max_span_width` (10):
     −log Σ_{(z, s) correct} p(z, s|x), joint logit = span logit + retriever logit of z;
     a term is zeroed when nothing is correct.
The document index stays frozen (the snapshot's embeddings are inputs); the query tower and the reader
train. Steps are `jax.jit`-ed once over the mesh with named shardings; the batch is split over `data`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from realm_jax import evaluation
from realm_jax import fileio
from realm_jax import sharding
from realm_jax.data import corpus_config
from realm_jax.data import example_order
from realm_jax.data import featurize
from realm_jax.data.questions import Question
from realm_jax.models import encoder as encoder_lib
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import embedding
from realm_jax.training import length_buckets
from realm_jax.training import loop as loop_lib
from realm_jax.training import losses
from realm_jax.training import optim
from realm_jax.training import train_state

Array = jax.Array
PARTS = ("retriever", "reader")  # The params of an Open-QA run.


@dataclasses.dataclass(frozen=True)
class OpenQAConfig:
  """The shapes of one Open-QA example.

  Attributes:
    num_retrieved: blocks retrieved per question for the retriever loss (5,000 in the paper).
    num_read: top blocks the reader reads (5 in the paper).
    query_length: `[CLS] question [SEP]` length for the query embedder, in wordpieces.
    reader_length: `[CLS] question [SEP] block [SEP]` length (288 + 32 in the paper).
    reader_query_length: wordpieces of the question kept in the reader input (incl. [CLS], [SEP]).
    reader_length_bucket: the reads of a batch are padded to the smallest multiple of this many
      wordpieces that holds the batch's longest read (capped at `reader_length`), not to
      `reader_length`: the train, eval and predict steps then compile once per bucket length
      (`reader_length / reader_length_bucket` shapes at most) and skip the padding past it. 0 pads
      every batch to `reader_length` (one shape).
    gold_block_in_read: training only: when none of the `num_read` top retrieved blocks is a gold
      block (of the question's `gold_doc_ids`, SQuAD-style) holding an answer, the gold block takes
      the last read slot (and its retrieved rank, so the retriever's marginal sees it too). This is
      DPR/ORQA-style reader training on a known positive; not in REALM's recipe, off by default.
      Evaluation always reads the retrieved blocks only.

  Raises:
    ValueError: if `num_read > num_retrieved` or a length is too small.
  """

  num_retrieved: int = 5000
  num_read: int = 5
  query_length: int = 64
  reader_length: int = 320
  reader_query_length: int = 32
  reader_length_bucket: int = 64
  gold_block_in_read: bool = False

  def __post_init__(self):
    if not 0 < self.num_read <= self.num_retrieved:
      raise ValueError(f"OpenQAConfig: need 0 < num_read ({self.num_read}) <= num_retrieved "
                       f"({self.num_retrieved})")
    if self.reader_length <= self.reader_query_length + 1:
      raise ValueError("OpenQAConfig: reader_length must exceed reader_query_length + 1")
    if self.query_length < 3:
      raise ValueError("OpenQAConfig: query_length must be at least 3")
    if self.reader_length_bucket < 0:
      raise ValueError("OpenQAConfig: reader_length_bucket must be >= 0 (0: no bucketing), got "
                       f"{self.reader_length_bucket}")


# ---------------------------------------------------------------------------------------------------
# Host side: retrieval results → fixed-shape batch.
# ---------------------------------------------------------------------------------------------------


class OpenQAFeaturizer:
  """Turns questions and their retrieved blocks into a numpy batch for the jitted steps.

  Args:
    tokenizer: a `realm_jax.tokenization.Tokenizer`.
    corpus: a corpus of blocks, indexable by block id (`corpus[block_id]` returns a `Block` with
      `text`, `body_ids`, `body_offsets`, `doc_id`).
    snapshot_block_ids: `[num_blocks]` int64 block id of each snapshot row.
    snapshot_embeddings: `[num_blocks, dim]` float32 document embeddings (the frozen index).
    config: the example shapes.
    max_span_width: the reader's maximum span width.
  """

  def __init__(self, tokenizer, corpus, snapshot_block_ids: np.ndarray,
               snapshot_embeddings: np.ndarray, config: OpenQAConfig, max_span_width: int):
    self.tokenizer = tokenizer
    self.corpus = corpus
    self.embeddings = snapshot_embeddings
    self.config = config
    self.max_span_width = max_span_width
    self.row_of_block = {int(b): i for i, b in enumerate(snapshot_block_ids)}
    self.position_of_block = {int(b): i for i, b in enumerate(corpus.block_ids)}
    self.starts, self.ends = encoder_lib.span_candidates(config.reader_length, max_span_width)
    self._has_answer_cache: dict[tuple[int, str], bool] = {}
    self._blocks_of_doc: dict[str, list[int]] | None = None

  def gold_blocks(self, question: Question) -> list[int]:
    """Block ids of the question's gold documents that hold an answer, in corpus order."""
    if self._blocks_of_doc is None:  # Built on first use: one entry per document.
      self._blocks_of_doc = {}
      for position, doc_id in enumerate(self.corpus.doc_ids):
        self._blocks_of_doc.setdefault(str(doc_id), []).append(
            int(self.corpus.block_ids[position]))
    return [b for doc in question.gold_doc_ids for b in self._blocks_of_doc.get(str(doc), ())
            if b in self.row_of_block and self.has_answer(b, question)]

  def with_gold_block(self, questions: Sequence[Question], retrieved_block_ids: np.ndarray
                      ) -> np.ndarray:
    """`retrieved_block_ids` `[n, K]` with a gold block at rank `num_read − 1` for each question
    whose top `num_read` hold none (`OpenQAConfig.gold_block_in_read`); a later copy of it is
    replaced by −1 (padding)."""
    out = np.array(retrieved_block_ids, copy=True)
    r = self.config.num_read
    for i, q in enumerate(questions):
      gold = self.gold_blocks(q)
      if not gold or set(out[i, :r].tolist()) & set(gold):
        continue
      out[i, r:][out[i, r:] == gold[0]] = -1
      out[i, r - 1] = gold[0]
    return out

  def query_batch(self, questions: Sequence[Question]) -> dict[str, np.ndarray]:
    """`[n, query_length]` int32 query inputs."""
    ids = [self.tokenizer.encode(q.question) for q in questions]
    return featurize.query_inputs(ids, self.config.query_length, self.tokenizer.cls_id,
                                  self.tokenizer.sep_id, self.tokenizer.pad_id)

  def block(self, block_id: int):
    """The corpus `Block` with this id."""
    return self.corpus[self.position_of_block[block_id]]

  def predicted_span(self, read: dict, span: int) -> tuple[int, int]:
    """Joined-input positions `(start, end)` (inclusive) of span candidate `span` in the read block
    `read` (an entry of `batch`'s `reads`), widened to whole words (`featurize.full_word_span`)."""
    return featurize.full_word_span(self.block(read["block_id"]).body_ids, read["body_start"],
                                    self.starts[span], self.ends[span],
                                    self.tokenizer.is_continuation)

  def has_answer(self, block_id: int, question: Question) -> bool:
    key = (block_id, question.qid)
    if key not in self._has_answer_cache:
      self._has_answer_cache[key] = evaluation.has_answer(
          self.block(block_id).text, question.answers,
          answers_are_regex=question.answers_are_regex)
    return self._has_answer_cache[key]

  def batch(self, questions: Sequence[Question], retrieved_block_ids: np.ndarray,
            with_labels: bool = True) -> tuple[dict[str, np.ndarray], list[list[dict]]]:
    """Builds the step inputs for `n` questions.

    Args:
      questions: the `n` questions.
      retrieved_block_ids: `[n, num_retrieved]` int64 block ids, best first; −1 marks padding.
      with_labels: compute `retrieved_has_answer` and `span_is_answer` (training).

    Returns:
      `(batch, reads)`: `batch` holds `query_*` `[n, query_length]`, `retrieved_embeddings`
      `[n, K, dim]` float32, `retrieved_valid` / `retrieved_has_answer` `[n, K]` bool, `reader_*`
      `[n, R, reader_length]` int32 and `span_is_answer` `[n, R, num_spans]` bool; `reads[i][r]`
      keeps the block id, text, offsets and body start of each read block (to map spans to text).
    """
    cfg = self.config
    n, k = retrieved_block_ids.shape
    if k != cfg.num_retrieved:
      raise ValueError(f"expected {cfg.num_retrieved} retrieved blocks per question, got {k}")
    if with_labels and cfg.gold_block_in_read:
      retrieved_block_ids = self.with_gold_block(questions, retrieved_block_ids)
    batch = {f"query_{k_}": v for k_, v in self.query_batch(questions).items()}
    valid = retrieved_block_ids >= 0
    rows = np.array([[self.row_of_block.get(int(b), 0) for b in row] for row in retrieved_block_ids])
    batch["retrieved_embeddings"] = self.embeddings[rows].astype(np.float32)
    batch["retrieved_valid"] = valid
    if with_labels:
      batch["retrieved_has_answer"] = np.array(
          [[bool(v) and self.has_answer(int(b), q) for b, v in zip(row, vrow)]
           for q, row, vrow in zip(questions, retrieved_block_ids, valid)])
    shape = (n, cfg.num_read, cfg.reader_length)
    reader = {name: np.zeros(shape, np.int32)
              for name in ("input_ids", "segment_ids", "input_mask", "body_mask")}
    span_labels = np.zeros((n, cfg.num_read, len(self.starts)), bool)
    reads: list[list[dict]] = []
    for i, q in enumerate(questions):
      q_ids = self.tokenizer.encode(q.question)
      reads.append([])
      for r in range(cfg.num_read):
        block_id = int(retrieved_block_ids[i, r])
        if block_id < 0:
          reads[i].append({"block_id": -1})
          continue
        block = self.block(block_id)
        joined = featurize.join_inputs(q_ids, block.body_ids, cfg.reader_length,
                                       self.tokenizer.cls_id, self.tokenizer.sep_id,
                                       self.tokenizer.pad_id, cfg.reader_query_length)
        for name in reader:
          reader[name][i, r] = joined[name]
        reads[i].append({"block_id": block_id, "body_start": joined["body_start"],
                         "body_len": joined["body_len"]})
        if with_labels and batch["retrieved_has_answer"][i, r]:
          span_labels[i, r] = featurize.span_answer_labels(
              block.text, block.body_offsets, joined["body_start"], joined["body_len"],
              q.answers, self.starts, self.ends, q.answers_are_regex)
    batch.update({f"reader_{k_}": v for k_, v in reader.items()})
    if with_labels:
      batch["span_is_answer"] = span_labels
    return batch, reads

  def cut_to_bucket(self, batch: dict[str, np.ndarray], across_processes: bool = False
                    ) -> dict[str, np.ndarray]:
    """`batch`'s reads cut to the bucket length of its longest read: `cut_to_bucket` with this
    configuration's `reader_length_bucket` and span width."""
    return cut_to_bucket(batch, self.config.reader_length_bucket, self.max_span_width,
                         across_processes)


def cut_reads(batch: dict[str, np.ndarray], length: int, max_span_width: int
              ) -> dict[str, np.ndarray]:
  """Drops the reader padding past `length`: the same batch, fewer computed tokens.

  The reader attends only to unmasked tokens and its span candidates are end-major
  (`encoder.span_candidates`), so the spans of the first `length` tokens are the first
  `num_span_candidates(length)` spans of the full length: span indices (`eval_step`'s
  `best_span`, `OpenQAFeaturizer.predicted_span`) mean the same span after the cut. Losses and
  gradients are those of the full length (up to float rounding); only dropout differs, its masks
  being drawn for the cut shape (another sample of the same distribution).

  Args:
    batch: `reader_*` `[n, R, L]` int32; optional `span_is_answer` `[n, R, num_spans(L)]` bool;
      other entries pass through.
    length: the new reader length, 0 < length ≤ L.
    max_span_width: the reader's maximum span width.

  Returns:
    A new dict; `reader_*` `[n, R, length]`, `span_is_answer` `[n, R, num_spans(length)]` (the
    input's own arrays when `length` is L).

  Raises:
    ValueError: if `length` is out of range, or the cut would drop a real token or an answer span.
  """
  return _cut_span_labels(length_buckets.cut(batch, {"reader_": length}), length, max_span_width)


def _cut_span_labels(batch: dict[str, np.ndarray], length: int, max_span_width: int
                     ) -> dict[str, np.ndarray]:
  """`batch` (a new dict) with `span_is_answer`, if any, cut to the spans of `length` tokens."""
  labels = batch.get("span_is_answer")
  num_spans = encoder_lib.num_span_candidates(length, max_span_width)
  if labels is None or labels.shape[-1] == num_spans:
    return batch
  if np.any(labels[..., num_spans:]):
    raise ValueError(f"reader_*: an answer span ends past token {length}")
  return dict(batch, span_is_answer=np.ascontiguousarray(labels[..., :num_spans]))


def cut_to_bucket(batch: dict[str, np.ndarray], bucket: int, max_span_width: int,
                  across_processes: bool = False) -> dict[str, np.ndarray]:
  """A batch's reads cut to the bucket length of its longest read (ORQA/REALM reader inputs
  without the padding past it; `training.length_buckets.cut_to_buckets` on the `reader_` group,
  then `span_is_answer` as in `cut_reads`).

  Args:
    batch: from `OpenQAFeaturizer.batch` (reads `[n, R, reader_length]`).
    bucket: `OpenQAConfig.reader_length_bucket` (0: no cut).
    max_span_width: the reader's maximum span width.
    across_processes: every process passes its own rows and all cut to the largest of their
      bucket lengths (`sharding.max_over_processes`, one collective; training, where each host
      featurises its own questions). False where every process builds the same batch
      (evaluation, prediction).

  Returns:
    `batch` with `reader_*` `[n, R, length]` and `span_is_answer` `[n, R,
    num_span_candidates(length)]`.

  Raises:
    ValueError: as `cut_reads`.
  """
  out, lengths = length_buckets.cut_to_buckets(batch, ("reader_",), bucket, across_processes)
  return _cut_span_labels(out, lengths["reader_"], max_span_width)


def pad_batch(batch: dict[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], int]:
  """Pads the leading axis to a multiple of `multiple` (repeating row 0; zero masks mark padding).

  Returns:
    `(padded_batch, n)` with `n` the number of real rows. Padded rows get
    `retrieved_valid = False`, so they contribute no loss.
  """
  n = len(next(iter(batch.values())))
  pad = (-n) % multiple
  if not pad:
    return batch, n
  out = {}
  for key, v in batch.items():
    filler = np.repeat(v[:1], pad, axis=0)
    if key in ("retrieved_valid", "retrieved_has_answer", "span_is_answer"):
      filler = np.zeros_like(filler)
    out[key] = np.concatenate([v, filler], axis=0)
  return out, n


# ---------------------------------------------------------------------------------------------------
# Device side: pure steps.
# ---------------------------------------------------------------------------------------------------


def _forward(params, batch, retriever_cfg: retriever_lib.RetrieverConfig,
             reader_cfg: encoder_lib.ReaderConfig, num_read: int, deterministic: bool,
             rng: Array | None):
  """Retriever logits `[b, K]` and reader span logits `[b, R, num_spans]`."""
  rngs = None if deterministic else dict(zip(("dropout",), jax.random.split(rng, 1)))
  rngs_reader = None if deterministic else {"dropout": jax.random.fold_in(rng, 1)}
  q = retriever_lib.Retriever(retriever_cfg).apply(
      {"params": params["retriever"]}, input_ids=batch["query_input_ids"],
      input_mask=batch["query_input_mask"], segment_ids=batch["query_segment_ids"],
      deterministic=deterministic, method=retriever_lib.Retriever.embed_queries, rngs=rngs)
  retriever_logits = retriever_lib.relevance_scores(q, batch["retrieved_embeddings"],
                                                    retriever_cfg.score_scale)
  retriever_logits = jnp.where(batch["retrieved_valid"], retriever_logits, -1e9)
  span_logits = encoder_lib.SpanReader(reader_cfg).apply(
      {"params": params["reader"]}, input_ids=batch["reader_input_ids"],
      input_mask=batch["reader_input_mask"], segment_ids=batch["reader_segment_ids"],
      body_mask=batch["reader_body_mask"], deterministic=deterministic, rngs=rngs_reader)
  return retriever_logits, span_logits


def train_step(state: train_state.TrainState, batch: dict[str, Array], rng: Array, *,
               tx: optax.GradientTransformation, retriever_cfg, reader_cfg, num_read: int
               ) -> tuple[train_state.TrainState, dict[str, Array]]:
  """One Open-QA update: the ORQA/REALM retriever + reader marginal losses (module docstring).

  Args:
    state: the train state (replicated).
    batch: the featurised batch (see `OpenQAFeaturizer.batch`), leading axis split over `data`.
    rng: PRNG key; folded with the step for dropout.

  Returns:
    `(new_state, metrics)`; metric keys are namespaced (`train/…`) float32 scalars.
  """
  rng = jax.random.fold_in(rng, state.step)
  span_valid = encoder_lib.span_mask(batch["reader_body_mask"], reader_cfg.max_span_width)
  example_valid = batch["retrieved_valid"][:, 0]

  def loss_fn(params):
    retriever_logits, span_logits = _forward(params, batch, retriever_cfg, reader_cfg, num_read,
                                             False, rng)
    r_loss, r_ok = losses.retriever_loss(retriever_logits, batch["retrieved_has_answer"],
                                         batch["retrieved_valid"])
    s_loss, s_ok = losses.reader_loss(span_logits, retriever_logits[:, :num_read],
                                      batch["span_is_answer"], span_valid)
    loss = losses.weighted_mean(r_loss + s_loss, example_valid)
    return loss, (r_loss, s_loss, r_ok, s_ok, retriever_logits, span_logits)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  r_loss, s_loss, r_ok, s_ok, retriever_logits, span_logits = aux
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  joint = span_logits + retriever_logits[:, :num_read, None]
  best = jnp.argmax(joint.reshape(joint.shape[0], -1), axis=-1)
  best_correct = jnp.take_along_axis(batch["span_is_answer"].reshape(joint.shape[0], -1),
                                     best[:, None], axis=-1)[:, 0]
  w = example_valid.astype(jnp.float32)
  metrics = {
      "train/loss": loss,
      "train/retriever_loss": losses.weighted_mean(r_loss, w),
      "train/reader_loss": losses.weighted_mean(s_loss, w),
      "train/answer_in_retrieved": losses.weighted_mean(r_ok, w),
      "train/answer_span_in_read": losses.weighted_mean(s_ok, w),
      "train/reader_accuracy": losses.weighted_mean(best_correct, w),
      "train/grad_norm": optax.global_norm(grads),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, Array], *, retriever_cfg, reader_cfg, num_read: int
              ) -> dict[str, Array]:
  """Predicts the best span over the top `num_read` blocks (joint logit, ORQA §4.2).

  Returns:
    `best_read [b]` int32 (which read block), `best_span [b]` int32 (index into
    `span_candidates`), `best_score [b]` float32, `p_z [b, K]` float32 retriever posterior p(z|x)
    over the retrieved blocks.
  """
  retriever_logits, span_logits = _forward(params, batch, retriever_cfg, reader_cfg, num_read,
                                           True, None)
  joint = span_logits + retriever_logits[:, :num_read, None]
  flat = joint.reshape(joint.shape[0], -1)
  best = jnp.argmax(flat, axis=-1)
  num_spans = span_logits.shape[-1]
  return {
      "best_read": (best // num_spans).astype(jnp.int32),
      "best_span": (best % num_spans).astype(jnp.int32),
      "best_score": jnp.max(flat, axis=-1),
      "p_z": jax.nn.softmax(retriever_logits, axis=-1),
  }


def make_eval_step(model_cfg: realm.ModelConfig, task: OpenQAConfig, mesh: jax.sharding.Mesh):
  """`eval_step(params, batch) -> outputs` jitted once over the mesh (params replicated, batch and
  outputs split over `data`)."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_step, retriever_cfg=model_cfg.retriever_config(),
                                   reader_cfg=model_cfg.reader_config(), num_read=task.num_read),
                 in_shardings=(rep, data), out_shardings=data)


# ---------------------------------------------------------------------------------------------------
# Evaluation (host loop around eval_step).
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpenQAEvaluator:
  """Evaluates Open-QA: recall@k of the retriever, exact match of the reader, predictions.

  Args:
    featurizer: builds the step inputs.
    searcher: MIPS over the snapshot (`search(q [n, dim], k) -> (scores, block_ids)`).
    query_embed_fn / eval_fn: the jitted query tower and `eval_step`.
    mesh: the device mesh.
    batch_size: questions per eval step (rounded up to a multiple of the `data` axis).
    recall_ks: the k of recall@k (REALM reports 5; DPR-style 1/5/20/100).
  """

  featurizer: OpenQAFeaturizer
  searcher: Any
  query_embed_fn: Any
  eval_fn: Any
  mesh: jax.sharding.Mesh
  batch_size: int = 8
  recall_ks: tuple[int, ...] = (1, 5, 20, 100)

  def retrieve(self, retriever_params: Any, questions: Sequence[Question], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds the questions and returns MIPS `(scores [n, k] float32, block_ids [n, k] int64)`."""
    queries = self.featurizer.query_batch(questions)
    q = embedding.run_batched(self.query_embed_fn, retriever_params, queries,
                                  max(self.batch_size, 64), self.mesh, bucket=16, progress=False)
    return self.searcher.search(q, k)

  def __call__(self, params: Any, questions: Sequence[Question], desc: str = "evaluating",
               read: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Runs retrieval (+ reading, when `read`) over `questions`.

    With `read=False` only the retriever is evaluated (recall@k); `exact_match` is absent and no
    predictions are returned. That is the cheap zero-shot column: an untrained reader has no EM.

    Returns:
      `(metrics, predictions)`: metrics `exact_match`, `answer_recall@k`, `gold_recall@k` (when the
      questions carry gold documents, as SQuAD-open does) in [0, 1], and `num_questions`;
      predictions are JSON-ready dicts (question, answers, prediction, exact_match, top blocks with
      p(z|x)).
    """
    import tqdm  # host-side progress only
    cfg = self.featurizer.config
    num_blocks = len(self.featurizer.row_of_block)
    k_search = min(max(max(self.recall_ks), cfg.num_retrieved), num_blocks)
    data_size = self.mesh.shape[sharding.DATA_AXIS]
    batch_size = -(-self.batch_size // data_size) * data_size
    corpus = self.featurizer.corpus
    em, answer_hits, gold_hits, predictions = [], [], [], []
    has_gold = all(q.gold_doc_ids for q in questions)
    for begin in tqdm.trange(0, len(questions), batch_size, desc=desc, unit="batch"):
      chunk = list(questions[begin:begin + batch_size])
      _, block_ids = self.retrieve(params["retriever"], chunk, k_search)
      width = max(max(self.recall_ks), cfg.num_retrieved)
      if block_ids.shape[1] < width:  # a corpus smaller than k: missing ranks are misses
        block_ids = np.pad(block_ids, ((0, 0), (0, width - block_ids.shape[1])),
                           constant_values=-1)
      if read:
        batch, reads = self.featurizer.batch(chunk, block_ids[:, :cfg.num_retrieved],
                                             with_labels=False)
        batch, _ = pad_batch(self.featurizer.cut_to_bucket(batch), data_size)
        out = jax.device_get(self.eval_fn(params, batch))
      for i, q in enumerate(chunk):
        top = block_ids[i, :max(self.recall_ks)]
        answer_hits.append([b >= 0 and self.featurizer.has_answer(int(b), q) for b in top])
        if has_gold:
          gold = set(q.gold_doc_ids)
          answer_doc = [b >= 0 and corpus.doc_ids[self.featurizer.position_of_block[int(b)]] in gold
                        for b in top]
          gold_hits.append(answer_doc)
        if not read:
          continue
        r, s = int(out["best_read"][i]), int(out["best_span"][i])
        chosen = reads[i][r]  # The read block holding the best span.
        prediction = ""
        if chosen["block_id"] >= 0:
          block = self.featurizer.block(chosen["block_id"])
          start, end = self.featurizer.predicted_span(chosen, s)
          prediction = featurize.span_text(block.text, block.body_offsets, chosen["body_start"],
                                           start, end)
        correct = evaluation.exact_match(prediction, q.answers, q.answers_are_regex)
        em.append(correct)
        top_blocks = []
        for rank in range(min(cfg.num_read, block_ids.shape[1])):
          b = int(block_ids[i, rank])
          if b < 0:
            continue
          blk = self.featurizer.block(b)
          top_blocks.append({"block_id": b, "doc_id": str(blk.doc_id), "title": blk.title,
                             "p_z": float(out["p_z"][i, rank]), "text": blk.text})
        predictions.append({"qid": q.qid, "question": q.question, "answers": list(q.answers),
                            "prediction": prediction, "score": float(out["best_score"][i]),
                            "exact_match": bool(correct), "evidence_rank": r,
                            "top_blocks": top_blocks})
    metrics = {"num_questions": float(len(questions))}
    if read:
      metrics["exact_match"] = float(np.mean(em)) if em else 0.0
    hits = np.asarray(answer_hits, bool).reshape(len(questions), -1)
    for k, v in evaluation.recall_at_k(hits, self.recall_ks).items():
      metrics[f"answer_recall@{k}"] = v
    if has_gold and gold_hits:
      gold = np.asarray(gold_hits, bool).reshape(len(questions), -1)
      for k, v in evaluation.recall_at_k(gold, self.recall_ks).items():
        metrics[f"gold_recall@{k}"] = v
    return metrics, predictions


# ---------------------------------------------------------------------------------------------------
# The run: data, first index, train loop, evaluation.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpenQADataConfig:
  """Where the knowledge corpus and the questions come from.

  Attributes:
    corpus: the knowledge corpus Z (`data.corpus_config.CorpusConfig`: sources, block length,
      tokenizer, data directory); its default is the embedded SQuAD v1.1 files (dev + 30 train
      articles). The index builder reads the same field, so both jobs block the same corpus.
    train_questions / eval_questions: question files; empty means the embedded SQuAD train / dev.
    questions_format: `squad_open`, `nq_open`, `webquestions` or `curatedtrec`.
    max_train_questions / max_eval_questions: 0 for all; otherwise a seeded random sample.

  Raises:
    ValueError: on an unknown questions format.
  """

  corpus: corpus_config.CorpusConfig = corpus_config.CorpusConfig()
  train_questions: str = ""
  eval_questions: str = ""
  questions_format: str = "squad_open"
  max_train_questions: int = 0
  max_eval_questions: int = 0

  def __post_init__(self):
    if self.questions_format not in ("squad_open", "nq_open", "webquestions", "curatedtrec"):
      raise ValueError(f"OpenQADataConfig.questions_format={self.questions_format!r} is unknown")
    if not isinstance(self.corpus, corpus_config.CorpusConfig):
      raise TypeError(f"OpenQADataConfig.corpus must be a CorpusConfig, got "
                      f"{type(self.corpus).__name__}")


def _sample(questions: list[Question], limit: int, seed: int) -> list[Question]:
  if not limit or limit >= len(questions):
    return questions
  order = np.random.default_rng(seed).permutation(len(questions))[:limit]
  return [questions[i] for i in sorted(order)]


def load_openqa_data(data: OpenQADataConfig, model: realm.ModelConfig, workdir: str, seed: int):
  """Tokenizer, blocked corpus (`corpus_config.load_corpus`) and question sets of an Open-QA run.

  Returns:
    `(tokenizer, corpus, train_questions, eval_questions)`.

  Raises:
    FileNotFoundError / data.corpus.DataFormatError: naming the bad file, line and field.
  """
  from realm_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

  tokenizer, corpus = corpus_config.load_corpus(data.corpus, model.checkpoint_dir(), workdir,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())
  embedded = (corpus_lib.embedded_squad_paths()
              if not (data.train_questions and data.eval_questions) else {})
  splits = {"train": data.train_questions or str(embedded["train"]),
            "eval": data.eval_questions or str(embedded["dev"])}
  questions = tfds_builders.build_questions(
      splits, data.questions_format, data.corpus.data_dir or fileio.join(workdir, "tfds"))
  train = _sample(questions["train"], data.max_train_questions, seed)
  evals = _sample(questions["eval"], data.max_eval_questions, seed + 1)
  logging.info("%d train / %d eval questions", len(train), len(evals))
  return tokenizer, corpus, train, evals


def params_from_run(init_from: str, abstract_params: Any, model: realm.ModelConfig, seed: int = 0
                    ) -> dict[str, Any]:
  """`{"retriever", "reader"}` params taken from another run (REALM §3.4 → §4 hand-over).

  Args:
    init_from: a work directory or `checkpoints/` directory of a REALM pre-training run (retriever ←
      its retriever, reader BERT ← its knowledge-augmented encoder's BERT, span head fresh), of an
      Open-QA run (retriever + reader) or of an ICT run (retriever; reader fresh), or a directory
      written by `realm-jax convert` (`realm_params.safetensors`).
    abstract_params: the `{"retriever", "reader"}` targets (`jax.ShapeDtypeStruct`s with shardings).
    model: the model configuration (the fresh parts come from its pretrained checkpoint).
    seed: seeds the fresh parts, as `realm.init_params`.

  Returns:
    The params; parts the source lacks are initialised as without `init_from`.

  Raises:
    FileNotFoundError: if `init_from` holds no checkpoint.
    ValueError: if its params do not fit the model.
  """
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  fresh = lambda part: realm.init_params(model, jax.random.key(seed), parts=(part,))[part]  # noqa: E731
  if fileio.isfile(fileio.join(init_from, "realm_params.safetensors")):
    from realm_jax.models import realm_checkpoints  # pylint: disable=g-import-not-at-top
    converted_dir = init_from
    if fileio.is_url(init_from):  # safetensors reads local files: stage the two files once.
      converted_dir = fileio.dirname(
          [fileio.local_copy(fileio.join(init_from, name))
           for name in (realm_checkpoints.CONVERTED_CONFIG_NAME,
                        realm_checkpoints.CONVERTED_PARAMS_NAME)][-1])
    converted = realm_checkpoints.load_converted(converted_dir).params
    restored = {"retriever": converted["retriever"]} if "retriever" in converted else {}
    if "reader" in converted:
      restored["reader"] = converted["reader"]
    elif "encoder" in converted:
      restored["encoder"] = {"bert": converted["encoder"]["bert"]}
    source = f"the converted checkpoint {init_from}"
  else:
    parts, step = checkpointing.saved_param_parts(init_from)
    target = {"retriever": abstract_params["retriever"]}
    if "reader" in parts:
      target["reader"] = abstract_params["reader"]
    elif "encoder" in parts:
      target["encoder"] = {"bert": abstract_params["reader"]["bert"]}
    restored, _ = checkpointing.restore_partial_params(init_from, target, step)
    source = f"{init_from} step {step} (parts {parts})"
  params = {"retriever": restored["retriever"] if "retriever" in restored else fresh("retriever")}
  if "reader" in restored:
    params["reader"] = restored["reader"]
  else:
    params["reader"] = fresh("reader")
    if "encoder" in restored:
      params["reader"] = realm._graft(params["reader"], ("bert",), restored["encoder"]["bert"])  # pylint: disable=protected-access
  jax.tree_util.tree_map(_check_shape, params, abstract_params)
  logging.info("fine-tuning starts from %s", source)
  return params


def _check_shape(value, target) -> None:
  if tuple(np.shape(value)) != tuple(target.shape):
    raise ValueError(f"init_from params of shape {np.shape(value)} do not fit the model's "
                     f"{target.shape}")


def train_and_evaluate(workdir: str,
                       model: realm.ModelConfig = realm.ModelConfig(),
                       data: OpenQADataConfig = OpenQADataConfig(),
                       task: OpenQAConfig = OpenQAConfig(),
                       optimizer: optim.OptimizerConfig | None = None,
                       loop: loop_lib.LoopConfig = loop_lib.LoopConfig(),
                       batch_size: int = 8,
                       eval_batch_size: int = 8,
                       searcher: str = "scann",
                       index_batch_size: int = 64,
                       zero_shot_eval: bool = True,
                       init_from: str = "",
                       seed: int = 0,
                       mesh_shape: tuple[int, ...] = (-1, 1)) -> dict[str, Any]:
  """Fine-tunes REALM/ORQA on Open-QA and evaluates it (REALM §3.4 / ORQA §4).

  Order of work: data → the train state (`loop.Trainer.initial_state`: resume, else `init_from`,
  else the pretrained BERT) → the first embedding snapshot (built here when `WORKDIR/snapshots` has
  none for this corpus) → searcher → optional zero-shot evaluation → the steps up to
  `num_train_steps` (`loop.Trainer.fit`) → final evaluation, predictions JSONL and `summary.json`.

  Args:
    workdir: the run's directory (local or `gs://`).
    model / data / task / optimizer: configuration dataclasses (gin builds them).
    loop: steps (`num_train_steps=0` evaluates only), logging, evaluation, checkpoint and NaN
      policy (`loop.LoopConfig`).
    batch_size: global questions per step (a multiple of the mesh's `data` size).
    searcher: `"scann"` (host ScaNN) or `"exact"` (sharded on-device top-k).
    zero_shot_eval: evaluate before training too (the "before" column of the benchmarks).
    init_from: start from another run instead of the pretrained BERT (see `params_from_run`);
      ignored when WORKDIR already has a checkpoint (resume wins).

  Returns:
    A summary dict: `zero_shot` and `final` metric dicts, `train` (the last logged window's means),
    `history`, `evals`, `predictions_path`, `num_blocks`, timings in seconds.

  Raises:
    ValueError: on inconsistent configuration (e.g. a batch that does not split over the mesh).
    retrieval.snapshot.SnapshotError: if `WORKDIR/snapshots` was built for another corpus.
    FloatingPointError: on a non-finite loss with `nan_policy="stop"`.
  """
  import time  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import searchers as searchers_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import snapshot as snapshot_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.training import index_source  # pylint: disable=g-import-not-at-top

  optimizer = optimizer or optim.OptimizerConfig(num_train_steps=max(loop.num_train_steps, 1))
  trainer = loop_lib.Trainer(workdir, loop, batch_size, mesh_shape)
  mesh, timings = trainer.mesh, {}
  t0 = time.time()
  tokenizer, corpus, train_qs, eval_qs = load_openqa_data(data, model, workdir, seed)
  timings["data_s"] = time.time() - t0
  if task.num_retrieved > len(corpus):
    raise ValueError(f"OpenQAConfig.num_retrieved={task.num_retrieved} exceeds the corpus size "
                     f"({len(corpus)} blocks)")
  tx = make_optimizer(optimizer)
  parts = step_parts(model, task, batch_size, tx)
  order = example_order.ExampleOrder(len(train_qs), batch_size, seed, jax.process_index(),
                                     jax.process_count())
  state = trainer.initial_state(
      random_params=parts.init_params, tx=tx, data_order=order, init_from=init_from,
      initial_params=lambda: realm.init_params(model, jax.random.key(seed), parts=PARTS),
      params_from=functools.partial(params_from_run, model=model, seed=seed))
  start_step = int(jax.device_get(state.step))

  t1 = time.time()  # The first index: the document embedder's snapshot, frozen while fine-tuning.
  path = index_source.ensure_first_snapshot(fileio.join(workdir, "snapshots"), corpus,
                                            model.retriever_config(), state.params["retriever"],
                                            params_step=start_step, batch_size=index_batch_size)
  snapshot = snapshot_lib.read_snapshot(path)
  timings["index_s"] = time.time() - t1
  t2 = time.time()
  search = searchers_lib.searcher_from_snapshot(
      snapshot, kind=searcher, mesh=mesh if searcher == "exact" else None)
  timings["searcher_build_s"] = time.time() - t2
  featurizer = OpenQAFeaturizer(tokenizer, corpus, snapshot.block_ids, snapshot.embeddings, task,
                                model.max_span_width)
  evaluator = OpenQAEvaluator(featurizer, search,
                              embedding.make_query_embed_fn(model.retriever_config(), mesh),
                              make_eval_step(model, task, mesh), mesh, eval_batch_size)
  summary: dict[str, Any] = {"num_blocks": len(corpus), "num_train_questions": len(train_qs),
                             "num_eval_questions": len(eval_qs), "snapshot": str(path),
                             "init": trainer.origin}
  if zero_shot_eval and start_step == 0:
    t3 = time.time()
    summary["zero_shot"], _ = evaluator(state.params, eval_qs, desc="zero-shot retrieval",
                                        read=False)
    timings["zero_shot_eval_s"] = time.time() - t3
    trainer.writer.write(0, summary["zero_shot"], prefix="zero_shot")

  def next_batch(step: int, state: train_state.TrainState) -> dict[str, np.ndarray]:
    del step  # The order is resumable state of its own.
    local = [train_qs[i] for i in order.next_local_indices()]
    _, retrieved = evaluator.retrieve(state.params["retriever"], local, task.num_retrieved)
    return featurizer.cut_to_bucket(featurizer.batch(local, retrieved, with_labels=True)[0],
                                    across_processes=True)

  state, fit = trainer.fit(loop_lib.Task(
      name="fine-tuning", train_step=parts.train_step, next_batch=next_batch, data_order=order,
      global_batch_size=batch_size,
      evaluate=lambda params, step: evaluator(params, eval_qs, desc=f"eval @ {step}")[0],
      checkpoint_meta={"model": dataclasses.asdict(model)},
      learning_rate=optim.learning_rate_schedule(optimizer)), state, jax.random.key(seed + 1))
  timings.update(fit.pop("timings"))
  summary.update(fit)

  t5 = time.time()
  summary["final"], predictions = evaluator(state.params, eval_qs, desc="final eval")
  timings["final_eval_s"] = time.time() - t5
  trainer.writer.write(loop.num_train_steps, summary["final"], prefix="eval")
  if trainer.is_main:
    pred_dir = fileio.join(workdir, "predictions")  # Local or gs://.
    fileio.makedirs(pred_dir)
    pred_path = fileio.join(pred_dir, f"eval-step{int(jax.device_get(state.step))}.jsonl")
    evaluation.write_predictions_jsonl(pred_path, predictions)
    summary["predictions_path"] = str(pred_path)
    summary["examples"] = predictions[:3]
  summary["timings"] = timings
  return trainer.finish(summary)


def abstract_batch(task: OpenQAConfig, model: realm.ModelConfig, batch_size: int
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global batch (what `OpenQAFeaturizer.batch` produces): the largest
  one; `cut_to_bucket` shortens the reads (`reader_*`, `span_is_answer`) of most batches."""
  b, k, r, lr, lq = (batch_size, task.num_retrieved, task.num_read, task.reader_length,
                     task.query_length)
  num_spans = len(encoder_lib.span_candidates(lr, model.max_span_width)[0])
  dim = model.retriever_config().embedding_dim
  i32, f32 = jnp.int32, jnp.float32
  spec = {"query_input_ids": ((b, lq), i32), "query_input_mask": ((b, lq), i32),
          "query_segment_ids": ((b, lq), i32), "retrieved_embeddings": ((b, k, dim), f32),
          "retrieved_valid": ((b, k), bool), "retrieved_has_answer": ((b, k), bool),
          "span_is_answer": ((b, r, num_spans), bool)}
  for name in ("input_ids", "segment_ids", "input_mask", "body_mask"):
    spec[f"reader_{name}"] = ((b, r, lr), i32)
  return {k_: jax.ShapeDtypeStruct(s, d) for k_, (s, d) in spec.items()}


def trainable_mask(params: Any) -> Any:
  """Which Open-QA params fine-tuning updates: all but a separate document tower.

  The document embeddings are the frozen index (REALM §3.4 / ORQA §5: the evidence blocks are
  embedded once, before fine-tuning), so the document tower gets no gradient. With
  `share_embedders=False` its params (`retriever/document_embedder/…`) are frozen outright: no
  AdamW weight decay drifting them away from the tower that built the index, and no Adam moments
  kept for them. With shared towers nothing is frozen (the one tower is the query tower).

  Args:
    params: the `{"retriever", "reader"}` params pytree (or any pytree with the same top level).

  Returns:
    A pytree of bools of the same structure (`optim.bert_adamw(…, trainable=…)`).
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      path: not (path[0] == "retriever" and path[1:2] == ("document_embedder",)) for path in flat})


def make_optimizer(config: optim.OptimizerConfig) -> optax.GradientTransformation:
  """The fine-tuning optimiser: `optim.bert_adamw` with a separate document tower frozen
  (`trainable_mask`)."""
  return optim.bert_adamw(config, trainable=trainable_mask)


def step_parts(model: realm.ModelConfig, task: OpenQAConfig, batch_size: int,
               tx: optax.GradientTransformation | None = None) -> train_state.StepParts:
  """The Open-QA step without weights or data (`train_state.make_step_parts`)."""
  return train_state.make_step_parts(
      train_step, model, PARTS, abstract_batch(task, model, batch_size), tx,
      retriever_cfg=model.retriever_config(), reader_cfg=model.reader_config(),
      num_read=task.num_read)
