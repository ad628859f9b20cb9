"""`realm-jax convert`: a released REALM checkpoint → realm_jax params, tokenizer files and index.

The job that turns a Hugging Face REALM checkpoint (see `models/realm_checkpoints.py` for the tensor
mapping) into a work directory that fine-tuning and `predict` read: `realm_params.safetensors`,
`realm_config.json`, the tokenizer files and, for `RealmForOpenQA`, the released `block_emb` index as
an embedding snapshot (`retrieval/snapshot.py`; REALM §3.4's MIPS index over the Wikipedia blocks).
It sits above `retrieval/` (it writes snapshots), so it is a job, not part of `models/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from realm_jax import fileio
from realm_jax.models import checkpoint_import as ci
from realm_jax.models import realm_checkpoints as rc
from realm_jax.retrieval import snapshot as snapshot_lib


# ----------------------------------------------------------------------------------------------
# block_emb -> embedding snapshot.
# ----------------------------------------------------------------------------------------------


def write_block_emb_snapshot(block_emb: np.ndarray,
                             root: rc.PathLike,
                             corpus_fingerprint: str,
                             *,
                             params_step: int = 0,
                             block_ids: np.ndarray | None = None,
                             num_shards: int = 1,
                             metadata: Mapping[str, Any] | None = None,
                             overwrite: bool = False) -> pathlib.Path:
  """Writes a released `block_emb` as an embedding snapshot (the MIPS index of REALM §3.4).

  Args:
    block_emb: `[num_blocks, dim]` float document embeddings (`RealmCheckpoint.block_emb`).
    root: the snapshots directory (`WORKDIR/snapshots` for fine-tuning).
    corpus_fingerprint: fingerprint of the knowledge corpus whose blocks the rows embed (the
      corpus built from the checkpoint's `block_records`); readers compare it with their corpus.
    params_step: the snapshot's step (directory name).
    block_ids: `[num_blocks]` unique integer block ids of the rows; default `0 … num_blocks−1`
      (row r = block record r).
    num_shards: contiguous shards to split the rows into.
    metadata: extra JSON metadata (a `"source"` entry is typical).
    overwrite: replace an existing snapshot at `params_step`.

  Returns:
    The committed snapshot directory `<root>/<params_step>`.

  Raises:
    ValueError: if `block_emb` is not 2-D or `block_ids` has the wrong length.
    snapshot.SnapshotError: as `snapshot.write_snapshot` (duplicate ids, NaN, existing snapshot).
  """
  block_emb = np.asarray(block_emb)
  if block_emb.ndim != 2:
    raise ValueError(f"write_block_emb_snapshot: block_emb must be [num_blocks, dim], got shape "
                     f"{block_emb.shape}")
  if block_ids is None:
    block_ids = np.arange(block_emb.shape[0], dtype=np.int64)
  block_ids = np.asarray(block_ids)
  if block_ids.shape != (block_emb.shape[0],):
    raise ValueError(f"write_block_emb_snapshot: block_ids must be [{block_emb.shape[0]}], got "
                     f"shape {block_ids.shape}")
  meta = {"embedder": "released block_emb", **(metadata or {})}
  return snapshot_lib.write_snapshot(root, params_step, block_ids.astype(np.int64),
                                     block_emb.astype(np.float32, copy=False), corpus_fingerprint,
                                     num_shards=num_shards, metadata=meta, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------------


def _is_pytorch_checkpoint(path: pathlib.Path) -> bool:
  """A `.bin` file, or a directory with a PyTorch checkpoint and no safetensors one."""
  if path.is_file():
    return path.suffix == ".bin"
  if (path / rc._WEIGHTS_NAME).is_file() or (path / rc._WEIGHTS_INDEX_NAME).is_file():
    return False
  return (path / rc._BIN_NAME).is_file() or (path / rc._BIN_INDEX_NAME).is_file()


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  """What `convert_released_checkpoint` wrote.

  Attributes:
    architecture: the converted REALM class.
    parts: the realm_jax parts written.
    params_file: `WORKDIR/realm_params.safetensors`.
    config_file: `WORKDIR/realm_config.json`.
    snapshot_dir: the committed `block_emb` snapshot, or None.
    block_emb_sha256: SHA-256 of the float32 `block_emb` bytes (None without one).
  """

  architecture: str
  parts: tuple[str, ...]
  params_file: pathlib.Path
  config_file: pathlib.Path
  snapshot_dir: pathlib.Path | None
  block_emb_sha256: str | None


def convert_released_checkpoint(workdir: rc.PathLike,
                                checkpoint: rc.PathLike,
                                *,
                                architecture: str | None = None,
                                corpus_fingerprint: str | None = None,
                                block_ids: np.ndarray | rc.PathLike | None = None,
                                snapshot_root: rc.PathLike | None = None,
                                params_step: int = 0,
                                num_shards: int = 1,
                                strict: bool = True,
                                overwrite: bool = False) -> ConversionResult:
  """Converts a released REALM checkpoint directory into realm_jax params (+ its index).

  The `realm-jax convert` command: reads `checkpoint` (safetensors, or `pytorch_model.bin` when
  torch is importable, converted on the fly into a temporary directory under `workdir`), writes
  `WORKDIR/realm_params.safetensors` and `WORKDIR/realm_config.json` (`rc.save_converted`; read back
  with `load_converted`), copies the tokenizer files (`vocab.txt`, ...) into `workdir`, and, for a
  `RealmForOpenQA` checkpoint with `corpus_fingerprint`, writes `block_emb` as the embedding
  snapshot `<snapshot_root>/<params_step>` (default root `WORKDIR/snapshots`, where fine-tuning
  looks for its index).

  Args:
    workdir: output directory (created), local or URL (`gs://…`: the files are written to a local
      temporary directory, then uploaded; the snapshot is committed manifest-last in the bucket).
    checkpoint: a Hugging Face REALM checkpoint directory (`config.json` + `model.safetensors` or
      `pytorch_model.bin`) or safetensors file; a URL is staged to the local cache first
      (safetensors only).
    architecture: force the REALM class (default: detected, see `rc.load_realm_checkpoint`).
    corpus_fingerprint: fingerprint of the corpus of the checkpoint's block records; without it a
      `block_emb` is not exported (a warning says so).
    block_ids: `[num_blocks]` ids of the `block_emb` rows, or a `.npy` file of them (default
      `0 … num_blocks−1`).
    snapshot_root: where to write the snapshot (default `WORKDIR/snapshots`).
    params_step: the snapshot's step.
    num_shards: shards of the snapshot.
    strict: refuse tensors the mapping does not know (see `rc.load_realm_checkpoint`).
    overwrite: replace an existing snapshot at `params_step`.

  Returns:
    A `ConversionResult` with the written paths.

  Raises:
    FileNotFoundError, ValueError, CheckpointMismatchError: as `rc.load_realm_checkpoint`. The
      checkpoint is read before anything is written: then a work directory that this call would
      have created is not left behind.
    ModuleNotFoundError: for a `.bin` checkpoint when torch is not installed (the message says how
      to convert it elsewhere).
    snapshot.SnapshotError: if the snapshot cannot be written.
  """
  remote_workdir = fileio.is_url(workdir)
  final_workdir = fileio.as_path(workdir)
  tokenizer_sources = {}
  if fileio.is_url(checkpoint):
    remote_dir = checkpoint if not str(checkpoint).endswith(".safetensors") else fileio.dirname(checkpoint)
    tokenizer_sources = {name: fileio.join(remote_dir, name) for name in rc._TOKENIZER_FILES}
    checkpoint = ci.stage_checkpoint(checkpoint)
  workdir = (pathlib.Path(tempfile.mkdtemp(prefix="realm-convert-")) if remote_workdir
             else pathlib.Path(workdir))
  created = remote_workdir or not workdir.exists()
  checkpoint = pathlib.Path(checkpoint)
  tmp_dir = None
  source_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
  try:
    if _is_pytorch_checkpoint(checkpoint):
      tmp_dir = workdir / ".hf-safetensors.tmp"
      shutil.rmtree(tmp_dir, ignore_errors=True)
      rc.pytorch_bin_to_safetensors(checkpoint, tmp_dir)
      checkpoint = tmp_dir
    ckpt = rc.load_realm_checkpoint(checkpoint, architecture=architecture, strict=strict)
  except BaseException:
    if created:  # A checkpoint that does not load leaves nothing behind.
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    if tmp_dir is not None:
      shutil.rmtree(tmp_dir, ignore_errors=True)
  workdir.mkdir(parents=True, exist_ok=True)
  config_file = rc.save_converted(ckpt, workdir)
  for name in rc._TOKENIZER_FILES:
    if (source_dir / name).is_file():
      shutil.copyfile(source_dir / name, workdir / name)
    elif name in tokenizer_sources and fileio.isfile(tokenizer_sources[name]):
      shutil.copyfile(fileio.local_copy(tokenizer_sources[name]), workdir / name)
  if remote_workdir:  # Upload the converted files; the snapshot goes straight to the bucket.
    try:
      fileio.makedirs(final_workdir)
      for local in sorted(workdir.iterdir()):
        if local.is_file():
          fileio.upload_file(local, fileio.join(final_workdir, local.name))
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    config_file = fileio.join(final_workdir, config_file.name)

  snapshot_dir = digest = None
  if ckpt.block_emb is not None:
    digest = hashlib.sha256(ckpt.block_emb.tobytes()).hexdigest()
    if corpus_fingerprint is None:
      logging.warning("%s: block_emb [%d, %d] not exported: pass corpus_fingerprint (the "
                      "fingerprint of the corpus of its block records) to write the snapshot",
                      ckpt.source, *ckpt.block_emb.shape)
    else:
      if block_ids is not None and not isinstance(block_ids, np.ndarray):
        block_ids = np.load(block_ids, allow_pickle=False)
      root = (fileio.as_path(snapshot_root) if snapshot_root is not None
              else fileio.join(final_workdir, "snapshots"))
      snapshot_dir = write_block_emb_snapshot(
          ckpt.block_emb, root, corpus_fingerprint, params_step=params_step, block_ids=block_ids,
          num_shards=num_shards, overwrite=overwrite,
          metadata={"source": ckpt.source, "architecture": ckpt.architecture,
                    "block_emb_sha256": digest})
  logging.info("Converted %s (%s) into %s", ckpt.source, ckpt.architecture, final_workdir)
  return ConversionResult(architecture=ckpt.architecture, parts=ckpt.parts,
                          params_file=fileio.join(final_workdir, rc.CONVERTED_PARAMS_NAME),
                          config_file=config_file,
                          snapshot_dir=snapshot_dir, block_emb_sha256=digest)
