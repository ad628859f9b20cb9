"""The trainer's done marker in the work directory (asynchronous index refresh, REALM §3.4).

The trainer and the index builder share nothing but the work directory. When the trainer has saved
its final checkpoint it writes `WORKDIR/trainer_done.json`; the index builder embeds that checkpoint
and exits. A trainer that starts (or resumes) removes an earlier run's marker.
"""

from __future__ import annotations

import json
import logging
import time

from realm_jax import fileio


TRAINER_DONE_NAME = "trainer_done.json"


def mark_trainer_done(workdir: str, final_step: int) -> None:
  """Called by the trainer after its final checkpoint: the index builder embeds it and exits.

  Writes `WORKDIR/trainer_done.json` (`{"final_step": …, "time": …}`) atomically (temp + rename
  locally, one object write on object stores).

  Args:
    workdir: the run's work directory (local path or URL).
    final_step: the step of the trainer's final checkpoint.
  """
  fileio.makedirs(workdir)
  fileio.write_atomic(fileio.join(workdir, TRAINER_DONE_NAME),
                      json.dumps({"final_step": int(final_step), "time": time.time()}) + "\n")


def clear_trainer_done(workdir: str) -> None:
  """Called by the trainer when it starts (or resumes): removes a done marker of an earlier run."""
  fileio.remove(fileio.join(workdir, TRAINER_DONE_NAME))


def trainer_final_step(workdir: str) -> int | None:
  """The `final_step` of `WORKDIR/trainer_done.json`, or None when the trainer has not finished.

  A malformed marker is logged and treated as absent.
  """
  path = fileio.join(workdir, TRAINER_DONE_NAME)
  try:
    return int(json.loads(fileio.read_text(path))["final_step"])
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("ignoring malformed %s: %s", path, e)
    return None
