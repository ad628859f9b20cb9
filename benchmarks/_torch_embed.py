"""PyTorch half of `embed_throughput.py`: runs `transformers.BertModel` on given batches.

`embed_throughput.py` drives a `TorchEmbedder` batch by batch, interleaved with the Flax encoder:
in-process when its interpreter has torch, else through this script as a subprocess (in a PyTorch
venv; it needs only torch, transformers, safetensors and numpy, not realm_jax):

    .torchvenv/bin/python benchmarks/_torch_embed.py --model-dir DIR --inputs batches.npz

`batches.npz` holds `input_ids_{j}`, `segment_ids_{j}`, `input_mask_{j}` (`[batch, length]` int32)
for batches j = 0 .. n-1. The subprocess prints one JSON line (versions, thread settings), then
reads commands from stdin, one a line, and answers each with one JSON line on stdout:

    run J        -> {"s": seconds}   forward pass of batch J ([CLS] kept from its first run)
    matmul N     -> {"s": seconds}   best of 5 [N, N] x [N, N] float32 matmuls
    dump PATH    -> {"ok": true}     writes `cls_{j}` ([batch, hidden] float32) of the run batches
    quit
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import transformers


class TorchEmbedder:
  """`BertModel` in inference mode over fixed batches; times one batch per call.

  Args:
    model_dir: a Hugging Face BERT checkpoint directory.
    batches: `{"input_ids_{j}", "segment_ids_{j}", "input_mask_{j}"}` int arrays.
    num_threads: `torch.set_num_threads` when positive; 0 keeps torch's default (one per core).
  """

  def __init__(self, model_dir: str, batches: dict[str, np.ndarray], num_threads: int = 0,
               dtype: str = "float32"):
    self.autocast = dtype == "bfloat16"  # torch.autocast on CPU: bf16 matmuls (oneDNN), f32 rest
    if num_threads > 0:
      torch.set_num_threads(num_threads)
    self.model = transformers.BertModel.from_pretrained(model_dir, local_files_only=True).eval()
    self.batches = {}
    for key, value in batches.items():
      name, j = key.rsplit("_", 1)
      self.batches.setdefault(int(j), {})[name] = torch.from_numpy(value.astype(np.int64))
    self.cls: dict[str, np.ndarray] = {}
    self.info = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "attn_implementation": getattr(self.model.config, "_attn_implementation", "eager"),
        "dtype": "bfloat16 (torch.autocast)" if self.autocast else "float32",
    }

  def run(self, j: int) -> float:
    """Seconds for one forward pass of batch `j` ([CLS] copied out to numpy inside the timing)."""
    b = self.batches[j]
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
      start = time.perf_counter()
      out = self.model(input_ids=b["input_ids"], token_type_ids=b["segment_ids"],
                       attention_mask=b["input_mask"])
      first = out.last_hidden_state[:, 0].numpy().copy()
      seconds = time.perf_counter() - start
    self.cls.setdefault(f"cls_{j}", first.astype(np.float32))
    return seconds

  def matmul(self, n: int) -> float:
    """Best of 5 seconds for an `[n, n] x [n, n]` matmul in the embedder's dtype."""
    a = torch.randn(n, n, dtype=torch.bfloat16 if self.autocast else torch.float32)
    times = []
    with torch.inference_mode():
      a @ a  # pylint: disable=pointless-statement
      for _ in range(5):
        start = time.perf_counter()
        a @ a  # pylint: disable=pointless-statement
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", required=True)
  parser.add_argument("--inputs", required=True)
  parser.add_argument("--num-threads", type=int, default=0, help="0: torch's default")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args()
  with np.load(args.inputs) as f:
    batches = {k: f[k] for k in f.files}
  embedder = TorchEmbedder(args.model_dir, batches, args.num_threads, args.dtype)
  print(json.dumps(embedder.info), flush=True)
  for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "run":
      reply = {"s": embedder.run(int(arg))}
    elif command == "matmul":
      reply = {"s": embedder.matmul(int(arg))}
    elif command == "dump":
      np.savez(arg, **embedder.cls)
      reply = {"ok": True}
    elif command == "quit":
      break
    else:
      reply = {"error": f"unknown command {command!r}"}
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
