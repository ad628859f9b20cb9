"""Runs the benchmarks of `benchmarks/` one after another and writes one Markdown report.

`make bench` runs this (`make bench ARGS=--quick` for the short versions). Each benchmark runs in its
own process with this interpreter, from the repository root; its full output goes to
`benchmarks/results/logs/<name>.log`. The report (`benchmarks/results/run_all.md`, or
`run_all_quick.md` with `--quick`) has one status row per benchmark (command, exit code, wall time)
and, per benchmark, the last Markdown table it printed (its headline table), or the last lines of its
output when it prints none. The report is also printed.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only a,b] [--skip a,b] [--list]

Benchmarks that need something absent here are reported as skipped with the reason: the PyTorch
side of `embed_throughput` (torch in this interpreter or `--torch-python`), and `retrieval_recall`
(the main job's work directory, `make demo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Bench:
  """One benchmark script: its arguments for a full and a quick run, and what it measures."""

  name: str
  what: str
  full: tuple[str, ...]
  quick: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()


BENCHES = (
    Bench("embed_throughput", "corpus embedding: Flax vs PyTorch BertModel, padding, compiles",
          (), ("--quick", "--plot", "")),
    Bench("reader_buckets", "fine-tuning train step: reads cut to length buckets vs padded to "
          "reader_length (padding, compiles, s/step)", (), ("--batches", "20", "--steps", "2")),
    Bench("mixed_precision", "float32 vs bfloat16 compute: fine-tuning step, corpus embedding",
          (), ("--steps", "1", "--num_blocks", "64")),
    Bench("encoder_profile", "document tower per component (XLA:CPU profile), f32 vs bf16",
          (), ("--runs", "1", "--batch", "8"),
          (("XLA_FLAGS", "--xla_force_host_platform_device_count=1"),)),
    Bench("scann_vs_exact", "MIPS: numpy vs exact sharded vs ScaNN swept to recall@10 >= 0.95",
          (), ("--quick",)),
    Bench("searcher_scale", "the MIPS index at 1M rows: snapshot write/validate/load, searchers",
          ("--num_blocks", "1000000", "--scann"), ("--num_blocks", "50000", "--scann"),
          (("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),)),
    Bench("scaling", "train step on 1-8 simulated devices; memory plan of the paper configs",
          (), ("--skip_memory",)),
    Bench("index_refresh", "asynchronous index refresh: step cost, refresh latency",
          (), ("--quick",)),
    Bench("wikipedia_scale", "Wikipedia-scale rehearsal, stage by stage",
          ("--sizes", "10000", "100000", "--workdir", "/tmp/realm_run_all_wiki"),
          ("--sizes", "2000", "--workdir", "/tmp/realm_run_all_wiki_quick")),
    Bench("pretraining", "REALM's effect: zero-shot recall after ICT, ICT-only, ICT + MLM warm-up "
          "+ REALM; retrieval utility over the steps",
          (), ("--articles", "2", "--questions", "50", "--ict_steps", "4", "--mlm_warmup_steps",
               "4", "--realm_steps", "4", "--refresh_every", "4", "--log_every", "2",
               "--eval_examples", "8")),
    # A short curve (~15 min); the README's hour-long one is `benchmarks/learning_curve.py` alone.
    Bench("learning_curve", "EM and gold recall@1/5/20 of the default job against steps and "
          "training time: REALM vs BM25 + the same reader",
          ("--steps", "120", "--eval_every", "40", "--fresh",
           "--workdir", "/tmp/realm_run_all_learning_curve",
           "--out", "benchmarks/results/run_all_learning_curve"),
          ("--steps", "4", "--eval_every", "2", "--fresh",
           "--workdir", "/tmp/realm_run_all_learning_curve_quick",
           "--out", "benchmarks/results/run_all_learning_curve_quick",
           "--gin_param", "finetune.OpenQADataConfig.max_eval_questions=16")),
    Bench("retrieval_recall", "SQuAD-open recall@k: MiniLM zero-shot / fine-tuned vs BM25",
          ("--workdir", "workdirs/squad_minilm"),
          ("--workdir", "workdirs/squad_minilm", "--max_questions", "500")),
)


def last_table(text: str) -> str | None:
  """The last block of consecutive lines starting with `|` (a Markdown table), or None."""
  tables, current = [], []
  for line in text.splitlines():
    if line.lstrip().startswith("|"):
      current.append(line.strip())
    elif current:
      tables.append(current)
      current = []
  if current:
    tables.append(current)
  tables = [t for t in tables if len(t) >= 3]
  return "\n".join(tables[-1]) if tables else None


def skip_reason(bench: Bench, args) -> str | None:
  """Why `bench` cannot run here, or None."""
  if bench.name == "retrieval_recall" and not (REPO / "workdirs" / "squad_minilm").is_dir():
    return "no workdirs/squad_minilm (run `make demo` first)"
  return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the short version of each benchmark")
  parser.add_argument("--only", default="", help="comma-separated names to run (default: all)")
  parser.add_argument("--skip", default="", help="comma-separated names not to run")
  parser.add_argument("--timeout", type=float, default=0,
                      help="seconds allowed per benchmark (0: none)")
  parser.add_argument("--torch-python", default=None,
                      help="passed to embed_throughput.py (a python with torch + transformers)")
  parser.add_argument("--out", default=None, help="report path (default: benchmarks/results/…)")
  parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
  args = parser.parse_args()
  names = [b.name for b in BENCHES]
  only = [n for n in args.only.split(",") if n]
  skip = [n for n in args.skip.split(",") if n]
  unknown = sorted(set(only + skip) - set(names))
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; known: {names}")
  if args.list:
    for b in BENCHES:
      print(f"{b.name:18s} {b.what}")
    return
  selected = [b for b in BENCHES if (not only or b.name in only) and b.name not in skip]
  out = pathlib.Path(args.out) if args.out else RESULTS / (
      "run_all_quick.md" if args.quick else "run_all.md")
  logs = RESULTS / "logs"
  logs.mkdir(parents=True, exist_ok=True)

  status, sections = [], []
  for bench in selected:
    argv = list(bench.quick if args.quick else bench.full)
    if bench.name == "embed_throughput":
      if args.torch_python:
        argv += ["--torch-python", args.torch_python]
      elif (importlib.util.find_spec("torch") is None
            and not (REPO / ".torchvenv" / "bin" / "python").exists()):
        argv += ["--skip-torch"]
    cmd = [sys.executable, f"benchmarks/{bench.name}.py", *argv]
    shown = " ".join(["python", *cmd[1:]])
    reason = skip_reason(bench, args)
    if reason:
      status.append((bench.name, shown, "skipped", "-", reason))
      print(f"[run_all] {bench.name}: skipped ({reason})", flush=True)
      continue
    print(f"[run_all] {bench.name}: {shown}", flush=True)
    env = dict(os.environ, **dict(bench.env))
    log = logs / f"{bench.name}{'_quick' if args.quick else ''}.log"
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=args.timeout or None, check=False)
      code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
      code = "timeout"
      output = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                else (e.stdout or ""))
    wall = time.perf_counter() - start
    log.write_text(output)
    table = last_table(output)
    note = "" if code == 0 else f"see {log.relative_to(REPO)}"
    status.append((bench.name, shown, str(code), f"{wall:.0f}", note))
    body = table or "```\n" + "\n".join(output.strip().splitlines()[-15:]) + "\n```"
    sections.append(f"### {bench.name}\n\n{bench.what}. `{shown}` (exit {code}, {wall:.0f} s)\n\n"
                    f"{body}\n")
    print(f"[run_all] {bench.name}: exit {code} in {wall:.0f} s", flush=True)

  header = (f"# Benchmarks ({'quick' if args.quick else 'full'} run)\n\n"
            f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} usable cores, python {platform.python_version()}\n")
  rows = ["| benchmark | command | exit | wall s | note |", "|---|---|---|---:|---|"]
  rows += [f"| {n} | `{c}` | {e} | {w} | {note} |" for n, c, e, w, note in status]
  report = header + "\n" + "\n".join(rows) + "\n\n" + "\n".join(sections)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(report)
  print()
  print(report)
  print(f"[run_all] report: {out}")
  if any(e not in ("0", "skipped") for _, _, e, _, _ in status):
    sys.exit(1)


if __name__ == "__main__":
  main()
