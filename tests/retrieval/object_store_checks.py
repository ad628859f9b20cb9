"""Checks shared by the object-store snapshot tests (`memory://` and `gs://` on an emulator)."""

from __future__ import annotations

import json

from realm_jax import fileio
from realm_jax import index_builder
from realm_jax.retrieval import trainer_done


def check_done_marker_and_journal(workdir: str) -> None:
  """The trainer's done marker and the index builder's journal round-trip under `workdir` (a URL)."""
  assert trainer_done.trainer_final_step(workdir) is None
  trainer_done.mark_trainer_done(workdir, 120)
  assert trainer_done.trainer_final_step(workdir) == 120
  trainer_done.clear_trainer_done(workdir)
  assert trainer_done.trainer_final_step(workdir) is None
  journal = index_builder._Journal(workdir, enabled=True)  # pylint: disable=protected-access
  journal.set(phase="waiting")
  journal.record({"params_step": 0})
  journal.record({"params_step": 40})
  assert json.loads(fileio.read_text(f"{workdir}/index_builder/status.json"))["phase"] == "waiting"
  assert [r["params_step"] for r in index_builder.read_refreshes(workdir)] == [0, 40]
