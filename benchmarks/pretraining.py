"""REALM's effect at small scale: does REALM pre-training improve retrieval on unseen questions?

The paper's claim (REALM, Guu et al., 2020, §3.4, §4.4 and Table 2's "zero-shot retrieval
recall@5" column): pre-training the retriever through the marginal masked-LM likelihood makes it a
better retriever than its ICT warm start, and better than the ICT warm start trained longer. This
benchmark runs that comparison on a reduced SQuAD-open setting that fits a shared 2-core CPU:

  1. ICT warm start (ORQA §5): `--ict_steps` steps from the starting retriever.
  2. ICT-only (the ablation): the same ICT run continued (its checkpoint copied and resumed, the
     linear decay extended) for `--realm_steps` more steps, as many retriever updates as REALM gives
     the retriever in step 3.
  3. REALM pre-training from the ICT retriever, one run of `--mlm_warmup_steps` +
     `--realm_steps` steps: salient-span masking (spaCy entities and dates, §3.4) over the corpus
     paragraphs, the real marginal masked-LM loss over ∅ + the top k − 1 retrieved blocks
     (`training/pretrain.py`), the index re-embedded every `--refresh_every` steps (inline
     refresh). Its first `--mlm_warmup_steps` steps are the masked-LM warm-up: the retriever is
     FROZEN (`OptimizerConfig.part_frozen_steps=(("retriever", N),)`: no update, no gradient into
     Adam's moments or the clipping norm) while the encoder and its masked-LM head learn with the
     ICT retriever's blocks. MiniLM has no masked-LM head (the decoder is tied to the word
     embeddings, the transform starts fresh), so before the warm-up p(y|z,x) barely depends on the
     retrieved block z and the marginal likelihood carries next to no signal to the retriever.
     Then the retriever is trained through it for `--realm_steps` steps (at the decayed rate of
     that step: one linear schedule for the whole run). The checkpoint at the end of the warm-up
     is checked to hold the ICT retriever unchanged.

Measured:
  (a) zero-shot gold-paragraph recall@1/5/20 on the SQuAD-open dev questions of the corpus articles
      (all of them by default; `--questions N` samples N), exact MIPS over the corpus re-embedded
      with each retriever: the starting retriever, after ICT, ICT-only, ICT + MLM warm-up + REALM.
      No question is ever trained on (ICT and REALM see only the paragraphs). The paired difference
      of recall@5 per question gives a 95% interval for REALM − ICT and REALM − ICT-only.
  (b) `retrieval/utility` (marginal − ∅-only log-likelihood per masked token, nats) and the masked-LM
      metrics over the steps of the REALM run (its logged history: warm-up, then REALM), and on
      `--eval_examples` held-out masked sentences at steps 0, the end of the warm-up, … and the end.
  (c) with `--random_ablation`: the same run with random-token masks (Table 2's "random token
      masks" row): recall and utility.

The starting retriever (`--start`):
  * `fresh_head` (default): all-MiniLM-L6-v2's BERT with a FRESH [CLS] projection head
    (`pooling="cls_projection"`, 128-d, LayerNorm, score scale 0.25, so that the spread of the top
    scores is about that of MiniLM's cosine x 20). A WEAKER start, on purpose: all-MiniLM-L6-v2's
    mean-pooled embedding was trained on a billion sentence pairs that include SQuAD's own
    (question, paragraph) pairs, so it is already a supervised SQuAD retriever (recall@5 0.857 on the
    8-article corpus); an unsupervised signal at this budget has little to add to it. The fresh head
    starts at 0.635 and leaves room: the question is whether the mechanism works.
  * `minilm`: all-MiniLM-L6-v2 as installed (mean pooling, cosine x 20), the strong start.
The masked-LM encoder is all-MiniLM-L6-v2 in both cases.

Defaults (the CPU budget, not the paper's): the paragraphs of the first 8 SQuAD v1.1 dev articles
(760 blocks of at most 128 wordpieces), their 2,804 dev questions; ICT 20 steps of batch 16, lr
1e-4, then ICT-only +80 steps; MLM warm-up 40 steps and REALM 80 steps of batch 4, k = 4 (∅ + 3),
query 32 + candidate 128 wordpieces, lr 1e-4, a refresh every 20 steps. The same settings as
`realm-jax` commands: experiments/cpu/realm_effect_minilm.gin (header).

Full run, from the repository root, on the host's one CPU device (not with the 8 simulated devices
of the tests: batch 4 is not a multiple of 8); it writes benchmarks/results/pretraining.{md,json}
with `--publish`. Expected: about 45 minutes on 2 cores shared with another job (as timed in a tiny
run here at load 4-5: ~4 s per ICT step, ~12 s per REALM step, ~35 s per corpus embedding, ~75 s
per recall measurement; i.e. ~2 min ICT, ~6 min ICT-only, ~30 min REALM with 5 refreshes and 5
held-out evaluations, ~5 min recall), less on idle cores; `--random_ablation` adds ~30 minutes:

    .venv/bin/python benchmarks/pretraining.py --publish
    # a check of the whole path in ~5 minutes:
    .venv/bin/python benchmarks/pretraining.py --articles 2 --questions 100 --ict_steps 2 \\
        --mlm_warmup_steps 3 --realm_steps 3 --refresh_every 2 --eval_examples 8 --log_every 1

Writes `<workdir>/results.json` (and `.md`) and prints Markdown tables. The run directories under
`--workdir` (ict, ict_only, realm, realm_random_token) are deleted first; the data caches are
kept.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import platform
import shutil
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realm_jax import sharding  # noqa: E402
from realm_jax.data import corpus as corpus_data  # noqa: E402
from realm_jax.data import corpus_config  # noqa: E402
from realm_jax.data import featurize  # noqa: E402
from realm_jax.data import tfds_builders  # noqa: E402
from realm_jax.models import realm  # noqa: E402
from realm_jax.retrieval import embedding  # noqa: E402
from realm_jax.training import checkpointing  # noqa: E402
from realm_jax.training import ict  # noqa: E402
from realm_jax.training import loop  # noqa: E402
from realm_jax.training import optim  # noqa: E402
from realm_jax.training import pretrain  # noqa: E402

RECALL_KS = (1, 5, 20)
STARTS = ("fresh_head", "minilm")
RUN_DIRS = ("ict", "ict_only", "realm", "realm_random_token")


def model_config(start: str) -> realm.ModelConfig:
  """The model of every phase: all-MiniLM-L6-v2, with the retriever head of `start`."""
  if start == "minilm":  # experiments/models/minilm.gin
    return realm.ModelConfig(init_checkpoint="minilm", pooling="mean", share_embedders=True,
                             score_scale=20.0)
  if start == "fresh_head":  # experiments/cpu/realm_effect_minilm.gin
    return realm.ModelConfig(init_checkpoint="minilm", pooling="cls_projection",
                             projection_size=128, share_embedders=True, score_scale=0.25)
  raise ValueError(f"--start must be one of {STARTS}, got {start!r}")


def gold_hits(retriever_params, model: realm.ModelConfig, tokenizer, corpus, questions,
              query_length: int, batch_size: int = 32) -> tuple[np.ndarray, float]:
  """Zero-shot retrieval: re-embeds the corpus with `retriever_params`, exact MIPS.

  Returns:
    `(hits, seconds)`: `hits [num_questions, max(RECALL_KS)]` bool, True where the block at that
    rank is a gold paragraph of the question; the seconds spent embedding corpus and questions.
  """
  mesh = sharding.make_mesh()
  cfg = model.retriever_config()
  t0 = time.time()
  docs = embedding.run_batched(embedding.make_document_embed_fn(cfg, mesh),
                               retriever_params, corpus.retrieval_inputs(), batch_size, mesh,
                               desc="embedding corpus")
  queries = featurize.query_inputs([tokenizer.encode(q.question) for q in questions],
                                   query_length, tokenizer.cls_id, tokenizer.sep_id,
                                   tokenizer.pad_id)
  q = embedding.run_batched(embedding.make_query_embed_fn(cfg, mesh), retriever_params,
                            queries, batch_size, mesh, bucket=16)
  seconds = time.time() - t0
  top = np.argsort(-(q @ docs.T), axis=1)[:, :max(RECALL_KS)]
  hits = np.array([[corpus.doc_ids[p] in set(question.gold_doc_ids) for p in row]
                   for row, question in zip(top, questions)])
  return hits, seconds


def recall_at(hits: np.ndarray) -> dict[str, float]:
  return {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in RECALL_KS}


def paired_difference(a: np.ndarray, b: np.ndarray, k: int = 5) -> dict[str, float]:
  """recall@k(a) − recall@k(b) over the same questions, with a normal 95% interval."""
  d = a[:, :k].any(axis=1).astype(float) - b[:, :k].any(axis=1).astype(float)
  half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
  return {"delta": float(d.mean()), "ci95": float(half), "better": int((d > 0).sum()),
          "worse": int((d < 0).sum())}


def restore_retriever(workdir: str, like):
  mesh = sharding.make_mesh()
  abstract = checkpointing.abstract_like(jax.device_put(like, sharding.replicated(mesh)))
  params, step = checkpointing.restore_partial_params(workdir, {"retriever": abstract})
  return jax.device_get(params["retriever"]), step


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/realm_pretraining_bench")
  p.add_argument("--start", default="fresh_head", choices=STARTS,
                 help="the starting retriever (module docstring)")
  p.add_argument("--articles", type=int, default=8)
  p.add_argument("--questions", type=int, default=0,
                 help="a seeded sample of this many dev questions (0: all of the articles')")
  p.add_argument("--max_block_length", type=int, default=128)
  p.add_argument("--ict_steps", type=int, default=20)
  p.add_argument("--ict_batch", type=int, default=16)
  p.add_argument("--ict_lr", type=float, default=1e-4)
  p.add_argument("--mlm_warmup_steps", type=int, default=40,
                 help="REALM steps with the retriever frozen before it is trained")
  p.add_argument("--realm_steps", type=int, default=80,
                 help="REALM steps that train the retriever (and ICT-only's extra steps)")
  p.add_argument("--realm_batch", type=int, default=4)
  p.add_argument("--realm_lr", type=float, default=1e-4)
  p.add_argument("--num_candidates", type=int, default=4)
  p.add_argument("--query_length", type=int, default=32)
  p.add_argument("--candidate_length", type=int, default=128)
  p.add_argument("--refresh_every", type=int, default=20)
  p.add_argument("--eval_examples", type=int, default=32,
                 help="masked sentences held out of the REALM phases, evaluated before/after")
  p.add_argument("--warmup_steps", type=int, default=2,
                 help="learning-rate warm-up steps of each run (not the MLM warm-up)")
  p.add_argument("--log_every", type=int, default=5,
                 help="log window of the REALM run (a divisor of --mlm_warmup_steps)")
  p.add_argument("--random_ablation", action="store_true",
                 help="also run warm-up + REALM with random-token masks (doubles their cost)")
  p.add_argument("--skip_random", action="store_true", help=argparse.SUPPRESS)  # the old default
  p.add_argument("--publish", action="store_true",
                 help="also write benchmarks/results/pretraining.{md,json} (full runs only)")
  args = p.parse_args(argv)
  if args.mlm_warmup_steps % args.log_every:
    p.error("--log_every must divide --mlm_warmup_steps (no log window across the two phases)")
  logging.basicConfig(level=logging.WARNING)
  started = time.time()
  work = pathlib.Path(args.workdir)
  for name in RUN_DIRS:  # a previous run's checkpoints would be resumed: start afresh
    shutil.rmtree(work / name, ignore_errors=True)
  subset = corpus_data.embedded_dev_subset(args.articles, work / "squad_subsets")
  model = model_config(args.start)
  data = corpus_config.CorpusConfig(sources=(str(subset),), max_block_length=args.max_block_length,
                                    data_dir=str(work / "tfds"))
  tokenizer, corpus = corpus_config.load_corpus(data, model.checkpoint_dir(), str(work))
  questions = tfds_builders.build_questions({"dev": str(subset)}, "squad_open", str(work / "tfds"))
  questions = [q for q in questions["dev"] if q.gold_doc_ids]
  if args.questions:
    pick = np.sort(np.random.default_rng(0).permutation(len(questions))[:args.questions])
    questions = [questions[i] for i in pick]
  results: dict = {"setting": vars(args), "num_blocks": len(corpus),
                   "num_questions": len(questions), "seconds": {},
                   "host": f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
                           f"{jax.default_backend()}, load {os.getloadavg()[0]:.1f} at the start"}
  print(f"corpus: {len(corpus)} blocks from {args.articles} dev articles; {len(questions)} "
        f"questions; start: {args.start}", flush=True)
  hits: dict[str, np.ndarray] = {}

  def measure(name: str, params) -> None:
    hits[name], seconds = gold_hits(params, model, tokenizer, corpus, questions, args.query_length)
    results["seconds"][f"recall {name}"] = seconds
    print(f"recall, {name}: {recall_at(hits[name])} ({seconds:.0f} s)", flush=True)

  start_name = ("MiniLM as installed" if args.start == "minilm"
                else "MiniLM, fresh [CLS] projection head")
  start_params = realm.init_params(model, jax.random.key(0), parts=("retriever",))["retriever"]
  measure(start_name, start_params)  # = ICT's initial params (seed 0)

  # 1. ICT warm start; 2. ICT-only: the same run continued for --realm_steps steps.
  ict_task = ict.IctConfig(query_length=args.query_length, block_length=args.max_block_length)

  def ict_run(run_dir: pathlib.Path, steps: int) -> dict:
    t = time.time()
    summary = ict.train(
        str(run_dir), model=model, data=data, task=ict_task,
        optimizer=optim.OptimizerConfig(learning_rate=args.ict_lr, num_train_steps=steps,
                                        warmup_steps=args.warmup_steps),
        loop=loop.LoopConfig(num_train_steps=steps, log_every_steps=max(1, steps // 10),
                             checkpoint_every_steps=steps), batch_size=args.ict_batch)
    return {"seconds": time.time() - t, "start_step": summary.get("start_step", 0),
            "steps": summary.get("steps"), "history": summary["history"],
            "timings": summary["timings"]}

  runs: dict[str, dict] = {}
  runs["ict"] = ict_run(work / "ict", args.ict_steps)
  ict_params, _ = restore_retriever(str(work / "ict"), start_params)
  measure("after ICT", ict_params)
  shutil.copytree(work / "ict" / "checkpoints", work / "ict_only" / "checkpoints")
  runs["ict_only"] = ict_run(work / "ict_only", args.ict_steps + args.realm_steps)
  measure("ICT-only", restore_retriever(str(work / "ict_only"), start_params)[0])

  # 3 + 4. One REALM run from the ICT retriever: the first --mlm_warmup_steps steps with the
  # retriever frozen (the masked-LM warm-up), then the retriever trained.
  task = pretrain.PretrainConfig(num_candidates=args.num_candidates,
                                 query_length=args.query_length,
                                 candidate_length=args.candidate_length)
  warm, total = args.mlm_warmup_steps, args.mlm_warmup_steps + args.realm_steps

  def realm_run(run_dir: pathlib.Path, masking: str) -> dict:
    t = time.time()
    summary = pretrain.train(
        str(run_dir), model=model, data=pretrain.PretrainDataConfig(corpus=data, masking=masking),
        task=task, optimizer=optim.OptimizerConfig(
            learning_rate=args.realm_lr, num_train_steps=total, warmup_steps=args.warmup_steps,
            part_frozen_steps=(("retriever", warm),)),
        loop=loop.LoopConfig(num_train_steps=total, log_every_steps=args.log_every,
                             checkpoint_every_steps=warm or total, eval_every_steps=warm,
                             keep_checkpoints=max(3, -(-total // max(warm, 1)))),
        batch_size=args.realm_batch, searcher="scann", index_refresh="inline",
        refresh_every_steps=args.refresh_every, index_batch_size=32, init_from=str(work / "ict"),
        num_eval_examples=args.eval_examples, eval_batch_size=args.realm_batch)
    out = {k: summary.get(k) for k in ("history", "evals", "eval_initial", "eval_final",
                                       "timings", "num_examples", "num_train_examples",
                                       "num_refreshes", "max_index_staleness_steps_seen")}
    out["seconds"] = time.time() - t
    print(f"{run_dir.name}: {total} steps in {out['seconds']:.0f} s", flush=True)
    if warm:  # the retriever at the end of the warm-up is still the ICT one
      mesh = sharding.make_mesh()
      abstract = checkpointing.abstract_like(jax.device_put(start_params,
                                                            sharding.replicated(mesh)))
      at_warm, _ = checkpointing.restore_partial_params(str(run_dir), {"retriever": abstract},
                                                        step=warm)
      if not all(np.array_equal(a, b) for a, b in zip(
          jax.tree_util.tree_leaves(jax.device_get(at_warm["retriever"])),
          jax.tree_util.tree_leaves(ict_params))):
        raise AssertionError(f"{run_dir}: the retriever changed during the MLM warm-up")
    return out

  for masking in ("salient",) + (("random_token",) if args.random_ablation else ()):
    suffix = "" if masking == "salient" else f"_{masking}"
    runs[f"realm{suffix}"] = realm_run(work / f"realm{suffix}", masking)
    name = "ICT + MLM warm-up + REALM" + ("" if masking == "salient" else f" ({masking} masks)")
    measure(name, restore_retriever(str(work / f"realm{suffix}"), start_params)[0])

  results["runs"] = runs
  results["recall"] = {name: recall_at(h) for name, h in hits.items()}
  realm_name = "ICT + MLM warm-up + REALM"
  results["recall@5 differences"] = {
      f"{realm_name} − after ICT": paired_difference(hits[realm_name], hits["after ICT"]),
      f"{realm_name} − ICT-only": paired_difference(hits[realm_name], hits["ICT-only"]),
      "ICT-only − after ICT": paired_difference(hits["ICT-only"], hits["after ICT"]),
      f"after ICT − {start_name}": paired_difference(hits["after ICT"], hits[start_name]),
  }
  results["total_s"] = time.time() - started
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_tables(results)
  print(text.getvalue())
  (work / "results.json").write_text(json.dumps(results, indent=2))
  (work / "results.md").write_text(text.getvalue())
  if args.publish:
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/pretraining.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    (out / "pretraining.json").write_text(json.dumps(dict(results, command=command), indent=2))
    (out / "pretraining.md").write_text(f"`{command.strip()}`\n\n{text.getvalue()}")
    print(f"wrote {out / 'pretraining.md'} and {out / 'pretraining.json'}")
  return results


def print_tables(results: dict) -> None:
  """The Markdown tables of the module docstring."""
  s, runs = results["setting"], results["runs"]
  warm, total = s["mlm_warmup_steps"], s["mlm_warmup_steps"] + s["realm_steps"]
  print(f"# REALM's effect at small scale ({results['host']})\n")
  print(f"Corpus: {results['num_blocks']} blocks (the first {s['articles']} SQuAD v1.1 dev "
        f"articles, <= {s['max_block_length']} wordpieces); all-MiniLM-L6-v2, start `{s['start']}`. "
        f"ICT: batch {s['ict_batch']}, lr {s['ict_lr']}, {s['ict_steps']} steps (ICT-only: "
        f"+{s['realm_steps']}). REALM from the ICT retriever: {total} steps of batch "
        f"{s['realm_batch']}, the first {warm} with the retriever frozen (MLM warm-up); salient "
        f"spans, k = {s['num_candidates']} incl. ∅, query {s['query_length']} + candidate "
        f"{s['candidate_length']}, lr {s['realm_lr']}, inline refresh every {s['refresh_every']} "
        f"steps. Total {results['total_s'] / 60:.1f} min.\n")

  print(f"(a) Zero-shot gold-paragraph recall on {results['num_questions']} SQuAD-open dev "
        "questions of these articles (none trained on; exact MIPS over the re-embedded corpus)\n")
  print("| retriever | retriever updates | " + " | ".join(f"recall@{k}" for k in RECALL_KS)
        + " | training s |")
  print("|---|---|" + "---|" * len(RECALL_KS) + "---|")
  realm_updates = f"ICT {s['ict_steps']} + REALM {s['realm_steps']} (after {warm} frozen)"
  updates = {"after ICT": f"ICT {s['ict_steps']}",
             "ICT-only": f"ICT {s['ict_steps'] + s['realm_steps']}"}
  seconds = {"after ICT": runs["ict"]["seconds"],
             "ICT-only": runs["ict"]["seconds"] + runs["ict_only"]["seconds"]}
  for run, name in (("realm", "ICT + MLM warm-up + REALM"),
                    ("realm_random_token", "ICT + MLM warm-up + REALM (random_token masks)")):
    if run in runs:
      updates[name] = realm_updates
      seconds[name] = runs["ict"]["seconds"] + runs[run]["seconds"]
  for name, r in results["recall"].items():
    print(f"| {name} | {updates.get(name, 'none')} | "
          + " | ".join(f"{r[f'recall@{k}']:.3f}" for k in RECALL_KS)
          + f" | {seconds.get(name, 0):.0f} |")
  print("\nPaired recall@5 differences over the same questions (95% interval; questions gained / "
        "lost)\n")
  print("| comparison | Δ recall@5 | 95% interval | gained | lost |")
  print("|---|---|---|---|---|")
  for name, d in results["recall@5 differences"].items():
    print(f"| {name} | {d['delta']:+.3f} | ±{d['ci95']:.3f} | {d['better']} | {d['worse']} |")

  for run in [r for r in ("realm", "realm_random_token") if r in runs]:
    r = runs[run]
    print(f"\n(b) `{run}`: retrieval utility over the steps (means over each logged window of "
          f"{s['log_every']} steps; the retriever is frozen up to step {warm})\n")
    print("| step | phase | mlm loss | ∅-only loss | mlm acc | utility (nats/token) | p(∅) | "
          "entropy | staleness |")
    print("|---|---|---|---|---|---|---|---|---|")
    for h in r["history"]:
      phase = "MLM warm-up" if h["step"] <= warm else "REALM"
      print(f"| {h['step']} | {phase} | {h['train/mlm_loss']:.3f} | "
            f"{h['train/null_mlm_loss']:.3f} | {h['train/mlm_accuracy']:.3f} | "
            f"{h['retrieval/utility']:+.4f} | {h['retrieval/p_null']:.3f} | "
            f"{h['retrieval/entropy']:.3f} | {h['retrieval/index_staleness_steps']:.0f} |")
    print(f"\nHeld-out masked sentences ({s['eval_examples']}, never trained on)\n")
    print("| step | mlm loss | mlm acc | utility (nats/token) | p(∅) | entropy |")
    print("|---|---|---|---|---|---|")
    evals = [dict(r["eval_initial"] or {}, step=0)] + list(r.get("evals") or [])
    if r.get("eval_final") and (not evals or evals[-1]["step"] != total):
      evals.append(dict(r["eval_final"], step=total))
    for e in evals:
      if "train/mlm_loss" in e:
        print(f"| {e['step']} | {e['train/mlm_loss']:.3f} | {e['train/mlm_accuracy']:.3f} | "
              f"{e['retrieval/utility']:+.4f} | {e['retrieval/p_null']:.3f} | "
              f"{e['retrieval/entropy']:.3f} |")
    t = r["timings"]
    print(f"\n{run}: {total} steps in {r['seconds']:.0f} s ({t.get('train_s', 0) / total:.1f} s "
          f"per step incl. {r.get('num_refreshes') or 0} index refreshes; first index "
          f"{t.get('first_index_s', 0):.0f} s, data {t.get('data_s', 0):.0f} s)")
  print("\nOther timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items())
        + ", " + ", ".join(f"{n} run {runs[n]['seconds']:.0f}" for n in ("ict", "ict_only")))


if __name__ == "__main__":
  main()
