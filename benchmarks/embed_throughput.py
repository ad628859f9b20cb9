"""Corpus-embedding throughput: Flax `BertEncoder` vs PyTorch `BertModel`, same weights and batches.

REALM (Guu et al., 2020, §3.4) re-embeds the whole knowledge corpus (blocks of up to 288 wordpieces)
at every asynchronous index refresh, so document-embedding throughput bounds how fresh the MIPS
index can be. This benchmark takes real blocks of the embedded SQuAD corpus (`data/squad`, blocked
as the jobs block it), cuts them into batches exactly as `retrieval/embedding.py` does
(`plan_batches`), and gives both frameworks the same batches, interleaved batch by batch and
repeated `--rounds` times, so that the ratio measures the encoders and a busy host slows both.

Layouts (one table row per layout and batch size):
  fixed     every block padded to 288 tokens, corpus order (the batching before length buckets);
  bucketed  longest first, each batch padded to the next multiple of `--bucket` (the default).

It prints, per row, blocks/s of each side (median round), the ratio, the model FLOP/s of the Flax
side (matmul FLOPs of the shapes executed, padding included) against the matmul peak of XLA in the
same dtype (`--dtype`: float32, or bfloat16 operands with float32 accumulation) measured in the
same run (a 2048^3 matmul, best of 5, before and after), the share of padded token positions and
the number of compiled shapes; then the [CLS] agreement, and a plot of blocks/s against the padded
sequence length (one point per bucket, from the timed batches).

Run from the repository root with the project venv (about 5 minutes on 2 idle cores; `--quick`
about 1):

    .venv/bin/python benchmarks/embed_throughput.py [--quick] [--torch-python PATH]

If this interpreter cannot import torch, the PyTorch half runs in `--torch-python` (default
`.torchvenv/bin/python`; create it with `python3 -m venv .torchvenv && .torchvenv/bin/pip install
torch transformers==4.40.2 safetensors numpy`) as a subprocess driven over a pipe
(`benchmarks/_torch_embed.py`). `--skip-torch` times the Flax encoder alone.
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

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_config
from realm_jax.models import bert
from realm_jax.models.bert import BertEncoder
from realm_jax.models.checkpoint_import import load_bert_checkpoint, minilm_checkpoint_dir
from realm_jax.retrieval import embedding

REPO = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
PEAK_N = 2048


def load_blocks(num_blocks: int, data_dir: str) -> dict[str, np.ndarray]:
  """`num_blocks` blocks spread evenly over the embedded SQuAD corpus (all of them for 0).

  Returns:
    `input_ids`, `segment_ids`, `input_mask`: `[num_blocks, 288]` int32 document-tower inputs.
  """
  paths = corpus_lib.embedded_squad_paths()
  config = corpus_config.CorpusConfig(sources=(str(paths["dev"]), str(paths["train"])),
                                      data_dir=data_dir)
  _, corpus = corpus_config.load_corpus(config, str(minilm_checkpoint_dir()), data_dir,
                                        show_progress=False)
  n = len(corpus)
  rows = np.arange(n) if num_blocks <= 0 or num_blocks >= n else (
      np.linspace(0, n - 1, num_blocks).round().astype(np.int64))
  return corpus.retrieval_inputs(rows)


def encoder_flops(batch: int, length: int, hidden: int, intermediate: int, layers: int) -> float:
  """Matmul FLOPs of one BERT forward pass over `[batch, length]` (projections, FFN, attention)."""
  per_layer = 2 * batch * length * (4 * hidden * hidden + 2 * hidden * intermediate)
  return layers * (per_layer + 4 * batch * length * length * hidden)


def jax_matmul_seconds(n: int = PEAK_N, dtype: str = "float32") -> float:
  """Best of 5 seconds for a jitted `[n, n] x [n, n]` matmul: float32, or bfloat16 operands with
  float32 accumulation (the form the encoder's bf16 layers use, `bert.dense_dot_general`)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return min(times)


class TorchProcess:
  """`_torch_embed.TorchEmbedder`'s interface over a pipe to a subprocess in another venv."""

  def __init__(self, python: str, model_dir: str, batches_path: str, num_threads: int,
               dtype: str = "float32"):
    self.proc = subprocess.Popen(
        [python, str(HERE / "_torch_embed.py"), "--model-dir", model_dir, "--inputs",
         batches_path, "--num-threads", str(num_threads), "--dtype", dtype],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    self.info = self._reply()

  def _reply(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"embed_throughput.py: the PyTorch subprocess exited "
                           f"({self.proc.wait()}); see its stderr above")
      if line.startswith("{"):
        return json.loads(line)

  def _ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._reply()

  def run(self, j: int) -> float:
    return self._ask(f"run {j}")["s"]

  def matmul(self, n: int) -> float:
    return self._ask(f"matmul {n}")["s"]

  def cls_arrays(self) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "cls.npz")
      self._ask(f"dump {path}")
      with np.load(path) as f:
        return {k: f[k] for k in f.files}

  def close(self) -> None:
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    self.proc.wait(timeout=60)


def start_torch(args, model_dir: pathlib.Path, batches: dict[str, np.ndarray], tmp: str):
  """The PyTorch side: in-process if this interpreter has torch, else a `TorchProcess`."""
  if importlib.util.find_spec("torch") is not None:
    sys.path.insert(0, str(HERE))
    import _torch_embed  # pylint: disable=g-import-not-at-top
    side = _torch_embed.TorchEmbedder(str(model_dir), batches, args.torch_threads, args.dtype)
    side.cls_arrays = lambda: side.cls
    side.close = lambda: None
    return side, f"in-process ({sys.executable})"
  python = pathlib.Path(args.torch_python)
  if not python.exists():
    raise FileNotFoundError(
        f"embed_throughput.py: --torch-python={str(python)!r} does not exist and this interpreter "
        "has no torch; create it with `python3 -m venv .torchvenv && .torchvenv/bin/pip install "
        "torch transformers==4.40.2 safetensors numpy`, or pass --skip-torch")
  path = os.path.join(tmp, "batches.npz")
  np.savez(path, **batches)
  side = TorchProcess(str(python), str(model_dir), path, args.torch_threads, args.dtype)
  return side, f"subprocess ({python})"


def plot(rows_by_length: dict[int, dict[str, float]], path: pathlib.Path, title: str) -> None:
  """blocks/s against the padded sequence length, one line per framework."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lengths = sorted(rows_by_length)
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for side, style in (("flax", "o-"), ("torch", "s--")):
    ys = [rows_by_length[n].get(side) for n in lengths]
    if any(y is not None for y in ys):
      ax.plot(lengths, ys, style, label={"flax": "Flax BertEncoder (jit)",
                                         "torch": "PyTorch BertModel"}[side])
  for n in lengths:
    r = rows_by_length[n]
    if r.get("torch"):
      ax.annotate(f"{r['flax'] / r['torch']:.2f}x", (n, r["flax"]), textcoords="offset points",
                  xytext=(0, 6), ha="center", fontsize=8)
  ax.set_xlabel("padded sequence length (bucket, tokens)")
  ax.set_ylabel("blocks / s")
  ax.set_yscale("log")
  ax.set_xticks(lengths)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-blocks", type=int, default=1024,
                      help="real SQuAD blocks, spread over the corpus (0: all 3,997)")
  parser.add_argument("--batch-sizes", default="64", help="comma-separated batch sizes")
  parser.add_argument("--bucket", type=int, default=embedding.DEFAULT_BUCKET,
                      help="bucketed layout: pad each batch to a multiple of this")
  parser.add_argument("--layouts", default="fixed,bucketed",
                      help="comma-separated: fixed (288, corpus order), bucketed")
  parser.add_argument("--fixed-blocks", type=int, default=256,
                      help="blocks of the fixed layout (a prefix of the sample; it is ~2x slower)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
  parser.add_argument("--quick", action="store_true",
                      help="256 blocks (64 for fixed), batch 32, 2 rounds")
  parser.add_argument("--model-dir", default=None,
                      help="HF BERT checkpoint directory (default: the installed MiniLM)")
  parser.add_argument("--data-dir", default=None, help="corpus cache (default: a temp dir)")
  parser.add_argument("--torch-python", default=str(REPO / ".torchvenv" / "bin" / "python"))
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads for the PyTorch half; 0 keeps torch's default")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of both sides: Flax `BertConfig.dtype` (bf16 operands, "
                      "float32 accumulation), PyTorch `torch.autocast('cpu', torch.bfloat16)`")
  parser.add_argument("--plot", default=str(REPO / "docs" / "embed_throughput.png"),
                      help="PNG of blocks/s against sequence length ('' for none)")
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args()
  if args.quick:
    args.num_blocks, args.fixed_blocks, args.batch_sizes, args.rounds = 256, 64, "32", 2
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  layouts = [s for s in args.layouts.split(",") if s]
  if any(b <= 0 for b in batch_sizes) or args.rounds <= 0 or args.bucket <= 0:
    parser.error("--batch-sizes, --rounds and --bucket must be positive")
  if not set(layouts) <= {"fixed", "bucketed"}:
    parser.error("--layouts: fixed and/or bucketed")
  model_dir = pathlib.Path(args.model_dir) if args.model_dir else minilm_checkpoint_dir()
  t0 = time.perf_counter()
  load_before = os.getloadavg()

  with tempfile.TemporaryDirectory() as tmp:
    blocks = load_blocks(args.num_blocks, args.data_dir or os.path.join(tmp, "data"))
    num, max_length = blocks["input_ids"].shape
    lengths = blocks["input_mask"].sum(axis=1)
    # The batches of every (layout, batch size), numbered j = 0, 1, ... for both sides.
    cases, batches, meta = [], {}, []
    for layout in layouts:
      for b in batch_sizes:
        count = min(num, args.fixed_blocks) if layout == "fixed" else num
        plan = embedding.plan_batches(lengths[:count], b, max_length,
                                      bucket=None if layout == "fixed" else args.bucket,
                                      sort=layout != "fixed")
        ids = []
        for rows, length in plan.batches:
          j = len(meta)
          for k, v in embedding.take_batch(blocks, rows, length, b).items():
            batches[f"{k}_{j}"] = v
          meta.append({"rows": len(rows), "length": length, "batch": b})
          ids.append(j)
        cases.append({"layout": layout, "batch": b, "plan": plan, "ids": ids, "blocks": count})

    ckpt = load_bert_checkpoint(model_dir, dtype=args.dtype)
    cfg = ckpt.config
    model = BertEncoder(cfg)
    # Dense weights in the compute dtype once, as the index builder casts them (a no-op in float32).
    params = jax.device_put(bert.cast_dense_params(ckpt.params, cfg.compute_dtype))
    embed_cls = jax.jit(lambda p, ids, segs, mask: model.apply(
        {"params": p}, input_ids=ids, input_mask=mask, segment_ids=segs)[:, 0])
    compile_s = {}
    for case in cases:  # compile (and warm) each shape before any timing
      start = time.perf_counter()
      before = embed_cls._cache_size()  # pylint: disable=protected-access
      for j in case["ids"]:
        embed_cls(params, batches[f"input_ids_{j}"], batches[f"segment_ids_{j}"],
                  batches[f"input_mask_{j}"]).block_until_ready()
      case["compiles"] = embed_cls._cache_size() - before  # pylint: disable=protected-access
      compile_s[f"{case['layout']}/b{case['batch']}"] = time.perf_counter() - start

    torch_side, where = None, "skipped (--skip-torch)"
    if not args.skip_torch:
      torch_side, where = start_torch(args, model_dir, batches, tmp)
      for case in cases:  # warm-up: one pass over each case's distinct shapes
        seen = set()
        for j in case["ids"]:
          if meta[j]["length"] not in seen:
            seen.add(meta[j]["length"])
            torch_side.run(j)

    peaks = {"jax": [jax_matmul_seconds(dtype=args.dtype)], "torch": []}
    if torch_side:
      peaks["torch"].append(torch_side.matmul(PEAK_N))
    flax_s = {j: [] for j in range(len(meta))}
    torch_s = {j: [] for j in range(len(meta))}
    flax_cls = {}
    for r in range(args.rounds):
      for case in cases:
        for j in case["ids"]:
          inputs = (batches[f"input_ids_{j}"], batches[f"segment_ids_{j}"],
                    batches[f"input_mask_{j}"])
          for side in (("flax", "torch") if (r + j) % 2 == 0 else ("torch", "flax")):
            if side == "torch":
              if torch_side:
                torch_s[j].append(torch_side.run(j))
              continue
            start = time.perf_counter()
            out = np.asarray(embed_cls(params, *inputs))
            flax_s[j].append(time.perf_counter() - start)
            flax_cls.setdefault(f"cls_{j}", out)
    peaks["jax"].append(jax_matmul_seconds(dtype=args.dtype))
    torch_cls = {}
    if torch_side:
      peaks["torch"].append(torch_side.matmul(PEAK_N))
      torch_cls = torch_side.cls_arrays()
      info = torch_side.info
      torch_side.close()

  peak_flops = 2 * PEAK_N ** 3 / min(peaks["jax"])
  torch_peak = 2 * PEAK_N ** 3 / min(peaks["torch"]) if peaks["torch"] else None
  rows = []
  for case in cases:
    ids = case["ids"]
    flops = sum(encoder_flops(meta[j]["batch"], meta[j]["length"], cfg.hidden_size,
                              cfg.intermediate_size, cfg.num_layers) for j in ids)
    flax_round = statistics.median(sum(flax_s[j][r] for j in ids) for r in range(args.rounds))
    row = {"layout": case["layout"], "batch": case["batch"], "blocks": case["blocks"],
           "flax_blocks_s": case["blocks"] / flax_round,
           "flax_gflops": flops / flax_round / 1e9, "peak_share": flops / flax_round / peak_flops,
           "padded_share": case["plan"].padded_share, "shapes": list(case["plan"].shapes),
           "compiles": case["compiles"]}
    if torch_side:
      torch_round = statistics.median(sum(torch_s[j][r] for j in ids) for r in range(args.rounds))
      row.update(torch_blocks_s=case["blocks"] / torch_round,
                 ratio=torch_round / flax_round, torch_gflops=flops / torch_round / 1e9)
    rows.append(row)
  # blocks/s per bucket length (the largest batch size's bucketed batches).
  by_length: dict[int, dict[str, float]] = {}
  curve = [c for c in cases if c["layout"] == "bucketed"]
  if curve:
    case = max(curve, key=lambda c: c["batch"])
    for length in case["plan"].shapes:
      ids = [j for j in case["ids"] if meta[j]["length"] == length]
      n = sum(meta[j]["rows"] for j in ids)
      entry = {"flax": n / statistics.median(sum(flax_s[j][r] for j in ids)
                                             for r in range(args.rounds)), "blocks": n}
      if torch_side:
        entry["torch"] = n / statistics.median(sum(torch_s[j][r] for j in ids)
                                               for r in range(args.rounds))
      by_length[length] = entry

  dev = jax.devices()[0]
  print(f"model: {model_dir} ({args.dtype}, {cfg.num_layers} layers, hidden {cfg.hidden_size}); "
        f"{num} real SQuAD blocks (mean length {lengths.mean():.0f} of {max_length} tokens), "
        f"{args.rounds} interleaved rounds")
  print(f"host: {platform.processor() or platform.machine()}, usable cores="
        f"{len(os.sched_getaffinity(0))}, load average (1 min) {load_before[0]:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end")
  print(f"flax: jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; compile+warm-up s: "
        + ", ".join(f"{k}={s:.1f}" for k, s in compile_s.items()))
  if torch_side:
    print(f"torch: {where}; torch {info['torch']}, transformers {info['transformers']}, "
          f"attn_implementation={info['attn_implementation']}, threads={info['num_threads']}")
  else:
    print(f"torch: {where}")
  print(f"{args.dtype} matmul peak ({PEAK_N}^3, best of 5, before/after): XLA "
        f"{peak_flops / 1e9:.0f} GFLOP/s"
        + (f"; torch {torch_peak / 1e9:.0f} GFLOP/s" if torch_peak else ""))
  print()
  table = markdown_table(rows)
  print(table)
  print()
  print("blocks/s: median round; ratio = flax / torch blocks/s; GFLOP/s = matmul FLOPs of the "
        "executed (padded) shapes / flax time; % peak = of the XLA matmul peak above; padded = "
        "padding share of the computed token positions; compiles = shapes compiled (one per bucket "
        "length).")
  if by_length:
    print()
    print("| bucket length | blocks | flax blocks/s | torch blocks/s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for length, e in by_length.items():
      t = e.get("torch")
      torch_col, ratio = (f"{t:.1f}", f"{e['flax'] / t:.2f}x") if t else ("-", "-")
      print(f"| {length} | {e['blocks']} | {e['flax']:.1f} | {torch_col} | {ratio} |")
  agreement = None
  if torch_cls:
    diffs = [np.max(np.abs(flax_cls[k][:meta[int(k[4:])]["rows"]]
                           - torch_cls[k][:meta[int(k[4:])]["rows"]]))
             for k in torch_cls if k in flax_cls]
    agreement = float(max(diffs))
    print(f"\n[CLS] agreement over {len(diffs)} batches: max |flax - torch| = {agreement:.2e}")
  if args.plot and by_length:
    title = (f"MiniLM-L6 corpus embedding, real SQuAD blocks, batch "
             f"{max(c['batch'] for c in curve)}, {len(os.sched_getaffinity(0))} CPU cores")
    plot(by_length, pathlib.Path(args.plot), title)
    print(f"plot: {args.plot}")
  wall = time.perf_counter() - t0
  print(f"total wall time {wall:.0f} s")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({
        "rows": rows, "by_length": {str(k): v for k, v in by_length.items()},
        "matmul_peak_gflops": peak_flops / 1e9,
        "torch_matmul_peak_gflops": torch_peak / 1e9 if torch_peak else None,
        "cls_agreement": agreement, "wall_s": wall, "table": table}, indent=1))


def markdown_table(rows: list[dict]) -> str:
  """The side-by-side table of `main`'s rows."""
  lines = ["| layout | batch | blocks | flax blocks/s | torch blocks/s | ratio | flax GFLOP/s | "
           "% of matmul peak | padded tokens | compiles |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    torch_s = f"{r['torch_blocks_s']:.1f}" if "torch_blocks_s" in r else "-"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    lines.append(f"| {r['layout']} | {r['batch']} | {r['blocks']} | {r['flax_blocks_s']:.1f} | "
                 f"{torch_s} | {ratio} | {r['flax_gflops']:.0f} | {100 * r['peak_share']:.0f} % | "
                 f"{100 * r['padded_share']:.1f} % | {r['compiles']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
