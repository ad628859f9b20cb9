"""Gold-paragraph recall@k on SQuAD-open dev: the MiniLM retriever (zero-shot and fine-tuned) vs BM25.

    .venv/bin/python benchmarks/retrieval_recall.py --workdir workdirs/squad_minilm [--max_questions N]

The work directory is the main job's (`make demo`): its TFDS corpus, its snapshot (the frozen document
index) and its newest checkpoint (the fine-tuned query tower). All questions of SQuAD v1.1 dev are
asked against the same blocks by three retrievers:
  * BM25 (`bm25s`, k1=0.9, b=0.4, lower-cased word tokens, no stemming, no stop words),
  * MiniLM zero-shot (the pretrained query tower),
  * MiniLM after fine-tuning (the checkpoint's query tower; same document index).
A question counts as a hit at k when a block cut from its gold paragraph is in the top k.
Prints a markdown table (recall in percent) and writes it to WORKDIR/benchmarks/retrieval_recall.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np
from realm_jax.retrieval import embedding

KS = (1, 5, 20, 100)


def _tokens(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def _gold_hits(block_rows: np.ndarray, questions, corpus) -> np.ndarray:
  hits = np.zeros(block_rows.shape, bool)
  for i, q in enumerate(questions):
    gold = set(q.gold_doc_ids)
    hits[i] = [corpus.doc_ids[r] in gold for r in block_rows[i]]
  return hits


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="workdirs/squad_minilm")
  parser.add_argument("--max_questions", type=int, default=0, help="0: all 10,570 dev questions")
  args = parser.parse_args(argv)

  import bm25s
  import gin
  import jax
  from realm_jax import cli
  from realm_jax import evaluation
  from realm_jax.models import realm
  from realm_jax.retrieval import searchers
  from realm_jax.retrieval import snapshot as snapshot_lib
  from realm_jax.training import checkpointing
  from realm_jax.training import finetune
  from realm_jax import sharding

  config = os.path.join(args.workdir, "config.gin")
  if not os.path.isfile(config):
    print(f"{config} not found: run `make demo` first (or pass --workdir)", file=sys.stderr)
    return 2
  cli.parse_gin([config], [])
  bindings = {k: gin.query_parameter(f"finetune.train_and_evaluate.{k}") for k in ("model",
                                                                                 "data", "task")}
  model_cfg: realm.ModelConfig = bindings["model"].scoped_configurable_fn()
  data_cfg = bindings["data"].scoped_configurable_fn()
  data_cfg = finetune.OpenQADataConfig(**{**data_cfg.__dict__, "max_eval_questions": 0})
  tokenizer, corpus, _, questions = finetune.load_openqa_data(data_cfg, model_cfg, args.workdir, 0)
  if args.max_questions:
    questions = finetune._sample(questions, args.max_questions, 1)  # pylint: disable=protected-access
  snapshot = snapshot_lib.read_snapshot(snapshot_lib.latest_snapshot(
      os.path.join(args.workdir, "snapshots")))
  rows_of_snapshot = corpus.positions(snapshot.block_ids)
  kmax = max(KS)
  results = {}

  # BM25 over "title text" of every block.
  t = time.time()
  retriever = bm25s.BM25(k1=0.9, b=0.4)
  retriever.index([_tokens(f"{corpus.titles[i]} {corpus.texts[i]}") for i in range(len(corpus))],
                  show_progress=False)
  docs, _ = retriever.retrieve([_tokens(q.question) for q in questions], k=kmax,
                               show_progress=False, n_threads=2)
  results["BM25 (bm25s)"] = (_gold_hits(np.asarray(docs), questions, corpus), time.time() - t)

  mesh = sharding.make_mesh()
  retriever_cfg = model_cfg.retriever_config()
  embed = embedding.make_query_embed_fn(retriever_cfg, mesh)
  search = searchers.searcher_from_snapshot(snapshot, kind="scann")
  init = realm.init_params(model_cfg, jax.random.key(0), parts=("retriever", "reader"))
  init = jax.device_put(init, sharding.replicated(mesh))
  variants = [("MiniLM zero-shot", init)]
  ckpt_dir = checkpointing.checkpoint_dir(args.workdir)
  if os.path.isdir(ckpt_dir):
    tuned, step = checkpointing.restore_partial_params(ckpt_dir,
                                                       checkpointing.abstract_like(init))
    variants.append((f"MiniLM fine-tuned ({step} steps)", tuned))
  task = bindings["task"].scoped_configurable_fn()
  featurizer = finetune.OpenQAFeaturizer(tokenizer, corpus, snapshot.block_ids,
                                         snapshot.embeddings, task, model_cfg.max_span_width)
  queries = featurizer.query_batch(questions)
  for name, params in variants:
    t = time.time()
    q = embedding.run_batched(embed, params["retriever"], queries, 128, mesh, bucket=16,
                                  desc=f"embedding questions ({name})")
    _, block_ids = search.search(q, kmax)
    rows = rows_of_snapshot[np.searchsorted(snapshot.block_ids, block_ids)]
    results[name] = (_gold_hits(rows, questions, corpus), time.time() - t)

  header = (f"Gold-paragraph recall@k (%), SQuAD v1.1 dev, {len(questions)} questions, "
            f"{len(corpus)} blocks")
  lines = [header, "", "| retriever | " + " | ".join(f"R@{k}" for k in KS) + " | seconds |",
           "|---|" + "---|" * (len(KS) + 1)]
  for name, (hits, seconds) in results.items():
    rec = evaluation.recall_at_k(hits, KS)
    lines.append(f"| {name} | " + " | ".join(f"{100 * rec[k]:.1f}" for k in KS)
                 + f" | {seconds:.0f} |")
  table = "\n".join(lines)
  print(table)
  out_dir = os.path.join(args.workdir, "benchmarks")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "retrieval_recall.md"), "w") as f:
    f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
