"""Where the document-embedding encoder's time goes on XLA:CPU, per component, from a profile.

Issue #12 asks for the cause of a missed target "a profile, not a guess". This script jits the
document tower exactly as the index builder does (`embedding.make_document_embed_fn`, MiniLM-L6
shapes: 6 layers, hidden 384, 12 heads, FFN 1536, mean pooling), runs it under `jax.profiler.trace`
on a `[--batch, --length]` batch (all positions real: the cost does not depend on the token values),
and attributes the time of every top-level XLA:CPU operation (thunk) to the model component named in
its HLO metadata (`op_name`, e.g. `.../layer_3/intermediate/dot_general`):

  attention projections   the query/key/value/output dense layers   (8·B·L·H² FLOPs a layer)
  attention core          scores, softmax, context (the chunked `fused_attention` loop; 4·B·L²·H)
  FFN                     intermediate dense + GELU, output dense     (4·B·L·H·I)
  LayerNorm + residual    the two post-LN LayerNorms and their residual adds
  embeddings, pooling     lookups, embedding LayerNorm, mean pooling, projection
  dtype conversions       casts XLA leaves unfused, named after a dense layer: its float32 kernel
                          and bias to bfloat16, or a float32 result to bfloat16 (bfloat16 only;
                          the kernel casts vanish with `--dense_weights cast_once`, the default,
                          which casts them once as the index builder does)
  other                   parameter conversions, copies, transposes not inside a component

For each component it prints the time per batch, its share, and for the matmul components the
achieved GFLOP/s next to the matmul peak of the same dtype measured in the same run (a 2048³ matmul;
bfloat16 means bf16 operands with float32 accumulation, `bert.dense_dot_general`).

Run on one idle core, as the refresh-latency target (issue #12, target 3) states it:

    XLA_FLAGS=--xla_force_host_platform_device_count=1 taskset -c 0 \\
        .venv/bin/python benchmarks/encoder_profile.py [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import sharding
from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.retrieval import embedding

COMPONENTS = ("attention projections", "attention core", "FFN", "LayerNorm + residual",
              "embeddings, pooling", "dtype conversions", "other")
_PATTERNS = (  # (regular expression on op_name, component): the first match wins.
    (r"/(query|key|value|out|intermediate|output)/convert_element_type$", "dtype conversions"),
    (r"/attention/(query|key|value|out)/", "attention projections"),
    (r"/attention/", "attention core"),
    # The GELU's float32 cast (`layer_i/convert_element_type`) heads the fusion that evaluates it.
    (r"/layer_\d+/(intermediate|output)/|/layer_\d+/(erf|tanh|gelu|mul|integer_pow)"
     r"|/layer_\d+/convert_element_type$", "FFN"),
    (r"/layer_\d+/(attention_layer_norm|output_layer_norm|add)", "LayerNorm + residual"),
    (r"/embeddings/|/projection|/reduce_sum|/div|/jit\(norm\)", "embeddings, pooling"),
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_DOT = re.compile(r"= \S+ dot\(.*?op_name=\"([^\"]*)\"")


def component(op_name: str) -> str:
  """The model component (one of `COMPONENTS`) an HLO op's `op_name` metadata belongs to."""
  for pattern, name in _PATTERNS:
    if re.search(pattern, op_name):
      return name
  return "other"


def entry_op_names(hlo_text: str) -> dict[str, str]:
  """`{instruction name: op_name}` for the ENTRY computation's instructions (the top-level thunks).

  A fusion that contains a matmul (XLA:CPU fuses bias adds, residuals and LayerNorm statistics
  around dots) is named after its first dot, since the matmul dominates its cost.
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      current = "ENTRY" if line.startswith("ENTRY ") else line.split()[0].lstrip("%")
      computations[current] = []
    elif current is not None and line.startswith(" "):
      computations[current].append(line)
  names = {}
  for line in computations.get("ENTRY", []):
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op_name = m.group(2)
    called = _CALLS.search(line)
    if called and "while" not in op_name:
      for inner in computations.get(called.group(1), []):
        dot = _DOT.search(inner)
        if dot:
          op_name = dot.group(1)
          break
    names[m.group(1)] = op_name
  return names


def matmul_peak(dtype: str, n: int = 2048) -> float:
  """FLOP/s of an `[n, n] x [n, n]` matmul in `dtype` (float32 accumulation), best of 5."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(5))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def component_flops(batch: int, length: int, hidden: int, intermediate: int,
                    layers: int) -> dict[str, float]:
  """Matmul FLOPs of the matmul components of one forward pass over `[batch, length]`."""
  tokens = batch * length
  return {"attention projections": 8 * tokens * hidden * hidden * layers,
          "attention core": 4 * tokens * length * hidden * layers,
          "FFN": 4 * tokens * hidden * intermediate * layers}


def profile(dtype: str, batch: int, length: int, runs: int, cast_params: bool = True
            ) -> tuple[dict[str, float], float]:
  """Per-component seconds per batch (from the profile) and the wall seconds per batch."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model = realm.ModelConfig(init_checkpoint="minilm", pooling="mean", dtype=dtype)
  params = realm.init_params(model, jax.random.key(0), parts=("retriever",))["retriever"]
  if cast_params:  # As `embedding.embed_snapshot` does once per snapshot.
    params = bert.cast_dense_params(params, model.retriever_config().bert.compute_dtype)
  embed = embedding.make_document_embed_fn(model.retriever_config(), mesh)
  rng = np.random.default_rng(0)
  inputs = {"input_ids": rng.integers(1000, 20000, (batch, length)).astype(np.int32),
            "input_mask": np.ones((batch, length), np.int32),
            "segment_ids": np.zeros((batch, length), np.int32)}
  names = entry_op_names(embed.lower(params, inputs).compile().as_text())
  embed(params, inputs).block_until_ready()
  wall = min(_timed(lambda: embed(params, inputs).block_until_ready()) for _ in range(3))
  seconds: dict[str, float] = collections.Counter()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(runs):
        embed(params, inputs).block_until_ready()
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          seconds[component(names[event.name])] += event.duration_ns * 1e-9 / runs
  return seconds, wall


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batch", type=int, default=8,
                      help="blocks per batch (the CPU gins' index batch size)")
  parser.add_argument("--length", type=int, default=160,
                      help="padded block length (tokens); the 20,780 SQuAD blocks in batches of 8 "
                           "pad to 159 on average (16-token buckets)")
  parser.add_argument("--runs", type=int, default=3, help="profiled forward passes")
  parser.add_argument("--dense_weights", default="cast_once", choices=("cast_once", "per_call", "both"),
                      help="cast_once: the layers' Dense weights cast to the compute dtype once "
                           "(`bert.cast_dense_params`, as the index builder does); per_call: float32 "
                           "weights cast inside every call (before 2026-12-02)")
  args = parser.parse_args()
  cfg = realm.ModelConfig(init_checkpoint="minilm").retriever_config().bert
  flops = component_flops(args.batch, args.length, cfg.hidden_size, cfg.intermediate_size,
                          cfg.num_layers)
  cores = len(os.sched_getaffinity(0))
  print(f"# Document tower (MiniLM-L{cfg.num_layers}, hidden {cfg.hidden_size}), batch "
        f"[{args.batch}, {args.length}], {cores} usable core(s), load {os.getloadavg()[0]:.1f}, "
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s))\n")
  modes = ("cast_once", "per_call") if args.dense_weights == "both" else (args.dense_weights,)
  for dtype, mode in ((d, m) for d in args.dtypes.split(",") for m in modes):
    if dtype == "float32" and mode == "per_call" and len(modes) > 1:
      continue  # Nothing to cast in float32: the two modes are the same program.
    peak = matmul_peak(dtype)
    seconds, wall = profile(dtype, args.batch, args.length, args.runs,
                            cast_params=mode == "cast_once")
    total = sum(seconds.values())
    weights = "" if dtype == "float32" else f", Dense weights {mode.replace('_', ' ')}"
    print(f"## {dtype}{weights}: {wall * 1e3:.0f} ms a batch = {args.batch / wall:.1f} blocks/s; "
          f"profiled ops {total * 1e3:.0f} ms; matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    print("| component | ms a batch | share | matmul GFLOP/s | of peak |")
    print("|---|---:|---:|---:|---:|")
    for name in COMPONENTS:
      s = seconds.get(name, 0.0)
      rate = (f"{flops[name] / s / 1e9:.0f} | {100 * flops[name] / s / peak:.0f} %"
              if name in flops and s > 0 else "– | –")
      print(f"| {name} | {s * 1e3:.1f} | {100 * s / max(total, 1e-12):.0f} % | {rate} |")
    all_flops = sum(flops.values())
    print(f"| **all** | {total * 1e3:.1f} | 100 % | {all_flops / wall / 1e9:.0f} (wall) | "
          f"{100 * all_flops / wall / peak:.0f} % |\n")


if __name__ == "__main__":
  main()
