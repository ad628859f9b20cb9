"""Question → answer with its evidence: the top blocks, their p(z|x) and the answer span.

`Predictor` loads a run once — tokenizer, knowledge corpus, the newest embedding snapshot and its
MIPS searcher, the newest checkpoint (or the pretrained initialisation if there is none) and the
jitted query tower and reader — then answers questions as often as asked (REALM §3.4, ORQA §4):

    from realm_jax import Predictor
    predictor = Predictor.from_workdir("workdirs/squad_minilm")
    answer = predictor.answer("Who wrote Hamlet?", top_k=3)
    block = answer["evidence"]
    print(answer["prediction"], block["title"], block["p_z"])

`realm-jax predict --workdir W "question" …` (`predict` below) and `realm-jax serve --workdir W`
(`realm_jax.serve`) run on it. The configuration is `W/config.gin`, as written by `realm-jax main`,
`finetune` or `convert`: its bindings of `predict.predict` (model, data, task, searcher).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import jax
import numpy as np

from realm_jax import fileio
from realm_jax import sharding
from realm_jax.data import featurize
from realm_jax.data.questions import Question
from realm_jax.models import realm
from realm_jax.retrieval import embedding
from realm_jax.training import finetune

# The arguments of `predict` that `W/config.gin` may bind and `Predictor` takes.
_CONFIG_ARGS = ("model", "data", "task", "searcher", "seed", "mesh_shape")


class Predictor:
  """A loaded run that answers free-text questions with evidence (REALM §3.4, ORQA §4).

  Everything is loaded in the constructor, once; `answer` then embeds the questions, retrieves the
  top `task.num_retrieved` blocks by MIPS over the snapshot, reads the top `task.num_read` of them
  and returns the best span of the joint retriever + reader score. `answer` may be called from
  several threads: calls run one at a time.

  Args:
    workdir: a run directory with `snapshots/` (and usually `checkpoints/`), local or gs://.
    model / data / task: as in `finetune.train_and_evaluate` (`from_workdir` reads them from
      `config.gin`).
    searcher: `"scann"` (the exact searcher when ScaNN is not installed) or `"exact"`.
    seed: initialises the parameters when the work directory has no checkpoint.
    mesh_shape: the device mesh (`sharding.make_mesh`).
    batch_size: questions per reader step (rounded up to a multiple of the mesh's `data` size).

  Raises:
    FileNotFoundError: if the work directory has no snapshot, or a corpus file is missing.
    data.corpus.DataFormatError: on a malformed corpus file.
  """

  def __init__(self, workdir: str,
               model: realm.ModelConfig = realm.ModelConfig(),
               data: finetune.OpenQADataConfig = finetune.OpenQADataConfig(),
               task: finetune.OpenQAConfig = finetune.OpenQAConfig(),
               searcher: str = "scann", seed: int = 0, mesh_shape: Sequence[int] = (-1, 1),
               batch_size: int = 8):
    # pylint: disable=g-import-not-at-top
    from realm_jax.retrieval import searchers as searchers_lib
    from realm_jax.retrieval import snapshot as snapshot_lib
    # pylint: enable=g-import-not-at-top

    if "://" not in workdir:
      workdir = os.path.abspath(workdir)
    root = fileio.join(workdir, "snapshots")
    path = snapshot_lib.latest_snapshot(root)  # None without one (local or gs://).
    if path is None:
      raise FileNotFoundError(f"{root}: no embedding snapshot; run `realm-jax main` or `finetune` "
                              "with this workdir first")
    self.workdir = workdir
    self.model, self.data, self.task, self.searcher_kind = model, data, task, searcher
    self.mesh = sharding.make_mesh(tuple(mesh_shape))
    data_size = self.mesh.shape[sharding.DATA_AXIS]
    self.batch_size = -(-max(1, batch_size) // data_size) * data_size
    self.tokenizer, self.corpus, _, _ = finetune.load_openqa_data(data, model, workdir, seed)
    self.snapshot = snapshot_lib.read_snapshot(path, lazy=True)  # Rows are read when needed.
    self.snapshot_path = str(path)
    fingerprint = getattr(self.corpus, "fingerprint", None)
    if fingerprint is not None and self.snapshot.corpus_fingerprint != fingerprint:
      logging.warning("%s was built for corpus %s…, not for the configured corpus %s…: the "
                      "evidence texts may not be those that were embedded", path,
                      self.snapshot.corpus_fingerprint[:12], fingerprint[:12])
    self.params, self.params_step = _params(workdir, model, seed, self.mesh)
    self.searcher = searchers_lib.searcher_from_snapshot(
        self.snapshot, kind=searcher, mesh=self.mesh if searcher == "exact" else None)
    self.featurizer = finetune.OpenQAFeaturizer(self.tokenizer, self.corpus,
                                                self.snapshot.block_ids, self.snapshot.embeddings,
                                                task, model.max_span_width)
    self.query_embed_fn = embedding.make_query_embed_fn(model.retriever_config(), self.mesh)
    self.eval_fn = finetune.make_eval_step(model, task, self.mesh)
    self._lock = threading.Lock()
    logging.info("predictor ready: %d blocks (snapshot %s), params of step %s", self.num_blocks,
                 self.snapshot_path, self.params_step)

  @classmethod
  def from_workdir(cls, workdir: str, *, gin_files: Sequence[str] = (),
                   gin_params: Sequence[str] = (), **overrides: Any) -> "Predictor":
    """Loads the run in `workdir` with the configuration the CLI uses.

    The configuration is `WORKDIR/config.gin` (or `gin_files` instead, then `gin_params`), parsed as
    `realm-jax predict` does — this replaces gin's global configuration — and its bindings of
    `predict.predict` give the constructor's `model`, `data`, `task`, `searcher` (and `seed`,
    `mesh_shape` when bound). Relative paths in it are relative to the current directory.

    Args:
      workdir: the run directory (local or gs://).
      gin_files: gin files to use instead of `WORKDIR/config.gin`.
      gin_params: extra gin bindings, e.g. `"SEARCHER='exact'"`.
      **overrides: constructor arguments that replace the configured ones (e.g. `searcher="exact"`,
        `batch_size=16`).

    Returns:
      The loaded `Predictor`.

    Raises:
      FileNotFoundError: if there is no `config.gin` (and no `gin_files`) or no snapshot.
      realm_jax.cli.UsageError: on a gin file that does not parse.
    """
    import gin  # pylint: disable=g-import-not-at-top
    from realm_jax import cli  # pylint: disable=g-import-not-at-top

    if "://" not in workdir:
      workdir = os.path.abspath(workdir)
    files = list(gin_files)
    if not files:
      cfg = str(fileio.join(workdir, "config.gin"))
      if not fileio.isfile(cfg):
        raise FileNotFoundError(f"{cfg} not found: run `realm-jax main` or `finetune` with this "
                                "workdir first, or pass gin files")
      files = [cfg]
    cli.parse_gin(files, list(gin_params))
    try:
      bindings = gin.get_bindings(predict)
    except ValueError:  # predict.predict is not configurable: no gin file bound it
      bindings = {}
    kwargs = {k: v for k, v in bindings.items() if k in _CONFIG_ARGS}
    kwargs.update(overrides)
    return cls(workdir, **kwargs)

  @property
  def num_blocks(self) -> int:
    """The number of blocks in the snapshot (the retrievable evidence)."""
    return len(self.featurizer.row_of_block)

  def info(self) -> dict[str, Any]:
    """JSON-ready facts about the loaded run (work directory, snapshot, step, sizes)."""
    return {"workdir": self.workdir, "snapshot": self.snapshot_path,
            "params_step": self.params_step, "num_blocks": self.num_blocks,
            "num_retrieved": self.task.num_retrieved, "num_read": self.task.num_read,
            "searcher": self.searcher_kind}

  def answer(self, questions: str | Sequence[str], top_k: int | None = None
             ) -> dict[str, Any] | list[dict[str, Any]]:
    """Answers questions with the best span and its evidence.

    Args:
      questions: one question (a string) or a sequence of them.
      top_k: how many of the retrieved blocks to return as evidence, best first, in
        `1 … task.num_retrieved`; default `task.num_read` (the blocks the reader read).

    Returns:
      For a string one dict, for a sequence a list of them in order. Each holds:
        `question` (str); `prediction` (str, the answer; "" when no block was read); `score`
        (float, the joint retriever + reader logit of the span); `evidence_rank` (int, the
        retrieval rank of the block the answer was read from, −1 when none); `evidence` (that
        block, as below, or None); `top_blocks` (list of the `top_k` best retrieved blocks).
        A block is a dict: `rank` (int, 0 = best), `block_id` (int), `doc_id`, `title`, `text`
        (str), `p_z` (float, the retriever's p(z|x) over the `num_retrieved` retrieved blocks) and
        `answer_start` / `answer_end` (int character offsets `[start, end)` of the answer in `text`,
        so `text[answer_start:answer_end] == prediction`; None except in the evidence block).

    Raises:
      ValueError: on a blank question, an empty sequence or a `top_k` out of range.
      TypeError: if a question is not a string.
    """
    single = isinstance(questions, str)
    texts = [questions] if single else list(questions)
    if not texts:
      raise ValueError("answer: no questions given")
    for i, q in enumerate(texts):
      if not isinstance(q, str):
        raise TypeError(f"answer: question {i} is {type(q).__name__}, not a string")
      if not q.strip():
        raise ValueError(f"answer: question {i} is blank")
    cfg = self.task
    top_k = cfg.num_read if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not (
        1 <= top_k <= cfg.num_retrieved):
      raise ValueError(f"answer: top_k must be an integer in 1 … {cfg.num_retrieved} "
                       f"(num_retrieved), got {top_k!r}")
    qs = [Question(qid=str(i), question=q.strip(), answers=[]) for i, q in enumerate(texts)]
    with self._lock:
      results = []
      for begin in range(0, len(qs), self.batch_size):
        results += self._answer_batch(qs[begin:begin + self.batch_size], int(top_k))
    return results[0] if single else results

  def warmup(self) -> None:
    """Compiles the query tower and the reader for one question (the first request is then fast)."""
    self.answer("warm-up question")

  def _answer_batch(self, questions: list[Question], top_k: int) -> list[dict[str, Any]]:
    """`answer` for at most `batch_size` questions."""
    cfg = self.task
    data_size = self.mesh.shape[sharding.DATA_AXIS]
    queries = self.featurizer.query_batch(questions)
    q = embedding.run_batched(self.query_embed_fn, self.params["retriever"], queries,
                              max(self.batch_size, 64), self.mesh, bucket=16, progress=False)
    _, block_ids = self.searcher.search(q, min(cfg.num_retrieved, self.num_blocks))
    block_ids = np.asarray(block_ids, np.int64)
    if block_ids.shape[1] < cfg.num_retrieved:  # a corpus smaller than num_retrieved
      block_ids = np.pad(block_ids, ((0, 0), (0, cfg.num_retrieved - block_ids.shape[1])),
                         constant_values=-1)
    batch, reads = self.featurizer.batch(questions, block_ids, with_labels=False)
    # Few shapes: reads cut to a length bucket, questions padded to a multiple of the data axis.
    batch, _ = finetune.pad_batch(self.featurizer.cut_to_bucket(batch), data_size)
    out = jax.device_get(self.eval_fn(self.params, batch))
    results = []
    for i, question in enumerate(questions):
      blocks = []
      for rank in range(cfg.num_retrieved):
        b = int(block_ids[i, rank])
        if b < 0:
          continue
        blk = self.featurizer.block(b)
        blocks.append({"rank": rank, "block_id": b, "doc_id": str(blk.doc_id),
                       "title": blk.title, "text": blk.text, "p_z": float(out["p_z"][i, rank]),
                       "answer_start": None, "answer_end": None})
      r, s = int(out["best_read"][i]), int(out["best_span"][i])
      prediction, evidence = "", None
      read = reads[i][r]
      if read["block_id"] >= 0:
        blk = self.featurizer.block(read["block_id"])
        start, end = self.featurizer.predicted_span(read, s)
        offsets = _span_offsets(blk.body_offsets, read["body_start"], start, end)
        if offsets is not None:
          prediction = featurize.span_text(blk.text, blk.body_offsets, read["body_start"],
                                           start, end)
          evidence = next(x for x in blocks if x["rank"] == r)
          evidence["answer_start"], evidence["answer_end"] = offsets
      results.append({"question": question.question, "prediction": prediction,
                      "score": float(out["best_score"][i]),
                      "evidence_rank": evidence["rank"] if evidence else -1,
                      "evidence": evidence, "top_blocks": blocks[:top_k]})
    return results


def _span_offsets(body_offsets: np.ndarray, body_start: int, start: int, end: int
                  ) -> tuple[int, int] | None:
  """`[start, end)` character offsets in the block text of the reader span `start … end`.

  Args:
    body_offsets: `[num_body_tokens, 2]` int32 character offsets of the block's body tokens.
    body_start: the joined-input position of the first body token.
    start / end: the span's first and last joined-input positions (inclusive), as in
      `featurize.span_text`.

  Returns:
    `(char_start, char_end)`, or None when the span is not inside the body.
  """
  s, e = int(start) - body_start, int(end) - body_start
  if not 0 <= s <= e < len(body_offsets):
    return None
  return int(body_offsets[s][0]), int(body_offsets[e][1])


def predict(workdir: str, questions: Sequence[str],
            model: realm.ModelConfig = realm.ModelConfig(),
            data: finetune.OpenQADataConfig = finetune.OpenQADataConfig(),
            task: finetune.OpenQAConfig = finetune.OpenQAConfig(),
            searcher: str = "scann", seed: int = 0, mesh_shape: tuple[int, ...] = (-1, 1),
            top_k: int | None = None, **unused: Any) -> list[dict[str, Any]]:
  """Answers free-text questions with the run's newest model and index (`realm-jax predict`).

  A one-off `Predictor(...).answer(questions, top_k)`; gin binds this function's arguments in
  `config.gin`, and `Predictor.from_workdir` reads those bindings.

  Args:
    workdir: a run directory with `snapshots/` (and usually `checkpoints/`).
    questions: the questions, plain strings.
    model / data / task / searcher / seed / mesh_shape: as `Predictor`'s.
    top_k: evidence blocks per answer (`Predictor.answer`).

  Returns:
    One dict per question, as `Predictor.answer` returns them.

  Raises:
    FileNotFoundError: if the work directory has no snapshot.
  """
  del unused
  predictor = Predictor(workdir, model=model, data=data, task=task, searcher=searcher, seed=seed,
                        mesh_shape=mesh_shape)
  return predictor.answer(list(questions), top_k=top_k)


def _params(workdir: str, model: realm.ModelConfig, seed: int, mesh: jax.sharding.Mesh
            ) -> tuple[Any, int | None]:
  """The newest checkpoint's `{"retriever", "reader"}` params and step, else the initial params and
  None (restore order of `training.loop`: the work directory's checkpoint, then the pretrained
  BERT, then random)."""
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from realm_jax.training import train_state  # pylint: disable=g-import-not-at-top
  parts = finetune.step_parts(model, finetune.OpenQAConfig(num_retrieved=1, num_read=1), 1)
  abstract = train_state.abstract_train_state(parts.init_params, parts.tx, mesh).params
  try:
    params, step = checkpointing.restore_partial_params(workdir, abstract)
    logging.info("predicting with the params of step %d", step)
    return params, int(step)
  except FileNotFoundError:
    logging.info("no checkpoint in %s: using the initial params", workdir)
  params = realm.init_params(model, jax.random.key(seed), parts=finetune.PARTS)
  return jax.device_put(params, sharding.replicated(mesh)), None
