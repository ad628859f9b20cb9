"""Corpus-embedding throughput: Flax `BertEncoder` vs PyTorch `BertModel` on the same weights.

REALM (Guu et al., 2020, §3.4) re-embeds the whole knowledge corpus (blocks of up to 288
wordpieces) at every asynchronous index refresh, so document-embedding throughput bounds how fresh
the MIPS index can be. This benchmark embeds synthetic 288-token blocks (lengths 200..288, the rest
padding; segment ids 0 for a short "title", 1 for the "body") with the all-MiniLM-L6-v2 weights in
float32 and reports blocks/s, ms/batch and peak RSS for each batch size, for both frameworks, plus
the [CLS] agreement between them. Blocks and batches are the same for both.

Run from the repository root with the project venv (1-2 minutes on 2 idle CPU cores, up to ~4 when
the cores are shared):

    .venv/bin/python benchmarks/embed_throughput.py

If this interpreter cannot import torch, the PyTorch half runs in `--torch-python`
(default `.torchvenv/bin/python`, see `benchmarks/_torch_embed.py`) as a subprocess, and the output
says so. `--skip-torch` times the Flax encoder alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.models.bert import BertEncoder
from realm_jax.models.checkpoint_import import load_bert_checkpoint, minilm_checkpoint_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
CLS_ID, SEP_ID = 101, 102


def make_blocks(num_blocks: int, seq_len: int, vocab_size: int,
                seed: int = 0) -> dict[str, np.ndarray]:
  """Synthetic corpus blocks `[CLS] title [SEP] body [SEP] pad...` (REALM §3.4 document input).

  Returns:
    `input_ids`, `segment_ids`, `input_mask`: `[num_blocks, seq_len]` int32.
  """
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min(200, seq_len), seq_len + 1, size=num_blocks)
  lengths[0] = seq_len
  title_len = rng.integers(2, 12, size=num_blocks)
  pos = np.arange(seq_len)[None, :]
  mask = pos < lengths[:, None]
  ids = rng.integers(1000, vocab_size, size=(num_blocks, seq_len))
  ids[:, 0] = CLS_ID
  ids[pos == title_len[:, None] + 1] = SEP_ID
  ids[pos == lengths[:, None] - 1] = SEP_ID
  segs = (pos > title_len[:, None] + 1) & mask
  return {"input_ids": np.where(mask, ids, 0).astype(np.int32),
          "segment_ids": segs.astype(np.int32), "input_mask": mask.astype(np.int32)}


def peak_rss_mb() -> float:
  """Peak resident set size (VmHWM) of this process in MiB (`getrusage` would be inherited by the
  torch subprocess across fork/exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def time_flax(model_dir: pathlib.Path, blocks: dict[str, np.ndarray], batch_sizes: list[int],
              num_batches: int) -> tuple[dict, dict[str, np.ndarray]]:
  """Times the jitted Flax encoder's [CLS] output, compiled ahead of time for each batch size.

  Batch `i` of size `b` is blocks `[i * b, (i + 1) * b)`, as in `_torch_embed.run`.

  Returns:
    (report, cls) in the format of `_torch_embed.run`, plus `report["compile_s"]`.
  """
  ckpt = load_bert_checkpoint(model_dir)
  model = BertEncoder(ckpt.config)
  params = jax.device_put(ckpt.params)

  def embed_cls(p, ids, segs, mask):
    return model.apply({"params": p}, input_ids=ids, input_mask=mask, segment_ids=segs,
                       deterministic=True)[:, 0]

  report = {"results": {}, "compile_s": {}}
  cls = {}
  for b in batch_sizes:
    start = time.perf_counter()
    spec = jax.ShapeDtypeStruct((b, blocks["input_ids"].shape[1]), jnp.int32)
    compiled = jax.jit(embed_cls).lower(params, spec, spec, spec).compile()
    report["compile_s"][str(b)] = time.perf_counter() - start
    times = []
    for i in range(num_batches):
      sl = slice(i * b, (i + 1) * b)
      start = time.perf_counter()
      first = np.asarray(compiled(params, blocks["input_ids"][sl], blocks["segment_ids"][sl],
                                  blocks["input_mask"][sl]))
      times.append(time.perf_counter() - start)
      if i == 0:
        cls[f"cls_{b}"] = first
    report["results"][str(b)] = {"seconds_per_batch": times, "median_s": statistics.median(times),
                                 "peak_rss_mb": peak_rss_mb()}
  return report, cls


def time_torch(args, model_dir: pathlib.Path, blocks: dict[str, np.ndarray],
               batch_sizes: list[int]) -> tuple[dict, dict[str, np.ndarray], str]:
  """Runs `_torch_embed.py` in this interpreter if it has torch, else in `args.torch_python`."""
  if importlib.util.find_spec("torch") is not None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _torch_embed  # pylint: disable=g-import-not-at-top
    report, cls = _torch_embed.run(str(model_dir), blocks, batch_sizes, args.num_batches,
                                   args.torch_threads)
    return report, cls, f"in-process ({sys.executable})"
  python = pathlib.Path(args.torch_python)
  if not python.exists():
    raise FileNotFoundError(
        f"embed_throughput.py: --torch-python={str(python)!r} does not exist and this interpreter "
        "has no torch; create it with `python3 -m venv .torchvenv && .torchvenv/bin/pip install "
        "torch==2.13.0 transformers safetensors numpy`, or pass --skip-torch")
  with tempfile.TemporaryDirectory() as tmp:
    inputs, output = pathlib.Path(tmp) / "in.npz", pathlib.Path(tmp) / "out.npz"
    np.savez(inputs, **blocks)
    cmd = [str(python), str(pathlib.Path(__file__).resolve().parent / "_torch_embed.py"),
           "--model-dir", str(model_dir), "--inputs", str(inputs), "--output", str(output),
           "--batch-sizes", ",".join(map(str, batch_sizes)),
           "--num-batches", str(args.num_batches), "--num-threads", str(args.torch_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"embed_throughput.py: the PyTorch subprocess failed "
                         f"({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(output) as f:
      cls = {k: f[k] for k in f.files}
  return report, cls, f"subprocess ({python})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", default="16,64", help="comma-separated batch sizes")
  parser.add_argument("--seq-len", type=int, default=288, help="block length in wordpieces")
  parser.add_argument("--num-batches", type=int, default=2,
                      help="timed batches per batch size (JAX compiles ahead of time; torch warms "
                      "up on 2 blocks first)")
  parser.add_argument("--model-dir", default=None,
                      help="HF BERT checkpoint directory (default: the installed MiniLM)")
  parser.add_argument("--torch-python", default=str(REPO / ".torchvenv" / "bin" / "python"))
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads for the PyTorch half; 0 keeps torch's default")
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  if any(b <= 0 for b in batch_sizes) or args.num_batches <= 0 or args.seq_len <= 0:
    parser.error("--batch-sizes, --num-batches and --seq-len must be positive")
  if args.torch_threads < 0:
    parser.error("--torch-threads must be >= 0")
  model_dir = pathlib.Path(args.model_dir) if args.model_dir else minilm_checkpoint_dir()

  t0 = time.perf_counter()
  vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
  load_before = os.getloadavg()
  blocks = make_blocks(max(batch_sizes) * args.num_batches, args.seq_len, vocab)
  flax_report, flax_cls = time_flax(model_dir, blocks, batch_sizes, args.num_batches)
  torch_report, torch_cls, where = None, None, "skipped (--skip-torch)"
  if not args.skip_torch:
    torch_report, torch_cls, where = time_torch(args, model_dir, blocks, batch_sizes)

  dev = jax.devices()[0]
  print(f"model: {model_dir} (float32), blocks of {args.seq_len} tokens "
        f"(mean real length {blocks['input_mask'].sum(1).mean():.0f}), "
        f"{args.num_batches} timed batches per batch size")
  print(f"host: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"usable cores={len(os.sched_getaffinity(0))}, load average (1 min) "
        f"{load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
  print(f"flax: jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (XLA:CPU uses one intra-op thread per "
        f"usable core by default); compile s: "
        + ", ".join(f"b{b}={s:.1f}" for b, s in flax_report["compile_s"].items()))
  if torch_report:
    print(f"torch: {where}; torch {torch_report['torch']}, transformers "
          f"{torch_report['transformers']}, attn_implementation="
          f"{torch_report['attn_implementation']}, torch.get_num_threads()="
          f"{torch_report['num_threads']}, interop threads={torch_report['num_interop_threads']}")
  else:
    print(f"torch: {where}")
  print()
  header = (f"| {'framework':<24} | {'batch':>5} | {'ms/batch (median)':>17} | "
            f"{'ms/batch (min..max)':>19} | {'blocks/s':>8} | {'peak RSS MiB':>12} |")
  print(header)
  print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  rows = [("flax BertEncoder (jit)", flax_report)]
  if torch_report:
    rows.append(("torch BertModel", torch_report))
  for b in batch_sizes:
    for name, rep in rows:
      r = rep["results"][str(b)]
      spread = f"{1000 * min(r['seconds_per_batch']):.0f}..{1000 * max(r['seconds_per_batch']):.0f}"
      print(f"| {name:<24} | {b:>5} | {1000 * r['median_s']:>17.1f} | {spread:>19} | "
            f"{b / r['median_s']:>8.2f} | {r['peak_rss_mb']:>12.0f} |")
  print()
  print("peak RSS = the process's high-water mark (VmHWM) after that batch size, weights and "
        "inputs included; flax and torch run in separate processes only when torch is a "
        "subprocess.")
  if torch_cls:
    for b in batch_sizes:
      diff = np.max(np.abs(flax_cls[f"cls_{b}"] - torch_cls[f"cls_{b}"]))
      print(f"[CLS] agreement, batch {b}: max |flax - torch| = {diff:.2e}")
  print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
