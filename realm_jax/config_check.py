"""`python -m realm_jax.config_check`: checks a run configuration here, before it reaches a TPU worker.

`tpu/launch.sh` calls it before it starts anything, so that a configuration that would fail on every
worker (a `%gin.REQUIRED` macro left unbound, a malformed bucket path, a local path the workers cannot
read) stops on this machine with one line per problem:

  python -m realm_jax.config_check --gin_file experiments/paper/finetune_nq.gin \
      --gin_param "WIKIPEDIA=('gs://my-bucket/wiki/enwiki-20181220-*.jsonl',)" ... \
      [--workdir gs://my-bucket/realm_jax/run] [--require_bucket] [--stage BERT_BASE_DIR]

What it checks:
  * the gin files and bindings parse, exactly as `realm-jax` parses them (`cli.parse_gin`: the same
    include search path, the same imports; so it imports the modules the gin files name, which takes
    about a second);
  * every `%gin.REQUIRED` is overridden, and every macro that a binding uses (`%NAME`) is bound;
  * every string of the configuration, and the work directory, that starts like a bucket path is a
    well-formed `gs://BUCKET/PATH`: a valid bucket name, two slashes, no whitespace, no `//` inside
    the path, no `<placeholder>` left in it;
  * with `--require_bucket` (the workers read the paths, not this machine), the path macros of
    `PATH_MACROS` are `gs://` paths.
With `--stage NAME`, a macro whose value is a `gs://` directory is printed on stdout as
`stage NAME=gs://…` for `tpu/worker.sh start --stage` to copy to every worker.

Exit status: 0 when the configuration is fine, 1 with one `error: …` line per problem on stderr,
2 on a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys
from typing import Any, Iterator, Sequence

from realm_jax import cli
from realm_jax.data import resources


@dataclasses.dataclass(frozen=True)
class PathMacro:
  """A macro of the experiment files that names files or directories.

  Attributes:
    what: what the path holds.
    example: a gin value in the expected bucket layout (what `--gin_param NAME=<example>` takes).
    empty_ok: whether `''` is a valid value (INIT_FROM: start from the pretrained BERT).
  """
  what: str
  example: str
  empty_ok: bool = False


# The path macros of experiments/ (models/bert_base.gin and the paper files). The README section
# "Cloud TPU: path macros and bucket layout" documents the same table.
PATH_MACROS: dict[str, PathMacro] = {
    "BERT_BASE_DIR": PathMacro(
        "a Hugging Face bert-base-uncased directory (config.json, model.safetensors, vocab.txt)",
        "'gs://BUCKET/models/bert-base-uncased'"),
    "WIKIPEDIA": PathMacro(
        "the knowledge corpus: JSONL pages {\"title\", \"text\"}, paths or glob patterns",
        "('gs://BUCKET/wiki/enwiki-20181220-*.jsonl',)"),
    "CC_NEWS": PathMacro(
        "the CC-News pre-training corpus: JSONL articles {\"title\", \"text\"}, paths or glob patterns",
        "('gs://BUCKET/ccnews/ccnews-*.jsonl',)"),
    "TRAIN_QUESTIONS": PathMacro(
        "the training questions (a path or a glob pattern)",
        "'gs://BUCKET/openqa/NQ-open.train.jsonl'"),
    "EVAL_QUESTIONS": PathMacro(
        "the evaluation questions (a path or a glob pattern)",
        "'gs://BUCKET/openqa/NQ-open.dev.jsonl'"),
    "INIT_FROM": PathMacro(
        "the work directory to start from (the ICT or pre-training run), or a converted checkpoint",
        "'gs://BUCKET/realm_jax/RUN'", empty_ok=True),
}

# GCS bucket names: https://cloud.google.com/storage/docs/buckets#naming
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_IP_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
# What a value that is meant to be a bucket path starts with: gs:…, GS:…, gcs:… (any slashes).
_BUCKET_LIKE_RE = re.compile(r"^\s*(gs|gcs):", re.IGNORECASE)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_REQUIRED_DECL_RE = r"^\s*{}\s*=\s*%gin\.REQUIRED\b"
_INCLUDE_RE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem of a configuration: where it is (a file, a macro, a flag) and what is wrong."""
  where: str
  message: str

  def __str__(self) -> str:
    return f"{self.where}: {self.message}"


@dataclasses.dataclass
class CheckResult:
  """What `check` found.

  Attributes:
    problems: one entry per problem, in the order found (empty: the configuration is fine).
    staged: macro name → `gs://` directory, for the `stage` macros whose value is one.
  """
  problems: list[Problem] = dataclasses.field(default_factory=list)
  staged: dict[str, str] = dataclasses.field(default_factory=dict)


def bucket_name_problem(bucket: str) -> str | None:
  """Why `bucket` is not a valid Cloud Storage bucket name, or None when it is one.

  Args:
    bucket: the bucket part of a `gs://BUCKET/PATH` URL.
  """
  rule = ("3-63 lower-case letters, digits, '-', '_' and '.', starting and ending with a letter or "
          "digit")
  if not bucket:
    return "the bucket name is empty"
  if not _BUCKET_RE.match(bucket) or len(bucket) < 3:
    return f"'{bucket}' is not a valid bucket name ({rule})"
  if len(bucket) > (222 if "." in bucket else 63) or any(len(p) > 63 for p in bucket.split(".")):
    return f"'{bucket}' is not a valid bucket name (too long: {rule})"
  if ".." in bucket or _IP_RE.match(bucket):
    return f"'{bucket}' is not a valid bucket name (no '..', not an IP address)"
  if bucket.startswith("goog") or "google" in bucket:
    return f"'{bucket}' is not a valid bucket name (no 'goog' prefix, no 'google' in it)"
  return None


def gcs_url_problem(url: str) -> str | None:
  """Why `url` is not a well-formed `gs://BUCKET[/PATH]` URL, or None when it is one.

  Args:
    url: a string that should be a Cloud Storage path (glob characters in PATH are allowed).
  """
  if any(c.isspace() for c in url):
    return "contains whitespace (a comment inside the quotes?)"
  match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):(/*)(.*)$", url)
  if not match:
    return "is not a gs://BUCKET/PATH URL"
  scheme, slashes, rest = match.groups()
  if scheme != "gs":
    return f"starts with '{scheme}:': write gs://BUCKET/PATH"
  if len(slashes) != 2:
    return f"has {len(slashes)} slash(es) after 'gs:': write gs://BUCKET/PATH"
  bucket, _, path = rest.partition("/")
  problem = bucket_name_problem(bucket)
  if problem:
    return problem
  if "//" in path:
    return "has an empty path component ('//')"
  if "<" in url or ">" in url:
    return "still has a <placeholder> in it"
  return None


# ----------------------------------------------------------------------------------------------------
# Walking the parsed gin configuration
# ----------------------------------------------------------------------------------------------------


def _config() -> dict[tuple[str, str], dict[str, Any]]:
  """Every binding gin holds: (scope, selector) → {parameter: value}; macros are (NAME, 'gin.macro')."""
  from gin import config as gin_config
  return gin_config._CONFIG  # pylint: disable=protected-access  # gin has no public enumeration


def _is_reference(value: Any) -> bool:
  from gin import config as gin_config
  return isinstance(value, gin_config.ConfigurableReference)


def _macro_name(ref: Any) -> str | None:
  """`NAME` for a `%NAME` reference, None for anything else."""
  return "/".join(ref.scopes) if ref.selector == "gin.macro" else None


def _is_required(value: Any) -> bool:
  return _is_reference(value) and value.scoped_selector == "gin.REQUIRED/gin.constant"


def _leaves(value: Any) -> Iterator[Any]:
  """The non-container values inside `value` (tuples, lists and dicts are walked)."""
  if isinstance(value, (tuple, list)):
    for v in value:
      yield from _leaves(v)
  elif isinstance(value, dict):
    for k, v in value.items():
      yield from _leaves(k)
      yield from _leaves(v)
  else:
    yield value


def _binding_name(scope: str, selector: str, param: str) -> str:
  if selector == "gin.macro":
    return scope
  name = ".".join(selector.split(".")[-2:])  # realm_jax.training.finetune.X → finetune.X
  return f"{scope + '/' if scope else ''}{name}.{param}"


_UNBOUND = object()


def _resolve(value: Any, seen: tuple[str, ...] = ()) -> Any:
  """`value` with its `%MACRO` references replaced by their values (`_UNBOUND` if never bound).

  `@configurable()` references are left as they are (never called); `%gin.REQUIRED` stays a reference.
  """
  if isinstance(value, tuple):
    return tuple(_resolve(v, seen) for v in value)
  if isinstance(value, list):
    return [_resolve(v, seen) for v in value]
  if _is_reference(value):
    name = _macro_name(value)
    if name is not None:
      if name in seen:
        return _UNBOUND
      bound = _config().get((name, "gin.macro"), {})
      return _resolve(bound["value"], seen + (name,)) if "value" in bound else _UNBOUND
  return value


def _macro_value(name: str) -> Any:
  """The resolved value of macro `name`; `_UNBOUND` when the configuration does not bind it."""
  bound = _config().get((name, "gin.macro"), {})
  return _resolve(bound["value"], (name,)) if "value" in bound else _UNBOUND


# ----------------------------------------------------------------------------------------------------
# Where a binding comes from (for the messages)
# ----------------------------------------------------------------------------------------------------


def _display(path: str) -> str:
  if "://" in path:
    return path
  p = pathlib.Path(path).resolve()
  for base in (pathlib.Path.cwd(), resources.root()):  # The CLI's gin lookup order.
    try:
      return str(p.relative_to(base))
    except ValueError:
      continue
  return str(p)


def _gin_file_order(gin_files: Sequence[str]) -> list[tuple[str, str | None]]:
  """(file, the file that includes it or None) in parse order, includes at their place."""
  out: list[tuple[str, str | None]] = []

  def visit(name: str, parent: str | None, depth: int) -> None:
    try:
      path = cli._resolve_gin_file(name)  # pylint: disable=protected-access  # the CLI's own lookup
    except cli.UsageError:
      return
    out.append((path, parent))
    if depth > 20 or "://" in path:  # a gin file behind a URL: its includes are not followed here
      return
    for line in pathlib.Path(path).read_text().splitlines():
      match = _INCLUDE_RE.match(line)
      if match:
        visit(match.group(1), path, depth + 1)

  for f in gin_files:
    visit(f, None, 0)
  return out


def _declared_in(name: str, gin_files: Sequence[str], gin_params: Sequence[str]) -> str:
  """The gin file (or `--gin_param`) whose `NAME = %gin.REQUIRED` is the one in force."""
  pattern = re.compile(_REQUIRED_DECL_RE.format(re.escape(name)), re.MULTILINE)
  where = "the gin files"
  for path, parent in _gin_file_order(gin_files):
    if "://" not in path and pattern.search(pathlib.Path(path).read_text()):
      where = _display(path) + (f" (included by {_display(parent)})" if parent else "")
  if any(pattern.search(p) for p in gin_params):
    where = "--gin_param"
  return where


def _bound_by_param(name: str, gin_params: Sequence[str]) -> bool:
  pattern = re.compile(rf"^\s*{re.escape(name)}\s*=", re.MULTILINE)
  return any(pattern.search(p) for p in gin_params)


def _hint(name: str) -> str:
  macro = PATH_MACROS.get(name)
  if macro is None:
    return f"bind it with --gin_param '{name}=...'"
  return f"bind it, e.g. --gin_param \"{name}={macro.example}\" ({name}: {macro.what})"


# ----------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def check(gin_files: Sequence[str], gin_params: Sequence[str] = (), *, workdir: str | None = None,
          require_bucket: bool = False, stage: Sequence[str] = ()) -> CheckResult:
  """Parses the configuration like `realm-jax` does and lists what would fail on the workers.

  Args:
    gin_files: the gin files, in order (relative to the working directory or the project root).
    gin_params: the gin bindings, in order (`NAME=VALUE`).
    workdir: the run's work directory, checked when it looks like a bucket path.
    require_bucket: the path macros of `PATH_MACROS` must be `gs://` paths (the paths are read on
      TPU workers, which do not have this machine's files).
    stage: macro names whose `gs://` value should be copied to every worker (`CheckResult.staged`).

  Returns:
    A `CheckResult`; its `problems` is empty when the configuration is fine.

  Raises:
    Nothing for a bad configuration: every problem is a `Problem` of the result.
  """
  result = CheckResult()
  problems = result.problems
  if workdir is not None and _BUCKET_LIKE_RE.match(workdir):
    problem = gcs_url_problem(workdir)
    if problem:
      problems.append(Problem("--workdir", f"'{workdir}': {problem}"))
  try:
    cli.parse_gin(gin_files, gin_params)
  except cli.UsageError as e:
    message = _one_line(e)
    if isinstance(e.__cause__, ImportError):
      message += (f" (the gin files import modules that {sys.executable} cannot import: install "
                  "realm_jax in it, e.g. `make install`, or choose another python)")
    problems.append(Problem(", ".join(gin_files), message))
    return result
  except Exception as e:  # pylint: disable=broad-except  # gin raises many kinds; report, don't crash
    problems.append(Problem(", ".join(gin_files), f"gin configuration error: {_one_line(e)}"))
    return result

  config = _config()
  for (scope, selector), params in sorted(config.items()):
    for param, value in params.items():
      key = _binding_name(scope, selector, param)
      for leaf in _leaves(value):
        if _is_required(leaf):
          if selector == "gin.macro":
            where = _declared_in(scope, gin_files, gin_params)
            problems.append(Problem(where, f"{scope} = %gin.REQUIRED is not bound: {_hint(scope)}"))
          else:
            problems.append(Problem(key, "is %gin.REQUIRED and not bound"))
        elif _is_reference(leaf):
          name = _macro_name(leaf)
          if name is not None and "value" not in config.get((name, "gin.macro"), {}):
            problems.append(Problem(key, f"uses macro %{name}, which is never bound: {_hint(name)}"))
        elif isinstance(leaf, str) and _BUCKET_LIKE_RE.match(leaf):
          problem = gcs_url_problem(leaf)
          if problem:
            origin = " (from --gin_param)" if _bound_by_param(key, gin_params) else ""
            problems.append(Problem(key, f"'{leaf}'{origin}: {problem}"))

  if require_bucket:
    for name, macro in PATH_MACROS.items():
      value = _macro_value(name)
      if value is _UNBOUND:
        continue
      for leaf in _leaves(value):
        if not isinstance(leaf, str) or _BUCKET_LIKE_RE.match(leaf):
          continue  # references are reported above, bucket paths checked above
        if leaf == "" and macro.empty_ok:
          continue
        if _URL_RE.match(leaf):
          problems.append(Problem(name, f"'{leaf}' is not a gs:// path: the TPU workers read "
                                  f"{name} from Cloud Storage (e.g. {name}={macro.example})"))
        else:
          problems.append(Problem(
              name, f"'{leaf}' is a local path, but the TPU workers read {name}: put it in the "
              f"bucket (e.g. {name}={macro.example}), or launch with --allow-local-paths if every "
              "worker has it"))

  for name in stage:
    value = _macro_value(name)
    if value is _UNBOUND or _is_reference(value) or value in ("", None):
      continue
    if not isinstance(value, str):
      problems.append(Problem(name, f"can only stage a directory given as one string, not {value!r}"))
    elif value.startswith("gs://") and gcs_url_problem(value) is None:
      if any(c in value for c in "*?["):
        problems.append(Problem(name, f"'{value}' is a glob pattern: a directory to stage is one path"))
      else:
        result.staged[name] = value.rstrip("/")
  return result


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m realm_jax.config_check", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable, in order)")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable, in order)")
  p.add_argument("--workdir", default=None, help="the run's work directory")
  p.add_argument("--require_bucket", action="store_true",
                 help="the path macros must be gs:// paths (the TPU workers read them)")
  p.add_argument("--stage", action="append", default=[], metavar="MACRO",
                 help="print `stage MACRO=gs://...` when MACRO is a gs:// directory (repeatable)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point.

  Args:
    argv: the arguments without the program name (default `sys.argv[1:]`).

  Returns:
    0 when the configuration is fine (and prints `stage NAME=URL` lines on stdout), 1 when it has
    problems (one `error: …` line each on stderr), 2 on a bad command line.
  """
  args = _parser().parse_args(argv)
  if not args.gin_file:
    print("error: give at least one --gin_file", file=sys.stderr)
    return 2
  result = check(args.gin_file, args.gin_param, workdir=args.workdir,
                 require_bucket=args.require_bucket, stage=args.stage)
  for problem in result.problems:
    print(f"error: {problem}", file=sys.stderr)
  if result.problems:
    return 1
  for name, url in result.staged.items():
    print(f"stage {name}={url}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
