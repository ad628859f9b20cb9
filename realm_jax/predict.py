"""Question → answer with its evidence: the top blocks and their retrieval probabilities p(z|x).

`realm-jax predict --workdir W "question" …` reads `W/config.gin`, the newest checkpoint in
`W/checkpoints` (or the pretrained initialisation if there is none) and the newest snapshot in
`W/snapshots`, retrieves with MIPS, reads the top blocks and prints the best span (REALM §3.4, ORQA §4).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax

from realm_jax.data.questions import Question
from realm_jax.models import realm
from realm_jax.training import finetune
from realm_jax import sharding
from realm_jax.retrieval import embedding


def predict(workdir: str, questions: Sequence[str],
            model: realm.ModelConfig = realm.ModelConfig(),
            data: finetune.OpenQADataConfig = finetune.OpenQADataConfig(),
            task: finetune.OpenQAConfig = finetune.OpenQAConfig(),
            searcher: str = "scann", seed: int = 0, mesh_shape: tuple[int, ...] = (-1, 1),
            **unused: Any) -> list[dict[str, Any]]:
  """Answers free-text questions with the run's newest model and index.

  Args:
    workdir: a run directory with `snapshots/` (and usually `checkpoints/`).
    questions: the questions, plain strings.
    model / data / task: as in `finetune.train_and_evaluate` (read from `config.gin`).
    searcher: `"scann"` or `"exact"`.

  Returns:
    One dict per question: `question`, `prediction` (answer text), `score`, `evidence_rank` and
    `top_blocks` (block id, title, text, p(z|x)).

  Raises:
    FileNotFoundError: if the work directory has no snapshot.
  """
  from realm_jax.retrieval import searchers as searchers_lib
  from realm_jax.retrieval import snapshot as snapshot_lib

  del unused
  mesh = sharding.make_mesh(mesh_shape)
  root = os.path.join(workdir, "snapshots")
  path = snapshot_lib.latest_snapshot(root)  # None without one (local or gs://).
  if path is None:
    raise FileNotFoundError(f"{root}: no embedding snapshot; run `realm-jax main` or `finetune` "
                            "with this workdir first")
  tokenizer, corpus, _, _ = finetune.load_openqa_data(
      data, model, workdir, seed)
  snapshot = snapshot_lib.read_snapshot(path, lazy=True)  # Loads the serialized ScaNN searcher below.
  params = _params(workdir, model, seed, mesh)
  search = searchers_lib.searcher_from_snapshot(
      snapshot, kind=searcher, mesh=mesh if searcher == "exact" else None)
  eval_fn = finetune.make_eval_step(model, task, mesh)
  featurizer = finetune.OpenQAFeaturizer(tokenizer, corpus, snapshot.block_ids,
                                         snapshot.embeddings, task, model.max_span_width)
  evaluator = finetune.OpenQAEvaluator(featurizer, search,
                                       embedding.make_query_embed_fn(model.retriever_config(),
                                                                         mesh),
                                       eval_fn, mesh, recall_ks=(task.num_read,))
  qs = [Question(qid=str(i), question=q, answers=[]) for i, q in enumerate(questions)]
  _, predictions = evaluator(params, qs, desc="predicting")
  for p in predictions:
    p.pop("answers", None)
  return predictions


def _params(workdir: str, model: realm.ModelConfig, seed: int, mesh: jax.sharding.Mesh) -> Any:
  """The newest checkpoint's `{"retriever", "reader"}` params, else the initial ones (restore order
  of `training.loop`: the work directory's checkpoint, then the pretrained BERT, then random)."""
  from realm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from realm_jax.training import train_state  # pylint: disable=g-import-not-at-top
  parts = finetune.step_parts(model, finetune.OpenQAConfig(num_retrieved=1, num_read=1), 1)
  abstract = train_state.abstract_train_state(parts.init_params, parts.tx, mesh).params
  try:
    params, step = checkpointing.restore_partial_params(workdir, abstract)
    logging.info("predicting with the params of step %d", step)
    return params
  except FileNotFoundError:
    logging.info("no checkpoint in %s: using the initial params", workdir)
  params = realm.init_params(model, jax.random.key(seed), parts=finetune.PARTS)
  return jax.device_put(params, sharding.replicated(mesh))
