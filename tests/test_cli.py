"""`realm-jax` end to end on a tiny model: finetune → files in the workdir → resume → predict; errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from realm_jax import cli
from realm_jax import evaluation

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN = "tests/fixtures/gin/tiny_finetune.gin"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


def test_finetune_resume_and_predict(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  summary = cli.run(["finetune", "--gin_file", GIN, "--workdir", workdir])
  assert summary["steps"] == 2
  # The fixture corpus has 10 blocks: recall@k is monotone and all blocks are retrieved at 100.
  final = summary["final"]
  assert final["answer_recall@1"] <= final["answer_recall@5"] <= final["answer_recall@100"] == 1.0
  assert final["gold_recall@100"] == 1.0
  for name in ("config.gin", "summary.json", "snapshots/0/manifest.json",
               "predictions/eval-step2.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "finetune.OpenQAConfig.num_read = 2" in open(os.path.join(workdir, "config.gin")).read()
  with open(os.path.join(workdir, "predictions/eval-step2.jsonl")) as f:
    preds = [json.loads(line) for line in f]
  assert len(preds) == 9 and all(len(p["top_blocks"]) == 2 for p in preds)
  # The reported EM is the official exact match of the written predictions against the gold answers
  # read straight from the SQuAD file, and each prediction is text of the block it was read from.
  gold = {qa["id"]: [a["text"] for a in qa["answers"]]
          for article in json.loads((ROOT / "tests/fixtures/data/squad_dev_tiny.json").read_text())
          ["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
  assert sorted(p["qid"] for p in preds) == sorted(gold)
  correct = [evaluation.exact_match(p["prediction"], gold[p["qid"]]) for p in preds]
  assert [p["exact_match"] for p in preds] == correct
  assert summary["final"]["exact_match"] == pytest.approx(sum(correct) / len(preds))
  for p in preds:
    assert p["prediction"] and p["prediction"] in p["top_blocks"][p["evidence_rank"]]["text"], p
  # p(z|x) is a distribution over the 3 retrieved blocks: the top 2 hold at most all of it.
  assert all(0 < sum(b["p_z"] for b in p["top_blocks"]) <= 1 + 1e-5 for p in preds)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 2

  # Resume: two more steps continue from step 2 (the data iterator state is restored too).
  summary = cli.run(["finetune", "--gin_file", GIN, "--workdir", workdir,
                     "--gin_param", "TRAIN_STEPS=4"])
  assert summary["steps"] == 4 and "zero_shot" not in summary
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 4
  capsys.readouterr()

  # `evaluate` re-evaluates the newest checkpoint: the resumed run's final metrics, the same table.
  evaluated = cli.run(["evaluate", "--gin_file", GIN, "--workdir", workdir])
  assert evaluated["steps"] == 4 and evaluated["final"] == summary["final"]
  out = capsys.readouterr().out
  assert "REALM Open-QA" in out and "4 steps" in out and "exact_match" in out
  # Your own corpus: a new work directory evaluates the fine-tuned run's params (init_from) on a
  # corpus and questions given on the command line, with the index embedded by its retriever.
  own = cli.run(["evaluate", "--gin_file", GIN, "--workdir", str(tmp_path / "own"),
                 "--gin_param", f"finetune.train_and_evaluate.init_from='{workdir}'"])
  assert own["init"] == f"params from {workdir}" and own["steps"] == 0
  assert own["final"]["num_questions"] == 9 and "zero_shot" in own

  preds = cli.run(["predict", "--workdir", workdir, "Where is the Vistula?"])
  assert len(preds) == 1 and preds[0]["top_blocks"]
  assert "Q: Where is the Vistula?" in capsys.readouterr().out


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "realm_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_missing_input_file_is_a_clear_error(tmp_path):
  r = _cli("finetune", "--gin_file", GIN, "--workdir", str(tmp_path / "w"),
           "--gin_param", "corpus_config.CorpusConfig.sources=('/no/such/corpus.json',)")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert "/no/such/corpus.json" in r.stderr


def test_malformed_input_file_names_file_and_line(tmp_path):
  bad = tmp_path / "corpus.jsonl"
  bad.write_text('{"title": "A", "text": "fine"}\n{"title": "B", "txt": "typo"}\n')
  r = _cli("finetune", "--gin_file", GIN, "--workdir", str(tmp_path / "w"),
           "--gin_param", f"corpus_config.CorpusConfig.sources=('{bad}',)")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert "corpus.jsonl" in r.stderr and "2" in r.stderr and "text" in r.stderr


def test_gin_file_binding_a_module_it_does_not_import_is_one_line(tmp_path):
  """Regression: with dynamic registration every file imports what it binds; a file that binds
  `realm.…` relying on an included file's import raised a NameError traceback."""
  gin = tmp_path / "extra.gin"
  gin.write_text("from __gin__ import dynamic_registration\nrealm.ModelConfig.dtype = 'auto'\n")
  r = _cli("finetune", "--gin_file", GIN, "--gin_file", str(gin), "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "gin configuration error" in r.stderr and "'realm' was not provided" in r.stderr
  assert not (tmp_path / "w").exists()


def test_unknown_gin_file_and_missing_question():
  r = _cli("finetune", "--gin_file", "nope.gin")
  assert r.returncode == 2 and "nope.gin" in r.stderr and "Traceback" not in r.stderr
  r = _cli("predict", "--gin_file", GIN)
  assert r.returncode == 2 and "question" in r.stderr


def test_convert_released_checkpoint(tmp_path):
  out = tmp_path / "converted"
  r = _cli("convert", "tests/fixtures/hf_realm/openqa", "--workdir", str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  assert (out / "realm_params.safetensors").exists() and (out / "realm_config.json").exists()
  r = _cli("convert", "--workdir", str(out))
  assert r.returncode == 2 and "checkpoint path" in r.stderr


def test_convert_error_is_one_line_and_writes_nothing(tmp_path):
  """Regression (issue #14): a checkpoint that does not load left a traceback and config.gin."""
  from safetensors.numpy import load_file, save_file
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  hf = json.loads((ROOT / "tests/fixtures/hf_realm/encoder/config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
  tensors = load_file(str(ROOT / "tests/fixtures/hf_realm/encoder/model.safetensors"))
  tensors["cls.predictions.decoder.weight"] = tensors.pop("realm.embeddings.word_embeddings.weight")
  save_file(tensors, str(ckpt / "model.safetensors"))  # untied: the word embeddings are missing
  out = tmp_path / "converted"
  r = _cli("convert", str(ckpt), "--workdir", str(out))
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("realm-jax: error:")]
  assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1]
  assert errors[0].startswith(f"realm-jax: error: REALM checkpoint {ckpt / 'model.safetensors'} "
                              "does not match its config")
  assert "missing parameter 'realm.embeddings.word_embeddings.weight'" in errors[0]
  assert not out.exists()
  # An existing work directory is left as it was.
  out.mkdir()
  (out / "keep.txt").write_text("x")
  r = _cli("convert", str(ckpt), "--workdir", str(out))
  assert r.returncode == 2 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_version_and_help_of_every_command(capsys):
  import realm_jax
  with pytest.raises(SystemExit) as e:
    cli.run(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.startswith(f"realm-jax {realm_jax.__version__} ")
  with pytest.raises(SystemExit) as e:
    cli.run(["--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0 and all(f"    {command}" in out for command in cli.COMMANDS)
  for command in cli.COMMANDS:
    with pytest.raises(SystemExit) as e:
      cli.run([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: realm-jax {command} "), out
    assert "--gin_file" in out and "example: realm-jax" in out
  assert "QUESTION" in _cli("predict", "-h").stdout  # The console entry point too.


def test_command_line_errors_exit_2(capsys):
  for argv, message in ((["--workdir", "w", "main"], "the command comes first"),
                        (["train"], "invalid choice: 'train'"),
                        ([], "required: COMMAND"),
                        (["main", "stray"], "unrecognized arguments: stray")):
    with pytest.raises(SystemExit) as e:
      cli.run(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err, argv
  # Questions may stand before and after the options.
  args = cli.parse_args(["predict", "Q1", "--workdir", "w", "Q2"])
  assert args.command == "predict" and args.questions == ["Q1", "Q2"] and args.workdir == "w"


def test_second_run_in_a_workdir_reuses_its_compiled_steps(tmp_path, monkeypatch):
  """The console command keeps compiled programs in WORKDIR/compilation_cache; `evaluate` in the
  same work directory finds every program it needs there (no new cache entry appears).

  JAX keeps only programs that compiled in at least JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (the
  CLI's default 0.5 s, JAX's 1 s): the tiny test model's programs compile faster than that on a
  fast host (CI once missed jit_embed, once every `evaluate` program), so the threshold is 0 here."""
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  workdir = tmp_path / "run"
  r = _cli("finetune", "--gin_file", GIN, "--workdir", str(workdir))
  assert r.returncode == 0, r.stderr[-2000:]
  cache = workdir / "compilation_cache"
  first = {p.name for p in cache.iterdir()}
  kinds = {name.split("-")[0] for name in first}
  assert {"jit_guarded", "jit_eval_step", "jit_embed"} <= kinds, kinds  # train, eval, embed
  r = _cli("evaluate", "--gin_file", GIN, "--workdir", str(workdir))
  assert r.returncode == 0, r.stderr[-2000:]
  assert {p.name for p in cache.iterdir()} == first
  # A user's own cache location wins.
  own = tmp_path / "own_cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(own))
  r = subprocess.run([sys.executable, "-m", "realm_jax.cli", "evaluate", "--gin_file", GIN,
                      "--workdir", str(tmp_path / "other"), "--gin_param",
                      f"finetune.train_and_evaluate.init_from='{workdir}'"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert any(own.iterdir()) and not (tmp_path / "other" / "compilation_cache").exists()


def test_storage_errors_are_one_line_exit_2(monkeypatch, capsys):
  """A full disk, a read-only work directory or a checkpoint that could not be written ends the
  console command with its message (which names the path) and exit code 2; other OS errors keep
  their traceback."""
  import errno
  from realm_jax.training import checkpointing
  raised = [OSError(errno.ENOSPC, "No space left on device", "/w/summary.json"),
            PermissionError(errno.EACCES, "Permission denied", "/w/checkpoints"),
            checkpointing.CheckpointWriteError("checkpoint step 4 not written to /w/checkpoints")]
  for error in raised:
    def fail(*args, error=error, **kwargs):
      raise error
    monkeypatch.setattr(cli, "run", fail)
    assert cli.main(["finetune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"realm-jax: error: {error}", err
    assert "/w/" in err[0]
  def reset(*args, **kwargs):
    raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
  monkeypatch.setattr(cli, "run", reset)
  with pytest.raises(ConnectionResetError):
    cli.main(["finetune"])


def test_console_command_prints_the_jobs_info_log_lines(tmp_path):
  """Regression: importing the checkpointing module (orbax logs through absl at import) before the
  logging set-up left the console commands at WARNING, so a job's INFO lines (e.g. the index
  builder's "already written, skipped") never appeared."""
  script = (
      "import logging, sys\n"
      "from realm_jax import cli\n"
      "cli.configured = lambda module, function: (\n"
      "    lambda **kw: logging.getLogger('realm_jax.job').info('the job ran in %s', kw['workdir']))\n"
      f"sys.exit(cli.main(['finetune', '--gin_file', {GIN!r}, '--workdir', {str(tmp_path)!r}]))\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"INFO realm_jax.job: the job ran in {tmp_path}" in r.stderr, r.stderr[-2000:]


def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
  """The errors a user fixes end the console command with one line and exit code 2: a work
  directory reused with another corpus (for real), and each other kind the command reports."""
  from realm_jax import tokenization
  from realm_jax.models import checkpoint_import
  from realm_jax.retrieval import snapshot
  from realm_jax.retrieval import watcher
  workdir = tmp_path / "reused"
  snapshot.write_snapshot(workdir / "snapshots", 0, np.arange(3), np.ones((3, 4), np.float32),
                          "fingerprint-of-another-corpus")
  assert cli.main(["finetune", "--gin_file", GIN, "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()  # progress bars, then the error
  assert [line for line in err if "realm-jax: error" in line] == err[-1:], err
  assert err[-1].startswith(f"realm-jax: error: {workdir / 'snapshots' / '0'}: field "
                           "'corpus_fingerprint' is fingerprint")
  assert "built for another corpus" in err[-1]
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
  raised = [checkpoint_import.CheckpointMismatchError("ckpt/model.safetensors",
                                                     ["missing parameter 'a'", "shape of 'b'"]),
            tokenization.TokenizerError("vocab.txt:7: duplicate token 'the'"),
            watcher.IndexStalenessError("no index within 60 s: is the index builder running?"),
            snapshot.SnapshotError("snapshots/4: shard 2 checksum mismatch")]
  lines = []
  for error in raised:
    def fail(*args, error=error, **kwargs):
      raise error
    monkeypatch.setattr(cli, "run", fail)
    assert cli.main(["finetune"]) == 2, error
    lines += capsys.readouterr().err.strip().splitlines()
  assert lines == [  # the mismatch's parameter listing joined onto its one line
      "realm-jax: error: checkpoint ckpt/model.safetensors does not match the BERT config: "
      "missing parameter 'a'; shape of 'b'",
      *(f"realm-jax: error: {error}" for error in raised[1:])]
