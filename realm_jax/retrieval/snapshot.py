"""Embedding snapshots: the document index that the index builder writes and the trainer reads.

REALM (Guu et al., 2020, §3.4, "asynchronous index refresh") re-embeds every block of the knowledge
corpus with a recent copy of the document embedder while the trainer keeps using the previous index. A
reader must never see a half-written snapshot; how a snapshot is committed depends on the file system
(`fileio.supports_atomic_rename`).

Layout of one committed snapshot:

    <root>/<params_step>/manifest.json                          the commit: written LAST
    <root>/<params_step>/embeddings-00000-of-00004.npy          [rows, dim] float32 (or float16)
    <root>/<params_step>/block_ids-00000-of-00004.npy           [rows] int64
    <root>/<params_step>/shard-00000-of-00004.json              per-shard commit record (checksums)
    <root>/<params_step>/writer.json                            the writers' shared settings
    <root>/<params_step>/searcher-<name>                        optional: the ScaNN searcher built by
                                                                the index builder (`searcher.serialize`
                                                                files), named with checksums in the
                                                                manifest's `searcher` entry

A directory without a valid `manifest.json` is not a snapshot: `list_snapshots` and `read_snapshot`
skip / refuse it. Several processes may write disjoint shards of one snapshot (one index builder per
host); exactly one of them calls `SnapshotWriter.commit`, which checks every shard (commit record and
checksums) and writes the manifest. Each shard's arrays are written first and its commit record after
them, so a restarted builder resumes the shards that have a record (`SnapshotWriter.completed_shards`).

Local (POSIX) file systems — commit by rename, as the official code: writers work in
`<root>/.tmp-<params_step>/` (a deterministic name, so that a restart resumes it); every file is
written to a `*.partial` file, fsync-ed and renamed; the commit writes the manifest there and renames
the directory to `<root>/<params_step>`. Replacing a committed snapshot (`overwrite=True`) renames the
old one aside first (and back, if the new one cannot be renamed into place: a failed overwrite keeps
the old snapshot); pruning renames a snapshot to `.deleting-<step>-<id>` before deleting it.

Object stores (`gs://`, `s3://`, `memory://`, … through fsspec) — commit by writing the manifest last:
there is no atomic rename (it is copy + delete) but one object write is atomic. Writers therefore work
directly in `<root>/<params_step>/` (a restart resumes the shards found there) and the commit is the
single write of `manifest.json` after every shard was checked; until then the directory is invisible
to readers. Replacing (`overwrite=True`) and pruning delete the old manifest before the files it names,
so a reader never takes a half-deleted snapshot for a valid one (one that is reading at that moment
gets a `SnapshotError` for a vanished file, as with a local prune).

Rows keep the shard order: row `r` of `Snapshot.embeddings` is the embedding of `Snapshot.block_ids[r]`,
and the searchers return these row numbers (see `retrieval/searchers.py`). Paths are `pathlib.Path`
for local snapshots and URL strings (`gs://bucket/work/snapshots/500`) on object stores.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tqdm

from realm_jax import fileio

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WRITER_CONFIG_NAME = "writer.json"
SUPPORTED_DTYPES = ("float32", "float16")
TMP_PREFIX = ".tmp-"
# Directories being replaced (`.old-`) or deleted (`.deleting-`): never read; `prune_snapshots` removes
# leftovers.
_OLD_PREFIX = ".old-"
_DELETING_PREFIX = ".deleting-"
_FINITE_CHECK_ROWS = 1 << 16
_STEP_DIR_RE = re.compile(r"^[0-9]+$")
SEARCHER_FIELD = "searcher"
SEARCHER_FILE_PREFIX = "searcher-"
_SEARCHER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_COPY_CHUNK_BYTES = 4 << 20

PathLike = str | os.PathLike


class SnapshotError(ValueError):
  """A snapshot (or a temporary snapshot directory) is missing, malformed or inconsistent.

  The message names the offending file and the manifest field (or array property) that is wrong.
  """


# ----------------------------------------------------------------------------------------------------
# File names and small helpers
# ----------------------------------------------------------------------------------------------------


def embeddings_file_name(shard_index: int, num_shards: int) -> str:
  """`embeddings-<shard:05d>-of-<num_shards:05d>.npy`."""
  return f"embeddings-{shard_index:05d}-of-{num_shards:05d}.npy"


def block_ids_file_name(shard_index: int, num_shards: int) -> str:
  """`block_ids-<shard:05d>-of-<num_shards:05d>.npy`."""
  return f"block_ids-{shard_index:05d}-of-{num_shards:05d}.npy"


def shard_record_file_name(shard_index: int, num_shards: int) -> str:
  """`shard-<shard:05d>-of-<num_shards:05d>.json`: the commit record of one written shard."""
  return f"shard-{shard_index:05d}-of-{num_shards:05d}.json"


def searcher_file_name(name: str) -> str:
  """`searcher-<name>`: where file `<name>` of a serialized searcher lives in a snapshot directory."""
  return f"{SEARCHER_FILE_PREFIX}{name}"


def _upload_file(local: pathlib.Path, dest: fileio.Path) -> tuple[str, int]:
  """Streams a local file to `dest` (locally temp + fsync + rename; object stores one object write).

  Returns:
    (hex SHA-256, size in bytes) of what was copied.

  Raises:
    OSError: from either file system.
  """
  digest, size = hashlib.sha256(), 0
  opener = (fileio.atomic_writer(dest) if fileio.supports_atomic_rename(dest)
            else fileio.open_file(dest, "wb"))
  with open(local, "rb") as src, opener as out:
    while chunk := src.read(_COPY_CHUNK_BYTES):
      digest.update(chunk)
      size += len(chunk)
      out.write(chunk)
  return digest.hexdigest(), size


def _sha256(path: fileio.Path) -> str:
  """Hex SHA-256 of a file, read in 4 MiB chunks."""
  return fileio.sha256(path)


def _atomic_save_npy(path: fileio.Path, array: np.ndarray) -> None:
  """Writes `array` as `.npy` atomically: locally a fsync-ed `*.partial` file renamed onto `path`; on
  object stores one object write."""
  fileio.save_npy(path, array)


def _json_text(obj: Mapping[str, Any]) -> str:
  """Indented, key-sorted JSON with a final newline (the format of every snapshot JSON file)."""
  return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _atomic_write_json(path: fileio.Path, obj: Mapping[str, Any]) -> None:
  """Writes `obj` as indented JSON atomically (locally `*.partial` + fsync + rename; object stores: one
  object write)."""
  fileio.write_atomic(path, _json_text(obj))


def _read_json(path: fileio.Path) -> dict[str, Any]:
  """Parses a JSON object file.

  Raises:
    SnapshotError: if the file is missing, unreadable, not JSON or not a JSON object.
  """
  try:
    text = fileio.read_text(path)
  except FileNotFoundError as e:
    raise SnapshotError(f"{path}: file not found") from e
  except (OSError, UnicodeDecodeError) as e:
    raise SnapshotError(f"{path}: cannot read ({e})") from e
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise SnapshotError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(obj, dict):
    raise SnapshotError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


def _field(obj: Mapping[str, Any], name: str, types: type | tuple[type, ...], file: PathLike) -> Any:
  """Returns `obj[name]`, checking that it exists and has one of `types` (bool is never an int).

  Raises:
    SnapshotError: naming `file` and the field.
  """
  if name not in obj:
    raise SnapshotError(f"{file}: missing field {name!r}")
  value = obj[name]
  types = types if isinstance(types, tuple) else (types,)
  if isinstance(value, bool) and bool not in types:
    raise SnapshotError(f"{file}: field {name!r} must be {'/'.join(t.__name__ for t in types)}, "
                        f"got {value!r}")
  if not isinstance(value, types):
    raise SnapshotError(f"{file}: field {name!r} must be {'/'.join(t.__name__ for t in types)}, "
                        f"got {type(value).__name__} {value!r}")
  return value


def check_finite(array: np.ndarray, file: PathLike | str, field: str) -> None:
  """Checks that a `[rows, ...]` float array holds no NaN or infinity (in row chunks, mmap friendly).

  Args:
    array: the array (a memmap is read 65,536 rows at a time).
    file: the file (or object) named in the error message.
    field: the field named in the error message.

  Raises:
    SnapshotError: naming `file`, `field` and the first bad row.
  """
  for start in range(0, array.shape[0], _FINITE_CHECK_ROWS):
    chunk = np.asarray(array[start:start + _FINITE_CHECK_ROWS])
    if not np.isfinite(chunk).all():
      bad = start + int(np.argwhere(~np.isfinite(chunk))[0][0])
      raise SnapshotError(f"{file}: field {field!r} holds a non-finite value (first at row {bad})")


def check_unique_block_ids(block_ids: np.ndarray, file: PathLike | str,
                           field: str = "block_ids") -> None:
  """Checks that a `[rows]` integer array has no repeated id (sorts a copy: O(rows log rows)).

  Raises:
    SnapshotError: naming `file`, `field`, one repeated id and the number of duplicates.
  """
  if block_ids.size < 2:
    return
  ordered = np.sort(block_ids, kind="stable")
  dup = np.nonzero(ordered[1:] == ordered[:-1])[0]
  if dup.size:
    raise SnapshotError(f"{file}: field {field!r} repeats block id {int(ordered[dup[0]])} "
                        f"({dup.size} duplicate(s))")


def _validate_metadata(metadata: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
  """Returns a JSON-safe copy of `metadata` (a string-keyed dict), or raises SnapshotError."""
  if metadata is None:
    return {}
  if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
    raise SnapshotError(f"{where}: field 'metadata' must be a dict with string keys, got {metadata!r}")
  try:
    return json.loads(json.dumps(dict(metadata)))
  except (TypeError, ValueError) as e:
    raise SnapshotError(f"{where}: field 'metadata' is not JSON-serialisable ({e})") from e


# ----------------------------------------------------------------------------------------------------
# Rows read on demand from the shard files (paper scale: 13.35M x 128 float32 = 6.8 GB)
# ----------------------------------------------------------------------------------------------------

_STREAM_ROWS = 1 << 13  # Rows per read when streaming a shard file (4 MiB at dim 128, float32).


@dataclasses.dataclass(frozen=True)
class NpyPart:
  """Where the rows of one `.npy` shard file live: `rows x dim` values of `dtype` from byte `offset`.

  Attributes:
    path: the `.npy` file (local `pathlib.Path` or URL string).
    offset: byte offset of row 0 (the size of the `.npy` header).
    rows: number of rows.
    dim: values per row.
    dtype: the stored dtype (float32 or float16).
  """

  path: fileio.Path
  offset: int
  rows: int
  dim: int
  dtype: np.dtype

  @property
  def row_bytes(self) -> int:
    """Bytes per row (`dim * itemsize`)."""
    return self.dim * self.dtype.itemsize


def open_npy_part(path: PathLike, rows: int, dim: int, dtype: np.dtype | str,
                  field: str) -> NpyPart:
  """Reads only the header of a `.npy` file and checks it holds `[rows, dim]` C-order `dtype` values.

  Args:
    path: the `.npy` file (local path or URL; one small read).
    rows / dim / dtype: what the manifest says the file holds.
    field: the manifest field named in errors.

  Returns:
    The `NpyPart` (no data read).

  Raises:
    SnapshotError: naming the file and `field` if it is missing, not `.npy`, or of another shape,
      dtype or order.
  """
  path = fileio.as_path(path)
  dtype = np.dtype(dtype)
  try:
    with fileio.open_file(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, found = np.lib.format.read_array_header_1_0(f)
      else:
        shape, fortran, found = np.lib.format.read_array_header_2_0(f)
      offset = f.tell()
  except FileNotFoundError as e:
    raise SnapshotError(f"{path}: file not found (field {field!r} of the manifest)") from e
  except (OSError, ValueError, EOFError) as e:
    raise SnapshotError(f"{path}: not a readable .npy file for field {field!r} ({e})") from e
  if tuple(shape) != (rows, dim) or found != dtype or fortran:
    raise SnapshotError(f"{path}: holds {'Fortran-order ' if fortran else ''}{found} {list(shape)}, "
                        f"field {field!r} says {dtype} {[rows, dim]}")
  return NpyPart(path=path, offset=int(offset), rows=int(rows), dim=int(dim), dtype=dtype)


def verify_npy_part(part: NpyPart, sha256: str, field: str, manifest_file: PathLike) -> None:
  """Streams a shard file once: its SHA-256 must be `sha256`, and every value finite (REALM §3.4).

  Reads `_STREAM_ROWS` rows at a time with plain reads (no memory map, so the resident set does not
  grow with the file; the page cache may keep it).

  Raises:
    SnapshotError: naming the file and `field` on a checksum mismatch, a short file or NaN/inf.
  """
  digest = hashlib.sha256()
  try:
    with fileio.open_file(part.path, "rb") as f:
      digest.update(_read_exactly(f, part.offset, part.path))
      for start in range(0, part.rows, _STREAM_ROWS):
        n = min(_STREAM_ROWS, part.rows - start)
        data = _read_exactly(f, n * part.row_bytes, part.path)
        digest.update(data)
        if not np.isfinite(np.frombuffer(data, part.dtype)).all():
          chunk = np.frombuffer(data, part.dtype).reshape(n, part.dim)
          bad = start + int(np.argwhere(~np.isfinite(chunk))[0][0])
          raise SnapshotError(f"{part.path}: field 'embeddings' holds a non-finite value (first at "
                              f"row {bad})")
      while tail := f.read(_STREAM_ROWS * part.row_bytes):
        digest.update(tail)
  except FileNotFoundError as e:
    raise SnapshotError(f"{part.path}: file not found (field {field!r} of {manifest_file})") from e
  except OSError as e:
    raise SnapshotError(f"{part.path}: cannot read ({e})") from e
  if digest.hexdigest() != sha256:
    raise SnapshotError(f"{part.path}: checksum does not match field {field!r} of {manifest_file} "
                        "(file corrupt or modified)")


def _read_exactly(f: Any, num_bytes: int, path: PathLike) -> bytes:
  """`num_bytes` bytes from the file object `f`, or SnapshotError naming `path` if it ends first."""
  chunks, left = [], num_bytes
  while left > 0:
    chunk = f.read(left)
    if not chunk:
      raise SnapshotError(f"{path}: file is truncated ({num_bytes - left} of {num_bytes} bytes read)")
    chunks.append(chunk)
    left -= len(chunk)
  return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ShardedRows:
  """A read-only `[num_rows, dim]` array made of per-shard row blocks, read on demand (REALM §3.4).

  What `read_snapshot(lazy=True)` returns as `Snapshot.embeddings`: at paper scale (13.35M x 128
  float32, 6.8 GB) the snapshot is never concatenated in memory. Each part is either an in-memory
  `[rows_i, dim]` array or an `NpyPart` (a shard file, local or on an object store, read with plain
  reads: no memory map, no open file kept). Consumers see an array:

    rows.shape, rows.dtype, rows.ndim, len(rows)
    rows[a:b]             -> [b - a, dim] numpy copy (only the shards it overlaps are read)
    rows[int_array]       -> [*int_array.shape, dim] numpy gather (e.g. the retrieved blocks)
    rows.read_rows(a, b, out)  fills a caller's buffer (the device-array callbacks of `ExactSearcher`)
    np.asarray(rows)      -> the whole array (one full copy; what ScaNN's builder needs)

  `rows_read` counts the rows read so far (a multi-host test checks each host reads only its share).
  """

  def __init__(self, parts: Sequence[np.ndarray | NpyPart], dim: int, dtype: np.dtype | str):
    """Concatenates `parts` by rows (nothing is read here).

    Args:
      parts: `[rows_i, dim]` arrays or `NpyPart`s, in row order.
      dim: values per row.
      dtype: dtype of every part (float32 or float16).

    Raises:
      ValueError: if a part has another width or dtype.
    """
    self._parts = list(parts)
    self.dtype = np.dtype(dtype)
    self._dim = int(dim)
    sizes = []
    for part in self._parts:
      rows = part.rows if isinstance(part, NpyPart) else part.shape[0]
      width = part.dim if isinstance(part, NpyPart) else (part.shape[1] if part.ndim == 2 else -1)
      if width != self._dim or np.dtype(part.dtype) != self.dtype:
        raise ValueError(f"ShardedRows: part of width {width} dtype {part.dtype}, expected "
                         f"{self._dim} {self.dtype}")
      sizes.append(int(rows))
    self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    self.shape = (int(self._starts[-1]), self._dim)
    self.rows_read = 0

  ndim = 2

  @property
  def size(self) -> int:
    """Number of values (`rows * dim`)."""
    return self.shape[0] * self.shape[1]

  @property
  def nbytes(self) -> int:
    """Bytes the whole array takes once read."""
    return self.size * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def __repr__(self) -> str:
    return f"ShardedRows(shape={self.shape}, dtype={self.dtype}, parts={len(self._parts)})"

  def _read_part(self, part: np.ndarray | NpyPart, start: int, stop: int, out: np.ndarray) -> None:
    """Copies rows `[start, stop)` of one part into `out` (`[stop - start, dim]`, any float dtype)."""
    if not isinstance(part, NpyPart):
      out[...] = part[start:stop]
      return
    n = stop - start
    try:
      with fileio.open_file(part.path, "rb") as f:
        f.seek(part.offset + start * part.row_bytes)
        if out.dtype == part.dtype and out.flags.c_contiguous and hasattr(f, "readinto"):
          view, done = memoryview(out).cast("B"), 0
          while done < n * part.row_bytes:
            got = f.readinto(view[done:])
            if not got:
              raise SnapshotError(f"{part.path}: file is truncated (rows {start}:{stop} wanted)")
            done += got
        else:
          data = _read_exactly(f, n * part.row_bytes, part.path)
          out[...] = np.frombuffer(data, part.dtype).reshape(n, part.dim)
    except FileNotFoundError as e:
      raise SnapshotError(f"{part.path}: file not found (pruned while being read?)") from e
    except OSError as e:
      raise SnapshotError(f"{part.path}: cannot read ({e})") from e

  def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows `[start, stop)` as a `[stop - start, dim]` array (written into `out` when given).

    Args:
      start / stop: row range, `0 <= start <= stop <= num_rows`.
      out: optional C-contiguous `[stop - start, dim]` float buffer (cast on copy); default a new
        array of `self.dtype`.

    Raises:
      IndexError: on a range outside the array.
      ValueError: on an `out` of the wrong shape.
      SnapshotError: if a shard file vanished or is truncated.
    """
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= self.shape[0]:
      raise IndexError(f"ShardedRows: rows [{start}, {stop}) outside [0, {self.shape[0]})")
    if out is None:
      out = np.empty((stop - start, self._dim), self.dtype)
    elif out.shape != (stop - start, self._dim):
      raise ValueError(f"ShardedRows.read_rows: out has shape {out.shape}, expected "
                       f"{(stop - start, self._dim)}")
    first = int(np.searchsorted(self._starts, start, side="right")) - 1
    row = start
    for i in range(max(first, 0), len(self._parts)):
      if row >= stop:
        break
      lo, hi = int(self._starts[i]), int(self._starts[i + 1])
      end = min(hi, stop)
      if end > row:
        self._read_part(self._parts[i], row - lo, end - lo, out[row - start:end - start])
        row = end
    self.rows_read += stop - start
    return out

  def _gather(self, rows: np.ndarray) -> np.ndarray:
    """`[n, dim]` rows at the (valid, non-negative) positions `rows` (`[n]` int64)."""
    out = np.empty((rows.shape[0], self._dim), self.dtype)
    part_of = np.searchsorted(self._starts, rows, side="right") - 1
    for i in np.unique(part_of):
      where = np.nonzero(part_of == i)[0]
      local = rows[where] - self._starts[i]
      part = self._parts[i]
      if not isinstance(part, NpyPart):
        out[where] = part[local]
        continue
      lo, hi = int(local.min()), int(local.max()) + 1
      if hi - lo <= 8 * len(local) + 64:  # Dense enough: one read of the span.
        span = np.empty((hi - lo, self._dim), self.dtype)
        self._read_part(part, lo, hi, span)
        out[where] = span[local - lo]
      else:
        for j, r in zip(where, local):
          self._read_part(part, int(r), int(r) + 1, out[j:j + 1])
    self.rows_read += rows.shape[0]
    return out

  def __getitem__(self, key: Any) -> np.ndarray:
    """Numpy indexing on rows (int, slice, integer or boolean array), optionally `[rows, cols]`.

    Raises:
      IndexError: on out-of-range rows.
      TypeError: on an unsupported key.
    """
    cols = None
    if isinstance(key, tuple):
      if len(key) > 2:
        raise IndexError(f"ShardedRows: too many indices {key!r} for a 2-D array")
      key, cols = key[0], (key[1] if len(key) == 2 else None)
    n = self.shape[0]
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
      index = int(key) + n if key < 0 else int(key)
      if not 0 <= index < n:
        raise IndexError(f"ShardedRows: row {key} outside [0, {n})")
      result = self.read_rows(index, index + 1)[0]
    elif isinstance(key, slice):
      start, stop, step = key.indices(n)
      if step == 1:
        result = self.read_rows(start, max(start, stop))
      else:
        result = self._gather(np.arange(start, stop, step, dtype=np.int64))
    else:
      index = np.asarray(key)
      if index.dtype == bool:
        if index.shape != (n,):
          raise IndexError(f"ShardedRows: boolean index of shape {index.shape}, expected ({n},)")
        index = np.nonzero(index)[0]
      if not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"ShardedRows: unsupported index {key!r}")
      flat = index.reshape(-1).astype(np.int64)
      flat = np.where(flat < 0, flat + n, flat)
      if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise IndexError(f"ShardedRows: index out of range [0, {n})")
      result = self._gather(flat).reshape(index.shape + (self._dim,))
    return result if cols is None else result[..., cols]

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    """The whole `[num_rows, dim]` array (one full copy in memory)."""
    del copy
    out = self.read_rows(0, self.shape[0])
    return out if dtype is None else out.astype(dtype, copy=False)

  def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
    """The whole array as `dtype` (numpy's `astype`, reading every row)."""
    del copy
    return np.asarray(self, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The in-memory snapshot
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Snapshot:
  """One committed embedding snapshot (or the shards of it that were loaded), REALM §3.4.

  Attributes:
    path: the snapshot directory `<root>/<params_step>` (`pathlib.Path`; a URL string on object
      stores).
    params_step: the training step of the embedder parameters that produced the embeddings.
    corpus_fingerprint: fingerprint of the knowledge corpus (block ids and texts) that was embedded.
    block_ids: `[num_blocks]` int64, unique; row `r` of `embeddings` embeds block `block_ids[r]`.
    embeddings: `[num_blocks, dim]` float32 (float16 if stored so); a read-only `np.memmap` when read
      with `mmap=True` and a single shard was loaded; a `ShardedRows` (rows read from the shard files on
      demand, never all held in memory) when read with `lazy=True`.
    metadata: free-form JSON metadata from the writer (e.g. the embedder's config name).
    num_shards: number of shards the snapshot was written in.
    shard_indices: which shards were loaded, in row order.
    shard_row_ranges: `(start, end)` rows of each loaded shard inside `block_ids` / `embeddings`
      (default: one range covering all rows).
    manifest: the parsed `manifest.json` (set by `read_snapshot`; None for snapshots made in memory).
      Its optional `searcher` entry describes the serialized ScaNN searcher (`searcher_entry`).

  Raises:
    SnapshotError: in `__post_init__` if the arrays disagree in shape or type.
  """

  path: fileio.Path
  params_step: int
  corpus_fingerprint: str
  block_ids: np.ndarray
  embeddings: np.ndarray
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  num_shards: int = 1
  shard_indices: tuple[int, ...] = (0,)
  shard_row_ranges: tuple[tuple[int, int], ...] | None = None
  manifest: Mapping[str, Any] | None = None

  def __post_init__(self):
    where = f"Snapshot({self.path})"
    if self.embeddings.ndim != 2:
      raise SnapshotError(f"{where}: field 'embeddings' must be [num_blocks, dim], "
                          f"got shape {self.embeddings.shape}")
    if self.block_ids.ndim != 1 or self.block_ids.shape[0] != self.embeddings.shape[0]:
      raise SnapshotError(f"{where}: field 'block_ids' must be [{self.embeddings.shape[0]}], "
                          f"got shape {self.block_ids.shape}")
    if not np.issubdtype(self.block_ids.dtype, np.integer):
      raise SnapshotError(f"{where}: field 'block_ids' must be integer, got {self.block_ids.dtype}")
    if self.shard_row_ranges is None:
      object.__setattr__(self, "shard_row_ranges", ((0, int(self.embeddings.shape[0])),))
    ranges = self.shard_row_ranges
    expected_start = 0
    for start, end in ranges:
      if start != expected_start or end < start:
        raise SnapshotError(f"{where}: field 'shard_row_ranges' {ranges} is not contiguous")
      expected_start = end
    if expected_start != self.embeddings.shape[0]:
      raise SnapshotError(f"{where}: field 'shard_row_ranges' {ranges} does not cover "
                          f"{self.embeddings.shape[0]} rows")

  @property
  def num_blocks(self) -> int:
    """Number of rows (blocks) loaded."""
    return int(self.embeddings.shape[0])

  @property
  def dim(self) -> int:
    """Embedding dimension (128 in REALM)."""
    return int(self.embeddings.shape[1])


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def is_committed(path: PathLike) -> bool:
  """Whether a snapshot directory `<root>/<params_step>` counts as committed for writers.

  Locally: the directory exists (it only ever appears by the commit's rename). On object stores: its
  `manifest.json` exists (the directory exists as soon as a shard was written). The manifest is not
  validated here (`read_manifest` does that).
  """
  path = fileio.as_path(path)
  if fileio.supports_atomic_rename(path):
    return fileio.exists(path)
  return fileio.exists(fileio.join(path, MANIFEST_NAME))


def staging_dir(root: PathLike, params_step: int) -> fileio.Path:
  """Where the writers of snapshot `params_step` write their shards before the commit.

  `<root>/.tmp-<params_step>` locally (renamed on commit); `<root>/<params_step>` itself on object
  stores (committed by writing the manifest last).
  """
  if fileio.supports_atomic_rename(root):
    return fileio.join(root, f"{TMP_PREFIX}{int(params_step)}")
  return fileio.join(root, str(int(params_step)))


def staging_dirs(root: PathLike) -> list[tuple[int, fileio.Path]]:
  """Snapshots being written (or abandoned) under `root`: `(params_step, staging directory)` pairs.

  Locally the `.tmp-<step>` directories; on object stores the `<step>` directories without a
  `manifest.json` (and any `.tmp-<step>`). Sorted by step; `[]` if `root` does not exist.
  """
  root = fileio.as_path(root)
  try:
    names = fileio.listdir(root)
  except (FileNotFoundError, NotADirectoryError):
    return []
  atomic = fileio.supports_atomic_rename(root)
  found = []
  for name in names:
    entry = fileio.join(root, name)
    if name.startswith(TMP_PREFIX) and name[len(TMP_PREFIX):].isdigit():
      if fileio.isdir(entry):
        found.append((int(name[len(TMP_PREFIX):]), entry))
    elif not atomic and _STEP_DIR_RE.match(name) and not is_committed(entry):
      if fileio.isdir(entry):
        found.append((int(name), entry))
  return sorted(found, key=lambda x: (x[0], str(x[1])))


def _retract(path: fileio.Path) -> None:
  """Object stores: withdraws the committed snapshot `path` and deletes its files (for `overwrite`).

  Order: (1) note when the manifest was written; (2) delete the writers' files (`shard-*.json`,
  `writer.json`; readers never use them, so the snapshot stays valid meanwhile, and a crash here leaves
  it committed); (3) delete the manifest: the snapshot is gone for readers; (4) delete the arrays. Only
  objects written no later than the manifest are deleted: newer ones belong to a writer of the new
  snapshot that started meanwhile (another process of the same job).
  """
  manifest = fileio.join(path, MANIFEST_NAME)
  if not fileio.exists(manifest):
    return  # Withdrawn concurrently.
  try:
    committed_at = fileio.mtime(manifest)
  except OSError:  # No modification times on this store (or just deleted): delete everything.
    committed_at = float("inf")

  def delete_old(names: Iterable[str]) -> None:
    for name in names:
      file = fileio.join(path, name)
      try:
        written_at = fileio.mtime(file)
      except FileNotFoundError:
        continue  # Deleted concurrently.
      except OSError:
        written_at = float("-inf")  # No time known: taken as old.
      if written_at <= committed_at:
        fileio.remove(file)

  try:
    names = [n for n in fileio.listdir(path) if n != MANIFEST_NAME]
  except (FileNotFoundError, NotADirectoryError):
    names = []
  delete_old(n for n in names if n.endswith(".json"))
  fileio.remove(manifest)
  delete_old(n for n in names if not n.endswith(".json"))
  logging.info("Withdrew snapshot %s (overwrite=True)", path)


class SnapshotWriter:
  """Writes the shards of one snapshot, then commits it (REALM §3.4; see the module docstring).

  Shards go to `tmp_dir`: `<root>/.tmp-<params_step>/` locally (committed by renaming it to
  `<root>/<params_step>`), `<root>/<params_step>/` itself on object stores (committed by writing
  `manifest.json` last); `staging_dir` gives it.

  Resumable: `tmp_dir` depends only on `params_step`, and `completed_shards()` lists the shards already
  written and checksummed, so a restarted index builder skips them. Several processes may construct a
  writer with the same arguments and write disjoint shards concurrently; exactly one then calls
  `commit()`. The writers' shared settings (`num_shards`, `corpus_fingerprint`, `dim`, `dtype`) are
  recorded in `writer.json` by the first writer, and a later writer with different settings is refused.
  The manifest `metadata` is the committing writer's.

  If the snapshot is already committed (`is_committed`), the constructor and `commit()` raise
  `SnapshotError` unless `overwrite=True`. With `overwrite=True`, locally the commit renames the old
  directory aside, renames the new one into place and then deletes the old one (readers see the old
  snapshot, then for an instant no snapshot at that step, then the new one — never a mixture). On object
  stores the new shards are written where the old ones are, so the CONSTRUCTOR withdraws the old
  snapshot (manifest deleted before its arrays, see `_retract`): readers see no snapshot at that step
  until the new one is committed.

  Example:
    writer = SnapshotWriter(root, params_step=500, num_shards=4, corpus_fingerprint=fp, dim=128)
    for shard in sorted(set(range(4)) - set(writer.completed_shards())):
      writer.write_shard(shard, block_ids_of(shard), embed(shard))
    path = writer.commit()
  """

  def __init__(self,
               root: PathLike,
               params_step: int,
               num_shards: int,
               corpus_fingerprint: str,
               dim: int,
               dtype: str = "float32",
               metadata: Mapping[str, Any] | None = None,
               overwrite: bool = False):
    """Creates (or joins) the staging directory of one snapshot.

    Args:
      root: the snapshots directory, e.g. `WORKDIR/snapshots` (local path or URL such as
        `gs://bucket/work/snapshots`); created if missing.
      params_step: training step of the embedder parameters (the snapshot's directory name); >= 0.
      num_shards: number of shards the embeddings are split into; >= 1.
      corpus_fingerprint: fingerprint of the embedded corpus (non-empty string).
      dim: embedding dimension; >= 1.
      dtype: storage dtype, one of `SUPPORTED_DTYPES`; embeddings are cast to it.
      metadata: free-form JSON metadata for the manifest.
      overwrite: replace an already committed `<root>/<params_step>` (on commit locally, at once on
        object stores).

    Raises:
      SnapshotError: on a bad argument, if the snapshot is already committed (and not `overwrite`), or if
        the staging directory was started with different settings.
      ImportError: for a URL whose fsspec backend is not installed (e.g. gcsfs for `gs://`).
    """
    where = f"SnapshotWriter({root})"
    if (isinstance(params_step, bool) or not isinstance(params_step, (int, np.integer)) or
        params_step < 0):
      raise SnapshotError(f"{where}: field 'params_step' must be an int >= 0, got {params_step!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
      raise SnapshotError(f"{where}: field 'num_shards' must be an int >= 1, got {num_shards!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
      raise SnapshotError(f"{where}: field 'dim' must be an int >= 1, got {dim!r}")
    if not isinstance(corpus_fingerprint, str) or not corpus_fingerprint:
      raise SnapshotError(f"{where}: field 'corpus_fingerprint' must be a non-empty string, "
                          f"got {corpus_fingerprint!r}")
    if dtype not in SUPPORTED_DTYPES:
      raise SnapshotError(f"{where}: field 'dtype' must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    self.root = fileio.as_path(root)
    self.params_step = int(params_step)
    self.num_shards = int(num_shards)
    self.corpus_fingerprint = corpus_fingerprint
    self.dim = int(dim)
    self.dtype = dtype
    self.metadata = _validate_metadata(metadata, where)
    self.overwrite = overwrite
    self.atomic_rename = fileio.supports_atomic_rename(self.root)
    self.tmp_dir = staging_dir(self.root, self.params_step)
    self.final_dir = fileio.join(self.root, str(self.params_step))
    self._committed = False
    self._searcher: dict[str, Any] | None = None
    if is_committed(self.final_dir):
      if not overwrite:
        raise SnapshotError(f"{self.final_dir}: snapshot for params_step {self.params_step} already "
                            "exists (pass overwrite=True to replace it)")
      if not self.atomic_rename:
        _retract(self.final_dir)
    fileio.makedirs(self.tmp_dir)
    self._join_writer_config()

  # -- settings shared by all writers of this staging directory --------------------------------------

  def _settings(self) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "params_step": self.params_step,
            "num_shards": self.num_shards, "corpus_fingerprint": self.corpus_fingerprint,
            "dim": self.dim, "dtype": self.dtype}

  def _join_writer_config(self) -> None:
    """Records the settings in `writer.json` (first writer) or checks them against the file.

    Locally the first write is race-free (`os.link`); on object stores it is an exclusive create where
    the backend has one (GCS), else "write if absent"; either way every writer then reads the file back
    and compares, so a writer with other settings is refused.
    """
    config_path = fileio.join(self.tmp_dir, WRITER_CONFIG_NAME)
    if not fileio.exists(config_path):
      fileio.write_if_absent(config_path, _json_text(self._settings()))
    existing = _read_json(config_path)
    for name, value in self._settings().items():
      if existing.get(name) != value:
        raise SnapshotError(
            f"{config_path}: field {name!r} is {existing.get(name)!r} but this writer has {value!r}; "
            f"the staging directory {self.tmp_dir} was started by a different job (delete it to "
            "start over)")

  # -- shards --------------------------------------------------------------------------------------

  def _shard_paths(self, shard_index: int) -> tuple[fileio.Path, fileio.Path, fileio.Path]:
    return (fileio.join(self.tmp_dir, embeddings_file_name(shard_index, self.num_shards)),
            fileio.join(self.tmp_dir, block_ids_file_name(shard_index, self.num_shards)),
            fileio.join(self.tmp_dir, shard_record_file_name(shard_index, self.num_shards)))

  def _check_shard_index(self, shard_index: int) -> None:
    if (isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)) or
        not 0 <= shard_index < self.num_shards):
      raise SnapshotError(f"{self.tmp_dir}: field 'shard_index' must be in [0, {self.num_shards}), "
                          f"got {shard_index!r}")

  def write_shard(self, shard_index: int, block_ids: np.ndarray, embeddings: np.ndarray) -> None:
    """Writes one shard (both arrays, then its commit record), replacing an earlier copy of it.

    Args:
      shard_index: which shard, in `[0, num_shards)`; shards are concatenated in index order.
      block_ids: `[rows]` integer block ids (stored as int64), unique within the shard.
      embeddings: `[rows, dim]` float embeddings (stored as `dtype`); rows may be 0.

    Raises:
      SnapshotError: on a bad shard index, wrong shapes, non-integer or repeated block ids, NaN/inf
        embeddings, after `commit()`, or (object stores) once another writer committed the snapshot
        (the files are the committed snapshot's then).
    """
    if self._committed:
      raise SnapshotError(f"{self.final_dir}: snapshot already committed; cannot write shard "
                          f"{shard_index}")
    self._check_shard_index(shard_index)
    emb_path, ids_path, record_path = self._shard_paths(shard_index)
    block_ids = np.asarray(block_ids)
    embeddings = np.asarray(embeddings)
    if block_ids.ndim != 1 or not np.issubdtype(block_ids.dtype, np.integer):
      raise SnapshotError(f"{ids_path}: field 'block_ids' must be a 1-D integer array, got "
                          f"shape {block_ids.shape} dtype {block_ids.dtype}")
    if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
      raise SnapshotError(f"{emb_path}: field 'embeddings' must have shape [rows, {self.dim}], got "
                          f"{embeddings.shape}")
    if embeddings.shape[0] != block_ids.shape[0]:
      raise SnapshotError(f"{emb_path}: field 'embeddings' has {embeddings.shape[0]} rows but "
                          f"'block_ids' has {block_ids.shape[0]}")
    if not np.issubdtype(embeddings.dtype, np.floating):
      raise SnapshotError(f"{emb_path}: field 'embeddings' must be floating point, got "
                          f"{embeddings.dtype}")
    stored = np.ascontiguousarray(embeddings, dtype=self.dtype)
    check_finite(stored, emb_path, "embeddings")
    ids64 = np.ascontiguousarray(block_ids, dtype=np.int64)
    check_unique_block_ids(ids64, ids_path)
    if not self.atomic_rename and is_committed(self.final_dir):
      raise SnapshotError(f"{self.final_dir}: snapshot for params_step {self.params_step} was "
                          f"committed by another writer; shard {shard_index} not written")
    fileio.remove(record_path)  # The shard is incomplete from here until its record exists.
    _atomic_save_npy(emb_path, stored)
    _atomic_save_npy(ids_path, ids64)
    record = {
        "shard_index": int(shard_index),
        "num_shards": self.num_shards,
        "num_rows": int(stored.shape[0]),
        "dim": self.dim,
        "dtype": self.dtype,
        "embeddings_file": fileio.basename(emb_path),
        "block_ids_file": fileio.basename(ids_path),
        "embeddings_sha256": _sha256(emb_path),
        "block_ids_sha256": _sha256(ids_path),
    }
    _atomic_write_json(record_path, record)

  def _load_record(self, shard_index: int, verify: bool) -> dict[str, Any]:
    """Reads and checks one shard's commit record; with `verify`, re-hashes its files.

    Raises:
      SnapshotError: if the record is missing, malformed, or does not match the files.
    """
    emb_path, ids_path, record_path = self._shard_paths(shard_index)
    record = _read_json(record_path)
    for name, types in (("shard_index", int), ("num_shards", int), ("num_rows", int), ("dim", int),
                        ("dtype", str), ("embeddings_file", str), ("block_ids_file", str),
                        ("embeddings_sha256", str), ("block_ids_sha256", str)):
      _field(record, name, types, record_path)
    expected = {"shard_index": shard_index, "num_shards": self.num_shards, "dim": self.dim,
                "dtype": self.dtype, "embeddings_file": fileio.basename(emb_path),
                "block_ids_file": fileio.basename(ids_path)}
    for name, value in expected.items():
      if record[name] != value:
        raise SnapshotError(f"{record_path}: field {name!r} is {record[name]!r}, expected {value!r}")
    for path, name in ((emb_path, "embeddings_sha256"), (ids_path, "block_ids_sha256")):
      if not fileio.exists(path):
        raise SnapshotError(f"{path}: file not found (named by field {name!r} of {record_path})")
      if verify and _sha256(path) != record[name]:
        raise SnapshotError(f"{path}: checksum does not match field {name!r} of {record_path}")
    return record

  def completed_shards(self, verify: bool = True) -> list[int]:
    """Shards already fully written: their commit record exists and (with `verify`) checksums match.

    Args:
      verify: re-hash each shard's files (reads them all); otherwise trust the records.

    Returns:
      Sorted shard indices.
    """
    try:
      present = set(fileio.listdir(self.tmp_dir))
    except (FileNotFoundError, NotADirectoryError):
      present = set()
    done = []
    for shard_index in range(self.num_shards):
      if shard_record_file_name(shard_index, self.num_shards) not in present:
        continue
      try:
        self._load_record(shard_index, verify=verify)
      except SnapshotError as e:
        logging.warning("Snapshot shard %d will be rewritten: %s", shard_index, e)
        continue
      done.append(shard_index)
    return done

  def staged_arrays(self) -> tuple[np.ndarray, ShardedRows]:
    """Every written shard of the staging directory, in shard order, for building a searcher.

    Returns:
      (`[num_blocks]` int64 block ids, `[num_blocks, dim]` `ShardedRows` over the shard files: nothing
      but the headers is read until used).

    Raises:
      SnapshotError: if a shard is missing or its files do not match its record.
    """
    ids, parts = [], []
    for shard_index in range(self.num_shards):
      record = self._load_record(shard_index, verify=False)
      emb_path, ids_path, _ = self._shard_paths(shard_index)
      ids.append(_load_block_ids(ids_path, record["block_ids_sha256"], f"shard {shard_index}",
                                 fileio.join(self.tmp_dir, shard_record_file_name(
                                     shard_index, self.num_shards)), record["num_rows"]))
      parts.append(open_npy_part(emb_path, record["num_rows"], self.dim, self.dtype,
                                 f"shard {shard_index} embeddings"))
    return np.concatenate(ids), ShardedRows(parts, self.dim, self.dtype)

  def add_searcher(self, local_dir: PathLike, kind: str, config: Mapping[str, Any], num_rows: int,
                   info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Uploads a serialized searcher (e.g. ScaNN's `searcher.serialize(local_dir)`) into the snapshot.

    Each file `<name>` of `local_dir` is copied (streamed, 4 MiB at a time) to
    `<staging dir>/searcher-<name>`: locally a fsync-ed `*.partial` renamed into place, on object stores
    one object write. The manifest written by `commit` then names every file with its SHA-256 and size,
    the searcher's `config` (what determines it: the trainer rebuilds when its own differs) and the
    `num_rows` it indexes (REALM §3.4: the index builder publishes the MIPS index, not only the
    embeddings). Call it on the committing writer, before `commit`.

    Args:
      local_dir: a local directory holding only the searcher's regular files (no sub-directories).
      kind: the searcher kind, e.g. "scann".
      config: JSON-serialisable settings that determine the searcher.
      num_rows: rows indexed; `commit` checks it equals the snapshot's `num_blocks`.
      info: free-form JSON (library version, build seconds).

    Returns:
      The manifest entry (`kind`, `config`, `num_rows`, `dim`, `files`, `info`).

    Raises:
      SnapshotError: on a bad file name (only `[A-Za-z0-9_.-]`, no pickles), a sub-directory, a
        non-serialisable config, or after `commit`.
    """
    where = f"SnapshotWriter.add_searcher({local_dir})"
    if self._committed:
      raise SnapshotError(f"{self.final_dir}: snapshot already committed; cannot add a searcher")
    local_dir = pathlib.Path(local_dir)
    names = sorted(os.listdir(local_dir))
    for name in names:
      if not _SEARCHER_NAME_RE.match(name) or name.endswith(".pkl") or not (local_dir / name).is_file():
        raise SnapshotError(f"{where}: {name!r} is not a plain searcher file (names [A-Za-z0-9_.-], "
                            "no pickles, no directories)")
    if not names:
      raise SnapshotError(f"{where}: no files")
    for old in fileio.listdir(self.tmp_dir):
      if old.startswith(SEARCHER_FILE_PREFIX):
        fileio.remove(fileio.join(self.tmp_dir, old))
    files = []
    for name in names:
      digest, size = _upload_file(local_dir / name, fileio.join(self.tmp_dir, searcher_file_name(name)))
      files.append({"name": name, "sha256": digest, "bytes": size})
    entry = {"kind": str(kind), "config": _validate_metadata(config, where),
             "num_rows": int(num_rows), "dim": self.dim, "files": files,
             "info": _validate_metadata(info, where)}
    self._searcher = entry
    logging.info("snapshot %s: searcher %s uploaded (%d files, %.1f MB)", self.tmp_dir, kind,
                 len(files), sum(f["bytes"] for f in files) / 1e6)
    return entry

  def commit(self, verify: bool = True) -> fileio.Path:
    """Checks every shard and writes the manifest: locally into `tmp_dir`, then renamed to
    `<root>/<params_step>`; on object stores into `<root>/<params_step>` directly, as the last write.

    Args:
      verify: re-hash every shard file and check block-id uniqueness across shards before committing.

    Returns:
      The committed snapshot directory.

    Raises:
      SnapshotError: if a shard is missing or corrupt, block ids repeat across shards, the corpus is
        empty, the step was committed meanwhile (and not `overwrite`), or the temporary directory is
        gone (local).
    """
    if self._committed:
      raise SnapshotError(f"{self.final_dir}: already committed by this writer")
    if self.atomic_rename and not fileio.isdir(self.tmp_dir):
      raise SnapshotError(f"{self.tmp_dir}: temporary directory not found (committed by another "
                          "process?)")
    if is_committed(self.final_dir) and not self.overwrite:
      raise SnapshotError(f"{self.final_dir}: snapshot for params_step {self.params_step} already "
                          "exists (pass overwrite=True to replace it)")
    try:
      present = set(fileio.listdir(self.tmp_dir))
    except FileNotFoundError:
      present = set()
    missing = [i for i in range(self.num_shards)
               if shard_record_file_name(i, self.num_shards) not in present]
    if missing:
      raise SnapshotError(f"{self.tmp_dir}: cannot commit, {len(missing)} of {self.num_shards} shards "
                          f"missing (first: {shard_record_file_name(missing[0], self.num_shards)})")
    records = [self._load_record(i, verify=verify)
               for i in tqdm.trange(self.num_shards, desc="verify snapshot shards",
                                    disable=self.num_shards < 8 or not verify)]
    if verify:
      all_ids = np.concatenate([fileio.load_npy(fileio.join(self.tmp_dir, r["block_ids_file"]))
                                for r in records])
      check_unique_block_ids(all_ids, fileio.join(self.tmp_dir, "block_ids-*.npy"))
    num_blocks = sum(r["num_rows"] for r in records)
    if num_blocks == 0:
      raise SnapshotError(f"{self.tmp_dir}: field 'num_blocks' is 0; a snapshot needs at least one row")
    if self._searcher is not None:
      if self._searcher["num_rows"] != num_blocks:
        raise SnapshotError(f"{self.tmp_dir}: field 'searcher.num_rows' is "
                            f"{self._searcher['num_rows']} but the shards hold {num_blocks} rows")
      for f in self._searcher["files"]:
        if not fileio.exists(fileio.join(self.tmp_dir, searcher_file_name(f["name"]))):
          raise SnapshotError(f"{fileio.join(self.tmp_dir, searcher_file_name(f['name']))}: file not "
                              "found (field 'searcher.files' of the manifest being committed)")
    shards, row = [], 0
    for r in records:
      shards.append({
          "index": r["shard_index"],
          "embeddings_file": r["embeddings_file"],
          "block_ids_file": r["block_ids_file"],
          "row_start": row,
          "row_end": row + r["num_rows"],
          "shape": [r["num_rows"], self.dim],
          "embeddings_sha256": r["embeddings_sha256"],
          "block_ids_sha256": r["block_ids_sha256"],
      })
      row += r["num_rows"]
    now = time.time()
    manifest = {
        "format_version": FORMAT_VERSION,
        "params_step": self.params_step,
        "corpus_fingerprint": self.corpus_fingerprint,
        "num_blocks": num_blocks,
        "dim": self.dim,
        "dtype": self.dtype,
        "num_shards": self.num_shards,
        "shards": shards,
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "created_unix": now,
        "metadata": self.metadata,
    }
    if self._searcher is not None:
      manifest[SEARCHER_FIELD] = self._searcher
    for stale in fileio.glob(self.tmp_dir, "*.partial"):
      fileio.remove(stale)
    if not self.atomic_rename:
      _atomic_write_json(fileio.join(self.final_dir, MANIFEST_NAME), manifest)  # The commit.
    else:
      self._rename_into_place(manifest)
    self._committed = True
    logging.info("Committed snapshot %s: %d blocks x %d (%s) in %d shard(s)", self.final_dir,
                 num_blocks, self.dim, self.dtype, self.num_shards)
    return self.final_dir

  def _rename_into_place(self, manifest: Mapping[str, Any]) -> None:
    """Local commit: manifest into `tmp_dir`, old snapshot (overwrite) aside, `tmp_dir` renamed."""
    _atomic_write_json(fileio.join(self.tmp_dir, MANIFEST_NAME), manifest)
    old = None
    if fileio.exists(self.final_dir):  # Only reachable with overwrite=True.
      old = fileio.join(self.root, f"{_OLD_PREFIX}{self.params_step}-{uuid.uuid4().hex[:8]}")
      fileio.rename(self.final_dir, old)
    try:
      fileio.rename(self.tmp_dir, self.final_dir)
    except OSError as e:
      kept = ""
      if old is not None:  # Put the previous snapshot back: a failed overwrite must not lose it.
        try:
          fileio.rename(old, self.final_dir)
          fileio.fsync_dir(self.root)
          kept = "; the previous snapshot is kept"
        except OSError as e2:
          kept = f"; the previous snapshot could not be put back ({e2}) and is at {old}"
      raise SnapshotError(f"{self.final_dir}: cannot rename {self.tmp_dir} into place ({e}); was the "
                          f"step committed concurrently?{kept} (the new shards stay in "
                          f"{self.tmp_dir})") from e
    fileio.fsync_dir(self.root)
    if old is not None:
      fileio.rmtree(old)

  def discard(self) -> None:
    """Deletes the staging directory (all shards written so far, by any writer).

    On object stores the staging directory is `<root>/<params_step>`: a snapshot committed there is
    left alone (with a warning).
    """
    if not self.atomic_rename and is_committed(self.final_dir):
      logging.warning("SnapshotWriter.discard: %s is committed; not deleted", self.final_dir)
      return
    fileio.rmtree(self.tmp_dir)


def write_snapshot(root: PathLike,
                   params_step: int,
                   block_ids: np.ndarray,
                   embeddings: np.ndarray,
                   corpus_fingerprint: str,
                   num_shards: int = 1,
                   metadata: Mapping[str, Any] | None = None,
                   dtype: str = "float32",
                   overwrite: bool = False) -> fileio.Path:
  """Writes and commits a whole snapshot from in-memory arrays (rows split into contiguous shards).

  Args:
    root: the snapshots directory (local path or URL).
    params_step: embedder parameter step (directory name).
    block_ids: `[num_blocks]` integer block ids, unique.
    embeddings: `[num_blocks, dim]` float embeddings.
    corpus_fingerprint: fingerprint of the embedded corpus.
    num_shards: number of near-equal contiguous shards (`np.array_split` sizes).
    metadata: free-form JSON metadata.
    dtype: storage dtype, one of `SUPPORTED_DTYPES`.
    overwrite: replace an existing snapshot at this step (see `SnapshotWriter`).

  Returns:
    The committed directory `<root>/<params_step>`.

  Raises:
    SnapshotError: as `SnapshotWriter.write_shard` / `commit`.
  """
  embeddings = np.asarray(embeddings)
  block_ids = np.asarray(block_ids)
  if embeddings.ndim != 2:
    raise SnapshotError(f"write_snapshot({root}): field 'embeddings' must be [num_blocks, dim], got "
                        f"shape {embeddings.shape}")
  if block_ids.ndim != 1 or len(block_ids) != len(embeddings):
    raise SnapshotError(f"write_snapshot({root}): field 'block_ids' must be [{len(embeddings)}], got "
                        f"shape {block_ids.shape}")
  writer = SnapshotWriter(root, params_step, num_shards, corpus_fingerprint, embeddings.shape[1],
                          dtype=dtype, metadata=metadata, overwrite=overwrite)
  sizes = [len(embeddings) // num_shards + (i < len(embeddings) % num_shards)
           for i in range(num_shards)]
  bounds = np.cumsum([0] + sizes)
  for shard in tqdm.trange(num_shards, desc="write snapshot", disable=num_shards < 8):
    start, end = bounds[shard], bounds[shard + 1]
    writer.write_shard(shard, block_ids[start:end], embeddings[start:end])
  return writer.commit()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_manifest(path: PathLike) -> dict[str, Any]:
  """Reads and schema-checks `<path>/manifest.json` (no file hashing).

  Args:
    path: a snapshot directory.

  Returns:
    The manifest as a dict (fields as written by `SnapshotWriter.commit`).

  Raises:
    SnapshotError: naming the manifest file and the field, if it is missing or inconsistent.
  """
  path = fileio.as_path(path)
  file = fileio.join(path, MANIFEST_NAME)
  m = _read_json(file)
  version = _field(m, "format_version", int, file)
  if version != FORMAT_VERSION:
    raise SnapshotError(f"{file}: field 'format_version' is {version}, this code reads "
                        f"{FORMAT_VERSION}")
  step = _field(m, "params_step", int, file)
  if step < 0:
    raise SnapshotError(f"{file}: field 'params_step' must be >= 0, got {step}")
  name = fileio.basename(path)
  if _STEP_DIR_RE.match(name) and int(name) != step:
    raise SnapshotError(f"{file}: field 'params_step' is {step} but the directory is {name}")
  fingerprint = _field(m, "corpus_fingerprint", str, file)
  if not fingerprint:
    raise SnapshotError(f"{file}: field 'corpus_fingerprint' is empty")
  num_blocks = _field(m, "num_blocks", int, file)
  dim = _field(m, "dim", int, file)
  if num_blocks < 1 or dim < 1:
    raise SnapshotError(f"{file}: fields 'num_blocks' and 'dim' must be >= 1, got {num_blocks}, {dim}")
  dtype = _field(m, "dtype", str, file)
  if dtype not in SUPPORTED_DTYPES:
    raise SnapshotError(f"{file}: field 'dtype' must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
  num_shards = _field(m, "num_shards", int, file)
  shards = _field(m, "shards", list, file)
  if num_shards < 1 or len(shards) != num_shards:
    raise SnapshotError(f"{file}: field 'shards' has {len(shards)} entries but 'num_shards' is "
                        f"{num_shards}")
  _field(m, "created", str, file)
  _field(m, "metadata", dict, file)
  row = 0
  for i, shard in enumerate(shards):
    where = f"shards[{i}]"
    if not isinstance(shard, dict):
      raise SnapshotError(f"{file}: field {where!r} must be an object")
    for name, types in (("index", int), ("embeddings_file", str), ("block_ids_file", str),
                        ("row_start", int), ("row_end", int), ("shape", list),
                        ("embeddings_sha256", str), ("block_ids_sha256", str)):
      try:
        _field(shard, name, types, file)
      except SnapshotError as e:
        raise SnapshotError(str(e).replace("field '", f"field '{where}.")) from None
    if shard["index"] != i:
      raise SnapshotError(f"{file}: field '{where}.index' is {shard['index']}, expected {i}")
    for name, expected in (("embeddings_file", embeddings_file_name(i, num_shards)),
                           ("block_ids_file", block_ids_file_name(i, num_shards))):
      if shard[name] != expected:
        raise SnapshotError(f"{file}: field '{where}.{name}' is {shard[name]!r}, expected "
                            f"{expected!r}")
    rows = shard["row_end"] - shard["row_start"]
    if shard["row_start"] != row or rows < 0:
      raise SnapshotError(f"{file}: field '{where}.row_start' / 'row_end' "
                          f"({shard['row_start']}, {shard['row_end']}) not contiguous from row {row}")
    if shard["shape"] != [rows, dim]:
      raise SnapshotError(f"{file}: field '{where}.shape' is {shard['shape']}, expected {[rows, dim]}")
    row = shard["row_end"]
  if row != num_blocks:
    raise SnapshotError(f"{file}: field 'num_blocks' is {num_blocks} but the shards cover {row} rows")
  return m


def _load_npy(path: fileio.Path, mmap: bool, field: str) -> np.ndarray:
  """`fileio.load_npy` with errors turned into SnapshotError naming the file."""
  try:
    return fileio.load_npy(path, mmap=mmap)
  except FileNotFoundError as e:
    raise SnapshotError(f"{path}: file not found (field {field!r} of the manifest)") from e
  except (OSError, ValueError, EOFError) as e:
    raise SnapshotError(f"{path}: not a readable .npy file for field {field!r} ({e})") from e


def _load_npy_checked(path: fileio.Path, sha256: str | None, field: str, checksum_field: str,
                      manifest_file: fileio.Path) -> np.ndarray:
  """Object stores: reads a `.npy` file ONCE, checks its SHA-256 (if given) and parses it.

  Raises:
    SnapshotError: naming the file and the manifest field, if it is missing, corrupt or not `.npy`.
  """
  try:
    data = fileio.read_bytes(path)
  except FileNotFoundError as e:
    raise SnapshotError(f"{path}: file not found (field {checksum_field!r} of {manifest_file})") from e
  except OSError as e:
    raise SnapshotError(f"{path}: cannot read ({e})") from e
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise SnapshotError(f"{path}: checksum does not match field {checksum_field!r} of "
                        f"{manifest_file} (file corrupt or modified)")
  try:
    return fileio.load_npy_bytes(data)
  except (OSError, ValueError, EOFError) as e:
    raise SnapshotError(f"{path}: not a readable .npy file for field {field!r} ({e})") from e


def read_snapshot(path: PathLike,
                  validate: bool = True,
                  mmap: bool = False,
                  shard_indices: Sequence[int] | None = None,
                  lazy: bool = False,
                  validate_rows: tuple[int, int] | None = None) -> Snapshot:
  """Loads a committed snapshot (all shards, or a subset for one host of a multi-host job).

  The manifest schema, array shapes and dtypes are always checked. With `validate`, also the SHA-256 of
  every loaded file, block-id uniqueness and the absence of NaN/inf (this reads every byte).

  With `lazy` (paper scale, REALM §3.4: 13.35M x 128 float32 is 6.8 GB), `embeddings` is a
  `ShardedRows`: only the `.npy` headers are read here, rows are read from the shard files when used
  (so a searcher copies them straight to its device buffers and the host never holds a second copy).
  Validation then streams each embeddings file once (SHA-256 and finiteness in one pass, plain reads).
  On a pod every host opens the whole snapshot lazily and validates only `validate_rows`, the rows its
  own devices hold (`searchers.process_row_range`); the other hosts validate theirs.

  Args:
    path: the snapshot directory `<root>/<params_step>` (local path or URL).
    validate: check checksums, uniqueness and finiteness.
    mmap: memory-map the `.npy` files read-only instead of reading them (one shard stays a memmap;
      several shards are concatenated into memory). Local files only: on object stores every file is
      read once, fully (hashed and parsed from the same bytes). Ignored with `lazy`.
    shard_indices: shards to load, default all; loaded in increasing order.
    lazy: return `embeddings` as a `ShardedRows` over the shard files (local or object store).
    validate_rows: with `lazy` and `validate`, only embeddings files overlapping these manifest rows
      `[start, stop)` are checked (block ids are always checked); default all.

  Returns:
    The `Snapshot`, rows in shard order; `manifest` holds the parsed manifest.

  Raises:
    SnapshotError: naming the file and field, if anything is missing, malformed or corrupt.
  """
  path = fileio.as_path(path)
  local = isinstance(path, pathlib.Path)
  m = read_manifest(path)
  num_shards, dim, dtype = m["num_shards"], m["dim"], np.dtype(m["dtype"])
  manifest_file = fileio.join(path, MANIFEST_NAME)
  if shard_indices is None:
    selected = list(range(num_shards))
  else:
    selected = sorted(set(int(i) for i in shard_indices))
    if not selected or selected[0] < 0 or selected[-1] >= num_shards:
      raise SnapshotError(f"{manifest_file}: requested shard_indices {list(shard_indices)} outside "
                          f"[0, {num_shards})")
  all_ids, all_emb, ranges, row = [], [], [], 0
  for i in tqdm.tqdm(selected, desc="read snapshot", disable=len(selected) < 8):
    shard = m["shards"][i]
    rows = shard["row_end"] - shard["row_start"]
    emb_path = fileio.join(path, shard["embeddings_file"])
    ids_path = fileio.join(path, shard["block_ids_file"])
    if lazy:
      ids = _load_block_ids(ids_path, shard["block_ids_sha256"] if validate else None,
                            f"shards[{i}]", manifest_file, rows)
      emb = open_npy_part(emb_path, rows, dim, dtype, f"shards[{i}].embeddings_file")
      if validate and (validate_rows is None or (shard["row_start"] < validate_rows[1] and
                                                 validate_rows[0] < shard["row_end"])):
        verify_npy_part(emb, shard["embeddings_sha256"], f"shards[{i}].embeddings_sha256",
                        manifest_file)
      all_ids.append(ids)
      all_emb.append(emb)
      ranges.append((row, row + rows))
      row += rows
      continue
    if local:
      if validate:
        for file, name in ((emb_path, "embeddings_sha256"), (ids_path, "block_ids_sha256")):
          if not file.exists():
            raise SnapshotError(f"{file}: file not found (field 'shards[{i}].{name}' of "
                                f"{manifest_file})")
          if _sha256(file) != shard[name]:
            raise SnapshotError(f"{file}: checksum does not match field 'shards[{i}].{name}' of "
                                f"{manifest_file} (file corrupt or modified)")
      emb = _load_npy(emb_path, mmap, f"shards[{i}].embeddings_file")
      ids = _load_npy(ids_path, mmap, f"shards[{i}].block_ids_file")
    else:
      emb, ids = (_load_npy_checked(file, shard[name] if validate else None, f"shards[{i}].{field}",
                                    f"shards[{i}].{name}", manifest_file)
                  for file, field, name in ((emb_path, "embeddings_file", "embeddings_sha256"),
                                            (ids_path, "block_ids_file", "block_ids_sha256")))
    if emb.shape != (rows, dim):
      raise SnapshotError(f"{emb_path}: shape {emb.shape} differs from field 'shards[{i}].shape' "
                          f"{[rows, dim]} of {manifest_file}")
    if emb.dtype != dtype:
      raise SnapshotError(f"{emb_path}: dtype {emb.dtype} differs from field 'dtype' {m['dtype']!r} "
                          f"of {manifest_file}")
    if ids.shape != (rows,) or ids.dtype != np.int64:
      raise SnapshotError(f"{ids_path}: expected [{rows}] int64 block ids, got shape {ids.shape} "
                          f"dtype {ids.dtype}")
    if validate:
      check_finite(emb, emb_path, "embeddings")
    all_ids.append(ids)
    all_emb.append(emb)
    ranges.append((row, row + rows))
    row += rows
  block_ids = all_ids[0] if len(all_ids) == 1 else np.concatenate(all_ids)
  if lazy:
    embeddings = ShardedRows(all_emb, dim, dtype)
  else:
    embeddings = all_emb[0] if len(all_emb) == 1 else np.concatenate(all_emb)
  if validate:
    check_unique_block_ids(np.asarray(block_ids), fileio.join(path, "block_ids-*.npy"))
  return Snapshot(path=path, params_step=m["params_step"], corpus_fingerprint=m["corpus_fingerprint"],
                  block_ids=block_ids, embeddings=embeddings, metadata=m["metadata"],
                  num_shards=num_shards, shard_indices=tuple(selected),
                  shard_row_ranges=tuple(ranges), manifest=m)


def _load_block_ids(path: fileio.Path, sha256: str | None, where: str, manifest_file: fileio.Path,
                    rows: int) -> np.ndarray:
  """Reads one `[rows]` int64 block-ids file whole, checking its SHA-256 when `sha256` is given.

  Raises:
    SnapshotError: naming the file and the manifest field if it is missing, corrupt or malformed.
  """
  try:
    data = fileio.read_bytes(path)
  except FileNotFoundError as e:
    raise SnapshotError(f"{path}: file not found (field '{where}.block_ids_sha256' of "
                        f"{manifest_file})") from e
  except OSError as e:
    raise SnapshotError(f"{path}: cannot read ({e})") from e
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise SnapshotError(f"{path}: checksum does not match field '{where}.block_ids_sha256' of "
                        f"{manifest_file} (file corrupt or modified)")
  try:
    ids = fileio.load_npy_bytes(data)
  except (OSError, ValueError, EOFError) as e:
    raise SnapshotError(f"{path}: not a readable .npy file for field '{where}.block_ids_file' "
                        f"({e})") from e
  if ids.shape != (rows,) or ids.dtype != np.int64:
    raise SnapshotError(f"{path}: expected [{rows}] int64 block ids, got shape {ids.shape} "
                        f"dtype {ids.dtype}")
  return ids


def searcher_entry(manifest: Mapping[str, Any], path: PathLike) -> dict[str, Any] | None:
  """The manifest's serialized-searcher entry, schema-checked; None if the snapshot has none.

  A malformed entry does not make the snapshot invalid (its embeddings are still good): callers
  catch the error and rebuild the searcher.

  Args:
    manifest: a manifest from `read_manifest` / `Snapshot.manifest`.
    path: the snapshot directory (named in errors).

  Returns:
    `{"kind", "config", "num_rows", "dim", "files": [{"name", "sha256", "bytes"}], "info"}` or None.

  Raises:
    SnapshotError: naming the manifest and the `searcher.…` field that is missing or wrong.
  """
  if SEARCHER_FIELD not in manifest:
    return None
  file = fileio.join(fileio.as_path(path), MANIFEST_NAME)
  entry = manifest[SEARCHER_FIELD]
  if not isinstance(entry, dict):
    raise SnapshotError(f"{file}: field 'searcher' must be an object")
  try:
    for name, types in (("kind", str), ("config", dict), ("num_rows", int), ("dim", int),
                        ("files", list)):
      _field(entry, name, types, file)
    if not entry["files"]:
      raise SnapshotError(f"{file}: field 'files' is empty")
    for i, f in enumerate(entry["files"]):
      if not isinstance(f, dict):
        raise SnapshotError(f"{file}: field 'files[{i}]' must be an object")
      for name, types in (("name", str), ("sha256", str), ("bytes", int)):
        _field(f, name, types, file)
      if not _SEARCHER_NAME_RE.match(f["name"]) or f["name"].endswith(".pkl"):
        raise SnapshotError(f"{file}: field 'files[{i}].name' {f['name']!r} is not a plain file name")
  except SnapshotError as e:
    raise SnapshotError(str(e).replace("field '", "field 'searcher.")) from None
  return dict(entry)


def fetch_searcher_files(path: PathLike, entry: Mapping[str, Any], local_dir: PathLike) -> None:
  """Puts the verified files of a snapshot's serialized searcher into the local directory `local_dir`.

  Local snapshots: each file is hashed, then symbolic-linked into `local_dir` (no copy of the
  multi-GB dataset file). Object stores: each file is streamed into `local_dir` and hashed on the way.
  Either way `local_dir` then holds the files under their original names (`scann_assets.pbtxt`, …), as
  the library's loader expects (REALM §3.4: the trainer loads the index builder's searcher).

  Args:
    path: the snapshot directory.
    entry: its `searcher_entry`.
    local_dir: an existing, empty local directory.

  Raises:
    SnapshotError: naming the file and its `searcher.files[i]` field if it is missing, of another
      size, or its SHA-256 differs (corrupt or modified).
  """
  path = fileio.as_path(path)
  local_dir = pathlib.Path(local_dir)
  manifest_file = fileio.join(path, MANIFEST_NAME)
  for i, f in enumerate(entry["files"]):
    src = fileio.join(path, searcher_file_name(f["name"]))
    field = f"searcher.files[{i}]"
    digest, size = hashlib.sha256(), 0
    try:
      if isinstance(src, pathlib.Path):
        with open(src, "rb") as fin:
          while chunk := fin.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        os.symlink(src.resolve(), local_dir / f["name"])
      else:
        # `local_dir` is a local temp dir by construction: ScaNN loads searchers from local files.
        with fileio.open_file(src, "rb") as fin, open(local_dir / f["name"], "wb") as out:
          while chunk := fin.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    except FileNotFoundError as e:
      raise SnapshotError(f"{src}: file not found (field '{field}' of {manifest_file})") from e
    except OSError as e:
      raise SnapshotError(f"{src}: cannot read ({e})") from e
    if size != f["bytes"] or digest.hexdigest() != f["sha256"]:
      raise SnapshotError(f"{src}: checksum does not match field '{field}.sha256' of {manifest_file} "
                          f"({size} bytes, expected {f['bytes']}; file corrupt or modified)")


# ----------------------------------------------------------------------------------------------------
# Listing and pruning
# ----------------------------------------------------------------------------------------------------


def list_snapshots(root: PathLike) -> list[tuple[int, fileio.Path]]:
  """Committed snapshots under `root`: `<step>` directories with a valid manifest (schema only).

  On object stores a `<step>` directory without a manifest (shards still being written, or abandoned)
  is not listed.

  Returns:
    `(params_step, path)` pairs sorted by increasing step; `[]` if `root` does not exist.
  """
  root = fileio.as_path(root)
  try:
    names = fileio.listdir(root)
  except (FileNotFoundError, NotADirectoryError):
    return []
  found = []
  for name in names:
    if not _STEP_DIR_RE.match(name):
      continue
    entry = fileio.join(root, name)
    if isinstance(entry, pathlib.Path) and not entry.is_dir():
      continue
    try:
      read_manifest(entry)
    except SnapshotError as e:
      logging.debug("Not a snapshot: %s", e)
      continue
    found.append((int(name), entry))
  return sorted(found, key=lambda x: (x[0], str(x[1])))


def latest_snapshot(root: PathLike) -> fileio.Path | None:
  """The committed snapshot with the highest params step, or None if there is none."""
  snapshots = list_snapshots(root)
  return snapshots[-1][1] if snapshots else None


def prune_snapshots(root: PathLike,
                    keep: int = 3,
                    protect: Iterable[int] = (),
                    stale_tmp_age_s: float | None = None) -> list[fileio.Path]:
  """Deletes all but the newest `keep` committed snapshots (the official refresher keeps 3, §3.4).

  A snapshot disappears from `list_snapshots` at once and is then removed: locally it is first renamed
  to `.deleting-<step>-<id>`; on object stores its manifest is deleted first, then the other files.
  Leftover `.deleting-*` / `.old-*` directories are removed too. Locally, directories named `<step>`
  without a valid manifest are never touched (they are not snapshots and not ours).

  Staging directories (`staging_dirs`: `.tmp-<step>` locally, `<step>` without a manifest on object
  stores) belong to writers that may still be running, so they are removed only when `stale_tmp_age_s`
  is given and nothing in them was modified for that many seconds. Choose it well above the time one
  shard takes to write.

  Args:
    root: the snapshots directory.
    keep: number of newest committed snapshots to keep; >= 1.
    protect: steps never deleted (e.g. the one the trainer is currently searching).
    stale_tmp_age_s: age in seconds after which an idle staging directory is deleted; None: never.

  Returns:
    The paths removed (original names).

  Raises:
    ValueError: if `keep < 1`.
  """
  if keep < 1:
    raise ValueError(f"prune_snapshots: keep must be >= 1, got {keep}")
  root = fileio.as_path(root)
  if not fileio.isdir(root):
    return []
  atomic = fileio.supports_atomic_rename(root)
  protected = {int(s) for s in protect}
  snapshots = list_snapshots(root)
  removed = []
  for step, path in snapshots[:-keep]:
    if step in protected:
      continue
    if atomic:
      doomed = fileio.join(root, f"{_DELETING_PREFIX}{step}-{uuid.uuid4().hex[:8]}")
      try:
        fileio.rename(path, doomed)
      except FileNotFoundError:
        continue  # Pruned concurrently.
    else:
      try:
        fileio.remove(fileio.join(path, MANIFEST_NAME), missing_ok=False)  # Invisible from here.
      except FileNotFoundError:
        continue  # Pruned concurrently.
      doomed = path
    fileio.rmtree(doomed)
    removed.append(path)
  now = time.time()
  for name in fileio.listdir(root):
    entry = fileio.join(root, name)
    if name.startswith((_DELETING_PREFIX, _OLD_PREFIX)):
      if fileio.isdir(entry):
        fileio.rmtree(entry)
        removed.append(entry)
      continue
    if stale_tmp_age_s is None:
      continue
    uncommitted_step_dir = not atomic and bool(_STEP_DIR_RE.match(name))
    if not (name.startswith(TMP_PREFIX) or uncommitted_step_dir) or not fileio.isdir(entry):
      continue
    if uncommitted_step_dir and is_committed(entry):
      continue  # A snapshot (kept above).
    newest = fileio.newest_mtime(entry)
    if newest is None:
      continue  # Committed (renamed) or deleted meanwhile.
    if now - newest > stale_tmp_age_s:
      if uncommitted_step_dir and is_committed(entry):
        continue  # Committed meanwhile.
      fileio.rmtree(entry)
      removed.append(entry)
  if removed:
    logging.info("Pruned %d snapshot director%s under %s", len(removed),
                 "y" if len(removed) == 1 else "ies", root)
  return removed
