"""Asynchronous index refresh (REALM §3.4): step-loop cost of a concurrent refresh, refresh latency.

A REALM trainer keeps stepping while a separate index builder re-embeds the whole corpus with a newer
document embedder; the new index must be swapped in between two steps without stalling. This script
runs that set-up on this machine and measures it:

  * the trainer: THIS process, the real REALM pre-training step (`pretrain.step_parts` jitted by `loop.jit_train_step`: query tower,
    ScaNN retrieval on the host, the k candidates re-embedded with the document tower, the
    knowledge-augmented masked-LM encoder, the marginal loss, AdamW), all-MiniLM-L6-v2, with synthetic
    random-token masks on sentences cut from the corpus; it checkpoints with orbax (async, as the
    trainer does) and calls `IndexWatcher.before_step` every step;
  * the index builder: the real `realm-jax index-builder` in a separate process, over the embedded
    SQuAD corpus (3,997 blocks of <= 288 wordpieces);
  * on a CPU host each process is pinned to its own share of the cores (trainer first half, builder
    second half; `--no_pin` to share them all), like two jobs on their own devices.

Measured: step time without a refresh (builder idle) and while the builder embeds; the latency of
`before_step` at the swap vs a step; and the refresh latency from the checkpoint written to the new
index live in the step loop, split into its parts (builder poll, restore, embedding, commit, the
trainer's load + validation + ScaNN build, wait for the next step boundary). Also the first index.

Run from the repository root (about 15 minutes on 2 shared CPU cores):

    .venv/bin/python benchmarks/index_refresh.py                    # 2 refreshes, 3,997 blocks
    .venv/bin/python benchmarks/index_refresh.py --quick            # tiny fixture corpus, ~2 min
    # The whole SQuAD v1.1 (20,780 blocks; about 1 h: 27 min first index, 28 min refresh):
    .venv/bin/python benchmarks/index_refresh.py --first_index_all_cores --refreshes 1 \
        --swap_timeout_s 7200 --corpus_source dev-v1.1.json --corpus_source train-v1.1.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from realm_jax.data import corpus_config
from realm_jax.retrieval import embedding
from realm_jax.retrieval import trainer_done

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pin(cpus):
  if cpus and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, set(cpus))


def _builder_gin(path: pathlib.Path, sources, data_dir: str, args) -> pathlib.Path:
  lines = [
      "from __gin__ import dynamic_registration",
      "from realm_jax import index_builder",
      "from realm_jax.data import corpus_config",
      "from realm_jax.models import realm",
      "include 'experiments/models/minilm.gin'",
      "index_builder.run.model = %MODEL",
      "index_builder.run.data = @corpus_config.CorpusConfig()",
      f"corpus_config.CorpusConfig.sources = {tuple(sources)!r}",
      f"corpus_config.CorpusConfig.data_dir = {data_dir!r}",
      f"index_builder.run.poll_interval_s = {args.poll_interval_s}",
      f"index_builder.run.batch_size = {args.index_batch_size}",
      "index_builder.run.blocks_per_shard = 4096",
      f"index_builder.run.max_refreshes = {args.refreshes + 1}",
      f"realm.ModelConfig.dtype = {args.dtype!r}",
      "index_builder.run.idle_timeout_s = 3600.0",
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


def _synthetic_examples(corpus, tokenizer, n: int, query_length: int, max_masks: int, seed: int):
  """`n` masked queries `[CLS] sentence-ish [SEP]` cut from random blocks (random-token masks)."""
  import numpy as np
  from realm_jax.data import featurize
  rng = np.random.default_rng(seed)
  positions = rng.integers(len(corpus), size=n)
  ids = [corpus.body_ids(int(p))[:query_length - 2] for p in positions]
  q = featurize.query_inputs(ids, query_length, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
  mlm_positions = np.zeros((n, max_masks), np.int32)
  mlm_targets = np.zeros((n, max_masks), np.int32)
  mlm_weights = np.zeros((n, max_masks), np.float32)
  for i in range(n):
    length = int(q["input_mask"][i].sum())
    slots = np.sort(rng.choice(np.arange(1, length - 1), size=min(max_masks, length - 2),
                               replace=False))
    mlm_positions[i, :len(slots)] = slots
    mlm_targets[i, :len(slots)] = q["input_ids"][i, slots]
    mlm_weights[i, :len(slots)] = 1.0
    q["input_ids"][i, slots] = tokenizer.mask_id
  return {"query_input_ids": q["input_ids"], "query_input_mask": q["input_mask"],
          "query_segment_ids": q["segment_ids"], "mlm_positions": mlm_positions,
          "mlm_targets": mlm_targets, "mlm_weights": mlm_weights,
          "source_block_id": corpus.block_ids[positions].astype(np.int64)}


def _summary(values):
  values = sorted(values)
  if not values:
    return {"n": 0}
  return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
          "p90": values[min(len(values) - 1, int(0.9 * len(values)))], "max": values[-1]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--corpus_source", action="append", default=[],
                      help="corpus file(s); default the embedded SQuAD (3,997 blocks)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS cache shared by both processes (default WORKDIR/tfds)")
  parser.add_argument("--refreshes", type=int, default=2)
  parser.add_argument("--baseline_steps", type=int, default=15)
  parser.add_argument("--steps_after_swap", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--num_candidates", type=int, default=4)
  parser.add_argument("--query_length", type=int, default=48)
  parser.add_argument("--candidate_length", type=int, default=128)
  parser.add_argument("--max_masks", type=int, default=5)
  parser.add_argument("--index_batch_size", type=int, default=8,
                      help="blocks per embedding batch (the CPU gins' value; 8 is fastest on a CPU core)")
  parser.add_argument("--poll_interval_s", type=float, default=1.0)
  parser.add_argument("--dtype", default="float32",
                      help="compute dtype of both processes (realm.ModelConfig.dtype: float32, "
                           "bfloat16 or auto)")
  parser.add_argument("--no_pin", action="store_true", help="both processes share every core")
  parser.add_argument("--first_index_all_cores", action="store_true",
                      help="build the first index (initial params) with a builder run on every core "
                           "before the trainer starts; the pinned builder then only refreshes (saves "
                           "half the wall time on a large corpus; the refresh figures are unchanged)")
  parser.add_argument("--swap_timeout_s", type=float, default=3600.0,
                      help="give up when a refresh is not live this long after its checkpoint")
  parser.add_argument("--json", default=None, help="also write the figures here")
  parser.add_argument("--quick", action="store_true",
                      help="the 3-paragraph test fixture corpus, 1 refresh, 5 baseline steps")
  args = parser.parse_args(argv)
  if args.quick:
    args.corpus_source = args.corpus_source or ["tests/fixtures/data/squad_dev_tiny.json"]
    args.refreshes, args.baseline_steps = 1, 5

  from realm_jax import launch_local
  trainer_cpus = builder_cpus = None
  all_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  if not args.no_pin and hasattr(os, "sched_getaffinity"):
    trainer_cpus, builder_cpus = launch_local.split_cpus(all_cpus)
  _pin(trainer_cpus)
  os.environ["XLA_FLAGS"] = launch_local.child_env(1)["XLA_FLAGS"]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import numpy as np
  from realm_jax import index_builder
  from realm_jax.models import realm
  from realm_jax.retrieval import searchers
  from realm_jax.retrieval import watcher as watcher_lib
  from realm_jax.training import checkpointing
  from realm_jax.training import loop
  from realm_jax.training import optim
  from realm_jax.training import pretrain
  from realm_jax import sharding
  from realm_jax.training import train_state

  load_start = os.getloadavg()
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="index_refresh_"))
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = args.data_dir or str(workdir / "tfds")
  sources = [str((ROOT / s).resolve()) if not os.path.isabs(s) else s for s in args.corpus_source]
  if not sources:
    from realm_jax.data import corpus as corpus_lib
    paths = corpus_lib.embedded_squad_paths()
    sources = [str(paths["dev"]), str(paths["train"])]
  model = realm.ModelConfig(init_checkpoint="minilm", pooling="mean", score_scale=20.0,
                            dtype=args.dtype)
  data = corpus_config.CorpusConfig(sources=tuple(sources), data_dir=data_dir)
  t0 = time.time()
  _, corpus = corpus_config.load_corpus(data, model.checkpoint_dir(), str(workdir),
                                       show_progress=False)
  print(f"# corpus: {len(corpus)} blocks ({time.time() - t0:.1f} s to prepare/load)", flush=True)

  # The index builder: a separate process on its own cores, starting with the first index.
  gin_file = _builder_gin(workdir / "builder.gin", sources, data_dir, args)
  log_path = workdir / "index-builder.log"
  env = launch_local.child_env(1)
  env["JAX_PLATFORMS"] = "cpu"
  if args.first_index_all_cores and not index_builder.read_refreshes(str(workdir)):
    t0 = time.time()
    print("# first index: a builder run on every core (max_refreshes=1) ...", flush=True)
    with open(workdir / "index-builder-first.log", "w") as log:
      subprocess.run(
          [sys.executable, "-m", "realm_jax.cli", "index-builder", "--gin_file", str(gin_file),
           "--workdir", str(workdir), "--gin_param", "index_builder.run.max_refreshes = 1"],
          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=True,
          preexec_fn=lambda: _pin(all_cpus))  # Not this process' trainer core: every core.
    print(f"# first index built in {time.time() - t0:.1f} s", flush=True)
  with open(log_path, "w") as log:
    builder = subprocess.Popen(
        [sys.executable, "-m", "realm_jax.cli", "index-builder", "--gin_file", str(gin_file),
         "--workdir", str(workdir)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        start_new_session=True)
  if builder_cpus:
    os.sched_setaffinity(builder.pid, set(builder_cpus))
  print(f"# trainer on CPUs {trainer_cpus}, index builder (pid {builder.pid}) on CPUs "
        f"{builder_cpus}; builder log {log_path}", flush=True)

  try:
    # The trainer: the real REALM step on one CPU device.
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    task = pretrain.PretrainConfig(num_candidates=args.num_candidates,
                                   query_length=args.query_length,
                                   candidate_length=args.candidate_length, max_masks=args.max_masks)
    from realm_jax import tokenization
    tokenizer = tokenization.load_tokenizer(
        "wordpiece", str(pathlib.Path(model.checkpoint_dir()) / "vocab.txt"))
    params = realm.init_params(model, jax.random.key(0), parts=("retriever", "encoder"))
    tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=3e-5, num_train_steps=10_000,
                                                warmup_steps=10))
    state = train_state.create_train_state(params, tx, mesh)
    del params
    train_fn = loop.jit_train_step(pretrain.step_parts(model, task, args.batch_size, tx).train_step,
                                   mesh)
    query_embed_fn = embedding.make_query_embed_fn(model.retriever_config(), mesh)
    featurizer = pretrain.PretrainFeaturizer(tokenizer, corpus, task)
    examples = _synthetic_examples(corpus, tokenizer, 512, task.query_length, task.max_masks, 0)
    ckpt = checkpointing.CheckpointManager(checkpointing.checkpoint_dir(str(workdir)),
                                           save_interval_steps=1)
    watcher = watcher_lib.IndexWatcher(
        workdir / "snapshots", corpus.fingerprint,
        lambda s: searchers.searcher_from_snapshot(s, kind="scann"),
        poll_interval_s=args.poll_interval_s, max_index_staleness_steps=None, log_every_s=30,
        wait_timeout_s=5.0)
    rng = jax.random.key(1)
    t_wait = time.time()
    print("# waiting for the builder's first index ...", flush=True)
    while True:  # Until the first index is live, or the builder has died (its log says why).
      try:
        watcher.before_step(0)
        break
      except watcher_lib.IndexStalenessError:
        if builder.poll() is not None:
          sys.exit(f"index_refresh: the index builder exited with code {builder.returncode} "
                   f"before its first index; see {log_path}")
    first_wait_s = time.time() - t_wait

    step = 0

    def one_step():
      """before_step + retrieval + featurisation + the jitted step; returns (before_s, step_s)."""
      nonlocal state, step
      t_a = time.perf_counter()
      index = watcher.before_step(step)
      t_b = time.perf_counter()
      rows = (np.arange(step * args.batch_size, (step + 1) * args.batch_size)
              % len(examples["source_block_id"]))
      batch = pretrain.retrieve_and_featurize(featurizer, {k: v[rows] for k, v in examples.items()},
                                              state.params["retriever"], index.searcher,
                                              query_embed_fn, mesh)
      state, metrics = train_fn(state, sharding.global_batch_from_local(batch, mesh), rng)
      jax.block_until_ready(metrics["train/loss"])
      step += 1
      return t_b - t_a, time.perf_counter() - t_a

    for _ in range(3):  # Compile and warm up.
      one_step()
    baseline = [one_step() for _ in range(args.baseline_steps)]
    print(f"# baseline: {statistics.median(s for _, s in baseline):.3f} s/step (median of "
          f"{len(baseline)})", flush=True)

    refreshes = []
    for r in range(args.refreshes):
      save_step = step
      t_save = time.time()
      ckpt.save(save_step, state.params, state.opt_state, {"data": {}}, force=True)
      during, swap = [], None
      swaps_before = watcher.swap_count
      deadline = time.monotonic() + args.swap_timeout_s
      while swap is None:
        before_s, step_s = one_step()
        if watcher.swap_count > swaps_before:
          swap = (before_s, step_s)
        else:
          during.append((before_s, step_s))
        if time.monotonic() > deadline:
          raise RuntimeError(f"no swap within {args.swap_timeout_s:.0f} s; see {log_path}")
      live = watcher.live
      after = [one_step() for _ in range(args.steps_after_swap)]
      ckpt.wait_until_finished()
      record = next(x for x in index_builder.read_refreshes(str(workdir))
                    if x["params_step"] == save_step)
      ckpt_written = record["checkpoint_mtime"]
      refreshes.append({
          "params_step": save_step, "steps_during": len(during) + 1,
          "step_s_during": _summary([s for _, s in during]),
          "step_s_after": _summary([s for _, s in after]),
          "before_step_s_at_swap": swap[0], "step_s_at_swap": swap[1],
          "before_step_s_other": _summary([b for b, _ in during + after]),
          "save_call_to_written_s": ckpt_written - t_save,
          "written_to_builder_start_s": (record["committed_at"] - record["total_s"]) - ckpt_written,
          "restore_s": record["restore_s"], "embed_s": record["embed_s"],
          "commit_s": record["commit_s"],
          "committed_to_loaded_s": live.loaded_at - record["committed_at"],
          "trainer_load_validate_s": live.load_s, "trainer_searcher_build_s": live.build_s,
          "loaded_to_live_s": live.swapped_in_at - live.loaded_at,
          "written_to_live_s": live.swapped_in_at - ckpt_written,
          "blocks_per_s": len(corpus) / record["embed_s"],
      })
      print(f"# refresh {r + 1}: step {save_step} live after {refreshes[-1]['written_to_live_s']:.1f} s "
            f"({len(during) + 1} steps later)", flush=True)
    trainer_done.mark_trainer_done(str(workdir), refreshes[-1]["params_step"])  # final checkpoint
    ckpt.close()
    watcher.close()
    builder.wait(timeout=120)
  finally:
    if builder.poll() is None:
      builder.terminate()
      builder.wait()

  first = index_builder.read_refreshes(str(workdir))[0]
  results = {
      "num_blocks": len(corpus), "cpu_count": os.cpu_count(), "load_average_start": load_start,
      "load_average_end": os.getloadavg(), "trainer_cpus": trainer_cpus,
      "builder_cpus": builder_cpus, "batch_size": args.batch_size, "task": dataclasses.asdict(task),
      "baseline_step_s": _summary([s for _, s in baseline]),
      "baseline_before_step_s": _summary([b for b, _ in baseline]),
      "first_index": {"all_cores": args.first_index_all_cores, "total_s": first["total_s"],
                      "embed_s": first["embed_s"],
                      "init_s": first["restore_s"], "trainer_waited_s": first_wait_s},
      "refreshes": refreshes,
  }
  _print_table(results)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
  return 0


def _print_table(res) -> None:
  b = res["baseline_step_s"]
  print(f"\n## Asynchronous index refresh: {res['num_blocks']:,} blocks, all-MiniLM-L6-v2, REALM step "
        f"(batch {res['batch_size']}), trainer CPUs {res['trainer_cpus']}, builder CPUs "
        f"{res['builder_cpus']} of {res['cpu_count']}; load average {res['load_average_start'][0]:.1f} "
        f"at the start, {res['load_average_end'][0]:.1f} at the end (other jobs share the host)\n")
  print("| step loop | steps | median s/step | mean s/step | p90 s/step | steps/s |")
  print("|---|---|---|---|---|---|")
  print(f"| no refresh (builder idle) | {b['n']} | {b['median']:.3f} | {b['mean']:.3f} | "
        f"{b['p90']:.3f} | {1 / b['mean']:.2f} |")
  for i, r in enumerate(res["refreshes"]):
    d = r["step_s_during"]
    if d["n"]:
      print(f"| during refresh {i + 1} | {d['n']} | {d['median']:.3f} | {d['mean']:.3f} | "
            f"{d['p90']:.3f} | {1 / d['mean']:.2f} |")
  print("\n| refresh | before_step at swap ms | that step s | before_step otherwise ms (median / max) "
        "| swap / step |")
  print("|---|---|---|---|---|")
  for i, r in enumerate(res["refreshes"]):
    o = r["before_step_s_other"]
    print(f"| {i + 1} (step {r['params_step']}) | {1e3 * r['before_step_s_at_swap']:.3f} | "
          f"{r['step_s_at_swap']:.3f} | {1e3 * o['median']:.3f} / {1e3 * o['max']:.3f} | "
          f"{r['before_step_s_at_swap'] / b['median']:.2e} |")
  print("\n| refresh | ckpt written → builder starts s | restore s | embed s (blocks/s) | commit s | "
        "committed → loaded s (validate / ScaNN) | loaded → live s | **written → live s** | steps |")
  print("|---|---|---|---|---|---|---|---|---|")
  for i, r in enumerate(res["refreshes"]):
    print(f"| {i + 1} | {r['written_to_builder_start_s']:.2f} | {r['restore_s']:.2f} | "
          f"{r['embed_s']:.1f} ({r['blocks_per_s']:.0f}) | {r['commit_s']:.2f} | "
          f"{r['committed_to_loaded_s']:.2f} ({r['trainer_load_validate_s']:.2f} / "
          f"{r['trainer_searcher_build_s']:.2f}) | {r['loaded_to_live_s']:.2f} | "
          f"**{r['written_to_live_s']:.1f}** | {r['steps_during']} |")
  f = res["first_index"]
  where = "a builder on every core, before the trainer started" if f["all_cores"] else "the builder"
  print(f"\nFirst index (no checkpoint yet, initial params): {f['total_s']:.1f} s in {where} "
        f"(init {f['init_s']:.1f} s, embed {f['embed_s']:.1f} s); the trainer waited "
        f"{f['trainer_waited_s']:.1f} s in before_step(0).")


if __name__ == "__main__":
  sys.exit(main())
