"""The optional Weights & Biases writer of `training/metric_writer.py` (issue #15), off by default.

Two layers: a fake `wandb` module in `sys.modules` pins the contract (what is passed to
`wandb.init`, the exact dicts and steps given to `run.log`, `finish` at `close`, process 0 only, the
error when wandb is missing); the real wandb (the test extra) then runs offline into the work
directory and its transaction log (`run-ID.wandb`: LevelDB-log framed `wandb_internal_pb2.Record`s)
is read back to check the history rows it recorded.
"""

from __future__ import annotations

import glob
import json
import struct
import sys
import types
import uuid

import gin
import jax
import numpy as np
import pytest

from realm_jax import fileio
from realm_jax.training import metric_writer

ENV = metric_writer.WANDB_PROJECT_ENV
# wandb's own variables that would change what these tests see.
WANDB_VARS = ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_MODE", "WANDB_RUN_ID",
              "WANDB_RESUME", "WANDB_ENTITY")


class FakeRun:

  def __init__(self, **kwargs):
    self.init_kwargs = kwargs
    self.id = "fake-run"
    self.logged: list[tuple[dict, int]] = []
    self.finished = 0

  def log(self, data, step=None):
    assert self.finished == 0, "log after finish"
    self.logged.append((dict(data), step))

  def finish(self):
    self.finished += 1


@pytest.fixture
def clean_env(monkeypatch):
  for name in (ENV, *WANDB_VARS):
    monkeypatch.delenv(name, raising=False)
  gin.clear_config()
  yield monkeypatch
  gin.clear_config()


@pytest.fixture
def fake_wandb(clean_env):
  """A `wandb` module whose `init` returns a `FakeRun`; `module.runs` lists them."""
  module = types.ModuleType("wandb")
  module.runs = []

  def init(**kwargs):
    run = FakeRun(**kwargs)
    module.runs.append(run)
    return run

  module.init = init
  clean_env.setitem(sys.modules, "wandb", module)
  return module


# ------------------------------------------------------------------------------------------------
# The contract, with a fake wandb
# ------------------------------------------------------------------------------------------------


def test_off_by_default_and_not_by_plain_wandb_project(fake_wandb, tmp_path, monkeypatch):
  fake_wandb.init = None  # Calling it would fail: W&B must not start.
  monkeypatch.setenv("WANDB_PROJECT", "some-other-tool")
  writer = metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)
  assert writer.wandb_run is None
  writer.write(1, {"loss": 1.0}, prefix="train")
  writer.close()
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
  assert not (tmp_path / "run" / "wandb").exists()


def test_logs_the_tensorboard_tags_at_their_steps_and_finishes(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv(ENV, "realm-test")
  writer = metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)
  (run,) = fake_wandb.runs
  assert writer.wandb_run is run
  assert run.init_kwargs == {"project": "realm-test", "name": "run", "dir": str(tmp_path / "run"),
                             "config": {"workdir": str(tmp_path / "run")},
                             "reinit": "create_new"}
  writer.write(10, {"loss": np.float32(2.5), "gold_recall@5": 0.5}, prefix="train")
  writer.write(10, {"exact_match": 0.25}, prefix="eval")
  writer.write(20, {"perf/step_time_s": np.float64(0.125)})
  assert run.logged == [({"train/loss": 2.5, "train/gold_recall_at_5": 0.5}, 10),
                        ({"eval/exact_match": 0.25}, 10),
                        ({"perf/step_time_s": 0.125}, 20)]
  for data, step in run.logged:  # Plain Python numbers, not numpy scalars.
    assert type(step) is int and all(type(v) is float for v in data.values())
  assert run.finished == 0
  writer.close()
  assert run.finished == 1 and writer.wandb_run is None
  writer.close()  # A second close does nothing.
  assert run.finished == 1


def test_argument_overrides_the_environment(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv(ENV, "from-env")
  off = metric_writer.MetricWriter(str(tmp_path / "a"), enabled=True, wandb_project="")
  assert off.wandb_run is None and not fake_wandb.runs
  off.close()
  monkeypatch.delenv(ENV)
  on = metric_writer.MetricWriter(str(tmp_path / "b"), enabled=True, wandb_project="from-arg")
  assert [r.init_kwargs["project"] for r in fake_wandb.runs] == ["from-arg"]
  on.close()


def test_only_process_0_starts_a_run(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv(ENV, "realm-test")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metric_writer.MetricWriter(str(tmp_path / "run"))  # Default: enabled on process 0 only.
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert writer.wandb_run is None and not fake_wandb.runs
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer = metric_writer.MetricWriter(str(tmp_path / "run"))
  assert len(fake_wandb.runs) == 1
  writer.close()


def test_wandb_name_and_dir_from_the_environment_win(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv(ENV, "realm-test")
  monkeypatch.setenv("WANDB_NAME", "my-name")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
  gin.parse_config("REALM_TEST_MACRO = 3")
  writer = metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)
  (run,) = fake_wandb.runs
  assert "name" not in run.init_kwargs and "dir" not in run.init_kwargs  # wandb reads the env.
  assert "REALM_TEST_MACRO = 3" in run.init_kwargs["config"]["gin_config"]
  writer.close()


def test_url_workdir_leaves_the_wandb_dir_to_wandb(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv(ENV, "realm-test")
  monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(tmp_path / "cache"))
  url = f"memory://test-{uuid.uuid4().hex[:10]}/run"
  try:
    writer = metric_writer.MetricWriter(url, enabled=True)
    writer.write(1, {"loss": 1.0})
    writer.close()
  finally:
    fileio.rmtree(url.rsplit("/", 1)[0])
  (run,) = fake_wandb.runs
  assert "dir" not in run.init_kwargs and run.init_kwargs["name"] == "run"
  assert run.init_kwargs["config"]["workdir"] == url
  assert run.logged == [({"loss": 1.0}, 1)] and run.finished == 1


def test_run_is_finished_when_closing_tensorboard_fails(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv(ENV, "realm-test")
  writer = metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)
  tensorboard = writer._writer  # pylint: disable=protected-access

  def broken_close():
    raise OSError("disk full")

  monkeypatch.setattr(tensorboard, "close", broken_close)
  with pytest.raises(OSError, match="disk full"):
    writer.close()
  assert fake_wandb.runs[0].finished == 1


def test_missing_wandb_names_the_extra(clean_env, tmp_path):
  clean_env.setenv(ENV, "realm-test")
  clean_env.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
  with pytest.raises(ImportError, match=r"wandb is not installed: pip install 'realm-jax\[wandb\]'"
                     r" \(or unset REALM_JAX_WANDB_PROJECT\)"):
    metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)
  # Off, wandb is never imported: the missing package does not matter.
  clean_env.delenv(ENV)
  metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True).close()


def test_a_wandb_folder_shadowing_the_package_is_reported(clean_env, tmp_path):
  clean_env.setenv(ENV, "realm-test")
  namespace = types.ModuleType("wandb")
  namespace.__path__ = [str(tmp_path / "wandb")]  # What `import wandb` gives for a bare ./wandb/.
  clean_env.setitem(sys.modules, "wandb", namespace)
  with pytest.raises(ImportError, match="not the wandb package"):
    metric_writer.MetricWriter(str(tmp_path / "run"), enabled=True)


# ------------------------------------------------------------------------------------------------
# The real wandb, offline
# ------------------------------------------------------------------------------------------------


def _read_records(path: str) -> list:
  """The `wandb_internal_pb2.Record`s of a `run-ID.wandb` transaction log.

  The file is a 7-byte header (`:W&B`, magic 0xBEE1, version 0) and LevelDB log blocks of 32 KiB:
  chunks of `crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)`.
  """
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
  block, pos, pending, records = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # Block trailer padding.
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
    elif kind not in (2, 3):
      assert kind == 0 and length == 0, (pos, kind, length)  # Zero padding.
  return records


def test_real_wandb_offline_records_the_scalars(clean_env, tmp_path):
  pytest.importorskip("wandb", reason="wandb is in the test extra: pip install -e '.[test]'")
  for name, value in {ENV: "realm-jax-test", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                      "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                      "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                      "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
    clean_env.setenv(name, value)
  workdir = tmp_path / "run"
  writer = metric_writer.MetricWriter(str(workdir), enabled=True)
  run_id = writer.wandb_run.id
  writer.write(10, {"loss": 2.5, "gold_recall@5": 0.5}, prefix="train")
  writer.write(10, {"exact_match": 0.25}, prefix="eval")
  writer.write(20, {"loss": np.float32(1.5)}, prefix="train")
  writer.close()

  (path,) = glob.glob(str(workdir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
  records = _read_records(path)
  kinds = [r.WhichOneof("record_type") for r in records]
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert run.project == "realm-jax-test" and run.display_name == "run"
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert config["workdir"] == str(workdir)
  history = {}
  for record in records:
    if record.WhichOneof("record_type") == "history":
      row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
             for i in record.history.item}
      history[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
  assert history == {10: {"train/loss": 2.5, "train/gold_recall_at_5": 0.5,
                          "eval/exact_match": 0.25},
                     20: {"train/loss": 1.5}}
  assert "exit" in kinds  # finish() ran: the run was closed.
