"""float32 vs bfloat16 compute on this host: the fine-tuning train step and corpus embedding.

What it measures (issue #12, "bf16 only where it pays on the target"). The same process times, for
each compute dtype (`realm.ModelConfig.dtype`; parameters stay float32 either way):

  * the Open-QA fine-tuning train step of the default job (`finetune.train_step` jitted by
    `loop.jit_train_step`: query tower, retriever loss over `--num_retrieved` blocks, the reader
    over `num_read` × `reader_length` tokens, AdamW) on a synthetic batch of the demo's shapes
    (random token ids, every position real: the step's cost does not depend on the values);
  * document embedding (`embedding.run_batched`, length-bucketed batches) of `--num_blocks` real
    blocks of the embedded SQuAD corpus, the index builder's work.

bfloat16 here means bf16 operands with float32 accumulation (`bert.dense_dot_general`), the form
that reaches AMX/AVX512-BF16 matmul kernels on XLA:CPU; `ModelConfig.dtype = 'auto'` picks it where
the host has them (`bert.resolve_dtype`). The table also gives the cosine agreement of the two
dtypes' document embeddings and how many of each block's 5 nearest neighbours (by inner product
among the sampled blocks) stay the same.

Run from the repository root (about 3 minutes on 2 idle cores):

    .venv/bin/python benchmarks/mixed_precision.py [--steps 3] [--num_blocks 256]
    taskset -c 0 .venv/bin/python benchmarks/mixed_precision.py   # one core
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import sharding
from realm_jax import tokenization
from realm_jax.data import corpus_config
from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.retrieval import embedding
from realm_jax.training import finetune
from realm_jax.training import loop
from realm_jax.training import optim
from realm_jax.training import train_state


def synthetic_batch(task: finetune.OpenQAConfig, model: realm.ModelConfig, batch_size: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch of `finetune.abstract_batch`'s shapes: random ids, full masks, 1 % positive spans."""
  batch = {}
  for name, spec in finetune.abstract_batch(task, model, batch_size).items():
    if spec.dtype == jnp.int32:
      if "mask" in name:
        batch[name] = np.ones(spec.shape, np.int32)
      elif "segment" in name:
        batch[name] = np.zeros(spec.shape, np.int32)
      else:
        batch[name] = rng.integers(1000, 20000, spec.shape).astype(np.int32)
    elif spec.dtype == jnp.bool_:
      batch[name] = (np.ones(spec.shape, bool) if name == "retrieved_valid"
                     else rng.random(spec.shape) < 0.01)
    else:  # unit-norm document embeddings, as MiniLM's mean pooling gives
      x = rng.standard_normal(spec.shape).astype(np.float32)
      batch[name] = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up)")
  parser.add_argument("--num_blocks", type=int, default=256, help="real blocks to embed")
  parser.add_argument("--batch_size", type=int, default=4, help="questions per train step")
  parser.add_argument("--num_retrieved", type=int, default=100)
  parser.add_argument("--index_batch_size", type=int, default=8)
  args = parser.parse_args()
  task = finetune.OpenQAConfig(num_retrieved=args.num_retrieved, num_read=3, query_length=48,
                               reader_length=320, reader_query_length=32)
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    _, corpus = corpus_config.load_corpus(corpus_config.CorpusConfig(max_block_length=288),
                                          str(tokenization.minilm_model_dir()), tmp,
                                          show_progress=False)
    rows = np.linspace(0, len(corpus) - 1, args.num_blocks).astype(np.int64)
    inputs = corpus.retrieval_inputs(rows)
  results, embeddings = {}, {}
  for dtype in args.dtypes.split(","):
    model = realm.ModelConfig(init_checkpoint="minilm", pooling="mean", score_scale=20.0,
                              span_hidden_size=256, max_span_width=10, dtype=dtype)
    tx = finetune.make_optimizer(optim.OptimizerConfig(learning_rate=1e-4, num_train_steps=100))
    params = realm.init_params(model, jax.random.key(0), parts=finetune.PARTS)
    state = train_state.create_train_state(params, tx, mesh)
    step = loop.jit_train_step(finetune.step_parts(model, task, args.batch_size, tx).train_step,
                               mesh)
    batch = sharding.global_batch_from_local(
        synthetic_batch(task, model, args.batch_size, rng), mesh)
    state, metrics = step(state, batch, jax.random.key(1))  # compile + warm up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    embed = embedding.make_document_embed_fn(model.retriever_config(), mesh)
    # The layers' Dense weights in the compute dtype once, as `embedding.embed_snapshot` does.
    doc_params = bert.cast_dense_params(params["retriever"], model.retriever_config().bert.compute_dtype)
    embedding.run_batched(embed, doc_params, inputs, args.index_batch_size, mesh,
                          progress=False)  # compile every bucket
    start = time.perf_counter()
    embeddings[dtype] = embedding.run_batched(embed, doc_params, inputs,
                                              args.index_batch_size, mesh, progress=False)
    results[dtype] = (step_s, len(rows) / (time.perf_counter() - start))
    print(f"  {dtype}: step {step_s:.2f} s, embedding {results[dtype][1]:.1f} blocks/s", flush=True)
  cores = len(os.sched_getaffinity(0))
  print(f"\nMiniLM-L6, {cores} usable core(s), load average {os.getloadavg()[0]:.1f}, "
        f"jax {jax.__version__} ({jax.default_backend()}), {mesh.size} device(s)\n")
  print("| dtype | fine-tuning step (s) | document embedding (blocks/s) |")
  print("|---|---:|---:|")
  base = next(iter(results.values()))
  for dtype, (step_s, bps) in results.items():
    print(f"| {dtype} | {step_s:.2f} ({base[0] / step_s:.2f}×) | {bps:.1f} ({bps / base[1]:.2f}×) |")
  if {"float32", "bfloat16"} <= set(embeddings):
    a, b = embeddings["float32"], embeddings["bfloat16"]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    near_a = np.argsort(-(a @ a.T), axis=1)[:, 1:6]
    near_b = np.argsort(-(b @ b.T), axis=1)[:, 1:6]
    same = np.mean([len(set(x) & set(y)) / 5 for x, y in zip(near_a, near_b)])
    print(f"\nbfloat16 vs float32 document embeddings: cosine min {cosine.min():.6f}, mean "
          f"{cosine.mean():.6f}; 5 nearest neighbours unchanged: {100 * same:.1f} %")


if __name__ == "__main__":
  main()
