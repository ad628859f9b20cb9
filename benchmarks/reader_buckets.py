"""The fine-tuning train step with its reads cut to length buckets vs padded to `reader_length`.

What it measures (issue #12, target 2: "the train steps use length-bucketed shapes from a small
fixed set"). On the default job's data and configuration (`experiments/cpu/squad_minilm.gin`: the
embedded SQuAD corpus, batches of 4 questions, 3 reads of up to 320 tokens each, the pretrained
MiniLM), the script builds real fine-tuning batches exactly as `finetune.train_and_evaluate` does
(zero-shot retrieval over the first index, the gold block in the last read slot, span labels) and,
for each `--buckets` value of `OpenQAConfig.reader_length_bucket` (0 = every read padded to
`reader_length`, today's shape before this change):

  * over `--batches` batches (host only): the share of computed reader tokens that are padding and
    the distinct reader lengths, i.e. the train step's compile count;
  * over the first `--steps` of them, interleaved config by config (the order rotated every step)
    so that all see the same host speed: the seconds per train step (`finetune.train_step` jitted
    by `loop.jit_train_step`, one jit per configuration, compiled ahead of time per shape, each
    compile timed on its own), from the same initial state;
  * the expected seconds per step over all `--batches` batches: each batch's reader length priced
    at the median timed step of that length (pooled over configurations: one length, one program;
    lengths never timed are interpolated linearly).

The losses after the timed steps differ a little between rows: dropout masks are drawn for the
batch's shape, so a cut batch gets another (equally distributed) dropout sample.

The first index (the corpus embedded by the pretrained document tower) is cached in `--workdir`.

    .venv/bin/python benchmarks/reader_buckets.py [--batches 100] [--steps 8] [--buckets 0,64,32]

Prints a Markdown table (and writes it with `--out`).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np


def _batches(args):
  """The job's configuration and `--batches` featurised fine-tuning batches at full length."""
  # pylint: disable=g-import-not-at-top
  import gin
  import jax
  from realm_jax import cli
  from realm_jax import fileio
  from realm_jax import sharding
  from realm_jax.data import example_order
  from realm_jax.models import realm
  from realm_jax.retrieval import embedding
  from realm_jax.retrieval import searchers
  from realm_jax.retrieval import snapshot as snapshot_lib
  from realm_jax.training import finetune
  from realm_jax.training import index_source
  # pylint: enable=g-import-not-at-top

  cli.parse_gin([args.gin_file], [])
  b = gin.get_bindings(finetune.train_and_evaluate)
  model = b.get("model", realm.ModelConfig())
  data = b.get("data", finetune.OpenQADataConfig())
  task = b.get("task", finetune.OpenQAConfig())
  batch_size, seed = b.get("batch_size", 8), b.get("seed", 0)
  mesh = sharding.make_mesh(tuple(b.get("mesh_shape", (-1, 1))))
  tokenizer, corpus, train_qs, _ = finetune.load_openqa_data(data, model, args.workdir, seed)
  params = realm.init_params(model, jax.random.key(seed), parts=finetune.PARTS)
  path = index_source.ensure_first_snapshot(
      fileio.join(args.workdir, "snapshots"), corpus, model.retriever_config(),
      params["retriever"], params_step=0, batch_size=b.get("index_batch_size", 64))
  snapshot = snapshot_lib.read_snapshot(path)
  featurizer = finetune.OpenQAFeaturizer(tokenizer, corpus, snapshot.block_ids,
                                         snapshot.embeddings, task, model.max_span_width)
  evaluator = finetune.OpenQAEvaluator(
      featurizer, searchers.searcher_from_snapshot(snapshot, kind="scann"),
      embedding.make_query_embed_fn(model.retriever_config(), mesh), None, mesh)
  order = example_order.ExampleOrder(len(train_qs), batch_size, seed)
  batches = []
  for _ in range(args.batches):
    questions = [train_qs[i] for i in order.next_local_indices()]
    _, retrieved = evaluator.retrieve(params["retriever"], questions, task.num_retrieved)
    batches.append(featurizer.batch(questions, retrieved, with_labels=True)[0])
  return model, task, batch_size, mesh, params, batches


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--gin_file", default="experiments/cpu/squad_minilm.gin")
  p.add_argument("--workdir", default="/tmp/realm_bench_reader_buckets",
                 help="data and first-index cache (local or gs://)")
  p.add_argument("--batches", type=int, default=100, help="batches for the padding statistics")
  p.add_argument("--steps", type=int, default=8, help="timed train steps per configuration")
  p.add_argument("--buckets", default="0,64,32",
                 help="reader_length_bucket values, comma-separated (0: no cut)")
  p.add_argument("--out", default="", help="also write the Markdown table here (local or gs://)")
  args = p.parse_args()
  buckets = [int(x) for x in args.buckets.split(",")]

  # pylint: disable=g-import-not-at-top
  import jax
  from realm_jax import sharding
  from realm_jax.models import encoder
  from realm_jax.training import finetune
  from realm_jax.training import length_buckets
  from realm_jax.training import loop
  from realm_jax.training import optim
  from realm_jax.training import train_state
  # pylint: enable=g-import-not-at-top

  t0 = time.perf_counter()
  model, task, batch_size, mesh, params, batches = _batches(args)
  print(f"{len(batches)} batches of {batch_size} questions × {task.num_read} reads built in "
        f"{time.perf_counter() - t0:.0f} s (reader_length {task.reader_length})", flush=True)

  real = sum(int(b["reader_input_mask"].sum()) for b in batches)
  stats = {}
  for bucket in buckets:
    lengths = [length_buckets.group_length(b, "reader_", bucket) for b in batches]
    computed = sum(len(b["reader_input_mask"]) * task.num_read * n for b, n in zip(batches, lengths))
    stats[bucket] = {"padded": 1 - real / computed, "lengths": collections.Counter(lengths),
                     "computed": computed}

  # Timed steps, interleaved across configurations (same batches, same initial params).
  tx = optim.bert_adamw(optim.OptimizerConfig(learning_rate=1e-5, num_train_steps=1000,
                                              warmup_steps=0))
  train_step = finetune.step_parts(model, task, batch_size, tx).train_step
  # One jit per configuration, so that none reuses another's compiled shapes.
  step_fns = {bucket: loop.jit_train_step(train_step, mesh) for bucket in buckets}
  rng = jax.random.key(1)
  states = {bucket: train_state.create_train_state(params, tx, mesh) for bucket in buckets}
  compiled, compile_s = {}, collections.defaultdict(float)
  step_s = collections.defaultdict(list)
  losses = collections.defaultdict(list)
  lengths_seen = collections.defaultdict(list)
  for i, full in enumerate(batches[:args.steps]):
    for bucket in buckets[i % len(buckets):] + buckets[:i % len(buckets)]:  # Rotated each step.
      batch = sharding.global_batch_from_local(
          finetune.cut_to_bucket(full, bucket, model.max_span_width), mesh)
      length = batch["reader_input_ids"].shape[-1]
      lengths_seen[bucket].append(length)
      key = (bucket, length)
      if key not in compiled:
        t = time.perf_counter()
        compiled[key] = step_fns[bucket].lower(states[bucket], batch, rng).compile()
        compile_s[bucket] += time.perf_counter() - t
      t = time.perf_counter()
      states[bucket], metrics = compiled[key](states[bucket], batch, rng)
      losses[bucket].append(float(jax.device_get(metrics["train/loss"])))
      step_s[bucket].append(time.perf_counter() - t)
    print(f"step {i + 1}/{args.steps}: " + ", ".join(
        f"bucket {bk}: {step_s[bk][-1]:.2f} s at {lengths_seen[bk][-1]}" for bk in buckets),
        flush=True)

  by_length = collections.defaultdict(list)
  for bucket in buckets:
    for n, t in zip(lengths_seen[bucket], step_s[bucket]):
      by_length[n].append(t)
  timed = sorted(by_length)
  price = lambda n: float(np.interp(n, timed, [statistics.median(by_length[m]) for m in timed]))  # noqa: E731
  base = buckets[0]
  expected = {bucket: sum(price(n) * c for n, c in stats[bucket]["lengths"].items())
              / len(batches) for bucket in buckets}
  rows = ["| reader_length_bucket | padded share of reader tokens | reader lengths (batches) | "
          "shapes over all batches | compile s (shapes of the timed steps) | s/step, timed steps | "
          "s/step expected over all batches | "
          f"vs first row | loss after {args.steps} steps |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
  for bucket in buckets:
    s = stats[bucket]
    shapes = ", ".join(f"{n}: {c}" for n, c in sorted(s["lengths"].items()))
    mean = statistics.mean(step_s[bucket]) if step_s[bucket] else float("nan")
    loss = losses[bucket][-1] if losses[bucket] else float("nan")
    rows.append(f"| {bucket or 'off (' + str(task.reader_length) + ')'} | {100 * s['padded']:.1f} % "
                f"| {shapes} | {len(s['lengths'])} | {compile_s[bucket]:.1f} "
                f"({len(set(lengths_seen[bucket]))}) | {mean:.2f} | "
                f"{expected[bucket]:.2f} | {expected[bucket] / expected[base]:.2f}× | {loss:.4f} |")
  rows += ["", "Median timed step by reader length: " + ", ".join(
      f"{n}: {statistics.median(by_length[n]):.2f} s ({len(by_length[n])})" for n in timed) + "."]
  spans_full = encoder.num_span_candidates(task.reader_length, model.max_span_width)
  table = "\n".join([
      f"Fine-tuning train step, {len(batches)} real batches ({batch_size} questions × "
      f"{task.num_read} reads, reader_length {task.reader_length}, {spans_full} span candidates at "
      f"full length); {jax.device_count()} device(s), {args.steps} timed steps per row, "
      "interleaved.", "", *rows, ""])  # pylint: disable=line-too-long
  print(table)
  if args.out:  # Local or gs://, written atomically.
    from realm_jax import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_atomic(args.out, table)


if __name__ == "__main__":
  main()
