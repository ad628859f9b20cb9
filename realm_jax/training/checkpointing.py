"""Orbax checkpoints of the train state and the input-pipeline state.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three named items:
  * `params`    — the model parameters (StandardSave; the index builder restores only this item),
  * `opt_state` — the optimiser state,
  * `meta`      — JSON: the step, the data-iterator state, and the name of the model config.
Saving is asynchronous; `CheckpointManager.close()` waits for pending writes.

A save that fails (a full disk, a read-only directory) raises `CheckpointWriteError` from `save`,
`wait_until_finished` or `close`, naming the directory, the step(s) not written and the newest complete
checkpoint, which is untouched: orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it
only once complete. The failed step's temporary directory is deleted (it holds the space a full disk
needs back), and leftovers of killed saves are deleted when a `CheckpointManager` is created.

Resume order (t5x, big_vision; decided once, in `training.loop.Trainer.initial_state`): a checkpoint
in the work directory > an `init_from` checkpoint (params only, `restore_partial_params`) > the
pretrained initialisation > random.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from realm_jax import fileio

PARAMS, OPT_STATE, META = "params", "opt_state", "meta"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# What a failed save raises through orbax: OSError (file systems), ValueError (tensorstore's
# "OUT_OF_RANGE: Error writing … File too large"), RuntimeError (orbax's background threads).
_SAVE_ERRORS = (OSError, ValueError, RuntimeError)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message names the directory, the step(s) and the newest
  complete checkpoint (which is intact)."""


def checkpoint_dir(workdir: str) -> str:
  """`WORKDIR/checkpoints` (local path or `gs://…`)."""
  return str(fileio.join(workdir, "checkpoints"))


class CheckpointManager:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` with REALM's three items.

  Args:
    directory: where step folders are written (`WORKDIR/checkpoints`).
    max_to_keep: newest checkpoints kept (older ones are deleted).
    save_interval_steps: `should_save(step)` is true every this many steps, and only then (orbax's
      default policy also saves the first step of a fresh run; here it does not: in asynchronous
      pre-training that checkpoint made the index builder re-embed the whole corpus for step 1, and
      which steps searched that index depended on timing).
    async_save: write in a background thread (the train loop goes on).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1000,
               async_save: bool = True):
    directory = _absolute(directory)
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]),
        # The step directory is created in `save` itself: created in the background, a failure (a
        # read-only directory) left orbax's other commit threads waiting 20 minutes for its signal,
        # and the process could not exit meanwhile.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=(PARAMS, OPT_STATE, META))
    self._in_flight: list[int] = []  # Steps whose (asynchronous) save was started, not yet waited on.

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves (asynchronously) params, optimiser state and JSON metadata at `step`.

    Returns:
      Whether a save was started (False when `step` is not on the save interval and not forced).

    Raises:
      CheckpointWriteError: if this save, or an earlier one still in flight, failed.
    """
    meta = dict(meta, step=int(step))
    try:  # Also where the error of an earlier asynchronous save surfaces.
      started = self._manager.save(step, args=ocp.args.Composite(**{
          PARAMS: ocp.args.StandardSave(params),
          OPT_STATE: ocp.args.StandardSave(opt_state),
          META: ocp.args.JsonSave(meta),
      }), force=force)
    except _SAVE_ERRORS as e:
      raise self._write_error(e, [*self._in_flight, int(step)]) from e
    if started:
      self._in_flight.append(int(step))
    return started

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any,
                                                                                      dict]:
    """Restores `(params, opt_state, meta)` onto the shardings of the abstract targets.

    Args:
      step: the step to restore.
      abstract_params / abstract_opt_state: pytrees of `jax.ShapeDtypeStruct` with shardings
        (from `jax.eval_shape`), so arrays land directly on their devices.

    Raises:
      FileNotFoundError: if the step does not exist.
    """
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}")
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_params),
        OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
        META: ocp.args.JsonRestore(),
    }))
    return restored[PARAMS], restored[OPT_STATE], dict(restored[META])

  def wait_until_finished(self) -> None:
    """Waits for the saves in flight.

    Raises:
      CheckpointWriteError: if one of them failed.
    """
    try:
      self._manager.wait_until_finished()
    except _SAVE_ERRORS as e:
      raise self._write_error(e, self._in_flight) from e
    self._in_flight = []

  def close(self) -> None:
    """Waits for the saves in flight and closes the manager (also when a save failed).

    Raises:
      CheckpointWriteError: if a save in flight failed.
    """
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def _write_error(self, error: Exception, steps: list[int]) -> CheckpointWriteError:
    """`error` of a failed save as a `CheckpointWriteError`; deletes the failed steps' temporary
    directories (a complete step is never touched)."""
    self._in_flight = []
    try:
      self._manager.reload()  # Re-read the committed steps from the directory.
    except Exception:  # pylint: disable=broad-except
      pass  # Best effort: the manager's own list stays; the error below still names the failure.
    failed = sorted(set(steps) - set(self._manager.all_steps()))
    for step in failed:
      for tmp in fileio.glob(self.directory, f"{step}{_ORBAX_TMP_SUFFIX}*"):
        fileio.rmtree(tmp)
    latest = self._manager.latest_step()
    kept = (f"the newest complete checkpoint, step {latest}, is intact" if latest is not None
            else "no complete checkpoint exists")
    return CheckpointWriteError(
        f"{self.directory}: checkpoint of step {', '.join(map(str, failed)) or '?'} not written "
        f"({type(error).__name__}: {error}); {kept}")


def _absolute(directory: str) -> str:
  """Local paths made absolute (orbax/tensorstore require it); URLs (`gs://…`) unchanged.

  Raises:
    ValueError: for a URL mangled by `pathlib` (`gs:/bucket/…`), see `fileio.is_url`.
  """
  directory = os.fspath(directory)
  return directory if fileio.is_url(directory) else os.path.abspath(directory)


# Attempts at listing a checkpoint directory that another job is pruning (see `_open_read_only`).
_LIST_ATTEMPTS = 5


def _open_read_only(directory: str) -> ocp.CheckpointManager:
  """A read-only orbax manager over `directory`, robust to the writer pruning it meanwhile.

  The manager lists the step directories, then reads each step's metadata. The trainer's manager
  deletes its oldest checkpoint after each save (`max_to_keep`), so a reader in another job (the
  index builder, `predict`) can list a step that is gone when its metadata is read: orbax then
  raises `NotADirectoryError` or `FileNotFoundError` ("Path is not a directory: …/5350", found by
  the soak test). The listing is simply taken again; the pruned step is no longer in it.

  Raises:
    FileNotFoundError: if the directory still changed under every one of `_LIST_ATTEMPTS` listings.
  """
  for attempt in range(_LIST_ATTEMPTS):
    try:
      return ocp.CheckpointManager(directory, item_names=(PARAMS, OPT_STATE, META),
                                   options=ocp.CheckpointManagerOptions(create=False))
    except (FileNotFoundError, NotADirectoryError) as e:
      if attempt == _LIST_ATTEMPTS - 1:
        raise FileNotFoundError(f"{directory}: checkpoints deleted while being listed, "
                                f"{_LIST_ATTEMPTS} times ({e})") from e
      logging.info("%s: a checkpoint was deleted while being listed (%s); listing again",
                   directory, e)
      time.sleep(0.05 * (attempt + 1))
  raise AssertionError("unreachable")


@contextlib.contextmanager
def _read_only(directory: str, step: int | None) -> Iterator[tuple[ocp.CheckpointManager, int]]:
  """An orbax manager over an existing `checkpoints/` directory and the step to read (newest)."""
  directory = _absolute(directory)
  manager = _open_read_only(directory)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint found")
    yield manager, int(step)
  finally:
    manager.close()


def abstract_like(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings) for every array of `tree`."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def saved_param_parts(directory: str, step: int | None = None) -> tuple[list[str], int]:
  """Top-level keys of the `params` item of the newest (or given) checkpoint, and its step.

  E.g. `["encoder", "retriever"]` for a REALM pre-training checkpoint, `["reader", "retriever"]`
  for an Open-QA one, `["retriever"]` for ICT.

  Args:
    directory: a work directory or its `checkpoints/` directory.

  Raises:
    FileNotFoundError: if `directory` holds no checkpoint.
  """
  directory = resolve_checkpoint_dir(directory)
  with _read_only(directory, step) as (_, step):
    tree = ocp.StandardCheckpointer().metadata(
        str(fileio.join(_absolute(directory), str(step), PARAMS))).item_metadata.tree
    return sorted(tree.keys()), step


def resolve_checkpoint_dir(path: str) -> str:
  """`path/checkpoints` when `path` is a work directory, else `path` (a `checkpoints/` directory)."""
  nested = str(fileio.join(path, "checkpoints"))
  return nested if fileio.isdir(nested) else str(path)


def restore_partial_params(directory: str, target: Any, step: int | None = None
                           ) -> tuple[Any, int]:
  """Restores the subtrees named by `target` from a checkpoint's `params` item: THE partial restore.

  The trainers (`init_from`), the index builder (the retriever of each new checkpoint) and
  `predict` all restore through this function; the optimiser state and the parts not named in
  `target` are never read (a refresh reads about a third of a pre-training checkpoint).

  Args:
    directory: a work directory or its `checkpoints/` directory (local or `gs://`).
    target: nested dict of `jax.ShapeDtypeStruct`s (with shardings, e.g. from
      `train_state.abstract_train_state` or `abstract_like`): any subset of the saved tree, e.g.
      `{"retriever": …}` out of a `{"retriever", "encoder"}` checkpoint.
    step: the step (default: the newest).

  Returns:
    `(params shaped and placed like target, step)`.

  Raises:
    FileNotFoundError: if there is no checkpoint, or not (or no longer) at `step`.
    ValueError: if the checkpoint lacks a part of `target` or its shapes differ, naming the
      checkpoint and the parts asked for.
  """
  directory = resolve_checkpoint_dir(directory)
  if not fileio.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such checkpoint directory")
  with _read_only(directory, step) as (manager, step):
    if step not in manager.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (deleted meanwhile?)")
    restore_args = jax.tree_util.tree_map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        target)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          PARAMS: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                         partial_restore=True)}))
    except FileNotFoundError:
      raise
    except NotADirectoryError as e:  # The step was pruned by its writer while being read.
      raise FileNotFoundError(f"{directory}: checkpoint of step {step} deleted while being read "
                              f"({e})") from e
    except (KeyError, ValueError) as e:
      raise ValueError(f"{directory}/{step}: cannot restore params {sorted(target)} with the "
                       f"model's shapes ({e}); was it written with this model config?") from e
    logging.info("restored params %s of step %d from %s", sorted(target), step, directory)
    return restored[PARAMS], int(step)
