"""REALM pre-training: retrieval-marginalised masked language modelling (Guu et al., 2020, §2–§3).

For a masked query sentence x (salient-span masking by default, §3.4):
  1. retrieval, on the host BEFORE the step: the current query embedder embeds x and MIPS over the
     current snapshot (ScaNN on the host, or the exact sharded top-k on the devices) returns the top
     blocks; trivial retrievals (the block x was cut from, or a copy of its text) are dropped, the
     best k − 1 are kept and the null document ∅ (empty title and body) is prepended as candidate 0
     (official `example_generator.postprocess_candidates`);
  2. the batch carries, for each of the k candidates, the document-tower input
     `[CLS] title [SEP] body [SEP]` (`[b, k, candidate_length]`) and the joined encoder input
     `[CLS] x [SEP] body [SEP]` (`[b, k, query_length + candidate_length]`, title dropped; ∅ gives
     `[CLS] x [SEP] [SEP]`);
  3. inside the jitted step, the k candidates are RE-EMBEDDED with the current document embedder, so
     the gradient reaches both towers through them (the stale index only chose them):
         log p(z_k|x) = log_softmax_k( score_scale · Embed_input(x)ᵀ Embed_doc(z_k) )
     The null document is scored like any other candidate: its score is the inner product with the
     current embedding of the empty block `[CLS] [SEP] [SEP]` (exactly what the official code does:
     `NULL_DOCUMENT` goes through the same featuriser and embedder). This needs no extra parameter,
     lets the score of ∅ depend on the query, and keeps the parameter tree identical to the one the
     index builder and checkpoint import expect;
  4. masked-LM logits p(y_j | z_k, x) for each candidate (`KnowledgeAugmentedEncoder`), and the
     per-token marginal (§2.3, §3.4) `log p(y_j|x) = logsumexp_k [log p(z_k|x) + log p(y_j|z_k, x)]`
     (`losses.mlm_marginal_log_likelihood`); loss = −mean over the real masked tokens.

Metrics: `train/mlm_loss`, `train/mlm_accuracy` (argmax of the marginal p(y|x)),
`train/null_mlm_loss`, `retrieval/utility` (marginal − ∅-only log-likelihood per token, the
official `retrieval_utility`; > 0 means retrieval helps), `retrieval/entropy` (nats) and
`retrieval/p_null` of p(z|x), `retrieval/index_staleness_steps` (train step − the snapshot's params
step, from the host) and the index source's `index/…` scalars.

The loop (`train`) builds the corpus and the masked examples (TFDS), the first snapshot when there
is none, and asks an index source (`training/index_source.py`) for the index before every step:
`index_refresh='none'` (one snapshot), `'inline'` (the trainer re-embeds the corpus every
`refresh_every_steps`) or `'async'` (`retrieval.watcher.IndexWatcher` swaps in snapshots written
by the separate index-builder job, which reads this run's checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from realm_jax import fileio
from realm_jax import sharding
from realm_jax.data import corpus_config
from realm_jax.data import example_order
from realm_jax.data import featurize
from realm_jax.models import bert
from realm_jax.models import encoder as encoder_lib
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.retrieval import embedding
from realm_jax.retrieval import trainer_done
from realm_jax.training import length_buckets
from realm_jax.training import loop as loop_lib
from realm_jax.training import losses
from realm_jax.training import optim
from realm_jax.training import train_state


Array = jax.Array

NULL_BLOCK_ID = -1   # candidate 0: the null document ∅
PAD_BLOCK_ID = -2    # a missing candidate (fewer than k − 1 non-trivial retrievals)
INDEX_REFRESH_MODES = ("none", "inline", "async")
MASKINGS = ("salient", "random_token", "random_span")
PARTS = ("retriever", "encoder")  # The params of a REALM pre-training run.


# ---------------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The shapes of one REALM pre-training example (REFERENCE "Hyper-parameters").

  Attributes:
    num_candidates: k, candidates per query INCLUDING the null document (8 in the paper).
    query_length: `[CLS] x [SEP]` length in wordpieces (96 in the paper); also the query part of the
      encoder input. The masked examples are built with this length.
    candidate_length: `[CLS] title [SEP] body [SEP]` length for the document tower, and the room
      for `body [SEP]` in the encoder input (288 in the paper); longer blocks are truncated.
    max_masks: masked-LM slots per query (10, the official local launcher).
    extra_retrieved: blocks retrieved beyond k − 1, so that dropping trivial retrievals still
      leaves k − 1 candidates.
    length_bucket: each train batch's query, candidate and joined inputs are cut to the smallest
      multiple of this many wordpieces that holds the batch's longest row of each
      (`training.length_buckets`; all processes agree on the lengths), so the step compiles once
      per combination of bucket lengths and skips the padding past them. 0: every batch at
      `query_length`, `candidate_length`, `joint_length`.

  Raises:
    ValueError: on sizes that cannot form an example.
  """

  num_candidates: int = 8
  query_length: int = 96
  candidate_length: int = 288
  max_masks: int = 10
  extra_retrieved: int = 2
  length_bucket: int = 64

  def __post_init__(self):
    if self.num_candidates < 2:
      raise ValueError(f"PretrainConfig.num_candidates={self.num_candidates}: need the null "
                       "document and at least one retrieved block")
    if self.query_length < 3:
      raise ValueError(f"PretrainConfig.query_length={self.query_length} must be at least 3")
    if self.candidate_length < 3:
      raise ValueError(f"PretrainConfig.candidate_length={self.candidate_length} must be at "
                       "least 3 ([CLS] [SEP] [SEP] of the null document)")
    if self.max_masks < 1 or self.extra_retrieved < 0:
      raise ValueError("PretrainConfig: max_masks must be >= 1 and extra_retrieved >= 0, got "
                       f"{self.max_masks}, {self.extra_retrieved}")
    if self.length_bucket < 0:
      raise ValueError(f"PretrainConfig.length_bucket={self.length_bucket} must be >= 0 (0: no "
                       "bucketing)")

  @property
  def joint_length(self) -> int:
    """Encoder input length `query_length + candidate_length` (96 + 288 = 384 in the paper)."""
    return self.query_length + self.candidate_length


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
  """Where the knowledge corpus (also the pre-training corpus) and its masked queries come from.

  Attributes:
    corpus: the knowledge corpus Z (`data.corpus_config.CorpusConfig`: sources, extra sources, an
      embedded-SQuAD subset, block length, tokenizer, data directory); its default is the embedded
      SQuAD v1.1 paragraphs (dev + 30 train articles). The index builder reads the same field.
    pretraining_sources: files the masked sentences are cut from when they are not the knowledge
      corpus (REALM §4.2, "REALM (CC-News)": pre-training text X from CC-News, knowledge corpus Z
      from Wikipedia), blocked like `corpus`. Empty means the sentences come from the knowledge
      corpus itself. Their blocks are not in the index, so their `source_block_id` is -1 (no
      trivial-retrieval filter).
    masking: 'salient' (REALM §3.4), 'random_token' or 'random_span' (Table 2 ablations).
    masking_seed: seed of the masks (see `data.pretraining.sentence_rng`).
    max_examples: 0 uses every masked sentence; otherwise a seeded random subset of this size.
    spacy_n_process: spaCy worker processes for the salient-span pass.

  Raises:
    ValueError: on an unknown masking or a negative `max_examples`.
    TypeError: if `corpus` is not a `CorpusConfig`.
  """

  corpus: corpus_config.CorpusConfig = corpus_config.CorpusConfig()
  pretraining_sources: tuple[str, ...] = ()
  masking: str = "salient"
  masking_seed: int = 0
  max_examples: int = 0
  spacy_n_process: int = 1

  def __post_init__(self):
    if self.masking not in MASKINGS:
      raise ValueError(f"PretrainDataConfig.masking={self.masking!r}; expected one of {MASKINGS}")
    if self.max_examples < 0:
      raise ValueError(f"PretrainDataConfig: max_examples must be >= 0, got {self.max_examples}")
    if not isinstance(self.corpus, corpus_config.CorpusConfig):
      raise TypeError(f"PretrainDataConfig.corpus must be a CorpusConfig, got "
                      f"{type(self.corpus).__name__}")


# ---------------------------------------------------------------------------------------------------
# Host side: retrieved blocks → candidates → fixed-shape batch.
# ---------------------------------------------------------------------------------------------------


class PretrainFeaturizer:
  """Builds the candidate set and the step inputs of REALM pre-training on the host (REALM §3.4).

  Args:
    tokenizer: supplies the [CLS] / [SEP] / [PAD] ids.
    corpus: the knowledge corpus (`data.corpus_store.Corpus`); candidates are its blocks.
    config: the example shapes.
  """

  def __init__(self, tokenizer, corpus, config: PretrainConfig):
    self.tokenizer = tokenizer
    self.corpus = corpus
    self.config = config
    self._text_keys: dict[int, int] = {}

  def _text_key(self, position: int) -> int:
    """A key of the block's (title, text): equal keys mark copies of the same text."""
    if position not in self._text_keys:
      self._text_keys[position] = hash((self.corpus.titles[position], self.corpus.texts[position]))
    return self._text_keys[position]

  def num_to_retrieve(self) -> int:
    """How many blocks to ask MIPS for: k − 1 + `extra_retrieved`, at most the corpus size."""
    return min(self.config.num_candidates - 1 + self.config.extra_retrieved, len(self.corpus))

  def select_candidates(self, retrieved_block_ids: np.ndarray, source_block_ids: np.ndarray
                        ) -> np.ndarray:
    """∅ first, then the best k − 1 retrieved blocks that are not trivial retrievals (REALM §3.4).

    A retrieved block is trivial when it is the query's own block or a copy of its title and text
    (the official code compares a hash of title and text); repeated ids are kept once.

    Args:
      retrieved_block_ids: `[n, K]` int64 block ids from MIPS, best first; negative ids are ignored.
      source_block_ids: `[n]` int64, the block each query sentence was cut from.

    Returns:
      `[n, num_candidates]` int64: column 0 is `NULL_BLOCK_ID`; `PAD_BLOCK_ID` fills the tail when
      fewer than k − 1 usable blocks were retrieved.

    Raises:
      ValueError: if the two arrays disagree in their leading dimension.
    """
    retrieved_block_ids = np.asarray(retrieved_block_ids, np.int64)
    source_block_ids = np.asarray(source_block_ids, np.int64).reshape(-1)
    if retrieved_block_ids.ndim != 2 or len(retrieved_block_ids) != len(source_block_ids):
      raise ValueError(f"select_candidates: retrieved_block_ids {retrieved_block_ids.shape} and "
                       f"source_block_ids {source_block_ids.shape} do not match")
    k = self.config.num_candidates
    out = np.full((len(source_block_ids), k), PAD_BLOCK_ID, np.int64)
    out[:, 0] = NULL_BLOCK_ID
    id_to_pos = self.corpus.block_ids
    for i, (row, source) in enumerate(zip(retrieved_block_ids, source_block_ids)):
      source_pos = np.searchsorted(id_to_pos, source)
      source_key = (self._text_key(int(source_pos))
                    if source_pos < len(id_to_pos) and id_to_pos[source_pos] == source else None)
      seen = {int(source)}
      j = 1
      for block_id in row.tolist():
        if j == k:
          break
        if block_id < 0 or block_id in seen:
          continue
        seen.add(block_id)
        if source_key is not None:
          pos = int(np.searchsorted(id_to_pos, block_id))
          if self._text_key(pos) == source_key:
            continue
        out[i, j] = block_id
        j += 1
    return out

  def featurize(self, examples: Mapping[str, np.ndarray], candidate_block_ids: np.ndarray
                ) -> dict[str, np.ndarray]:
    """The step inputs for `n` masked queries and their candidates.

    Args:
      examples: `PretrainingDataset.batch(...)`: `query_input_ids`, `query_input_mask`,
        `query_segment_ids` `[n, query_length]` int32; `mlm_positions`, `mlm_targets`
        `[n, max_masks]` int32; `mlm_weights` `[n, max_masks]` float32.
      candidate_block_ids: `[n, num_candidates]` int64 from `select_candidates`.

    Returns:
      A dict of numpy arrays:
        `query_input_ids`, `query_input_mask`, `query_segment_ids`: `[n, query_length]` int32;
        `candidate_input_ids`, `candidate_input_mask`, `candidate_segment_ids`:
          `[n, k, candidate_length]` int32, `[CLS] title [SEP] body [SEP]` (∅: `[CLS] [SEP] [SEP]`);
        `joint_input_ids`, `joint_input_mask`, `joint_segment_ids`: `[n, k, joint_length]` int32,
          `[CLS] x [SEP] body [SEP]` (∅: `[CLS] x [SEP] [SEP]`), x at its positions in the query;
        `mlm_positions`, `mlm_targets` `[n, max_masks]` int32; `mlm_weights` `[n, max_masks]`
          float32;
        `candidate_valid`: `[n, k]` bool (False for `PAD_BLOCK_ID`).

    Raises:
      ValueError: naming the field, when an array has the wrong shape for this config.
      KeyError: if a candidate id is not in the corpus.
    """
    cfg = self.config
    tok = self.tokenizer
    candidate_block_ids = np.asarray(candidate_block_ids, np.int64)
    n, k = candidate_block_ids.shape
    if k != cfg.num_candidates:
      raise ValueError(f"candidate_block_ids has {k} columns, expected num_candidates="
                       f"{cfg.num_candidates}")
    widths = {"query_input_ids": cfg.query_length, "query_input_mask": cfg.query_length,
              "query_segment_ids": cfg.query_length, "mlm_positions": cfg.max_masks,
              "mlm_targets": cfg.max_masks, "mlm_weights": cfg.max_masks}
    for name, width in widths.items():
      if name not in examples:
        raise ValueError(f"pre-training examples lack the field {name!r}")
      if examples[name].shape != (n, width):
        raise ValueError(f"pre-training examples field {name!r} has shape {examples[name].shape}, "
                         f"expected {(n, width)} (query_length={cfg.query_length}, max_masks="
                         f"{cfg.max_masks}: rebuild the examples with these lengths)")
    if not (candidate_block_ids[:, 0] == NULL_BLOCK_ID).all():
      raise ValueError("candidate 0 must be the null document (NULL_BLOCK_ID)")
    c, L = cfg.candidate_length, cfg.joint_length
    cand = {name: np.zeros((n, k, c), np.int32) for name in ("ids", "mask", "seg")}
    cand["ids"][:] = tok.pad_id
    joint = {name: np.zeros((n, k, L), np.int32) for name in ("ids", "mask", "seg")}
    # ∅ (and padding candidates): `[CLS] [SEP] [SEP]`, segments 0 0 1 as for an empty title/body.
    null = np.asarray([tok.cls_id, tok.sep_id, tok.sep_id], np.int32)
    not_real = candidate_block_ids < 0
    cand["ids"][not_real, :3] = null
    cand["mask"][not_real, :3] = 1
    cand["seg"][not_real, 2] = 1
    real = ~not_real
    positions = np.zeros((n, k), np.int64)
    if real.any():
      positions[real] = self.corpus.positions(candidate_block_ids[real])
      doc = self.corpus.retrieval_inputs(positions[real], max_length=c)
      cand["ids"][real] = doc["input_ids"]
      cand["mask"][real] = doc["input_mask"]
      cand["seg"][real] = doc["segment_ids"]
    query_ids = examples["query_input_ids"]
    query_len = examples["query_input_mask"].sum(axis=1)
    for i in range(n):
      x = query_ids[i, 1:max(int(query_len[i]) - 1, 1)]
      for j in range(k):
        body = (self.corpus.body_ids(int(positions[i, j]))[:c - 2] if real[i, j]
                else np.zeros((0,), np.int32))
        joined = featurize.join_inputs(x, body, L, tok.cls_id, tok.sep_id, tok.pad_id,
                                       max_query_length=cfg.query_length)
        joint["ids"][i, j] = joined["input_ids"]
        joint["mask"][i, j] = joined["input_mask"]
        joint["seg"][i, j] = joined["segment_ids"]
    return {
        "query_input_ids": np.asarray(query_ids, np.int32),
        "query_input_mask": np.asarray(examples["query_input_mask"], np.int32),
        "query_segment_ids": np.asarray(examples["query_segment_ids"], np.int32),
        "candidate_input_ids": cand["ids"], "candidate_input_mask": cand["mask"],
        "candidate_segment_ids": cand["seg"],
        "joint_input_ids": joint["ids"], "joint_input_mask": joint["mask"],
        "joint_segment_ids": joint["seg"],
        "mlm_positions": np.asarray(examples["mlm_positions"], np.int32),
        "mlm_targets": np.asarray(examples["mlm_targets"], np.int32),
        "mlm_weights": np.asarray(examples["mlm_weights"], np.float32),
        "candidate_valid": candidate_block_ids != PAD_BLOCK_ID,
    }


def search_local_rows(searcher, query_embeddings: Array, mesh: jax.sharding.Mesh, k: int
                      ) -> np.ndarray:
  """MIPS for this process's rows of a global, data-sharded `[batch, dim]` query array.

  `ExactSearcher` (on-device `sharded_top_k`) takes the global array on every process and returns
  every row; host searchers (ScaNN) get only this process's rows.

  Returns:
    `[local_batch, k]` int64 block ids, best first.
  """
  from realm_jax.retrieval import searchers as searchers_lib
  if isinstance(searcher, searchers_lib.ExactSearcher):
    _, ids = searcher.search(query_embeddings, k)
    local = ids.shape[0] // jax.process_count()
    return ids[jax.process_index() * local:(jax.process_index() + 1) * local]
  from jax.experimental import multihost_utils
  local_q = multihost_utils.global_array_to_host_local_array(
      query_embeddings, mesh, jax.P(sharding.DATA_AXIS))
  _, ids = searcher.search(np.asarray(local_q), k)
  return ids


# ---------------------------------------------------------------------------------------------------
# Device side: pure steps.
# ---------------------------------------------------------------------------------------------------


def forward(params: Mapping[str, Any], batch: Mapping[str, Array], *,
            retriever_cfg: retriever_lib.RetrieverConfig, encoder_cfg: bert.BertConfig,
            deterministic: bool, rng: Array | None = None) -> dict[str, Array]:
  """Retriever logits over the k candidates and the masked-LM logits given each candidate.

  The candidates are embedded with the CURRENT document tower (REALM §3.4), so gradients reach both
  towers through exactly these k blocks.

  Args:
    params: `{"retriever": ..., "encoder": ...}`.
    batch: the arrays of `PretrainFeaturizer.featurize` (any leading batch sharding).
    retriever_cfg / encoder_cfg: the model configuration.
    deterministic: disables dropout; otherwise `rng` is required.

  Returns:
    `retriever_logits [b, k]` float32 (score_scale · q·d, −1e9 where `candidate_valid` is False)
    and `mlm_logits [b, k, max_masks, vocab]` float32.
  """
  rngs = {} if deterministic else dict(zip(("query", "doc", "encoder"), jax.random.split(rng, 3)))
  drop = lambda name: None if deterministic else {"dropout": rngs[name]}  # noqa: E731
  model = retriever_lib.Retriever(retriever_cfg)
  q = model.apply({"params": params["retriever"]}, input_ids=batch["query_input_ids"],
                  input_mask=batch["query_input_mask"], segment_ids=batch["query_segment_ids"],
                  deterministic=deterministic, method=retriever_lib.Retriever.embed_queries,
                  rngs=drop("query"))
  d = model.apply({"params": params["retriever"]}, input_ids=batch["candidate_input_ids"],
                  input_mask=batch["candidate_input_mask"],
                  segment_ids=batch["candidate_segment_ids"], deterministic=deterministic,
                  method=retriever_lib.Retriever.embed_documents, rngs=drop("doc"))
  logits = retriever_lib.relevance_scores(q, d, retriever_cfg.score_scale)
  logits = jnp.where(batch["candidate_valid"], logits, -1e9)
  mlm_logits = encoder_lib.KnowledgeAugmentedEncoder(encoder_cfg).apply(
      {"params": params["encoder"]}, input_ids=batch["joint_input_ids"],
      input_mask=batch["joint_input_mask"], segment_ids=batch["joint_segment_ids"],
      mlm_positions=batch["mlm_positions"], deterministic=deterministic, rngs=drop("encoder"))
  return {"retriever_logits": logits, "mlm_logits": mlm_logits}


def pretraining_loss(params: Mapping[str, Any], batch: Mapping[str, Array], rng: Array | None, *,
                     retriever_cfg: retriever_lib.RetrieverConfig, encoder_cfg: bert.BertConfig,
                     deterministic: bool = False) -> tuple[Array, dict[str, Array]]:
  """−mean over real masked tokens of log p(y_j|x), marginalised over the k candidates (§2.3, §3.4).

  Returns:
    `(loss [] float32, aux)` with aux = `forward(...)` outputs plus the dict of
    `losses.mlm_marginal_log_likelihood` (`token_log_likelihood [b, m]`, `null_log_likelihood`,
    `log_p_z [b, k]`, `token_log_probs [b, k, m]`).
  """
  out = forward(params, batch, retriever_cfg=retriever_cfg, encoder_cfg=encoder_cfg,
                deterministic=deterministic, rng=rng)
  ll = losses.mlm_marginal_log_likelihood(out["retriever_logits"], out["mlm_logits"],
                                          batch["mlm_targets"], batch["candidate_valid"])
  loss = -losses.weighted_mean(ll["token_log_likelihood"], batch["mlm_weights"])
  return loss, dict(out, **ll)


def pretraining_metrics(aux: Mapping[str, Array], batch: Mapping[str, Array]) -> dict[str, Array]:
  """The namespaced float32 scalar metrics of a batch (see the module docstring).

  Args:
    aux: the second output of `pretraining_loss`.
    batch: the step inputs (`mlm_weights`, `mlm_targets`, `candidate_valid`).
  """
  w = batch["mlm_weights"].astype(jnp.float32)
  log_p_z = aux["log_p_z"]
  # Marginal predictive distribution log p(y|x) = logsumexp_k log p(z_k|x) + log p(y|z_k, x).
  log_p_y = jax.nn.logsumexp(
      log_p_z[:, :, None, None] + jax.nn.log_softmax(aux["mlm_logits"], axis=-1), axis=1)
  correct = (jnp.argmax(log_p_y, axis=-1) == batch["mlm_targets"]).astype(jnp.float32)
  valid = batch["candidate_valid"]
  p_z = jnp.where(valid, jnp.exp(log_p_z), 0.0)
  entropy = -jnp.sum(jnp.where(valid, p_z * log_p_z, 0.0), axis=-1)
  example_w = (w.sum(axis=-1) > 0).astype(jnp.float32)
  return {
      "train/mlm_loss": -losses.weighted_mean(aux["token_log_likelihood"], w),
      "train/null_mlm_loss": -losses.weighted_mean(aux["null_log_likelihood"], w),
      "train/mlm_accuracy": losses.weighted_mean(correct, w),
      "retrieval/utility": losses.weighted_mean(
          aux["token_log_likelihood"] - aux["null_log_likelihood"], w),
      "retrieval/entropy": losses.weighted_mean(entropy, example_w),
      "retrieval/p_null": losses.weighted_mean(p_z[:, 0], example_w),
      "retrieval/num_candidates": losses.weighted_mean(valid.sum(axis=-1).astype(jnp.float32),
                                                       example_w),
  }


def train_step(state: train_state.TrainState, batch: Mapping[str, Array], rng: Array, *,
               tx: optax.GradientTransformation, retriever_cfg: retriever_lib.RetrieverConfig,
               encoder_cfg: bert.BertConfig) -> tuple[train_state.TrainState, dict[str, Array]]:
  """One REALM pre-training update (module docstring); metrics use the pre-update params.

  Args:
    state: the train state, params `{"retriever", "encoder"}` (replicated).
    batch: `PretrainFeaturizer.featurize` arrays, leading axis split over `data`.
    rng: PRNG key, folded with the step for dropout.

  Returns:
    `(new_state, metrics)`: `train/loss`, `train/grad_norm` and `pretraining_metrics`.
  """
  rng = jax.random.fold_in(rng, state.step)
  loss_fn = functools.partial(pretraining_loss, retriever_cfg=retriever_cfg,
                              encoder_cfg=encoder_cfg, deterministic=False)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = pretraining_metrics(jax.lax.stop_gradient(aux), batch)
  metrics.update({"train/loss": loss, "train/grad_norm": optax.global_norm(grads)})
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Mapping[str, Any], batch: Mapping[str, Array], *,
              retriever_cfg: retriever_lib.RetrieverConfig, encoder_cfg: bert.BertConfig
              ) -> dict[str, Array]:
  """Deterministic `pretraining_metrics` (plus `train/loss`) of a batch, without an update."""
  loss, aux = pretraining_loss(params, batch, None, retriever_cfg=retriever_cfg,
                               encoder_cfg=encoder_cfg, deterministic=True)
  return dict(pretraining_metrics(aux, batch), **{"train/loss": loss})


def make_eval_step(model_cfg: realm.ModelConfig, mesh: jax.sharding.Mesh):
  """`eval_step(params, batch) -> metrics` jitted once over the mesh (params replicated, batch split
  over `data`, metrics replicated)."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_step, retriever_cfg=model_cfg.retriever_config(),
                                   encoder_cfg=model_cfg.bert_config()),
                 in_shardings=(rep, data), out_shardings=rep)


# The token inputs a train batch is cut to length buckets by (`PretrainConfig.length_bucket`).
BUCKETED_GROUPS = ("query_", "candidate_", "joint_")


def abstract_batch(task: PretrainConfig, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global batch (what `PretrainFeaturizer.featurize` produces): the
  largest one; `length_buckets.cut_to_buckets` shortens the token inputs of most batches."""
  b, k, q, c, m = (batch_size, task.num_candidates, task.query_length, task.candidate_length,
                   task.max_masks)
  i32 = jnp.int32
  spec = {"mlm_positions": ((b, m), i32), "mlm_targets": ((b, m), i32),
          "mlm_weights": ((b, m), jnp.float32), "candidate_valid": ((b, k), bool)}
  for name in ("input_ids", "input_mask", "segment_ids"):
    spec[f"query_{name}"] = ((b, q), i32)
    spec[f"candidate_{name}"] = ((b, k, c), i32)
    spec[f"joint_{name}"] = ((b, k, task.joint_length), i32)
  return {key: jax.ShapeDtypeStruct(s, d) for key, (s, d) in spec.items()}


def step_parts(model: realm.ModelConfig, task: PretrainConfig, batch_size: int,
               tx: optax.GradientTransformation | None = None) -> train_state.StepParts:
  """The REALM pre-training step without weights or data (`train_state.make_step_parts`)."""
  return train_state.make_step_parts(
      train_step, model, PARTS, abstract_batch(task, batch_size), tx,
      retriever_cfg=model.retriever_config(), encoder_cfg=model.bert_config())


# ---------------------------------------------------------------------------------------------------
# Data and initial parameters.
# ---------------------------------------------------------------------------------------------------


def load_pretraining_data(data: PretrainDataConfig, model: realm.ModelConfig, task: PretrainConfig,
                          workdir: str, seed: int = 0):
  """Tokenizer, corpus and masked pre-training examples (salient spans found once, §3.4).

  Returns:
    `(tokenizer, corpus, examples)` with `examples` a `data.pretraining.PretrainingDataset` of
    `[n, task.query_length]` queries and `[n, task.max_masks]` masked-LM slots.

  Raises:
    ValueError: if no sentence could be masked.
  """
  from realm_jax.data import pretraining as pretraining_data

  tokenizer, corpus = corpus_config.load_corpus(data.corpus, model.checkpoint_dir(), workdir,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())
  data_dir = data.corpus.data_dir or fileio.join(workdir, "tfds")
  text_corpus = corpus
  if data.pretraining_sources:
    from realm_jax.data import corpus_store
    text_corpus = corpus_store.build_corpus(list(data.pretraining_sources), tokenizer, data_dir,
                                            data.corpus.max_block_length,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())
    logging.info("pre-training text: %d blocks from %d files (%s), separate from the knowledge "
                 "corpus", len(text_corpus), len(data.pretraining_sources),
                 text_corpus.fingerprint[:12])
  examples_dir = pretraining_data.build_pretraining_dataset(
      text_corpus, tokenizer, data_dir, masking=data.masking,
      query_length=task.query_length, max_masks=task.max_masks, seed=data.masking_seed,
      corpus_fingerprint=text_corpus.fingerprint, n_process=data.spacy_n_process)
  examples = pretraining_data.load_pretraining_examples(examples_dir)
  if not len(examples):
    raise ValueError(f"{examples_dir}: no pre-training example")
  if text_corpus is not corpus:
    # Positions in another corpus are not block ids of the index: nothing to filter out.
    arrays = dict(examples.arrays)
    arrays["source_block_id"] = np.full_like(arrays["source_block_id"], -1)
    examples = pretraining_data.PretrainingDataset(arrays, examples.masking)
  if data.max_examples and data.max_examples < len(examples):
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:data.max_examples])
    examples = pretraining_data.PretrainingDataset(
        {k: v[keep] for k, v in examples.arrays.items()}, examples.masking)
  logging.info("%d %s-masked pre-training examples", len(examples), examples.masking)
  return tokenizer, corpus, examples


def params_from_run(init_from: str, abstract_params: Any, model: realm.ModelConfig, seed: int = 0
                    ) -> dict[str, Any]:
  """`{"retriever", "encoder"}`: the retriever of another run, the encoder from the pretrained BERT.

  REALM initialises the retriever from the ICT warm start and the encoder from BERT (§3.4). Any run
  with a `retriever` part serves (ICT, REALM pre-training, Open-QA).

  Args:
    init_from: a work directory or its `checkpoints/` directory.
    abstract_params: the `{"retriever", "encoder"}` targets (`jax.ShapeDtypeStruct`s with
      shardings).
    model / seed: the pretrained encoder and the seed of its fresh heads (`realm.init_params`).

  Raises:
    FileNotFoundError: if `init_from` holds no checkpoint.
    ValueError: if its retriever params do not fit the model.
  """
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  restored, step = checkpointing.restore_partial_params(
      init_from, {"retriever": abstract_params["retriever"]})
  logging.info("retriever initialised from %s (step %d)", init_from, step)
  encoder = realm.init_params(model, jax.random.key(seed), parts=("encoder",))["encoder"]
  return {"retriever": restored["retriever"], "encoder": encoder}


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------


def make_index_source(mode: str, *, snapshots_root: str, corpus, retriever_cfg, params_fn,
                      make_searcher, refresh_every_steps: int, max_index_staleness_steps: int,
                      poll_interval_s: float, index_batch_size: int, initial_path=None):
  """The index source of `index_refresh=mode` (see `training/index_source.py`).

  `initial_path` is the snapshot to start from ('none', 'inline'; default: the newest); a resumed
  run passes the newest one no newer than its checkpoint (`index_source.ensure_first_snapshot`).

  Raises:
    ValueError: on an unknown mode.
    ImportError: for 'async' when `realm_jax.retrieval.watcher` is not available.
  """
  from realm_jax.retrieval import snapshot as snapshot_lib
  from realm_jax.training import index_source
  if mode == "none":
    return index_source.StaticIndexSource(
        initial_path or snapshot_lib.latest_snapshot(snapshots_root), make_searcher,
        corpus.fingerprint)
  if mode == "inline":
    return index_source.InlineRefreshIndexSource(
        snapshots_root, corpus, retriever_cfg, params_fn, make_searcher, refresh_every_steps,
        initial_path=initial_path, batch_size=index_batch_size)
  if mode == "async":
    from realm_jax.retrieval import watcher  # pylint: disable=g-import-not-at-top
    return watcher.IndexWatcher(snapshots_root, corpus.fingerprint, make_searcher,
                                poll_interval_s, max_index_staleness_steps)
  raise ValueError(f"index_refresh must be one of {INDEX_REFRESH_MODES}, got {mode!r}")


class PretrainEvaluator:
  """Deterministic pre-training metrics over a fixed set of held-out examples.

  Args:
    featurizer: builds candidates and step inputs.
    examples: the `PretrainingDataset`.
    indices: `[num_eval]` example indices (held out of training).
    query_embed_fn / eval_fn: the jitted query tower and `eval_step`.
    mesh: the device mesh.
    batch_size: examples per eval step (a multiple of the mesh's `data` size).
  """

  def __init__(self, featurizer: PretrainFeaturizer, examples, indices: np.ndarray,
               query_embed_fn, eval_fn, mesh: jax.sharding.Mesh, batch_size: int):
    data_size = mesh.shape[sharding.DATA_AXIS]
    self.batch_size = -(-batch_size // data_size) * data_size
    self.featurizer, self.examples, self.indices = featurizer, examples, np.asarray(indices)
    self.query_embed_fn, self.eval_fn, self.mesh = query_embed_fn, eval_fn, mesh

  def __call__(self, params, searcher) -> dict[str, float]:
    """Example-weighted means of the eval metrics (keys as in training, without `train/loss`)."""
    sums: dict[str, float] = {}
    total = 0
    for begin in range(0, len(self.indices), self.batch_size):
      idx = self.indices[begin:begin + self.batch_size]
      n = len(idx)
      idx = np.concatenate([idx, np.repeat(idx[:1], self.batch_size - n)])
      ex = self.examples.batch(idx)
      if n < self.batch_size:  # padded rows carry no masked token
        ex["mlm_weights"] = ex["mlm_weights"].copy()
        ex["mlm_weights"][n:] = 0
      batch = retrieve_and_featurize(self.featurizer, ex, params["retriever"], searcher,
                                     self.query_embed_fn, self.mesh)
      metrics = jax.device_get(self.eval_fn(params, sharding.global_batch_from_local(batch,
                                                                                     self.mesh)))
      for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value) * n
      total += n
    return {k: v / max(total, 1) for k, v in sums.items() if k != "train/loss"}


def retrieve_and_featurize(featurizer: PretrainFeaturizer, examples: Mapping[str, np.ndarray],
                           retriever_params: Any, searcher, query_embed_fn,
                           mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Host-side retrieval for this process's examples, then `featurize` (REALM §3.4).

  The masked queries are embedded with the current query tower (jitted over the mesh), searched
  with `searcher`, trivial retrievals dropped and ∅ prepended.
  """
  queries = {"input_ids": examples["query_input_ids"], "input_mask": examples["query_input_mask"],
             "segment_ids": examples["query_segment_ids"]}
  q = query_embed_fn(retriever_params, sharding.global_batch_from_local(queries, mesh))
  retrieved = search_local_rows(searcher, q, mesh, featurizer.num_to_retrieve())
  candidates = featurizer.select_candidates(retrieved, examples["source_block_id"])
  return featurizer.featurize(examples, candidates)


def train(workdir: str,
          model: realm.ModelConfig = realm.ModelConfig(),
          data: PretrainDataConfig = PretrainDataConfig(),
          task: PretrainConfig = PretrainConfig(),
          optimizer: Any = None,
          loop: loop_lib.LoopConfig = loop_lib.LoopConfig(),
          batch_size: int = 8,
          searcher: str = "scann",
          index_refresh: str = "none",
          refresh_every_steps: int = 500,
          max_index_staleness_steps: int = 1000,
          poll_interval_s: float = 10.0,
          index_batch_size: int = 64,
          init_from: str = "",
          num_eval_examples: int = 0,
          eval_batch_size: int = 8,
          seed: int = 0,
          mesh_shape: Sequence[int] = (-1, 1)) -> dict[str, Any]:
  """REALM pre-training (§2–§3.4): retrieve, re-embed the k candidates, marginal masked LM.

  Order of work: corpus + masked examples (TFDS, once) → the train state (`loop.Trainer`: resume
  from `WORKDIR/checkpoints`, else the retriever from `init_from`, e.g. the ICT warm start, and the
  pretrained BERT encoder) → the first snapshot (built when `WORKDIR/snapshots` has none) → index
  source → optional eval of the held-out examples → the steps (`loop.Trainer.fit`) → final eval,
  `summary.json`.

  Checkpoints hold params `{"retriever", "encoder"}` (the index builder restores `retriever`),
  the optimiser state and the example order.

  Args:
    workdir: the run directory (local or `gs://`).
    model / data / task: configuration dataclasses (gin builds them).
    optimizer: `optim.OptimizerConfig` (default: lr 3e-5, the paper's pre-training rate).
    batch_size: global examples per step (a multiple of the mesh's `data` size).
    loop: steps, logging, evaluation, checkpoint and NaN policy (`loop.LoopConfig`).
    searcher: 'scann' (host) or 'exact' (on-device sharded top-k).
    index_refresh: 'none', 'inline' (re-embed every `refresh_every_steps` here) or 'async'
      (`retrieval.watcher.IndexWatcher` over snapshots from the index-builder job, which reads the
      checkpoints written every `checkpoint_every_steps`, builds the first index itself and exits
      after the final checkpoint, announced by `trainer_done.mark_trainer_done`).
    max_index_staleness_steps / poll_interval_s: passed to the watcher ('async').
    index_batch_size: blocks per forward pass when embedding the corpus.
    init_from: a checkpoint (or work) directory whose `retriever` params start the run.
    num_eval_examples: examples held out of training and evaluated before and after (0: none).
    eval_batch_size: examples per eval step.
    seed: seeds the heads' init, the data order and dropout.
    mesh_shape: the device mesh (`sharding.make_mesh`).

  Returns:
    A summary dict: `train` (the last logged window's means), `history` (every logged window,
    with `step`), `eval_initial` / `eval_final` (when `num_eval_examples`), `num_blocks`,
    `num_examples`, `num_refreshes`, `max_index_staleness_steps_seen`, `timings` (seconds).

  Raises:
    ValueError: on inconsistent configuration.
    FloatingPointError: on a non-finite loss with `nan_policy="stop"`.
  """
  from realm_jax.training import index_source as index_source_lib  # pylint: disable=g-import-not-at-top

  if searcher not in index_source_lib.SEARCHER_KINDS:
    raise ValueError(f"searcher must be one of {index_source_lib.SEARCHER_KINDS}, got {searcher!r}")
  if index_refresh not in INDEX_REFRESH_MODES:
    raise ValueError(f"index_refresh must be one of {INDEX_REFRESH_MODES}, got {index_refresh!r}")
  if task.joint_length > model.bert_config().max_position_embeddings:
    raise ValueError(f"PretrainConfig: query_length + candidate_length = {task.joint_length} "
                     "exceeds the encoder's max_position_embeddings="
                     f"{model.bert_config().max_position_embeddings}")
  if task.candidate_length < data.corpus.max_block_length:
    logging.warning(
        "PretrainConfig.candidate_length=%d < CorpusConfig.max_block_length=%d: blocks longer "
        "than the candidate length are truncated when the step re-embeds them, so their in-step "
        "document embedding is not their index row (REALM uses 288 for both)",
        task.candidate_length, data.corpus.max_block_length)
  optimizer = optimizer or optim.OptimizerConfig(learning_rate=3e-5,
                                                 num_train_steps=max(loop.num_train_steps, 1))
  trainer = loop_lib.Trainer(workdir, loop, batch_size, mesh_shape)
  mesh, timings = trainer.mesh, {}
  t0 = time.time()
  tokenizer, corpus, examples = load_pretraining_data(data, model, task, workdir, seed)
  timings["data_s"] = time.time() - t0
  order = np.random.default_rng(seed + 7).permutation(len(examples))
  eval_indices = np.sort(order[:num_eval_examples])
  train_indices = np.sort(order[num_eval_examples:])
  if not len(train_indices):
    raise ValueError(f"num_eval_examples={num_eval_examples} leaves no training example "
                     f"(of {len(examples)})")
  tx = optim.bert_adamw(optimizer)
  parts = step_parts(model, task, batch_size, tx)
  data_order = example_order.ExampleOrder(len(train_indices), batch_size, seed,
                                          jax.process_index(), jax.process_count())
  state = trainer.initial_state(
      random_params=parts.init_params, tx=tx, data_order=data_order, init_from=init_from,
      initial_params=lambda: realm.init_params(model, jax.random.key(seed), parts=PARTS),
      params_from=functools.partial(params_from_run, model=model, seed=seed))
  start_step = int(jax.device_get(state.step))

  t1 = time.time()  # The index source: REALM's refresh policy (none, inline or the async job).
  retriever_cfg = model.retriever_config()
  snapshots_root = os.path.join(workdir, "snapshots")
  latest = {"state": state}  # The state the inline refresh re-embeds with (set before each step).
  host_retriever_params = lambda: jax.device_get(latest["state"].params["retriever"])  # noqa: E731
  if index_refresh == "async" and trainer.is_main:
    trainer_done.clear_trainer_done(workdir)  # The index-builder job builds the first index too.
  first = None
  if index_refresh != "async":  # The newest snapshot no newer than this state's params.
    first = index_source_lib.ensure_first_snapshot(snapshots_root, corpus, retriever_cfg,
                                                   host_retriever_params(), params_step=start_step,
                                                   batch_size=index_batch_size)
  source = make_index_source(
      index_refresh, snapshots_root=snapshots_root, corpus=corpus, retriever_cfg=retriever_cfg,
      params_fn=host_retriever_params,
      make_searcher=index_source_lib.make_searcher_factory(searcher, mesh),
      refresh_every_steps=refresh_every_steps, max_index_staleness_steps=max_index_staleness_steps,
      poll_interval_s=poll_interval_s, index_batch_size=index_batch_size, initial_path=first)
  timings["first_index_s"] = time.time() - t1

  query_embed_fn = embedding.make_query_embed_fn(retriever_cfg, mesh)
  featurizer = PretrainFeaturizer(tokenizer, corpus, task)
  summary: dict[str, Any] = {
      "num_blocks": len(corpus), "num_examples": len(examples), "masking": examples.masking,
      "num_train_examples": len(train_indices), "num_eval_examples": len(eval_indices),
      "index_refresh": index_refresh, "searcher": searcher, "init_from": init_from or None,
      "init": trainer.origin}
  evaluator = (PretrainEvaluator(featurizer, examples, eval_indices, query_embed_fn,
                                 make_eval_step(model, mesh), mesh, eval_batch_size)
               if len(eval_indices) else None)
  if evaluator is not None and start_step == 0:
    t2 = time.time()
    summary["eval_initial"] = evaluator(state.params, source.before_step(0).searcher)
    timings["eval_initial_s"] = time.time() - t2
    trainer.writer.write(0, summary["eval_initial"], prefix="eval")

  staleness = {"now": 0, "max": 0}
  index = None

  def next_batch(step: int, state: train_state.TrainState) -> dict[str, np.ndarray]:
    nonlocal index
    latest["state"] = state
    index = source.before_step(step)  # Refreshes (inline) or swaps in (async) a newer index.
    staleness["now"] = step - int(index.snapshot.params_step)
    staleness["max"] = max(staleness["max"], staleness["now"])
    local = train_indices[data_order.next_local_indices()]
    batch = retrieve_and_featurize(featurizer, examples.batch(local), state.params["retriever"],
                                   index.searcher, query_embed_fn, mesh)
    return length_buckets.cut_to_buckets(batch, BUCKETED_GROUPS, task.length_bucket,
                                         across_processes=True)[0]

  def host_metrics(step: int) -> dict[str, float]:
    out = {"retrieval/index_staleness_steps": float(staleness["now"])}
    out.update(source.metrics(step) if hasattr(source, "metrics") else {})
    return out

  state, fit = trainer.fit(loop_lib.Task(
      name="REALM pre-training", train_step=parts.train_step, next_batch=next_batch,
      data_order=data_order, global_batch_size=batch_size,
      evaluate=(None if evaluator is None else
                lambda params, step: evaluator(params, index.searcher)),
      host_metrics=host_metrics,
      checkpoint_meta={"model": dataclasses.asdict(model), "task": dataclasses.asdict(task)},
      learning_rate=optim.learning_rate_schedule(optimizer),
      progress=("train/loss", "retrieval/utility")), state, jax.random.key(seed + 1))
  if index_refresh == "async" and trainer.is_main:
    trainer_done.mark_trainer_done(workdir, max(loop.num_train_steps, start_step))
  timings.update(fit.pop("timings"))
  summary.update(fit)
  if index is None:
    index = source.before_step(start_step)
  if evaluator is not None:
    t4 = time.time()
    summary["eval_final"] = evaluator(state.params, index.searcher)
    timings["eval_final_s"] = time.time() - t4
    trainer.writer.write(loop.num_train_steps, summary["eval_final"], prefix="eval")
    logging.info("final eval: %s", summary["eval_final"])
  summary.update({"num_refreshes": getattr(source, "num_refreshes", 0),
                  "max_index_staleness_steps_seen": staleness["max"],
                  "final_snapshot_params_step": int(index.snapshot.params_step)})
  if hasattr(source, "metrics"):
    summary["index"] = source.metrics(max(loop.num_train_steps, start_step))
  source.close()
  summary["timings"] = timings
  return trainer.finish(summary)
