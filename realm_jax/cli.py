"""`realm-jax COMMAND --gin_file … --gin_param … --workdir …`: parse, bind, call.

Commands and the top-level function each one calls (the only gin-configured functions):
  main           the CPU demo on the embedded SQuAD data (experiments/cpu/squad_minilm.gin)
  finetune       training.finetune.train_and_evaluate   (Open-QA fine-tuning, REALM §3.4)
  evaluate       the same with num_train_steps=0         (restores WORKDIR's newest checkpoint)
  predict        predict.predict                        (question → answer + evidence)
  serve          serve.serve                            (predict.Predictor over HTTP + a web page)
  pretrain       training.pretrain.train                (REALM pre-training, §3.4)
  ict            training.ict.train                     (ICT warm start, ORQA §5)
  index-builder  index_builder.run                      (asynchronous index refresh, §3.4)
  convert PATH   convert.convert_released_checkpoint
                 (a released Hugging Face REALM checkpoint → WORKDIR params + block-embedding snapshot)
The resolved configuration is written to `WORKDIR/config.gin`. `realm-jax COMMAND --help` describes
one command; gin files are looked up in the current directory, then among the experiment files that
ship with realm_jax (`experiments/` of the checkout, or the installed package's copy).
"""

from __future__ import annotations

import argparse
import importlib
import errno
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import realm_jax
from realm_jax.data import resources

# The checkout this module belongs to (for checkout-only tools); gin files and the embedded data are
# found through `resources.root()`, which also serves an installed wheel.
PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENT = "experiments/cpu/squad_minilm.gin"

# command → (module, function, gin files always parsed first)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "main": ("realm_jax.training.finetune", "train_and_evaluate", (DEFAULT_EXPERIMENT,)),
    "finetune": ("realm_jax.training.finetune", "train_and_evaluate", ()),
    "evaluate": ("realm_jax.training.finetune", "train_and_evaluate", ()),
    "predict": ("realm_jax.predict", "predict", ()),
    "serve": ("realm_jax.serve", "serve", ()),
    "pretrain": ("realm_jax.training.pretrain", "train", ()),
    "ict": ("realm_jax.training.ict", "train", ()),
    "index-builder": ("realm_jax.index_builder", "run", ()),
    "convert": ("realm_jax.convert", "convert_released_checkpoint", ()),
}


class UsageError(Exception):
  """A problem with the command line or an input file, reported without a traceback."""


# command → (one-line summary, what `realm-jax COMMAND --help` adds: details and an example)
COMMAND_HELP: dict[str, tuple[str, str]] = {
    "main": ("the CPU demo: SQuAD-open end to end on the embedded data",
             f"= `realm-jax finetune --gin_file {DEFAULT_EXPERIMENT}`; further --gin_file and\n"
             "--gin_param are applied after it.\n\n"
             "example: realm-jax main --workdir workdirs/squad_minilm"),
    "finetune": ("Open-QA fine-tuning (REALM §3.4): training.finetune.train_and_evaluate",
                 "Resumes from WORKDIR's newest checkpoint.\n\n"
                 "example: realm-jax finetune --gin_file experiments/cpu/squad_minilm.gin \\\n"
                 "           --gin_param TRAIN_STEPS=100 --workdir workdirs/ft"),
    "evaluate": ("evaluate WORKDIR's newest checkpoint (finetune with num_train_steps=0)",
                 "example: realm-jax evaluate --gin_file experiments/cpu/squad_minilm.gin \\\n"
                 "           --workdir workdirs/ft"),
    "predict": ("answer questions with a trained WORKDIR: predict.predict",
                "Reads WORKDIR/config.gin unless --gin_file is given.\n\n"
                "example: realm-jax predict --workdir workdirs/squad_minilm \"Who wrote Hamlet?\""),
    "serve": ("serve WORKDIR's Predictor over HTTP: a JSON endpoint and a page showing the answer "
              "and its evidence: serve.serve",
              "Reads WORKDIR/config.gin unless --gin_file is given; needs the serve extra\n"
              "(aiohttp). POST /api/answer {\"question\": ..., \"top_k\": ...} answers with JSON;\n"
              "GET / is the page.\n\n"
              "example: realm-jax serve --workdir workdirs/squad_minilm --port 8000"),
    "pretrain": ("REALM pre-training (§3.4): training.pretrain.train",
                 "example: realm-jax pretrain --gin_file experiments/cpu/pretrain_minilm.gin"),
    "ict": ("ICT warm start of the retriever (ORQA §5): training.ict.train",
            "example: realm-jax ict --gin_file experiments/cpu/ict_minilm.gin"),
    "index-builder": ("the asynchronous index refresh job (§3.4): index_builder.run",
                      "Runs beside `pretrain` with the same WORKDIR and gin files.\n\n"
                      "example: realm-jax index-builder --gin_file "
                      "experiments/cpu/pretrain_async_minilm.gin --workdir W"),
    "convert": ("a released Hugging Face REALM checkpoint -> WORKDIR params + block-embedding "
                "snapshot: convert.convert_released_checkpoint",
                "CHECKPOINT is a local copy of a Hugging Face Hub REALM repository, e.g.\n"
                "google/realm-orqa-nq-openqa (`huggingface-cli download\n"
                "google/realm-orqa-nq-openqa --local-dir realm-orqa-nq`).\n\n"
                "example: realm-jax convert realm-orqa-nq --workdir workdirs/orqa_nq"),
}


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
  """The options every command takes."""
  p.add_argument("--workdir", default=None,
                 help="run directory (local or gs://); default workdirs/<experiment name>")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin file (repeatable): a path, a URL, or a shipped experiments/ file")
  p.add_argument("--gin_param", action="append", default=[],
                 help="gin binding, e.g. 'TRAIN_STEPS=10' or "
                      "'loop.LoopConfig.log_every_steps=1' (repeatable)")
  p.add_argument("--log_level", default="INFO", help="Python logging level (default INFO)")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The `realm-jax` parser (`--help`, `--version`, the command list) and one parser per command."""
  top = argparse.ArgumentParser(prog="realm-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  top.add_argument("--version", action="version",
                   version=f"%(prog)s {realm_jax.__version__} (Python {sys.version.split()[0]})")
  sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           title="commands (`realm-jax COMMAND --help` for one)")
  parsers = {}
  for name in COMMANDS:
    summary, details = COMMAND_HELP[name]
    p = sub.add_parser(name, help=summary, description=f"realm-jax {name}: {summary}.",
                       epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    if name == "predict":
      p.add_argument("questions", nargs="*", metavar="QUESTION", help="the questions to answer")
    elif name == "convert":
      p.add_argument("questions", nargs="*", metavar="CHECKPOINT",
                     help="the released checkpoint's directory (config.json + weights)")
    elif name == "serve":
      p.set_defaults(questions=[])
      p.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
      p.add_argument("--port", type=int, default=8000,
                     help="port to listen on (default 8000; 0 picks a free one, printed)")
    else:
      p.set_defaults(questions=[])
    _add_common_arguments(p)
    parsers[name] = p
  return top, parsers


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses `realm-jax COMMAND …` (the command first; its questions may come between the options).

  `--help` and `--version` print and exit (SystemExit 0); a bad command line exits with status 2.
  """
  argv = list(argv)
  top, parsers = _parsers()
  if not argv or argv[0] not in parsers:
    if any(a in parsers for a in argv) and not {"-h", "--help", "--version"} & set(argv):
      top.error("the command comes first: realm-jax COMMAND [options]")
    top.parse_args(argv)  # --help, --version, or an error naming the commands: all exit here
    top.error("the command comes first: realm-jax COMMAND [options]")
  args = parsers[argv[0]].parse_intermixed_args(argv[1:])
  args.command = argv[0]
  return args


def _resolve_gin_file(name: str) -> str:
  """The gin file `name`: a URL as is (it must exist), else found in the cwd or `resources.root()`.

  Raises:
    UsageError: naming the file if it is not found.
  """
  from realm_jax import fileio
  if "://" in name and fileio.is_url(name):
    if not fileio.isfile(name):
      raise UsageError(f"gin file not found: {name}")
    return name
  for base in (pathlib.Path.cwd(), resources.root()):
    candidate = base / name
    if candidate.is_file():
      return str(candidate)
  raise UsageError(f"gin file not found: {name} (looked in {pathlib.Path.cwd()} and "
                   f"{resources.root()})")


def _is_url_file(path: str) -> bool:
  """True for an existing file behind a URL (`gs://…/config.gin`); False for anything else."""
  from realm_jax import fileio
  try:
    return fileio.is_url(path) and fileio.isfile(path)
  except (ValueError, ImportError, OSError):
    return False


def _open_url_text(path: str):
  """Opens a gin file behind a URL for reading (text), through `realm_jax.fileio`."""
  from realm_jax import fileio
  return fileio.open_file(path, "r", encoding="utf-8")


def _register_url_gin_reader() -> None:
  """Lets gin parse files behind URLs (e.g. `gs://bucket/run/config.gin`) through fileio."""
  import gin
  gin.config.register_file_reader(_open_url_text, _is_url_file)


def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
  """Parses gin files (includes resolve against the cwd, then `resources.root()`) and bindings.

  Raises:
    UsageError: naming the file and the offending line on a gin error.
  """
  import gin
  gin.clear_config()
  _register_url_gin_reader()
  gin.add_config_file_search_path(str(resources.root()))
  files = [_resolve_gin_file(f) for f in gin_files]
  try:
    gin.parse_config_files_and_bindings(files, gin_params, finalize_config=False)
  except (ValueError, SyntaxError, KeyError, ImportError, NameError) as e:
    # NameError: a dynamic-registration file binds a module it does not import itself.
    raise UsageError(f"gin configuration error: {e}") from e


def enable_compilation_cache(workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `WORKDIR/compilation_cache` (local work dirs).

  A second run in the same work directory (a resume after preemption, `evaluate`, `predict`)
  then loads its compiled train, eval and embedding steps instead of compiling them again. A cache
  set by the user (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is kept; URL work directories get
  none (each host compiles locally; set `JAX_COMPILATION_CACHE_DIR` to a local path to have one).
  Programs that compiled in under 0.5 s are not kept unless the user set
  `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` (JAX's own default is 1 s).

  Returns:
    The cache directory in use, or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if "://" in workdir:
    return None
  cache = os.path.join(workdir, "compilation_cache")
  os.makedirs(cache, exist_ok=True)  # Local by the check above (JAX's cache needs a local path).
  jax.config.update("jax_compilation_cache_dir", cache)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return cache


def default_workdir(command: str, gin_files: Sequence[str]) -> str:
  name = pathlib.Path(gin_files[-1]).stem if gin_files else command
  return str(pathlib.Path("workdirs") / name)


def configured(module: str, function: str) -> Callable[..., Any]:
  """The gin-configured version of `module.function`."""
  import gin
  fn = getattr(importlib.import_module(module), function)
  try:
    return gin.get_configurable(fn)
  except ValueError:  # no gin file registered it: nothing is bound, call it as it is
    return fn


def write_config(workdir: str, name: str = "config.gin") -> None:
  """Writes the resolved gin configuration to `WORKDIR/<name>` (atomically; local or gs://)."""
  import gin
  from realm_jax import fileio
  fileio.makedirs(workdir)
  fileio.write_atomic(fileio.join(workdir, name), gin.config_str())


def configure_logging(level: str) -> None:
  """Root logging at `level` (e.g. "INFO") to stderr, unless the process configured it already.

  Must run before anything logs: a first message through `logging.log` (absl does that, e.g. when
  orbax is imported) installs Python's default WARNING handler, and `basicConfig` is a no-op after.
  """
  logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(argv: Sequence[str], compilation_cache: bool = False) -> Any:
  """Parses `argv` (without the program name) and runs the command; returns its result.

  With `compilation_cache` (the console entry point's setting) compiled steps persist in
  `WORKDIR/compilation_cache` (`enable_compilation_cache`). In-process callers (tests, notebooks)
  keep JAX's process-wide setting as it is.
  """
  args = parse_args(argv)
  configure_logging(args.log_level)
  module, function, preset = COMMANDS[args.command]
  gin_files = list(preset) + list(args.gin_file)
  workdir = args.workdir
  if args.command in ("predict", "serve") and workdir and not args.gin_file:
    from realm_jax import fileio
    cfg = str(fileio.join(workdir, "config.gin"))  # Local or gs://.
    if not fileio.isfile(cfg):
      raise UsageError(f"{cfg} not found: run `realm-jax main` or `finetune` with this workdir "
                       "first, or pass --gin_file")
    gin_files = [cfg]
  if not gin_files and args.command not in ("main", "convert"):
    raise UsageError(f"`realm-jax {args.command}` needs --gin_file (see experiments/)")
  workdir = workdir or default_workdir(args.command, gin_files)
  if "://" not in workdir:  # local work directories are used as absolute paths (orbax needs them)
    workdir = os.path.abspath(workdir)
  params = list(args.gin_param)
  if args.command == "serve":  # The Predictor parses the configuration itself, once.
    from realm_jax import serve  # pylint: disable=g-import-not-at-top
    try:
      return serve.serve(workdir, host=args.host, port=args.port, gin_files=gin_files,
                         gin_params=params)
    except serve.BindError as e:
      raise UsageError(str(e)) from e
  parse_gin(gin_files, params)
  if compilation_cache and args.command != "convert":  # convert compiles nothing worth keeping
    enable_compilation_cache(workdir)
  fn = configured(module, function)
  kwargs: dict[str, Any] = {"workdir": workdir}
  if args.command == "evaluate":  # No steps; the gin file's other loop settings do not matter.
    from realm_jax.training import loop  # pylint: disable=g-import-not-at-top
    kwargs["loop"] = loop.LoopConfig(num_train_steps=0)
  if args.command == "predict":
    if not args.questions:
      raise UsageError("predict needs at least one question, e.g. realm-jax predict "
                       "--workdir W \"Who wrote Hamlet?\"")
    kwargs["questions"] = args.questions
  if args.command == "convert":
    if len(args.questions) != 1:
      raise UsageError("convert needs one checkpoint path: realm-jax convert PATH --workdir W")
    kwargs["checkpoint"] = args.questions[0]
  if args.command == "index-builder":  # shares WORKDIR with the trainer: its own file
    write_config(workdir, "config-index-builder.gin")
  elif args.command not in ("predict", "convert"):
    write_config(workdir)
  if args.command == "convert":  # config.gin only once converted: a failure writes nothing
    try:
      result = fn(**kwargs)
    except ValueError as e:  # CheckpointMismatchError, unsupported config.json, unreadable file
      message = str(e).split("\n  In call to configurable")[0]
      raise UsageError(message.replace(":\n  ", ": ", 1).replace("\n  ", "; ")) from e
    write_config(workdir)
  else:
    result = fn(**kwargs)
  if args.command in ("main", "evaluate"):  # The same summary table for both.
    from realm_jax import reporting
    print(reporting.format_summary(result))
  elif args.command == "predict":
    from realm_jax import reporting
    print(reporting.format_predictions(result))
  return result


# Storage errors a user fixes outside the program (space, quota, permissions, read-only mounts).
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                             errno.EPERM})


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point: exit code 0 on success, 2 with a one-line message on bad input."""
  argv = list(sys.argv[1:] if argv is None else argv)
  # Logging first: importing checkpointing (orbax, absl) below would otherwise leave the job's INFO
  # lines (progress, refreshes, resumed shards) unprinted.
  configure_logging(parse_args(argv).log_level)
  from realm_jax import tokenization
  from realm_jax.data import corpus as corpus_lib
  from realm_jax.models import checkpoint_import
  from realm_jax.retrieval import snapshot
  from realm_jax.retrieval import watcher
  from realm_jax.training import checkpointing
  # Errors a user can fix (their message names the file, field or setting): one line, exit code 2.
  known_errors: tuple[type[BaseException], ...] = (
      UsageError, FileNotFoundError, corpus_lib.DataFormatError, snapshot.SnapshotError,
      checkpoint_import.CheckpointMismatchError, tokenization.TokenizerError,
      watcher.IndexStalenessError, checkpointing.CheckpointWriteError)
  try:
    run(argv, compilation_cache=True)
  except known_errors as e:
    print(f"realm-jax: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except OSError as e:  # A full disk or a read-only work directory: the message names the path.
    if e.errno not in _STORAGE_ERRNOS:
      raise
    print(f"realm-jax: error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


def _one_line(error: BaseException) -> str:
  """The error's message on one line: without the "\n  In call to configurable '…'" that gin
  appends inside a configurable, and with a listing ("…config:\n  a\n  b", as
  CheckpointMismatchError writes it) joined as "…config: a; b"."""
  message = str(error).split("\n  In call to configurable")[0]
  message = message.replace(":\n  ", ": ", 1).replace("\n  ", "; ")
  return " ".join(message.splitlines())


if __name__ == "__main__":
  sys.exit(main())
