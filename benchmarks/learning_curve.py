"""Learning curve of the default job: exact match and gold recall@1/5/20 vs steps and wall time.

What it measures (issue #13, goal 2). The default job (`make demo`: `realm_jax.training.finetune.
train_and_evaluate` configured by `experiments/cpu/squad_minilm.gin`) is trained for `--steps` steps
(TRAIN_STEPS: the loop's steps AND the length of the learning-rate schedule), and on its seeded
sample of SQuAD-open dev questions (200 by default, `max_eval_questions`) this script reports, every
`--eval_every` steps:

  * REALM: exact match (EM) of the reader over its top `num_read` retrieved blocks and
    gold-paragraph recall@1/5/20 of the fine-tuned retriever (the trainer's own periodic
    evaluation, run on the params of that step; the frozen document index of the job);
  * BM25 + the same reader: `bm25s` (k1=0.9, b=0.4, lower-cased `\\w+` tokens, no stemming, no stop
    words, as `benchmarks/retrieval_recall.py`) over the same blocks ("title text") retrieves, and
    the SAME reader checkpoint reads BM25's top `num_read` blocks. The answer is the best span over
    them by the reader's span score; the REALM evaluator adds the dense retriever's logit of each
    block to it, which would mix dense retrieval into the baseline, so each read block gets the same
    (zero) retriever logit instead (`--bm25_block_prior dense` keeps the dense logit: a hybrid, not
    the baseline). BM25's recall does not change with training; its EM does, with the reader.

Row 0 is the start: zero-shot retrieval (the pretrained MiniLM query tower) and the untrained reader
(pretrained MiniLM + a fresh span head: EM near 0, shown for completeness). The x axes are training
steps and training wall time (seconds spent in train steps since the start, evaluations excluded:
`train_time_s` of `training.loop.Trainer.fit`).

How: one training run in `--workdir` with `loop.LoopConfig.eval_every_steps = checkpoint_every_steps
= --eval_every` and every checkpoint kept (about 0.3 GB each with MiniLM); then each checkpoint's
params (and the initial ones) are restored and evaluated with the BM25 evaluator
(`OpenQAEvaluator.retrieve` overridden). Evaluations done are cached in the work directory
(`learning_curve_evals.json`), and training segments in `learning_curve_segments.json`, so a run
that was interrupted continues with `--resume-friendly` (the trainer resumes from its newest
checkpoint; a finished run is not retrained; a reader evaluation that the killed segment did not get
to is done from its checkpoint; training time before a lost segment is then estimated from the
measured step time and marked "~").

Run from the repository root. The full curve takes about an hour on 2 CPU cores that nothing else
uses (estimated from the demo's measured 3.8 s a step and 34 s per evaluation of 200 questions:
~38 min of training steps, 10 REALM evaluations during training ~6 min, then 11 BM25 + reader
evaluations and the untrained reader's ~7 min, data and document index ~2 min); a shared CPU is
slower (8 s a step was seen with other jobs running). The checkpoints take ~3.5 GB of disk.

    .venv/bin/python benchmarks/learning_curve.py                    # 600 steps, every 60
    .venv/bin/python benchmarks/learning_curve.py --resume-friendly  # continue / re-report a run

A tiny check (a few minutes, most of it the document index):

    .venv/bin/python benchmarks/learning_curve.py --steps 4 --eval_every 2 --fresh \\
        --workdir /tmp/lc_tiny --out /tmp/lc_tiny/learning_curve \\
        --gin_param "finetune.OpenQADataConfig.max_eval_questions=16"

Writes `<out>.json` (every metric, timings, settings), `<out>.md` (a README section: the table and
the plot) and `<out>.png` (EM and recall@k against steps and against training time), default
`benchmarks/results/learning_curve.*`, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import platform
import re
import shlex
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KS = (1, 5, 20)
SEGMENTS_FILE = "learning_curve_segments.json"
EVALS_FILE = "learning_curve_evals.json"


def _tokens(text: str) -> list[str]:
  """BM25 tokens: lower-cased word characters (as benchmarks/retrieval_recall.py)."""
  return re.findall(r"\w+", text.lower())


def _read_json(path: pathlib.Path, default: Any) -> Any:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return default


def _write_json(path: pathlib.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=float))
  os.replace(tmp, path)


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Committed checkpoint steps in WORKDIR/checkpoints (orbax's temporary folders excluded)."""
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() \
      else []


def _gin_params(args) -> list[str]:
  """The bindings of this benchmark's run; the user's `--gin_param`s come last (they win)."""
  return [f"TRAIN_STEPS={args.steps}",
          f"loop.LoopConfig.eval_every_steps={args.eval_every}",
          f"loop.LoopConfig.checkpoint_every_steps={args.eval_every}",
          f"loop.LoopConfig.keep_checkpoints={args.steps // args.eval_every + 2}",
          *args.gin_param]


def _settings(args) -> dict[str, Any]:
  """What a reused work directory must have been trained with."""
  return {"gin_file": list(args.gin_file), "gin_params": _gin_params(args)}


# --------------------------------------------------------------------------------------------------
# Training: the default job with periodic evaluation and every eval step checkpointed.
# --------------------------------------------------------------------------------------------------


def train(args, workdir: pathlib.Path) -> list[dict[str, Any]]:
  """Runs (or resumes, or reuses) the training; returns the recorded training segments."""
  from realm_jax import cli  # pylint: disable=g-import-not-at-top

  seg_path = workdir / SEGMENTS_FILE
  record = _read_json(seg_path, {})
  latest = max(_checkpoint_steps(workdir), default=None)
  if latest is not None and record.get("settings") not in (None, _settings(args)):
    raise SystemExit(f"{workdir} was trained with other settings ({record.get('settings')}); use "
                     "another --workdir or --fresh")
  if latest is not None and latest >= args.steps:
    print(f"[learning_curve] {workdir}: reusing the finished run (checkpoint {latest})", flush=True)
    return record.get("segments", [])
  if latest is None:  # No checkpoint: no earlier segment or evaluation counts.
    record = {}
    (workdir / EVALS_FILE).unlink(missing_ok=True)
  record["settings"] = _settings(args)
  cli.parse_gin(args.gin_file, _gin_params(args))
  fn = cli.configured("realm_jax.training.finetune", "train_and_evaluate")
  cli.write_config(str(workdir))
  print(f"[learning_curve] training {args.steps} steps in {workdir}"
        + (f" (resuming from step {latest})" if latest else ""), flush=True)
  t = time.perf_counter()
  summary = fn(workdir=str(workdir))
  wall = time.perf_counter() - t
  segment = {k: summary.get(k) for k in ("start_step", "steps", "evals", "zero_shot", "final",
                                         "timings", "num_blocks", "num_train_questions",
                                         "num_eval_questions", "snapshot", "init")}
  segment["wall_s"] = wall
  record.setdefault("segments", []).append(segment)
  _write_json(seg_path, record)
  return record["segments"]


def train_times(segments: Sequence[dict[str, Any]], steps: Sequence[int]
                ) -> dict[int, tuple[float | None, bool]]:
  """`step -> (training seconds since step 0, estimated?)` from the recorded segments.

  A segment's `train_time_s` counts from its own start; the time before it is the sum of the
  previous segments' training time (train_s − eval_s) when they join up to its start step, else an
  estimate from the measured seconds per step (marked estimated).
  """
  per_step = [(s["timings"]["train_s"] - s["timings"].get("eval_s", 0.0))
              / max(s["steps"] - s["start_step"], 1) for s in segments if s.get("timings")]
  sec_per_step = float(np.mean(per_step)) if per_step else None
  known: dict[int, tuple[float, bool]] = {0: (0.0, False)}
  offset, offset_step, estimated = 0.0, 0, False
  for s in sorted(segments, key=lambda s: s["start_step"]):
    if s["start_step"] != offset_step:  # A segment was lost (killed before it finished).
      offset, estimated = s["start_step"] * (sec_per_step or 0.0), True
    for e in s.get("evals") or []:
      known[int(e["step"])] = (offset + e["train_time_s"], estimated)
    offset += s["timings"]["train_s"] - s["timings"].get("eval_s", 0.0)
    offset_step = s["steps"]
  out = {}
  for step in steps:
    if step in known:
      out[step] = known[step]
    else:
      out[step] = (step * sec_per_step, True) if sec_per_step else (None, True)
  return out


# --------------------------------------------------------------------------------------------------
# Evaluation of the checkpoints: BM25 + the same reader (and REALM where the trainer's is missing).
# --------------------------------------------------------------------------------------------------


class Evaluators:
  """The dense (REALM) and BM25 evaluators over the job's corpus, snapshot and eval questions."""

  def __init__(self, args, workdir: pathlib.Path):
    # pylint: disable=g-import-not-at-top
    import bm25s
    import gin
    import jax
    from realm_jax import cli
    from realm_jax import sharding
    from realm_jax.models import realm
    from realm_jax.retrieval import embedding
    from realm_jax.retrieval import searchers
    from realm_jax.retrieval import snapshot as snapshot_lib
    from realm_jax.training import checkpointing
    from realm_jax.training import finetune
    # pylint: enable=g-import-not-at-top

    cli.parse_gin(args.gin_file, _gin_params(args))
    b = gin.get_bindings(finetune.train_and_evaluate)
    self.model = b.get("model", realm.ModelConfig())
    data = b.get("data", finetune.OpenQADataConfig())
    self.task = task = b.get("task", finetune.OpenQAConfig())
    seed, init_from = b.get("seed", 0), b.get("init_from", "")
    self.mesh = mesh = sharding.make_mesh(tuple(b.get("mesh_shape", (-1, 1))))
    batch = b.get("eval_batch_size", 8)
    tokenizer, corpus, _, self.questions = finetune.load_openqa_data(data, self.model,
                                                                     str(workdir), seed)
    path = snapshot_lib.latest_snapshot(str(workdir / "snapshots"))
    snapshot = snapshot_lib.read_snapshot(path)
    self.featurizer = featurizer = finetune.OpenQAFeaturizer(
        tokenizer, corpus, snapshot.block_ids, snapshot.embeddings, task,
        self.model.max_span_width)
    self.num_blocks = len(featurizer.row_of_block)
    query_fn = embedding.make_query_embed_fn(self.model.retriever_config(), mesh)
    eval_fn = finetune.make_eval_step(self.model, task, mesh)
    search = searchers.searcher_from_snapshot(snapshot, kind=b.get("searcher", "scann"),
                                              mesh=mesh if b.get("searcher") == "exact" else None)
    ks = (1, 5, 20, 100)
    self.dense = finetune.OpenQAEvaluator(featurizer, search, query_fn, eval_fn, mesh, batch, ks)

    # BM25 over "title text" of every snapshot block; its ranking of each eval question, once.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    t = time.perf_counter()
    positions = corpus.positions(snapshot.block_ids)
    index = bm25s.BM25(k1=0.9, b=0.4)
    index.index([_tokens(f"{corpus.titles[int(p)]} {corpus.texts[int(p)]}") for p in positions],
                show_progress=False)
    k = min(max(max(ks), task.num_retrieved), self.num_blocks)
    rows, scores = index.retrieve([_tokens(q.question) for q in self.questions], k=k,
                                  show_progress=False, n_threads=1)
    block_ids = np.asarray(snapshot.block_ids)[np.asarray(rows)]
    ranking = {q.qid: (np.asarray(scores[i], np.float32), block_ids[i])
               for i, q in enumerate(self.questions)}
    self.bm25_index_s = time.perf_counter() - t

    if args.bm25_block_prior == "uniform":
      def reader_fn(params, batch_):  # Every read block gets the same retriever logit.
        batch_ = dict(batch_)
        batch_["retrieved_embeddings"] = np.zeros_like(batch_["retrieved_embeddings"])
        return eval_fn(params, batch_)
    else:
      reader_fn = eval_fn

    @dataclasses.dataclass
    class BM25Evaluator(finetune.OpenQAEvaluator):
      """`OpenQAEvaluator` whose candidates are BM25's (the params' retriever is not used)."""

      def retrieve(self, retriever_params, questions, k):
        del retriever_params
        got = [ranking[q.qid] for q in questions]
        return (np.stack([s[:k] for s, _ in got]), np.stack([ids[:k] for _, ids in got]))

    self.bm25 = BM25Evaluator(featurizer, None, query_fn, reader_fn, mesh, batch, ks)

    init = realm.init_params(self.model, jax.random.key(seed), parts=finetune.PARTS)
    init = jax.device_put(init, sharding.replicated(mesh))
    self.abstract = checkpointing.abstract_like(init)
    if init_from:  # The trainer's step 0 (`params_from_run`): the other run's params.
      init = finetune.params_from_run(init_from, self.abstract, self.model, seed)
    self.initial = init
    self.ckpt_dir = checkpointing.checkpoint_dir(str(workdir))
    self._restore = checkpointing.restore_partial_params

  def params(self, step: int):
    if step == 0:
      return self.initial
    return self._restore(self.ckpt_dir, self.abstract, step)[0]


def evaluate(args, workdir: pathlib.Path, steps: Sequence[int], dense_needed: set[int]
             ) -> tuple[dict[str, dict[int, dict]], dict[str, Any]]:
  """`({"bm25": {step: metrics}, "dense": {step: metrics}}, info)`; cached in the work directory."""
  cache_path = workdir / EVALS_FILE
  key = hashlib.sha256(json.dumps([_settings(args), args.bm25_block_prior]).encode()).hexdigest()
  cache = _read_json(cache_path, {})
  if cache.get("key") != key:
    cache = {"key": key, "results": {}}
  results = cache["results"]
  available = set(_checkpoint_steps(workdir)) | {0}
  todo = [(kind, s) for s in steps if s in available
          for kind in (("bm25",) * (not args.skip_bm25) + ("dense",) * (s in dense_needed))
          if f"{kind}@{s}" not in results]
  info: dict[str, Any] = dict(cache.get("info", {}))
  info["missing_checkpoints"] = sorted(set(steps) - available)
  t = time.perf_counter()
  if todo:
    ev = Evaluators(args, workdir)
    cache["info"] = dict(num_blocks=ev.num_blocks, num_questions=len(ev.questions),
                         bm25_index_s=ev.bm25_index_s, num_read=ev.task.num_read,
                         num_retrieved=ev.task.num_retrieved)
    info.update(cache["info"])
    for step in sorted({s for _, s in todo}):
      params = ev.params(step)
      for kind in ("bm25", "dense"):
        if (kind, step) not in todo:
          continue
        evaluator = ev.bm25 if kind == "bm25" else ev.dense
        metrics, _ = evaluator(params, ev.questions, desc=f"{kind} @ {step}", read=True)
        results[f"{kind}@{step}"] = metrics
        _write_json(cache_path, cache)
        print(f"[learning_curve] {kind} @ step {step}: EM {100 * metrics['exact_match']:.1f}, "
              f"gold recall@5 {100 * metrics.get('gold_recall@5', float('nan')):.1f}", flush=True)
  info["eval_s"] = time.perf_counter() - t
  if todo:  # Seconds of all the checkpoint evaluations behind the cached results.
    cache["eval_s_total"] = cache.get("eval_s_total", 0.0) + info["eval_s"]
    _write_json(cache_path, cache)
  info["eval_s_total"] = cache.get("eval_s_total", info["eval_s"])
  info["evaluations"] = len(todo)
  out: dict[str, dict[int, dict]] = {"bm25": {}, "dense": {}}
  for name, metrics in results.items():
    kind, step = name.split("@")
    out[kind][int(step)] = metrics
  return out, info


# --------------------------------------------------------------------------------------------------
# Report: JSON, Markdown table, plot.
# --------------------------------------------------------------------------------------------------


def _pct(metrics: dict | None, key: str) -> str:
  if not metrics or metrics.get(key) is None:
    return "—"
  return f"{100 * metrics[key]:.1f}"


def table(rows: Sequence[dict[str, Any]], with_bm25: bool) -> str:
  head = ["step", "train time (s)", "REALM EM"] + [f"REALM R@{k}" for k in KS]
  if with_bm25:
    head += ["BM25+reader EM"] + [f"BM25 R@{k}" for k in KS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
  for r in rows:
    t, est = r["train_time_s"], r["time_estimated"]
    cells = [str(r["step"]), "—" if t is None else f"{'~' if est else ''}{t:.0f}",
             _pct(r["realm"], "exact_match")] + [_pct(r["realm"], f"gold_recall@{k}") for k in KS]
    if with_bm25:
      cells += [_pct(r["bm25"], "exact_match")] + [_pct(r["bm25"], f"gold_recall@{k}") for k in KS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str, with_bm25: bool) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharey="row")
  styles = {1: ":", 5: "-", 20: "--"}
  top_em = 5.0
  for col, (xkey, xlabel) in enumerate((("step", "training steps"),
                                        ("train_time_min", "training wall time (min)"))):
    pts = [r for r in rows if r[xkey] is not None]
    x = [r[xkey] for r in pts]

    def series(kind, key, pts=pts):
      return [100 * r[kind][key] if r[kind] and r[kind].get(key) is not None else np.nan
              for r in pts]

    ax = axes[0, col]
    em = series("realm", "exact_match")
    ax.plot(x, em, "o-", color="C0", label="REALM (its retriever + reader)")
    if with_bm25:
      em_bm25 = series("bm25", "exact_match")
      ax.plot(x, em_bm25, "s-", color="C1", label="BM25 + the same reader")
      em = em + em_bm25
    top_em = max(top_em, float(np.nanmax(em + [0.0])) * 1.15)
    ax.set_ylim(0, top_em)
    ax.set_ylabel("exact match (%)")
    ax.grid(alpha=0.3)
    ax = axes[1, col]
    for k in KS:
      ax.plot(x, series("realm", f"gold_recall@{k}"), styles[k], marker="o", ms=3, color="C0",
              label=f"REALM gold recall@{k}")
      if with_bm25:
        ax.plot(x, series("bm25", f"gold_recall@{k}"), styles[k], marker="s", ms=3, color="C1",
                label=f"BM25 gold recall@{k}")
    ax.set_ylabel("gold recall@k (%)")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  for row in range(2):
    axes[row, 1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=600, help="training steps (TRAIN_STEPS)")
  parser.add_argument("--eval_every", type=int, default=60,
                      help="evaluate (and keep a checkpoint) every this many steps")
  parser.add_argument("--workdir", default="workdirs/learning_curve")
  parser.add_argument("--gin_file", action="append", default=None,
                      help="gin file (repeatable; default experiments/cpu/squad_minilm.gin, "
                           "which a given one replaces)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="extra gin binding (repeatable), applied after this script's own")
  parser.add_argument("--skip_bm25", action="store_true", help="no BM25 + reader baseline")
  parser.add_argument("--bm25_block_prior", choices=("uniform", "dense"), default="uniform",
                      help="the retriever logit added to the reader's span score for BM25's read "
                           "blocks: uniform (the baseline) or the dense retriever's (a hybrid)")
  parser.add_argument("--resume-friendly", "--resume_friendly", dest="resume_friendly",
                      action="store_true",
                      help="reuse the run in --workdir: resume its training from the newest "
                           "checkpoint (or skip training when finished) and its cached evaluations")
  parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learning_curve"),
                      help="output path without suffix: writes OUT.md, OUT.json, OUT.png")
  parser.add_argument("--log_level", default="WARNING")
  args = parser.parse_args(argv)
  args.gin_file = args.gin_file or ["experiments/cpu/squad_minilm.gin"]
  if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
    parser.error("--steps must be a positive multiple of --eval_every")
  logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "bm25s"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  workdir = pathlib.Path(args.workdir).resolve()  # Relative paths: to the current directory.
  args.out = str(pathlib.Path(args.out).resolve())
  args.gin_file = [str(pathlib.Path(g).resolve()) if "://" not in g and pathlib.Path(g).is_file()
                   and not (REPO / g).is_file() else g for g in args.gin_file]
  # gin's includes (`include 'experiments/models/minilm.gin'`) fail to resolve from another
  # directory (a TypeError inside gin.resource_reader), so parse from the repository root.
  os.chdir(REPO)
  if args.fresh and workdir.exists():
    shutil.rmtree(workdir)
  if _checkpoint_steps(workdir) and not args.resume_friendly:
    parser.error(f"{workdir} already has checkpoints {_checkpoint_steps(workdir)}: pass "
                 "--resume-friendly to reuse them (resume / reuse the run), or --fresh to delete "
                 "it")
  t_start = time.perf_counter()

  segments = train(args, workdir)
  t_trained = time.perf_counter()
  steps = [0] + list(range(args.eval_every, args.steps + 1, args.eval_every))
  realm_evals: dict[int, dict] = {}
  for s in segments:
    for e in s.get("evals") or []:
      realm_evals[int(e["step"])] = e
  dense_needed = {0} | {s for s in steps if s not in realm_evals}
  evals, info = evaluate(args, workdir, steps, dense_needed)
  times = train_times(segments, steps)
  t_end = time.perf_counter()

  rows = []
  for s in steps:
    realm_m = realm_evals.get(s) or evals["dense"].get(s)
    t, est = times[s]
    rows.append({"step": s, "train_time_s": t, "time_estimated": est,
                 "train_time_min": None if t is None else t / 60,
                 "realm": realm_m, "realm_source": "trainer" if s in realm_evals else "checkpoint",
                 "bm25": evals["bm25"].get(s)})
  zero = next((sg["zero_shot"] for sg in segments if sg.get("zero_shot")), None)
  if zero and rows[0]["realm"]:  # The trainer's zero-shot retrieval = row 0's (same params).
    for k in KS:
      if abs(zero.get(f"gold_recall@{k}", 0) - rows[0]["realm"].get(f"gold_recall@{k}", 0)) > 1e-6:
        print(f"[learning_curve] warning: zero-shot gold recall@{k} differs between the trainer "
              f"({zero[f'gold_recall@{k}']}) and this evaluation", file=sys.stderr)
  first = segments[0] if segments else {}
  n_q = info.get("num_questions") or first.get("num_eval_questions")
  n_blocks = info.get("num_blocks") or first.get("num_blocks")
  with_bm25 = not args.skip_bm25
  md_table = table(rows, with_bm25)
  cores = len(os.sched_getaffinity(0))
  caption = (f"SQuAD-open dev, {n_q} questions, {n_blocks} blocks; the default job "
             f"(`{' '.join(args.gin_file)}`) trained {args.steps} steps, evaluated every "
             f"{args.eval_every}; {cores} CPU cores. EM and gold-paragraph recall@k in %; row 0: "
             "zero-shot retrieval and the untrained reader. BM25 + reader: bm25s (k1=0.9, b=0.4) "
             f"retrieves, the reader checkpoint of that step reads its top "
             f"{info.get('num_read', 'num_read')} blocks"
             + (" (each with the same retriever logit)." if args.bm25_block_prior == "uniform"
                else " (with the dense retriever's logit: hybrid)."))
  if any(r["time_estimated"] for r in rows[1:]):
    caption += " ~: training time estimated (a resumed run)."
  out = pathlib.Path(args.out)
  png = out.with_suffix(".png")
  try:
    png_ref = png.resolve().relative_to(REPO).as_posix()
  except ValueError:
    png_ref = png.name
  plot(rows, png, f"Learning curve: default job, {n_q} SQuAD-open dev questions", with_bm25)
  train_wall = sum(sg.get("wall_s") or 0.0 for sg in segments)
  index_s = sum((sg.get("timings") or {}).get("index_s", 0.0) for sg in segments)
  title = "### Learning curve: REALM vs BM25 + the same reader"
  command = shlex.join(["python", "benchmarks/learning_curve.py",
                        *(argv if argv is not None else sys.argv[1:])])
  md = (f"{title}\n\n{caption}\n\n{md_table}\n\n![learning curve]({png_ref})\n\n"
        f"`{command.strip()}`: training run {train_wall:.0f} s (of which document index "
        f"{index_s:.0f} s), checkpoint evaluations {info['eval_s_total']:.0f} s "
        f"({datetime.date.today().isoformat()}, {platform.machine()}).\n")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text(md)
  _write_json(out.with_suffix(".json"), {
      "args": vars(args), "gin_params": _gin_params(args), "rows": rows, "segments": segments,
      "zero_shot_trainer": zero, "eval_info": info, "cores": cores,
      "platform": platform.platform(),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "wall_s": {"train": t_trained - t_start, "checkpoint_evals": info["eval_s"],
                 "total": t_end - t_start, "train_all_segments": train_wall,
                 "checkpoint_evals_all": info["eval_s_total"]}})
  print()
  print(caption)
  print()
  print(md_table)
  print()
  print(f"[learning_curve] wrote {out.with_suffix('.md')}, .json, .png in {t_end - t_start:.0f} s "
        f"(training {t_trained - t_start:.0f} s, checkpoint evaluations {info['eval_s']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
