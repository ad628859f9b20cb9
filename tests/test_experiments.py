"""Every experiment file parses, and its model and train step build abstractly (`jax.eval_shape`).

A paper config that no longer matches the code (a renamed binding, an impossible shape) fails here,
without weights or data: required data paths get dummy values and `init_checkpoint` is set to None
(the shapes come from the gin `bert.BertConfig`).
"""

import os
import pathlib
import re
import subprocess

import gin
import jax
import pytest

from realm_jax import cli
from realm_jax import config_check
from realm_jax.training import train_state

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
    out = train_state.train_step_shapes(finetune.step_parts(model, task, batch))
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
    out = train_state.train_step_shapes(module.step_parts(model, task, batch))
    assert out["metrics"]["train/loss"].shape == ()
    if "paper" in path:  # BERT-base towers: 110M parameters each
      n = sum(x.size for x in jax.tree_util.tree_leaves(out["params"]["retriever"]))
      assert 105e6 < n < 115e6, n
    if "ccnews" in path:  # X = CC-News, Z = Wikipedia (REALM §4.2)
      data = _value("pretrain.train.data")
      assert data.pretraining_sources == ("unused_news.jsonl",)
      assert data.corpus.sources == ("unused.jsonl",)
  else:
    pytest.fail(f"{path}: no known run file included")


# ------------------------------------------------------------------------------------------------
# The commands in the file headers, and the path macros (README "Cloud TPU: path macros and bucket
# layout"; tpu/launch.sh checks them with realm_jax.config_check)
# ------------------------------------------------------------------------------------------------

# What the paper headers expect in the shell before they are pasted.
HEADER_ENV = {"ZONE": "europe-west4-a", "BUCKET": "my-bucket", "PRETRAIN_RUN": "20250101-120000-realm",
              "ICT_RUN": "20250101-000000-realm"}


def _header_commands(path):
  """The shell commands of a file's header (`realm-jax …`, `tpu/launch.sh …`), continuations joined."""
  commands, current = [], None
  for line in (ROOT / path).read_text().splitlines():
    if not line.startswith("#"):
      break
    text = line[1:]
    if current is None and re.match(r"^\s+(realm-jax|tpu/launch\.sh)\s", text):
      current = []
    if current is not None:
      current.append(text)
      if not text.rstrip().endswith("\\"):
        commands.append("\n".join(current))
        current = None
  return commands


def _gin_params_of(command):
  """The `--gin_param` values of a header command, split into words by bash as a paste would."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", command],
                       env={"PATH": os.environ["PATH"], **HEADER_ENV}, capture_output=True, text=True,
                       check=True)
  words = out.stdout.split("\0")[:-1]
  params = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--gin_param"]
  return params + [w.split("=", 1)[1] for w in words if w.startswith("--gin_param=")]


def _strings(value):
  if isinstance(value, str):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _strings(v)
  elif isinstance(value, dict):
    for k, v in value.items():
      yield from _strings(k)
      yield from _strings(v)


def test_path_macros_are_the_dummies_and_documented_in_the_readme():
  assert set(DUMMIES) == set(config_check.PATH_MACROS)
  readme = (ROOT / "README.md").read_text()
  heading = "## Cloud TPU: path macros and bucket layout"
  assert readme.count(heading) == 1
  section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
  assert readme.index(heading) < readme.index("## Tests")
  for name, macro in config_check.PATH_MACROS.items():
    assert f"`{name}`" in section, name
    assert macro.example.strip("(),'") in section, macro.example
  # Every %gin.REQUIRED macro that an experiment leaves to the user is a documented path macro.
  for path in EXPERIMENTS:
    text = _text(path)
    for name in re.findall(r"^([A-Z_]+) = %gin\.REQUIRED", text, re.MULTILINE):
      rebound = re.search(rf"^{name} = (?!%gin\.REQUIRED)", text, re.MULTILINE)
      assert rebound or name in config_check.PATH_MACROS, (path, name)


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_header_commands_bind_clean_values(path, monkeypatch):
  """The gin params of each header command parse, pass the configuration check, and bind no comment."""
  monkeypatch.chdir(ROOT)
  params = [p for c in _header_commands(path) for p in _gin_params_of(c)]
  if "paper" in path:
    assert _header_commands(path) and params, path  # every paper file says how to launch it
  text = _text(path)
  dummies = [f"{k} = {v}" for k, v in DUMMIES.items() if f"{k} = %gin.REQUIRED" in text]
  result = config_check.check([path], dummies + params)
  assert result.problems == [], [str(p) for p in result.problems]
  for param in params:
    name = param.split("=", 1)[0].strip()
    value = _value(f"{name}/macro.value") if "." not in name else _value(name)
    for s in _strings(value):
      assert "#" not in s and not re.search(r"\s\(", s), (path, param, s)  # no comment in the quotes
      if "paper" in path:
        assert s == "" or config_check.gcs_url_problem(s) is None, (path, param, s)


# ------------------------------------------------------------------------------------------------
# The paper's hyper-parameters, as the paper experiment files bind them (issue #14 §7). The values
# are REALM's (Guu et al., 2020, §4 and appendix A) and ORQA's (Lee et al., 2019), written out here;
# a gin edit that drifts from them fails below, not after days on a TPU.
# ------------------------------------------------------------------------------------------------

PAPER = sorted(p for p in EXPERIMENTS if p.startswith("experiments/paper/"))
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512}
BERT_ADAMW = {"weight_decay": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-6, "clip_norm": 1.0}


def _check_common(run, kind):
  """BERT-base towers, BERT AdamW with the ORQA warm-up rule, 288-wordpiece blocks, and one step
  count shared by the loop and the schedule."""
  model, optimizer, loop = (_value(f"{run}.model"), _value(f"{run}.optimizer"),
                            _value(f"{run}.loop"))
  assert {k: getattr(model.bert, k) for k in BERT_BASE} == BERT_BASE, kind
  assert model.projection_size == 128 and model.share_embedders, kind  # ORQA's 128-d embeddings
  assert {k: getattr(optimizer, k) for k in BERT_ADAMW} == BERT_ADAMW, kind
  assert optimizer.warmup_steps is None, kind  # min(10000, max(100, steps / 10))
  assert optimizer.part_learning_rate_scales == (), kind
  assert optimizer.num_train_steps == loop.num_train_steps, kind
  return model, optimizer, loop


@pytest.mark.parametrize("path", PAPER)
def test_paper_hyperparameters(path, monkeypatch):
  from realm_jax.training import optim
  monkeypatch.chdir(ROOT)
  _parse(path)
  name = pathlib.Path(path).stem
  if name.startswith("finetune_"):  # REALM §4.2 / ORQA §4: Open-QA fine-tuning
    model, optimizer, _ = _check_common("finetune.train_and_evaluate", name)
    task, data = _value("finetune.train_and_evaluate.task"), _value(
        "finetune.train_and_evaluate.data")
    assert task.num_retrieved == 5000 and task.num_read == 5, name
    assert task.reader_length == 288 + 32 and task.reader_query_length == 32, name
    assert not task.gold_block_in_read, name  # a stated deviation of the CPU demo only
    assert model.max_span_width == 10, name
    assert data.corpus.max_block_length == 288, name
    assert optimizer.learning_rate == 1e-5, name
    assert data.questions_format == {"finetune_nq": "nq_open", "finetune_wq": "webquestions",
                                     "finetune_ct": "curatedtrec"}[name]
  elif name == "ict_warmstart":  # ORQA §5 / REALM §3.4: the ICT warm start
    _, optimizer, loop = _check_common("ict.train", name)
    task, data = _value("ict.train.task"), _value("ict.train.data")
    assert _value("ict.train.batch_size") == 4096 and loop.num_train_steps == 100_000
    assert optimizer.learning_rate == 1e-4
    assert task.query_length == 64 and task.block_length == 288
    assert task.remove_sentence_prob == 0.9  # the sentence stays in its block 10 % of the time
    assert data.max_block_length == 288
  elif name.startswith("realm_pretrain_"):  # REALM §4 / appendix A: pre-training
    _, optimizer, loop = _check_common("pretrain.train", name)
    task, data = _value("pretrain.train.task"), _value("pretrain.train.data")
    assert _value("pretrain.train.batch_size") == 512 and loop.num_train_steps == 200_000, name
    assert optimizer.learning_rate == 3e-5, name
    assert optimizer.resolved_warmup_steps == 10_000, name
    assert task.num_candidates == 8, name  # including the null document
    assert task.query_length == 96 and task.candidate_length == 288 and task.max_masks == 10, name
    assert data.corpus.max_block_length == 288 and data.masking == "salient", name
    # About one index refresh per 500 steps, the trainer at most 500 steps ahead (async builder).
    assert _value("pretrain.train.index_refresh") == "async", name
    assert _value("pretrain.train.refresh_every_steps") == 500, name
    assert _value("pretrain.train.max_index_staleness_steps") == 500, name
    assert _value("index_builder.run.num_train_steps") == 200_000, name
  else:
    pytest.fail(f"{path}: a paper file without known hyper-parameters; add it here")
  # The learning-rate schedule peaks at the paper's rate right after the warm-up.
  schedule = optim.learning_rate_schedule(optimizer)
  warmup = optimizer.resolved_warmup_steps
  assert float(schedule(warmup - 1)) == pytest.approx(optimizer.learning_rate * (warmup - 1) / warmup,
                                                      rel=1e-5)
