"""The Inverse Cloze Task warm start of the retriever (ORQA, Lee et al., 2019, §5; REALM §3.4).

ICT trains the query and document embedders before REALM pre-training: the pseudo-query is one
sentence of a block, its positive is the block with that sentence removed 90% of the time (kept 10%
so that the towers still learn word overlap), and the negatives are the OTHER blocks of the batch:

    p(b_i | q_i) = exp(s · q_iᵀ d_i) / Σ_{j ∈ global batch} exp(s · q_iᵀ d_j)
    loss = −mean_i log p(b_i | q_i)

The softmax runs over the blocks of the GLOBAL batch, gathered from every device ("in-batch softmax
over blocks gathered from all cores", REFERENCE "Hyper-parameters"): the step is a `jax.shard_map`
over the `data` axis in which each device embeds its own queries and blocks, `jax.lax.all_gather`s
the block embeddings of every device (`[global_batch, dim]`) and scores its queries against all of
them, so the logits are `[global_batch, global_batch]` and device i's positive sits at column
`i · local_batch + row`. Autodiff through the gather returns each block's gradient to the device
that embedded it (the transpose of `all_gather` is a reduce-scatter). A block that appears twice in
a batch (possible across an epoch boundary) is masked out as a negative of its own copy.

The loop (`train`) writes checkpoints whose params item is `{"retriever": ...}`; REALM pre-training
starts from them with `pretrain.train(init_from=<ICT workdir>)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from realm_jax import sharding
from realm_jax.data import corpus_config
from realm_jax.data import example_order
from realm_jax.models import realm
from realm_jax.models import retriever as retriever_lib
from realm_jax.training import length_buckets
from realm_jax.training import loop as loop_lib
from realm_jax.training import optim
from realm_jax.training import train_state

Array = jax.Array
_NEG = -1e9
BATCH_FIELDS = ("query_input_ids", "query_input_mask", "query_segment_ids", "block_input_ids",
                "block_input_mask", "block_segment_ids", "block_id")


@dataclasses.dataclass(frozen=True)
class IctConfig:
  """The shapes of one ICT example (ORQA §5; REFERENCE "Hyper-parameters").

  Attributes:
    query_length: `[CLS] sentence [SEP]` length in wordpieces (64 in ORQA).
    block_length: `[CLS] title [SEP] body [SEP]` length (288).
    remove_sentence_prob: probability that the query sentence is removed from its block (0.9).
    min_sentences: blocks with fewer sentences are not used (their evidence would be empty).
    length_bucket: on one process, each batch's queries and blocks are cut to the smallest
      multiple of this many wordpieces that holds the batch's longest of each
      (`training.length_buckets`): the step compiles once per pair of bucket lengths and skips
      the padding past them. 0, or several processes: every batch at `query_length` and
      `block_length` (agreeing on a length across processes takes a collective, which would wait
      for the step in flight: ICT builds the next batch while the step runs).

  Raises:
    ValueError: on impossible sizes or a probability outside [0, 1].
  """

  query_length: int = 64
  block_length: int = 288
  remove_sentence_prob: float = 0.9
  min_sentences: int = 2
  length_bucket: int = 64

  def __post_init__(self):
    if self.query_length < 3 or self.block_length < 4:
      raise ValueError(f"IctConfig: need query_length >= 3 and block_length >= 4, got "
                       f"{self.query_length}, {self.block_length}")
    if not 0.0 <= self.remove_sentence_prob <= 1.0:
      raise ValueError(f"IctConfig.remove_sentence_prob={self.remove_sentence_prob} is not in "
                       "[0, 1]")
    if self.length_bucket < 0:
      raise ValueError(f"IctConfig.length_bucket={self.length_bucket} must be >= 0 (0: no "
                       "bucketing)")


# ---------------------------------------------------------------------------------------------------
# Host side: deterministic, resumable batches.
# ---------------------------------------------------------------------------------------------------


class IctBatcher:
  """ICT batches over the blocks of a corpus, one pass per epoch, resumable (state in checkpoints).

  Each epoch visits every usable block once in a seeded order (`data.example_order.ExampleOrder`); the
  query sentence of a block and whether it is removed are redrawn every epoch (seed
  `seed · 100003 + epoch`, see `data.pretraining.make_ict_examples`). A batch that straddles an
  epoch boundary takes all of its rows from the newer epoch's draws.

  Args:
    blocks: the corpus blocks.
    tokenizer: supplies the special ids.
    config: the example shapes.
    global_batch_size: examples per step over all processes.
    seed: order and draw seed.
    process_index / process_count: this process's share of every global batch.

  Raises:
    ValueError: if no block has `config.min_sentences` sentences.
  """

  def __init__(self, blocks: Sequence[Any], tokenizer, config: IctConfig, global_batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    self.blocks, self.tokenizer, self.config, self.seed = blocks, tokenizer, config, seed
    self._cache: dict[int, Any] = {}
    first = self.examples(0)
    if not len(first):
      raise ValueError(f"ICT: no block has {config.min_sentences} sentences")
    self.num_examples = len(first)
    self.iterator = example_order.ExampleOrder(self.num_examples, global_batch_size, seed,
                                               process_index, process_count)

  def examples(self, epoch: int):
    """The `data.pretraining.IctExamples` of `epoch` (it and one other epoch stay cached)."""
    from realm_jax.data import pretraining as pretraining_data
    if epoch not in self._cache:
      cfg = self.config
      self._cache[epoch] = pretraining_data.make_ict_examples(
          self.blocks, self.tokenizer, cfg.query_length, cfg.block_length,
          cfg.remove_sentence_prob, seed=self.seed * 100003 + epoch,
          min_sentences=cfg.min_sentences, progress=False)
      others = sorted(e for e in self._cache if e != epoch)
      for old in others[:-1]:
        del self._cache[old]
      if hasattr(self, "num_examples") and len(self._cache[epoch]) != self.num_examples:
        raise RuntimeError("ICT: the set of usable blocks changed between epochs")
    return self._cache[epoch]

  def next_local_batch(self) -> dict[str, np.ndarray]:
    """This process's next rows: `query_*` `[n, query_length]`, `block_*` `[n, block_length]`
    int32, `block_id` `[n]` int32."""
    idx = self.iterator.next_local_indices()
    ex = self.examples(self.iterator.epoch)
    return {name: np.asarray(getattr(ex, name)[idx], np.int32) for name in BATCH_FIELDS}

  def state(self) -> dict[str, int]:
    return self.iterator.state()

  def restore(self, state: Mapping[str, int]) -> None:
    self.iterator.restore(dict(state))


# ---------------------------------------------------------------------------------------------------
# Device side: the in-batch softmax over the global batch (shard_map + all_gather).
# ---------------------------------------------------------------------------------------------------


def ict_outputs(params: Mapping[str, Any], batch: Mapping[str, Array], rng: Array | None, *,
                retriever_cfg: retriever_lib.RetrieverConfig, mesh: jax.sharding.Mesh,
                deterministic: bool) -> dict[str, Array]:
  """ICT loss, accuracy and logits with negatives from every device (ORQA §5).

  Args:
    params: `{"retriever": ...}`.
    batch: `BATCH_FIELDS` arrays with a leading `[global_batch]` axis split over `data`.
    rng: dropout key (folded with each device's index); None when `deterministic`.
    retriever_cfg: the embedders.
    mesh: the device mesh (axis `data`).
    deterministic: disables dropout.

  Returns:
    `loss` [] float32 (mean cross-entropy over the global batch, diagonal targets), `accuracy` []
    float32 (argmax == own block), `logits` `[global_batch, global_batch]` float32: row i scores
    query i against every block of the global batch (copies of its own block at −1e9).
  """
  model = retriever_lib.Retriever(retriever_cfg)
  axis = sharding.DATA_AXIS

  def per_shard(params, q_ids, q_mask, q_seg, b_ids, b_mask, b_seg, block_id, rng):
    shard = jax.lax.axis_index(axis)
    rngs = {}
    if not deterministic:
      q_rng, d_rng = jax.random.split(jax.random.fold_in(rng, shard))
      rngs = {"q": {"dropout": q_rng}, "d": {"dropout": d_rng}}
    q = model.apply({"params": params["retriever"]}, input_ids=q_ids, input_mask=q_mask,
                    segment_ids=q_seg, deterministic=deterministic,
                    method=retriever_lib.Retriever.embed_queries, rngs=rngs.get("q"))
    d = model.apply({"params": params["retriever"]}, input_ids=b_ids, input_mask=b_mask,
                    segment_ids=b_seg, deterministic=deterministic,
                    method=retriever_lib.Retriever.embed_documents, rngs=rngs.get("d"))
    all_d = jax.lax.all_gather(d, axis, axis=0, tiled=True)          # [global, dim]
    all_ids = jax.lax.all_gather(block_id, axis, axis=0, tiled=True)  # [global]
    local, total = q.shape[0], all_d.shape[0]
    logits = retriever_cfg.score_scale * jnp.einsum(
        "qd,bd->qb", q.astype(jnp.float32), all_d.astype(jnp.float32))
    target = shard * local + jnp.arange(local)
    columns = jnp.arange(total)
    duplicate = (block_id[:, None] == all_ids[None, :]) & (columns[None, :] != target[:, None])
    logits = jnp.where(duplicate, _NEG, logits)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, target[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
    loss = jax.lax.psum(nll.sum(), axis) / total
    accuracy = jax.lax.psum(correct.sum(), axis) / total
    return loss, accuracy, logits

  data = P(axis)
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(),) + (data,) * len(BATCH_FIELDS) + (P(),),
                     out_specs=(P(), P(), data))
  key = rng if rng is not None else jax.random.key(0)
  loss, accuracy, logits = fn(params, *(batch[name] for name in BATCH_FIELDS), key)
  return {"loss": loss, "accuracy": accuracy, "logits": logits}


def train_step(state: train_state.TrainState, batch: Mapping[str, Array], rng: Array, *,
               tx: optax.GradientTransformation, retriever_cfg: retriever_lib.RetrieverConfig,
               mesh: jax.sharding.Mesh) -> tuple[train_state.TrainState, dict[str, Array]]:
  """One ICT update; metrics `train/loss`, `train/accuracy`, `train/grad_norm`.

  Args:
    state: params `{"retriever"}` (replicated).
    batch: `IctBatcher` arrays, leading axis split over `data`.
    rng: PRNG key, folded with the step for dropout.
  """
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    out = ict_outputs(params, batch, rng, retriever_cfg=retriever_cfg, mesh=mesh,
                      deterministic=False)
    return out["loss"], out["accuracy"]

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"train/loss": loss, "train/accuracy": accuracy,
             "train/grad_norm": optax.global_norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Mapping[str, Any], batch: Mapping[str, Array], *,
              retriever_cfg: retriever_lib.RetrieverConfig, mesh: jax.sharding.Mesh
              ) -> dict[str, Array]:
  """Deterministic `ict_outputs` (loss, accuracy, `[global, global]` logits)."""
  return ict_outputs(params, batch, None, retriever_cfg=retriever_cfg, mesh=mesh,
                     deterministic=True)


def make_eval_step(model_cfg: realm.ModelConfig, mesh: jax.sharding.Mesh):
  """`eval_step(params, batch) -> {"loss", "accuracy", "logits"}` jitted once over the mesh (the
  logits split over `data`, the scalars replicated)."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_step, retriever_cfg=model_cfg.retriever_config(), mesh=mesh),
                 in_shardings=(rep, data),
                 out_shardings={"loss": rep, "accuracy": rep, "logits": data})


def abstract_batch(task: IctConfig, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global ICT batch (what `IctBatcher.next_local_batch` produces): the
  largest one; `length_buckets.cut_to_buckets` shortens most batches' queries and blocks."""
  spec = {}
  for name in BATCH_FIELDS:
    if name == "block_id":
      spec[name] = (batch_size,)
    else:
      spec[name] = (batch_size, task.query_length if name.startswith("query") else
                    task.block_length)
  return {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in spec.items()}


def step_parts(model: realm.ModelConfig, task: IctConfig, batch_size: int,
               tx: optax.GradientTransformation | None = None,
               mesh: jax.sharding.Mesh | None = None) -> train_state.StepParts:
  """The ICT step without weights or data (`train_state.StepParts`): random init of
  `{"retriever"}`, `train_step` bound to `mesh` (default: a one-device mesh, for shapes and memory
  plans), the global batch's shapes and the optimiser (default: BERT's AdamW)."""
  return train_state.make_step_parts(
      train_step, model, ("retriever",), abstract_batch(task, batch_size), tx,
      retriever_cfg=model.retriever_config(),
      mesh=mesh or sharding.make_mesh(devices=jax.devices()[:1]))


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------


def train(workdir: str,
          model: realm.ModelConfig = realm.ModelConfig(),
          data: corpus_config.CorpusConfig = corpus_config.CorpusConfig(),
          task: IctConfig = IctConfig(),
          optimizer: Any = None,
          loop: loop_lib.LoopConfig = loop_lib.LoopConfig(),
          batch_size: int = 32,
          seed: int = 0,
          mesh_shape: Sequence[int] = (-1, 1)) -> dict[str, Any]:
  """ICT warm start of the retriever (ORQA §5) over the blocks of the knowledge corpus.

  Order of work: corpus (built once, `data.corpus_config.load_corpus`) → the train state
  (`loop.Trainer`: resume from `WORKDIR/checkpoints`, else the pretrained BERT) → the steps
  (`loop.Trainer.fit`) → `summary.json`. Checkpoints hold params `{"retriever"}`;
  `pretrain.train(init_from=workdir)` loads them.

  Args:
    workdir: the run directory.
    model / task: configuration dataclasses (gin builds them).
    data: the knowledge corpus (`corpus_config.CorpusConfig`, ICT's data configuration: ICT needs
      the blocks and nothing else).
    optimizer: `optim.OptimizerConfig` (default: lr 1e-4, ORQA's ICT rate).
    batch_size: global examples per step (4096 in ORQA); the in-batch softmax has this many
      columns; a multiple of the mesh's `data` size.
    loop: steps, logging, checkpoint and NaN policy (`loop.LoopConfig`; ICT has no evaluator).
    seed: init, data order and dropout seed.
    mesh_shape: the device mesh.

  Returns:
    A summary: `train` (the last logged window's means), `history`, `num_blocks`, `num_examples`,
    `steps`, `start_step`, `timings` (seconds).

  Raises:
    ValueError: on inconsistent configuration.
    FloatingPointError: on a non-finite loss with `nan_policy="stop"`.
  """
  optimizer = optimizer or optim.OptimizerConfig(learning_rate=1e-4,
                                                 num_train_steps=max(loop.num_train_steps, 1))
  trainer = loop_lib.Trainer(workdir, loop, batch_size, mesh_shape)
  t0 = time.time()
  tokenizer, corpus = corpus_config.load_corpus(data, model.checkpoint_dir(), workdir,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())
  batcher = IctBatcher(corpus, tokenizer, task, batch_size, seed, jax.process_index(),
                       jax.process_count())
  if batcher.num_examples < batch_size:
    logging.warning("ICT: %d usable blocks < batch_size %d: blocks repeat within a batch (their "
                    "copies are masked out as negatives)", batcher.num_examples, batch_size)
  timings = {"data_s": time.time() - t0}
  tx = optim.bert_adamw(optimizer)
  parts = step_parts(model, task, batch_size, tx, trainer.mesh)
  state = trainer.initial_state(
      random_params=parts.init_params, tx=tx, data_order=batcher,
      initial_params=lambda: realm.init_params(model, jax.random.key(seed), parts=("retriever",)))
  bucket = task.length_bucket if jax.process_count() == 1 else 0  # IctConfig.length_bucket

  def next_batch(step: int, state: train_state.TrainState) -> dict[str, np.ndarray]:
    del step, state  # The batcher's order is resumable state of its own; no retrieval.
    return length_buckets.cut_to_buckets(batcher.next_local_batch(), ("query_", "block_"),
                                         bucket)[0]

  state, fit = trainer.fit(loop_lib.Task(
      name="ICT", train_step=parts.train_step, next_batch=next_batch, data_order=batcher,
      global_batch_size=batch_size,
      checkpoint_meta={"model": dataclasses.asdict(model), "task": dataclasses.asdict(task)},
      learning_rate=optim.learning_rate_schedule(optimizer),
      progress=("train/loss", "train/accuracy"), batch_needs_params=False), state, jax.random.key(seed + 1))
  timings.update(fit.pop("timings"))
  return trainer.finish(dict(fit, num_blocks=len(corpus), num_examples=batcher.num_examples,
                             batch_size=batch_size, init=trainer.origin, timings=timings))
