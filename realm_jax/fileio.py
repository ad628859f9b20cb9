"""Small file-system layer: local paths through os/pathlib, URLs (`gs://`, `s3://`, `memory://` …) through fsspec.

The trainer and the index builder (REALM §3.4, asynchronous index refresh) share nothing but a work
directory. On one machine that is a local directory; on Cloud TPU (separate slices) it is a `gs://`
bucket. The two differ in what a commit can rely on:

  * local (POSIX) paths: `os.replace` / `os.rename` of a file or a directory is atomic, files and
    directories can be fsync-ed, and `os.link` fails if the target exists (an atomic "create if absent");
  * object stores: there are no directories (only name prefixes), no rename (fsspec's `mv` copies and
    deletes), no hard links and no fsync; but writing one object is atomic — a reader sees the old object,
    no object, or the whole new object, never a part of it.

`supports_atomic_rename(path)` tells the two apart, so callers choose their commit protocol (see
`retrieval/snapshot.py`: rename a temporary directory locally, write the manifest last on object stores).

Dispatch: a path with a scheme (`<scheme>://…`, other than `file://`) goes through
`fsspec.core.url_to_fs`; anything else (including `file://…`, whose scheme is dropped) is a local path.
Local paths are returned as `pathlib.Path`, URLs as `str` (without a trailing `/`): `pathlib.Path` would
turn `gs://bucket/x` into `gs:/bucket/x`. `gs://` needs the `gcsfs` package (`pip install
'realm-jax[gcs]'`). Directory listings are never cached (another job writes the same bucket).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import os
import pathlib
import re
import shutil
import socket
import uuid
from typing import IO, Any, Iterator, Sequence

import numpy as np

PathLike = str | os.PathLike
Path = pathlib.Path | str  # What `as_path` returns: a local `pathlib.Path` or a URL string.

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# `pathlib.Path("gs://b/x")` is `gs:/b/x`: such a local path is a URL that lost a slash.
_MANGLED_URL_RE = re.compile(r"^(gs|gcs|s3|s3a|az|abfs|abfss|adl|hdfs|memory|http|https):/[^/]")
_HASH_CHUNK_BYTES = 1 << 22
_INSTALL_HINTS = {
    "gs": "pip install 'realm-jax[gcs]' (installs gcsfs)",
    "gcs": "pip install 'realm-jax[gcs]' (installs gcsfs)",
    "s3": "pip install s3fs",
    "s3a": "pip install s3fs",
}


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------


def _scheme(path: str) -> str | None:
  """The URL scheme of `path` in lower case (`gs`, `memory`, …), or None for a local path."""
  match = _URL_RE.match(path)
  return match.group(1).lower() if match else None


def is_url(path: PathLike) -> bool:
  """True when `path` is a URL handled by fsspec (`scheme://…`, any scheme but `file`).

  Raises:
    ValueError: if `path` is a URL mangled by `pathlib` (`gs:/bucket/…`).
  """
  text = os.fspath(path)
  if not isinstance(text, str):
    text = os.fsdecode(text)
  scheme = _scheme(text)
  if scheme is None and _MANGLED_URL_RE.match(text):
    raise ValueError(f"{text!r} looks like a URL that lost a '/' (pathlib.Path turns 'gs://b/x' into "
                     "'gs:/b/x'); pass the URL as a string")
  return scheme is not None and scheme != "file"


def as_path(path: PathLike) -> Path:
  """Normalises `path`: a `pathlib.Path` for a local path (`file://` dropped), else the URL string.

  A URL loses its trailing `/` (`gs://bucket/dir/` → `gs://bucket/dir`).

  Raises:
    ValueError: if `path` is a URL mangled by `pathlib` (see `is_url`).
  """
  text = os.fspath(path)
  if is_url(text):
    prefix = _URL_RE.match(text).group(0)
    return prefix + text[len(prefix):].rstrip("/")
  if isinstance(text, str) and _scheme(text) == "file":
    text = text[len("file://"):]
  return pathlib.Path(text)


def join(path: PathLike, *parts: str) -> Path:
  """`path / part / …`: `pathlib` joining for local paths, `/`-joining for URLs."""
  base = as_path(path)
  if isinstance(base, pathlib.Path):
    return base.joinpath(*parts)
  return "/".join([base, *(p.strip("/") for p in parts)])


def basename(path: PathLike) -> str:
  """The last component of `path` (`gs://b/snapshots/500` → `500`)."""
  base = as_path(path)
  if isinstance(base, pathlib.Path):
    return base.name
  return base[len(_URL_RE.match(base).group(0)):].rsplit("/", 1)[-1]


def dirname(path: PathLike) -> Path:
  """The parent of `path` (`gs://b/w/snapshots` → `gs://b/w`; a bucket is its own parent)."""
  base = as_path(path)
  if isinstance(base, pathlib.Path):
    return base.parent
  prefix = _URL_RE.match(base).group(0)
  rest = base[len(prefix):]
  return prefix + rest.rsplit("/", 1)[0] if "/" in rest else base


def supports_atomic_rename(path: PathLike) -> bool:
  """True on local file systems (`os.rename` is atomic); False on object stores (rename = copy+delete).

  Raises:
    ValueError: if `path` is a URL mangled by `pathlib` (see `is_url`).
  """
  return not is_url(path)


def _fs(path: PathLike) -> tuple[Any, str]:
  """`(fsspec file system, path inside it)` for a URL; listings are not cached.

  Raises:
    ImportError: if fsspec, or the backend of the URL's scheme (gcsfs for `gs://`), is not installed;
      the message says what to install.
  """
  url = os.fspath(path)
  scheme = _scheme(url) or "file"
  try:
    import fsspec.core  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{url}: URLs need fsspec (pip install fsspec)") from e
  try:
    return fsspec.core.url_to_fs(url, use_listings_cache=False)
  except ImportError as e:
    hint = _INSTALL_HINTS.get(scheme, f"install the fsspec backend for '{scheme}://'")
    raise ImportError(f"{url}: no file system for '{scheme}://' ({e}); {hint}") from e


# ----------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------


def exists(path: PathLike) -> bool:
  """True if a file or a directory (on object stores: an object or a non-empty prefix) is at `path`."""
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return path.exists()
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path: PathLike) -> bool:
  """True if `path` is a directory (on object stores: a prefix with objects, or a created directory)."""
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return path.is_dir()
  fs, p = _fs(path)
  return fs.isdir(p)


def isfile(path: PathLike) -> bool:
  """True if `path` is a regular file (an object)."""
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return path.is_file()
  fs, p = _fs(path)
  return fs.isfile(p)


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) of the entries directly inside directory `path`, sorted.

  Raises:
    FileNotFoundError: if `path` is not there.
    NotADirectoryError: if `path` is a local file.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return sorted(os.listdir(path))
  fs, p = _fs(path)
  names = set()
  for entry in fs.ls(p, detail=False):  # FileNotFoundError if nothing is there.
    entry = str(entry).rstrip("/")
    if entry != p.rstrip("/"):
      names.add(entry.rsplit("/", 1)[-1])
  if not names and not fs.isdir(p):
    if fs.isfile(p):
      raise NotADirectoryError(f"{path}: not a directory")
    raise FileNotFoundError(f"{path}: no such directory")
  return sorted(names)


def glob(path: PathLike, pattern: str) -> list[Path]:
  """Paths of the entries of directory `path` whose name matches `pattern` (`fnmatch`), sorted.

  Returns:
    `[]` if `path` is not a directory.
  """
  try:
    names = listdir(path)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return [join(path, name) for name in names if fnmatch.fnmatchcase(name, pattern)]


_GLOB_CHARS = re.compile(r"[*?\[]")


def has_glob(path: PathLike) -> bool:
  """True if `path` contains a glob wildcard (`*`, `?` or `[`)."""
  return bool(_GLOB_CHARS.search(os.fspath(path)))


def expand_patterns(patterns: PathLike | Sequence[PathLike], what: str = "input") -> list[Path]:
  """Expands file paths and glob patterns (local or URL) into existing files, in a stable order.

  Each entry of `patterns` is either a path (kept as is; it must exist) or a glob pattern
  (`gs://bucket/wiki/enwiki-*.jsonl`, `data/*.txt`, with `*`, `?`, `[…]`, `**`), whose matches are
  sorted by name. Entries keep their order; a file named twice is kept at its first place. Every
  process of a multi-host job therefore sees the same list.

  Args:
    patterns: one path or pattern, or a sequence of them.
    what: what the files are, for error messages ("corpus source", "train questions", …).

  Returns:
    `[path, …]`: local `pathlib.Path`s or URL strings (see `as_path`).

  Raises:
    FileNotFoundError: "{what} {pattern}: the glob matches no file" or "{what} {path}: not found",
      naming the first entry at fault.
    ValueError: if `patterns` is empty.
  """
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  patterns = list(patterns)
  if not patterns:
    raise ValueError(f"no {what} given")
  out: list[Path] = []
  seen: set[str] = set()
  for pattern in patterns:
    path = as_path(pattern)
    if not has_glob(path):
      if not isfile(path):
        raise FileNotFoundError(f"{what} {path}: not found")
      if not isinstance(path, pathlib.Path):  # One spelling per object (`memory://b` = `memory:///b`).
        fs, p = _fs(path)
        path = as_path(fs.unstrip_protocol(p))
      matches = [path]
    elif isinstance(path, pathlib.Path):
      import glob as glob_lib  # pylint: disable=g-import-not-at-top
      matches = [pathlib.Path(m) for m in sorted(glob_lib.glob(os.fspath(path), recursive=True))
                 if os.path.isfile(m)]
    else:
      fs, p = _fs(path)
      matches = [fs.unstrip_protocol(m) for m in sorted(fs.glob(p)) if fs.isfile(m)]
      matches = [as_path(m) for m in matches]
    if not matches:
      raise FileNotFoundError(f"{what} {path}: the glob matches no file")
    for m in matches:
      key = os.fspath(m)
      if key not in seen:
        seen.add(key)
        out.append(m)
  return out


def mtime(path: PathLike) -> float:
  """Modification time of a file (an object: its last write), in seconds since the epoch.

  Raises:
    FileNotFoundError: if `path` is not there.
    OSError: if an object store reports no time for it (e.g. it is only a prefix).
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return path.stat().st_mtime
  fs, p = _fs(path)
  return _fs_mtime(fs, p)


def _fs_mtime(fs: Any, p: str) -> float:
  """`mtime` inside an fsspec file system (`fs.modified`, else a time field of `fs.info`).

  Raises:
    FileNotFoundError: if `p` is not there.
    OSError: if the file system reports no time for it (e.g. `p` is only a prefix).
  """
  try:
    return fs.modified(p).timestamp()
  except (NotImplementedError, AttributeError, KeyError, IsADirectoryError, ValueError):
    info = fs.info(p)
  for key in ("mtime", "updated", "LastModified", "last_modified", "created"):
    value = info.get(key)
    if hasattr(value, "timestamp"):
      return value.timestamp()
    if isinstance(value, (int, float)):
      return float(value)
  raise OSError(f"{fs.unstrip_protocol(p)}: the file system reports no modification time")


def newest_mtime(path: PathLike) -> float | None:
  """Latest modification time of directory `path` or anything in it, None if `path` is gone.

  Locally: the directory and its direct children. On object stores (no directory times): every object
  below the prefix.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    try:
      newest = path.stat().st_mtime
      entries = list(path.iterdir()) if path.is_dir() else []
    except FileNotFoundError:
      return None
    for entry in entries:
      try:
        newest = max(newest, entry.stat().st_mtime)
      except FileNotFoundError:
        continue
    return newest
  fs, p = _fs(path)
  newest = None
  try:
    files = [p] if fs.isfile(p) else fs.find(p)
  except FileNotFoundError:
    return None
  for file in files:
    try:
      t = _fs_mtime(fs, file)
    except OSError:  # Deleted meanwhile, or no time reported.
      continue
    newest = t if newest is None else max(newest, t)
  return newest


# ----------------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------------


def open_file(path: PathLike, mode: str = "rb", encoding: str | None = None) -> IO[Any]:
  """Opens a file: the builtin `open` locally, `fsspec`'s file object on object stores.

  On object stores a file opened for writing becomes visible, as a whole, when it is closed.

  Raises:
    FileNotFoundError: when reading a missing file.
    FileExistsError: with mode `x…` if the file exists.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return open(path, mode, encoding=encoding)  # noqa: SIM115 - the caller closes it.
  fs, p = _fs(path)
  return fs.open(p, mode) if encoding is None else fs.open(p, mode, encoding=encoding)


def read_bytes(path: PathLike) -> bytes:
  """The whole content of a file.

  Raises:
    FileNotFoundError: if it is missing.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return path.read_bytes()
  fs, p = _fs(path)
  return fs.cat_file(p)


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
  """The whole content of a text file.

  Raises:
    FileNotFoundError: if it is missing.
    UnicodeDecodeError: if it is not `encoding`.
  """
  return read_bytes(path).decode(encoding)


def makedirs(path: PathLike) -> None:
  """Creates directory `path` and its parents if missing (on object stores usually a no-op)."""
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    path.mkdir(parents=True, exist_ok=True)
    return
  fs, p = _fs(path)
  fs.makedirs(p, exist_ok=True)


def process_alive(pid: int) -> bool:
  """Whether process `pid` runs on this machine (`kill(pid, 0)`; another user's process counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _host_tag() -> str:
  """This machine's name as it appears in temporary names (no '.', '-' or '/')."""
  return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _partial_name(path: pathlib.Path) -> pathlib.Path:
  """A unique `*.partial` sibling of `path`: `<name>.<host>-<pid>-<12 hex>.partial`.

  Unique, so concurrent writers never share one; the host and process id let a later writer of the
  same file remove what a killed writer left (`_remove_stale_partials`).
  """
  return path.with_name(f"{path.name}.{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")


def _remove_stale_partials(path: pathlib.Path) -> int:
  """Deletes the `*.partial` siblings of local file `path` left by dead processes of this machine.

  A writer killed between creating its temporary file and the rename (SIGKILL, a preempted VM)
  cannot clean up; without this, every preemption during a write would leave a file behind in the
  work directory. Only files named by `_partial_name` for `path`, by this host, whose process no
  longer runs are removed: a live writer's file, another host's (a shared NFS work directory) and
  other files are kept.

  Returns:
    The number of files removed.
  """
  removed = 0
  prefix, host = f"{path.name}.", _host_tag()
  try:
    candidates = [p for p in path.parent.iterdir()
                  if p.name.startswith(prefix) and p.name.endswith(".partial")]
  except OSError:
    return 0
  for stale in candidates:
    tag = stale.name[len(prefix):-len(".partial")]
    parts = tag.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
      continue
    pid = int(parts[1])
    if pid != os.getpid() and not process_alive(pid):
      try:
        stale.unlink()  # A local temporary file (see the docstring), never an object store.
        removed += 1
      except OSError:
        pass  # Removed by another writer meanwhile, or not ours to remove.
  return removed


def fsync_dir(path: PathLike) -> None:
  """Flushes a local directory entry (after a rename) to disk; a no-op on object stores and where a
  directory cannot be opened."""
  if is_url(path):
    return
  try:
    fd = os.open(as_path(path), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Some file systems cannot fsync a directory; the rename itself is still atomic.
  finally:
    os.close(fd)


def _write_error(error: OSError, path: PathLike, partial: PathLike | None = None) -> OSError:
  """`error` (raised while writing `path`) as an error that names `path` and says it was not replaced.

  A failed `write(2)` (a full disk: ENOSPC; a file-size limit: EFBIG) names no file at all (numpy's
  `tofile` even drops the errno: "16000 requested and 8160 written"), and a failed `open` of the
  temporary file names the `*.partial` sibling, not the file the caller asked for. The errno is kept,
  so the class is the same (`PermissionError` for EACCES …). An error that names another file (e.g.
  the source being copied), or an `OSError` subclass without an errno (raised by the caller's block
  with its own message), is returned unchanged.
  """
  named = error.filename
  ours = {str(path)} | ({str(partial)} if partial is not None else set())
  if named is not None and str(named) not in ours:
    return error
  if error.errno is None and type(error) is not OSError:
    return error  # E.g. a FileNotFoundError with a message, raised by the caller's block.
  reason = error.strerror or str(error) or type(error).__name__
  message = f"{reason}; not written, its previous content (if any) is unchanged"
  if error.errno is None:
    return OSError(f"{os.fspath(path)}: {message}")
  return OSError(error.errno, message, os.fspath(path))


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
  """A binary file object whose content appears at `path` all at once, when the block exits normally.

  Locally: a unique `*.partial` sibling, fsync-ed and `os.replace`-d onto `path` (the directory is
  fsync-ed too); on an exception the partial file is deleted and `path` is untouched. Object stores:
  one object write (a single PUT, or a resumable upload finalised on close), atomic there; on an
  exception nothing is written.

  Raises:
    OSError: from the file system, naming `path` (with the original errno: a full disk is ENOSPC, a
      read-only directory `PermissionError`) and saying it was not replaced; an `OSError` of the
      caller's block that names another file passes unchanged.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    _remove_stale_partials(path)
    tmp = _partial_name(path)
    try:
      with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except OSError as e:
      raise _write_error(e, path, tmp) from e
    finally:
      tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return
  buffer = io.BytesIO()
  yield buffer
  fs, p = _fs(path)
  try:
    fs.pipe_file(p, buffer.getvalue())
  except OSError as e:
    raise _write_error(e, path) from e


def write_atomic(path: PathLike, data: bytes | str, encoding: str = "utf-8") -> None:
  """Writes `data` (str is encoded) so that readers see the old content or the new, never a part.

  See `atomic_writer` for how (temp + fsync + rename locally, one object write on object stores).

  Raises:
    OSError: from the file system, naming `path` (see `atomic_writer`).
  """
  if isinstance(data, str):
    data = data.encode(encoding)
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    with atomic_writer(path) as f:
      f.write(data)
    return
  fs, p = _fs(path)
  try:
    fs.pipe_file(p, data)
  except OSError as e:
    raise _write_error(e, path) from e


def write_if_absent(path: PathLike, data: bytes | str, encoding: str = "utf-8") -> bool:
  """Creates `path` with `data` unless it exists; True if this call created it.

  Locally the creation is race-free (`os.link` of a fsync-ed temporary file fails if `path` exists).
  On object stores a conditional create (`pipe_file(mode="create")`: GCS `ifGenerationMatch=0`) is
  used where the backend has it — not `open(mode="xb")`, which gcsfs 2026.8 was seen to turn into a
  plain overwrite — else "check, then write": two concurrent callers may both write. Callers that
  need agreement read the file back and compare.

  Raises:
    OSError: from the file system (not for an existing `path`).
  """
  if isinstance(data, str):
    data = data.encode(encoding)
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    if path.exists():
      return False
    _remove_stale_partials(path)
    tmp = _partial_name(path)
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, path)
      except FileExistsError:
        return False
    finally:
      tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True
  fs, p = _fs(path)
  if fs.exists(p):
    return False
  try:
    fs.pipe_file(p, data, mode="create")
    return True
  except FileExistsError:
    return False
  except (NotImplementedError, ValueError, TypeError):
    # The backend has no conditional create: check-then-write (documented race, see above).
    fs.pipe_file(p, data)
    return True


def append_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
  """Appends `text` to a file (created if missing).

  Locally an `O_APPEND` write. Object stores cannot append: the object is read and rewritten whole
  (fine for small logs with a single writer; concurrent appenders may lose lines).

  Raises:
    OSError: from the file system.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    with open(path, "a", encoding=encoding) as f:
      f.write(text)
    return
  try:
    old = read_bytes(path)
  except FileNotFoundError:
    old = b""
  write_atomic(path, old + text.encode(encoding))


def sha256(path: PathLike) -> str:
  """Hex SHA-256 of a file, read in 4 MiB chunks.

  Raises:
    FileNotFoundError: if it is missing.
  """
  digest = hashlib.sha256()
  with open_file(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def save_npy(path: PathLike, array: np.ndarray) -> None:
  """Writes `array` as a `.npy` file atomically (see `atomic_writer`); no pickles.

  Raises:
    OSError: from the file system.
  """
  with atomic_writer(path) as f:
    np.save(_WriteOnly(f), array, allow_pickle=False)


class _WriteOnly:
  """Only the `write` of a file object: numpy then writes the array in 16 MiB chunks through it,
  instead of `ndarray.tofile`, whose failed write loses the errno ("32000 requested and 8160
  written" instead of "No space left on device")."""

  def __init__(self, f: IO[bytes]):
    self.write = f.write


def load_npy(path: PathLike, mmap: bool = False) -> np.ndarray:
  """Reads a `.npy` file (no pickles). Object stores are read fully: `mmap` applies to local files only.

  Args:
    path: the file.
    mmap: memory-map a local file read-only (`np.load(mmap_mode="r")`).

  Raises:
    FileNotFoundError: if it is missing.
    ValueError / OSError / EOFError: if it is not a readable `.npy` file.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  return load_npy_bytes(read_bytes(path))


def load_npy_bytes(data: bytes) -> np.ndarray:
  """Parses the bytes of a `.npy` file (no pickles).

  Raises:
    ValueError / EOFError: if they are not a `.npy` file.
  """
  return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------------------------------
# Deleting and renaming
# ----------------------------------------------------------------------------------------------------


def remove(path: PathLike, missing_ok: bool = True) -> None:
  """Deletes a file (an object).

  Raises:
    FileNotFoundError: if it is missing and not `missing_ok`.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    path.unlink(missing_ok=missing_ok)
    return
  fs, p = _fs(path)
  try:
    fs.rm_file(p)
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(path: PathLike, ignore_errors: bool = True) -> None:
  """Deletes directory `path` and everything in it (on object stores: every object under the prefix).

  Not atomic anywhere: a reader may see a part of the tree meanwhile.

  Raises:
    OSError: unless `ignore_errors` (a missing `path` is never an error).
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    if ignore_errors:
      shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
      shutil.rmtree(path)
    return
  fs, p = _fs(path)
  try:
    fs.rm(p, recursive=True)
  except FileNotFoundError:
    pass  # Already gone: the outcome the caller asked for.
  except OSError:
    if not ignore_errors:
      raise


def rename(src: PathLike, dst: PathLike) -> None:
  """Atomically renames a local file or directory (`os.rename`).

  Raises:
    ValueError: for URLs — object stores have no atomic rename (check `supports_atomic_rename`).
    OSError: from `os.rename` (e.g. `dst` is a non-empty directory, or `src` is gone).
  """
  if is_url(src) or is_url(dst):
    raise ValueError(f"rename({src}, {dst}): object stores have no atomic rename")
  os.rename(as_path(src), as_path(dst))


# ----------------------------------------------------------------------------------------------------
# Staging to the local disk (for libraries that need a local path)
# ----------------------------------------------------------------------------------------------------

CACHE_DIR_ENV = "REALM_JAX_CACHE"


def default_cache_dir() -> pathlib.Path:
  """Where `local_copy` stages remote files: `$REALM_JAX_CACHE`, else `~/.cache/realm_jax`."""
  value = os.environ.get(CACHE_DIR_ENV)
  return pathlib.Path(value) if value else pathlib.Path.home() / ".cache" / "realm_jax"


def size(path: PathLike) -> int:
  """Size of a file in bytes.

  Raises:
    FileNotFoundError: "{path}: not found" if it is missing.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    try:
      return path.stat().st_size
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{path}: not found") from e
  fs, p = _fs(path)
  try:
    return int(fs.size(p))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: not found") from e


def local_copy(path: PathLike, cache_dir: PathLike | None = None) -> pathlib.Path:
  """A local path with the content of file `path`, for libraries that only open local files.

  A local `path` is returned as is (nothing is copied). A URL is downloaded once to
  `cache_dir/<sha256(parent URL)[:16]>/<file name>`, so the files of one remote directory land in
  one local directory (`dirname(local_copy(url))` can stand for the model directory). A copy already
  there is reused when its size equals the object's; otherwise it is downloaded again to a unique
  `*.partial` file, checked by size and renamed into place (concurrent callers never see a part).

  Args:
    path: a local file or a URL (`gs://bucket/bert/model.safetensors`).
    cache_dir: the local cache folder (default `default_cache_dir()`); must be a local path.

  Returns:
    The local `pathlib.Path`.

  Raises:
    FileNotFoundError: "{path}: not found" if the file is missing.
    ValueError: if `cache_dir` is a URL.
    OSError: "{path}: copied N of M bytes to {local}" if the download is short, or from the file
      systems.
  """
  path = as_path(path)
  if isinstance(path, pathlib.Path):
    if not path.is_file():
      raise FileNotFoundError(f"{path}: not found")
    return path
  cache = as_path(cache_dir if cache_dir is not None else default_cache_dir())
  if not isinstance(cache, pathlib.Path):
    raise ValueError(f"cache_dir={cache}: the staging cache must be a local directory")
  expected = size(path)  # FileNotFoundError naming `path`.
  folder = cache / hashlib.sha256(os.fspath(dirname(path)).encode()).hexdigest()[:16]
  target = folder / basename(path)
  if target.is_file() and target.stat().st_size == expected:
    return target
  folder.mkdir(parents=True, exist_ok=True)
  _remove_stale_partials(target)
  tmp = _partial_name(target)
  try:
    fs, p = _fs(path)
    with fs.open(p, "rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, _HASH_CHUNK_BYTES)
    got = tmp.stat().st_size
    if got != expected:
      raise OSError(f"{path}: copied {got} of {expected} bytes to {target}")
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)
  return target


def upload_file(local: PathLike, dest: PathLike) -> None:
  """Copies local file `local` to `dest` (local or URL) so readers see the old or the new content.

  Raises:
    FileNotFoundError: if `local` is missing.
    OSError: from the file systems.
  """
  with open(as_path(local), "rb") as src, atomic_writer(dest) as dst:
    shutil.copyfileobj(src, dst, _HASH_CHUNK_BYTES)
