"""Plain-text tables of a run's results (the main job's printed summary, `predict`'s evidence)."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence


def _pct(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:5.1f}"


def format_summary(summary: dict[str, Any]) -> str:
  """Formats the dict returned by `finetune.train_and_evaluate`.

  Columns: zero-shot and after fine-tuning; rows: exact match and recall@k (percent). Then the
  timings (seconds) and three example predictions with their evidence.
  """
  zero = summary.get("zero_shot") or {}
  final = summary.get("final") or {}
  keys = ["exact_match"] + sorted(
      (k for k in final if "recall@" in k),
      key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
  lines = [
      "",
      f"REALM Open-QA — {summary.get('num_blocks', '?')} blocks, "
      f"{summary.get('num_train_questions', '?')} train questions, "
      f"{summary.get('steps', '?')} steps, {summary.get('num_eval_questions', '?')} eval questions",
      "",
      f"| {'metric (%)':<22} | {'zero-shot':>9} | {'fine-tuned':>10} |",
      f"|{'-' * 24}|{'-' * 11}|{'-' * 12}|",
  ]
  for k in keys:
    lines.append(f"| {k:<22} | {_pct(zero.get(k)):>9} | {_pct(final.get(k)):>10} |")
  train = {k: v for k, v in (summary.get("train") or {}).items()
           if k.startswith("train/") and k not in ("train/learning_rate", "train/nonfinite_steps")}
  if train:  # Means over the last logging window (`training.loop`).
    lines += ["", "last training metrics: " + ", ".join(
        f"{k.split('/')[-1]}={v:.3f}" for k, v in sorted(train.items()))]
  timings = summary.get("timings") or {}
  if timings:
    lines += ["timings (s): " + ", ".join(f"{k[:-2]}={v:.0f}" for k, v in timings.items())]
  if summary.get("predictions_path"):
    lines += [f"predictions: {summary['predictions_path']}"]
  examples = summary.get("examples") or []
  if examples:
    lines += ["", "Example predictions:", format_predictions(examples)]
  return "\n".join(lines)


def format_predictions(predictions: Sequence[dict[str, Any]], num_blocks: int = 3,
                       width: int = 100) -> str:
  """Question → answer, then the top blocks with p(z|x) and a snippet (REALM's evidence view)."""
  out = []
  for p in predictions:
    gold = p.get("answers")
    mark = ""
    if gold:
      mark = "  ✓" if p.get("exact_match") else f"  ✗ (gold: {' | '.join(gold[:3])})"
    out.append(f"Q: {p['question']}")
    out.append(f"A: {p['prediction'] or '(no answer)'}{mark}")
    for rank, b in enumerate(p.get("top_blocks", [])[:num_blocks]):
      used = " ←" if rank == p.get("evidence_rank") else ""
      snippet = textwrap.shorten(b["text"], width=width - 10, placeholder=" …")
      out.append(f"   [{rank + 1}] p(z|x)={b['p_z']:.3f} {b['title']}{used}")
      out.append(f"       {snippet}")
    out.append("")
  return "\n".join(out)
