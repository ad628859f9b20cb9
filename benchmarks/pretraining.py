"""REALM pre-training on this CPU: retrieval utility, zero-shot recall@5, salient vs random masks.

Three measures (REALM, Guu et al., 2020, §3.4 and Table 2), on a reduced SQuAD-open setting that fits
a shared 2-core CPU:

  (a) `retrieval/utility` (marginal − ∅-only log-likelihood per masked token, nats) over a short
      REALM pre-training run on the real paragraphs with all-MiniLM-L6-v2: positive? rising?
  (b) zero-shot gold-paragraph recall@k on SQuAD-open dev questions (no fine-tuning): the MiniLM
      retriever as installed, after the ICT warm start (ORQA §5), after REALM pre-training (started
      from the ICT retriever). Each column re-embeds the whole corpus with that retriever.
  (c) salient-span vs random-token masking on the same step budget, both from the ICT retriever:
      held-out masked-LM accuracy and retrieval utility before and after, and the mean training
      utility over the second half of the run.

Reduced setting (flags): the corpus is the paragraphs of the first `--articles` SQuAD v1.1 dev
articles (blocks of at most `--max_block_length` wordpieces); recall is measured on a seeded sample
of `--questions` dev questions of those articles; ICT and REALM run `--ict_steps` / `--realm_steps`
steps of batch `--ict_batch` / `--realm_batch`, k = `--num_candidates` (∅ included), query length
`--query_length`, candidate length `--candidate_length`, inline index refresh every
`--refresh_every` steps. The MiniLM checkpoint has no masked-LM head: the decoder is tied to the word
embeddings and the transform starts fresh, so the masked-LM starts far from BERT's.

Run from the repository root (about 20-30 minutes with the defaults on 2 shared cores; each training
run is a few minutes):

    .venv/bin/python benchmarks/pretraining.py
    .venv/bin/python benchmarks/pretraining.py --articles 4 --ict_steps 10 --realm_steps 10

Writes `<workdir>/results.json` and prints three Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realm_jax.data import corpus as corpus_data  # noqa: E402
from realm_jax.data import corpus_config  # noqa: E402
from realm_jax.data import featurize  # noqa: E402
from realm_jax.data import tfds_builders  # noqa: E402
from realm_jax.models import realm  # noqa: E402
from realm_jax.training import checkpointing  # noqa: E402
from realm_jax.training import ict  # noqa: E402
from realm_jax.training import loop  # noqa: E402
from realm_jax.training import optim  # noqa: E402
from realm_jax.training import pretrain  # noqa: E402
from realm_jax import sharding  # noqa: E402
from realm_jax.retrieval import embedding

RECALL_KS = (1, 5, 20)


def gold_recall(retriever_params, model: realm.ModelConfig, tokenizer, corpus, questions,
                query_length: int, batch_size: int = 32) -> tuple[dict[str, float], float]:
  """Zero-shot gold-paragraph recall@k: re-embeds the corpus with `retriever_params`, exact MIPS.

  Returns:
    `({"recall@k": fraction}, seconds spent embedding the corpus)`.
  """
  mesh = sharding.make_mesh()
  cfg = model.retriever_config()
  t0 = time.time()
  docs = embedding.run_batched(embedding.make_document_embed_fn(cfg, mesh),
                                   retriever_params, corpus.retrieval_inputs(), batch_size, mesh,
                                   desc="embedding corpus")
  embed_s = time.time() - t0
  queries = featurize.query_inputs([tokenizer.encode(q.question) for q in questions],
                                   query_length, tokenizer.cls_id, tokenizer.sep_id,
                                   tokenizer.pad_id)
  q = embedding.run_batched(embedding.make_query_embed_fn(cfg, mesh), retriever_params,
                                queries, batch_size, mesh, bucket=16)
  top = np.argsort(-(q @ docs.T), axis=1)[:, :max(RECALL_KS)]
  hits = np.array([[corpus.doc_ids[p] in set(question.gold_doc_ids) for p in row]
                   for row, question in zip(top, questions)])
  return {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in RECALL_KS}, embed_s


def restore_retriever(workdir: str, like):
  mesh = sharding.make_mesh()
  abstract = checkpointing.abstract_like(jax.device_put(like, sharding.replicated(mesh)))
  params, step = checkpointing.restore_partial_params(workdir, {"retriever": abstract})
  return jax.device_get(params["retriever"]), step


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/realm_pretraining_bench")
  p.add_argument("--articles", type=int, default=8)
  p.add_argument("--questions", type=int, default=300)
  p.add_argument("--max_block_length", type=int, default=128)
  p.add_argument("--ict_steps", type=int, default=20)
  p.add_argument("--ict_batch", type=int, default=16)
  p.add_argument("--ict_lr", type=float, default=1e-4)
  p.add_argument("--realm_steps", type=int, default=20)
  p.add_argument("--realm_batch", type=int, default=4)
  p.add_argument("--realm_lr", type=float, default=1e-4)
  p.add_argument("--num_candidates", type=int, default=4)
  p.add_argument("--query_length", type=int, default=32)
  p.add_argument("--candidate_length", type=int, default=128)
  p.add_argument("--refresh_every", type=int, default=10)
  p.add_argument("--eval_examples", type=int, default=32)
  p.add_argument("--warmup_steps", type=int, default=2)
  p.add_argument("--skip_random", action="store_true", help="skip the random-token run of (c)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  started = time.time()
  work = pathlib.Path(args.workdir)
  subset = corpus_data.embedded_dev_subset(args.articles, work / "squad_subsets")
  # all-MiniLM-L6-v2 as in experiments/models/minilm.gin: mean pooling, cosine scores x 20.
  model = realm.ModelConfig(init_checkpoint="minilm", pooling="mean", share_embedders=True,
                            score_scale=20.0)
  data = corpus_config.CorpusConfig(sources=(str(subset),), max_block_length=args.max_block_length,
                                    data_dir=str(work / "tfds"))
  tokenizer, corpus = corpus_config.load_corpus(data, model.checkpoint_dir(), str(work))
  questions = tfds_builders.build_questions({"dev": str(subset)}, "squad_open", str(work / "tfds"))
  questions = [q for q in questions["dev"] if q.gold_doc_ids]
  pick = np.sort(np.random.default_rng(0).permutation(len(questions))[:args.questions])
  questions = [questions[i] for i in pick]
  results: dict = {"setting": vars(args), "num_blocks": len(corpus),
                   "num_questions": len(questions),
                   "host": f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
                           f"{jax.default_backend()}, load {os.getloadavg()[0]:.1f}"}
  print(f"corpus: {len(corpus)} blocks from {args.articles} dev articles; {len(questions)} "
        "questions", flush=True)

  # (b) before: the installed MiniLM retriever.
  params = realm.init_params(model, jax.random.key(0), parts=("retriever",))["retriever"]
  recall = {}
  recall["MiniLM (before)"], embed_s = gold_recall(params, model, tokenizer, corpus, questions,
                                                   args.query_length)
  results["corpus_embed_s"] = embed_s
  print("recall before:", recall["MiniLM (before)"], f"(corpus embedded in {embed_s:.0f} s)",
        flush=True)

  # ICT warm start.
  t = time.time()
  ict_dir = str(work / "ict")
  ict_summary = ict.train(
      ict_dir, model=model, data=data,
      task=ict.IctConfig(query_length=args.query_length, block_length=args.max_block_length),
      optimizer=optim.OptimizerConfig(learning_rate=args.ict_lr, num_train_steps=args.ict_steps,
                                      warmup_steps=args.warmup_steps),
      loop=loop.LoopConfig(num_train_steps=args.ict_steps, log_every_steps=1,
                           checkpoint_every_steps=args.ict_steps),
      batch_size=args.ict_batch)
  results["ict"] = {"seconds": time.time() - t, "history": ict_summary["history"]}
  ict_params, _ = restore_retriever(ict_dir, params)
  recall["after ICT"], _ = gold_recall(ict_params, model, tokenizer, corpus, questions,
                                       args.query_length)
  print("recall after ICT:", recall["after ICT"], flush=True)

  # REALM pre-training from the ICT retriever: salient spans (a, b, c) and random tokens (c).
  task = pretrain.PretrainConfig(num_candidates=args.num_candidates,
                                 query_length=args.query_length,
                                 candidate_length=args.candidate_length)
  runs = {}
  for masking in ("salient",) + (() if args.skip_random else ("random_token",)):
    t = time.time()
    run_dir = str(work / f"realm_{masking}")
    runs[masking] = pretrain.train(
        run_dir, model=model, data=pretrain.PretrainDataConfig(corpus=data, masking=masking),
        task=task, optimizer=optim.OptimizerConfig(
            learning_rate=args.realm_lr, num_train_steps=args.realm_steps,
            warmup_steps=args.warmup_steps),
        loop=loop.LoopConfig(num_train_steps=args.realm_steps, log_every_steps=1,
                             checkpoint_every_steps=args.realm_steps),
        batch_size=args.realm_batch, searcher="scann", index_refresh="inline",
        refresh_every_steps=args.refresh_every, index_batch_size=32, init_from=ict_dir,
        num_eval_examples=args.eval_examples, eval_batch_size=args.realm_batch)
    runs[masking]["seconds"] = time.time() - t
    print(f"REALM ({masking}) done in {runs[masking]['seconds']:.0f} s", flush=True)
    if masking == "salient":
      realm_params, _ = restore_retriever(run_dir, params)
      recall["after ICT + REALM"], _ = gold_recall(realm_params, model, tokenizer, corpus,
                                                   questions, args.query_length)
      print("recall after REALM:", recall["after ICT + REALM"], flush=True)
  results["recall"] = recall
  results["realm"] = {k: {kk: v[kk] for kk in ("history", "eval_initial", "eval_final", "timings",
                                               "num_examples", "num_refreshes", "seconds")}
                      for k, v in runs.items()}
  results["total_s"] = time.time() - started
  (work / "results.json").write_text(json.dumps(results, indent=2))
  print_tables(results)
  return results


def print_tables(results: dict) -> None:
  """Prints the three Markdown tables of the module docstring."""
  s = results["setting"]
  print(f"\n# REALM pre-training benchmark ({results['host']})")
  print(f"corpus: {results['num_blocks']} blocks (first {s['articles']} SQuAD dev articles, <= "
        f"{s['max_block_length']} wordpieces); MiniLM-L6; REALM batch {s['realm_batch']}, k = "
        f"{s['num_candidates']} incl. null, query {s['query_length']} + candidate "
        f"{s['candidate_length']}, lr {s['realm_lr']}, inline refresh every {s['refresh_every']} "
        f"steps; ICT batch {s['ict_batch']}, {s['ict_steps']} steps, lr {s['ict_lr']}; corpus "
        f"embedding {results['corpus_embed_s']:.0f} s; total {results['total_s'] / 60:.1f} min\n")
  run = results["realm"]["salient"]
  print("(a) salient-span REALM run (from the ICT retriever): per-step training metrics")
  print("| step | mlm loss | null-doc loss | mlm acc | utility (nats/token) | p(null) | entropy "
        "| staleness |")
  print("|---|---|---|---|---|---|---|---|")
  for h in run["history"]:
    print(f"| {h['step']} | {h['train/mlm_loss']:.3f} | {h['train/null_mlm_loss']:.3f} | "
          f"{h['train/mlm_accuracy']:.3f} | {h['retrieval/utility']:+.4f} | "
          f"{h['retrieval/p_null']:.3f} | {h['retrieval/entropy']:.3f} | "
          f"{h['retrieval/index_staleness_steps']:.0f} |")
  print(f"\n(b) zero-shot gold-paragraph recall on {results['num_questions']} SQuAD-open dev "
        "questions (exact MIPS over the re-embedded corpus)")
  print("| retriever | " + " | ".join(f"recall@{k}" for k in RECALL_KS) + " |")
  print("|---|" + "---|" * len(RECALL_KS))
  for name, r in results["recall"].items():
    print(f"| {name} | " + " | ".join(f"{r[f'recall@{k}']:.3f}" for k in RECALL_KS) + " |")
  print(f"\n(c) masking ablation, {s['realm_steps']} steps each, held-out examples "
        f"({s['eval_examples']}) of the same masking")
  print("| masking | acc before | acc after | utility before | utility after | mean train utility "
        "(2nd half) | run s |")
  print("|---|---|---|---|---|---|---|")
  for masking, r in results["realm"].items():
    half = r["history"][len(r["history"]) // 2:]
    mean_u = np.mean([h["retrieval/utility"] for h in half]) if half else float("nan")
    print(f"| {masking} | {r['eval_initial']['train/mlm_accuracy']:.3f} | "
          f"{r['eval_final']['train/mlm_accuracy']:.3f} | "
          f"{r['eval_initial']['retrieval/utility']:+.4f} | "
          f"{r['eval_final']['retrieval/utility']:+.4f} | {mean_u:+.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
  main()
