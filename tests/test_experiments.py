"""Every experiment file parses, and its model and train step build abstractly (`jax.eval_shape`).

A paper config that no longer matches the code (a renamed binding, an impossible shape) fails here,
without weights or data: required data paths get dummy values and `init_checkpoint` is set to None
(the shapes come from the gin `bert.BertConfig`).
"""

import pathlib

import gin
import jax
import pytest

from realm_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*/*.gin")
                     if p.parent.name in ("cpu", "paper"))
DUMMIES = {"BERT_BASE_DIR": "'unused'", "WIKIPEDIA": "('unused.jsonl',)",
           "CC_NEWS": "('unused_news.jsonl',)",
           "TRAIN_QUESTIONS": "'unused'", "EVAL_QUESTIONS": "'unused'", "INIT_FROM": "''"}


def _value(name):
  value = gin.query_parameter(name)
  return value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") else value


def _text(path):
  """The file's text with its `include`s inlined (a paper file may include another one)."""
  lines = []
  for line in (ROOT / path).read_text().splitlines():
    if line.startswith("include '"):
      lines.append(_text(line.split("'")[1]))
    lines.append(line)
  return "\n".join(lines)


def _parse(path):
  text = _text(path)
  params = [f"{k} = {v}" for k, v in DUMMIES.items() if f"{k} = %gin.REQUIRED" in text]
  if "include 'experiments/models/bert_base.gin'" in text:  # no weights here: shapes from gin
    params.append("realm.ModelConfig.init_checkpoint = None")
  cli.parse_gin([path], params)


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_experiment_builds_abstractly(path, monkeypatch):
  monkeypatch.chdir(ROOT)
  _parse(path)
  text = _text(path)
  if "runs/finetune.gin" in text:
    from realm_jax.training import finetune
    model = _value("finetune.train_and_evaluate.model")
    task = _value("finetune.train_and_evaluate.task")
    batch = _value("finetune.train_and_evaluate.batch_size")
    out = finetune.abstract_train_step(model, task, batch)
    assert out["metrics"]["train/loss"].shape == ()
    # The BERT of the paper configs is BERT-base: 110M parameters per tower.
    if "paper" in path:
      n = sum(x.size for x in jax.tree_util.tree_leaves(out["params"]["reader"]["bert"]))
      assert 105e6 < n < 115e6, n
  elif "runs/pretrain.gin" in text or "runs/ict.gin" in text:
    kind = "pretrain" if "runs/pretrain.gin" in text else "ict"
    module = __import__(f"realm_jax.training.{kind}", fromlist=["x"])
    model = _value(f"{kind}.train.model")
    task = _value(f"{kind}.train.task")
    batch = _value(f"{kind}.train.batch_size")
    out = module.abstract_train_step(model, task, batch)
    assert out["metrics"]["train/loss" if kind == "pretrain" else "train/ict_loss"].shape == ()
    if "paper" in path:  # BERT-base towers: 110M parameters each
      n = sum(x.size for x in jax.tree_util.tree_leaves(out["params"]["retriever"]))
      assert 105e6 < n < 115e6, n
    if "ccnews" in path:  # X = CC-News, Z = Wikipedia (REALM §4.2)
      data = _value("pretrain.train.data")
      assert data.pretraining_sources == ("unused_news.jsonl",)
      assert data.corpus_sources == ("unused.jsonl",)
  else:
    pytest.fail(f"{path}: no known run file included")
