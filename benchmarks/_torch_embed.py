"""PyTorch half of `embed_throughput.py`: times `transformers.BertModel` on given blocks.

Run by `embed_throughput.py` (in the PyTorch venv when the project venv has no torch); it needs only
torch, transformers, safetensors and numpy, not realm_jax. Usage:

    .torchvenv/bin/python benchmarks/_torch_embed.py --model-dir DIR --inputs in.npz \
        --output out.npz --batch-sizes 16,64 --num-batches 2

`in.npz` holds `input_ids`, `segment_ids`, `input_mask` ([num_blocks, seq_len] int32). `out.npz`
receives `cls_{batch}` ([batch, hidden] float32 [CLS] vectors of the first timed batch); the last
line of stdout is a JSON object with the timings and the thread settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import transformers


def peak_rss_mb() -> float:
  """Peak resident set size of this process (VmHWM), in MiB.

  `getrusage(...).ru_maxrss` would be wrong in a subprocess: Linux carries it over fork and exec,
  so a child would report its parent's peak.
  """
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def run(model_dir: str, inputs: dict[str, np.ndarray], batch_sizes: list[int],
        num_batches: int, num_threads: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
  """Times [CLS] embedding of `num_batches` batches per batch size.

  One warm-up forward pass on 2 blocks precedes the timing. Batch `i` of size `b` is blocks
  `[i * b, (i + 1) * b)`. `num_threads > 0` calls `torch.set_num_threads(num_threads)`; 0 keeps
  torch's default (one intra-op thread per core).

  Returns:
    (report, cls): `report` has the torch/transformers versions, thread settings, attention
    implementation and, per batch size, the per-batch seconds and peak RSS; `cls[f"cls_{b}"]` is the
    [b, hidden] float32 [CLS] output of the first batch.

  Raises:
    ValueError: if the inputs hold fewer than `max(batch_sizes) * num_batches` blocks.
  """
  if num_threads > 0:
    torch.set_num_threads(num_threads)
  model = transformers.BertModel.from_pretrained(model_dir, local_files_only=True).eval()
  ids, segs, mask = (torch.from_numpy(inputs[k].astype(np.int64))
                     for k in ("input_ids", "segment_ids", "input_mask"))
  report = {
      "torch": torch.__version__, "transformers": transformers.__version__,
      "num_threads": torch.get_num_threads(),
      "num_interop_threads": torch.get_num_interop_threads(),
      "attn_implementation": model.config._attn_implementation, "results": {},
  }
  cls = {}
  with torch.inference_mode():
    model(input_ids=ids[:2], token_type_ids=segs[:2], attention_mask=mask[:2])  # warm-up
    for b in batch_sizes:
      if b * num_batches > ids.shape[0]:
        raise ValueError(f"_torch_embed: batch size {b} x {num_batches} batches needs "
                         f"{b * num_batches} blocks, the inputs have {ids.shape[0]}")
      times = []
      for i in range(num_batches):
        sl = slice(i * b, (i + 1) * b)
        start = time.perf_counter()
        out = model(input_ids=ids[sl], token_type_ids=segs[sl], attention_mask=mask[sl])
        first = out.last_hidden_state[:, 0].numpy().copy()
        times.append(time.perf_counter() - start)
        if i == 0:
          cls[f"cls_{b}"] = first.astype(np.float32)
      report["results"][str(b)] = {"seconds_per_batch": times, "median_s": statistics.median(times),
                                   "peak_rss_mb": peak_rss_mb()}
  return report, cls


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", required=True)
  parser.add_argument("--inputs", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--batch-sizes", default="16,64")
  parser.add_argument("--num-batches", type=int, default=2)
  parser.add_argument("--num-threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args()
  with np.load(args.inputs) as f:
    inputs = {k: f[k] for k in f.files}
  report, cls = run(args.model_dir, inputs, [int(b) for b in args.batch_sizes.split(",")],
                    args.num_batches, args.num_threads)
  np.savez(args.output, **cls)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
