"""The one train loop of every task: initialisation and resume, steps, metrics, checkpoints.

A task (`finetune`, `pretrain`, `ict`) supplies only what differs: how its params are initialised,
its pure `train_step`, `next_batch(step, state)` for this process, an optional periodic evaluator and
its index-refresh policy (inside `next_batch`, which sees the step). `Trainer` does the rest once:

  * the mesh (data parallel over every device of every process) and the metric writer;
  * ONE restore order, decided before anything is initialised (t5x, big_vision): the work
    directory's newest checkpoint (params, optimiser state and the data order) > `init_from` (another
    run's params, partially restored) > the pretrained checkpoint > random. Checkpoints are restored
    into `jax.eval_shape` targets, so no throw-away initialisation is computed on resume;
  * the step loop, with the step `jax.jit`-ed once over the mesh (state replicated and donated, batch
    split over `data`);
  * metrics averaged over each logging window, plus the learning rate, step time, examples/s and the
    host share of the wall time; periodic evaluation; a `jax.profiler` trace of chosen steps;
  * the non-finite-loss policy: `"stop"` raises (and no checkpoint is written from a window that saw
    a non-finite loss, so the last checkpoint stays good), `"skip"` leaves the state unchanged for
    such a step, counts it, and goes on;
  * checkpoints every `checkpoint_every_steps` and at the end (asynchronous orbax saves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from realm_jax import fileio
from realm_jax import sharding
from realm_jax.training import checkpointing
from realm_jax.training import metric_writer
from realm_jax.training import train_state as train_state_lib

TrainState = train_state_lib.TrainState
NAN_POLICIES = ("stop", "skip")
LOSS = "train/loss"
NONFINITE = "train/nonfinite_steps"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate, checkpoint and profile.

  Attributes:
    num_train_steps: total steps (the run ends at this step, also after a resume).
    log_every_steps: metrics are averaged over this many steps and written.
    checkpoint_every_steps: checkpoint interval (and always at the last step).
    eval_every_steps: run the task's evaluator every this many steps during training (0: never;
      the tasks evaluate before and after training on their own).
    nan_policy: `"stop"` (raise `FloatingPointError`) or `"skip"` (drop the update of a step with a
      non-finite loss or gradient norm, count it in `train/nonfinite_steps`, go on).
    profile_steps: `(first, last)`: write a `jax.profiler` trace of these steps (1-based, inclusive)
      to `WORKDIR/profile` (TensorBoard's profile plugin or Perfetto read it); `()`: none.
    keep_checkpoints: the newest checkpoints kept.

  Raises:
    ValueError: on a non-positive interval, an unknown policy or a malformed `profile_steps`.
  """

  num_train_steps: int = 100
  log_every_steps: int = 10
  checkpoint_every_steps: int = 100
  eval_every_steps: int = 0
  nan_policy: str = "stop"
  profile_steps: tuple[int, ...] = ()
  keep_checkpoints: int = 3

  def __post_init__(self):
    object.__setattr__(self, "profile_steps", tuple(self.profile_steps))  # gin passes lists
    if self.num_train_steps < 0:
      raise ValueError(f"num_train_steps={self.num_train_steps} must be >= 0")
    if self.log_every_steps < 1 or self.checkpoint_every_steps < 1 or self.eval_every_steps < 0:
      raise ValueError("log_every_steps and checkpoint_every_steps must be >= 1 and "
                       f"eval_every_steps >= 0, got {self.log_every_steps}, "
                       f"{self.checkpoint_every_steps}, {self.eval_every_steps}")
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(f"nan_policy={self.nan_policy!r}; expected one of {NAN_POLICIES}")
    if self.profile_steps and (len(self.profile_steps) != 2
                               or not 1 <= self.profile_steps[0] <= self.profile_steps[1]):
      raise ValueError(f"profile_steps={self.profile_steps!r}: expected (first, last) with "
                       "1 <= first <= last")


def jit_train_step(train_step: Callable[..., tuple[TrainState, Mapping[str, jax.Array]]],
                   mesh: jax.sharding.Mesh, nan_policy: str = "stop"):
  """A task's pure step, jitted once over the mesh: THE one place train steps are compiled.

  The state is replicated and donated, the batch split over `data`, the metrics replicated. The
  step's metrics gain `train/nonfinite_steps` (1.0 when the loss or gradient norm is not finite);
  under `nan_policy="skip"` such a step returns the old params and optimiser state (the step
  counter still advances, so the data order and the rng stay aligned with an uninterrupted run).

  Args:
    train_step: `train_step(state, batch, rng) -> (state, metrics)`, static arguments bound.
    mesh: the device mesh.
    nan_policy: `"stop"` or `"skip"` (see `LoopConfig`).

  Returns:
    `step(state, batch, rng) -> (state, metrics)`.
  """
  skip = nan_policy == "skip"

  def guarded(state, batch, rng):
    new_state, metrics = train_step(state, batch, rng)
    finite = jnp.isfinite(metrics[LOSS])
    if "train/grad_norm" in metrics:
      finite &= jnp.isfinite(metrics["train/grad_norm"])
    if skip:
      kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                    (new_state.params, new_state.opt_state),
                                    (state.params, state.opt_state))
      new_state = new_state.replace(params=kept[0], opt_state=kept[1])
    return new_state, dict(metrics, **{NONFINITE: 1.0 - finite.astype(jnp.float32)})

  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(guarded, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


class DataOrder(Protocol):
  """What the loop checkpoints of a task's input pipeline (`data.example_order.ExampleOrder`)."""

  def state(self) -> dict[str, int]: ...

  def restore(self, state: Mapping[str, int]) -> None: ...


@dataclasses.dataclass
class Task:
  """What one task supplies to the loop.

  Attributes:
    name: the progress-bar label (e.g. "fine-tuning").
    train_step: the pure `train_step(state, batch, rng) -> (state, metrics)`, static arguments
      bound; metrics are float32 scalars and include `train/loss` (and usually `train/grad_norm`).
    next_batch: `(step, state) -> {name: np.ndarray}`, THIS process's rows of the global batch of
      `step` (0-based). It may retrieve with `state.params` and refresh the index first (the task's
      refresh policy); it is called on every process.
    data_order: the input order whose state goes into every checkpoint.
    global_batch_size: examples per step over all processes (for examples/s).
    evaluate: `(params, step) -> {name: float}`, run every `eval_every_steps`; None: no periodic
      evaluation.
    host_metrics: `step -> {name: float}`, host-side scalars added to each logged window (index
      staleness, refresh counts); None: none.
    checkpoint_meta: JSON-ready metadata stored with every checkpoint (model and task configs).
    learning_rate: the optimiser's schedule (`step -> lr`), logged as `train/learning_rate`.
    progress: metric keys shown on the progress bar.
    batch_needs_params: `next_batch` reads `state.params` (retrieval with the current query
      tower), so it cannot start before the previous step ends; the loop then waits for that step
      first and logs the wait as `perf/device_wait_fraction` (the rest is host work,
      `perf/host_fraction`). False (ICT): the next batch is built while the step runs.
  """

  name: str
  train_step: Callable[..., tuple[TrainState, Mapping[str, jax.Array]]]
  next_batch: Callable[[int, TrainState], Mapping[str, np.ndarray]]
  data_order: DataOrder
  global_batch_size: int
  evaluate: Callable[[Any, int], dict[str, float]] | None = None
  host_metrics: Callable[[int], dict[str, float]] | None = None
  checkpoint_meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  learning_rate: optax.Schedule | None = None
  progress: Sequence[str] = (LOSS,)
  batch_needs_params: bool = True


class Trainer:
  """The mesh, metric writer and checkpoint manager of one run, and the loop over them.

  Args:
    workdir: the run directory (local or `gs://`): `checkpoints/`, `tensorboard/`, `profile/`,
      `summary.json`.
    config: the loop settings.
    global_batch_size: examples per step; must split over the mesh's `data` axis.
    mesh_shape: the device mesh (`sharding.make_mesh`).

  Raises:
    ValueError: if the batch does not split over the mesh.
  """

  def __init__(self, workdir: str, config: LoopConfig, global_batch_size: int,
               mesh_shape: Sequence[int] = (-1, 1)):
    self.workdir, self.config = workdir, config
    self.mesh = sharding.setup_training_mesh(mesh_shape, global_batch_size)
    fileio.makedirs(workdir)  # Local or gs://.
    self.is_main = jax.process_index() == 0
    self.writer = metric_writer.MetricWriter(workdir)
    self.checkpoints = checkpointing.CheckpointManager(
        checkpointing.checkpoint_dir(workdir), max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every_steps)
    self.origin = ""  # Where `initial_state` took the state from (for the logs and summary).
    self._profile_dir: fileio.Path | None = None
    self._profile_local = ""
    self._t0 = time.time()

  # ------------------------------------------------------------------------------------ start

  def initial_state(self, *, random_params: Callable[[jax.Array], Any],
                    initial_params: Callable[[], Any], tx: optax.GradientTransformation,
                    data_order: DataOrder, init_from: str = "",
                    params_from: Callable[[str, Any], Any] | None = None) -> TrainState:
    """The state to train from, by the one restore order (module docstring).

    Args:
      random_params: `rng -> params`, for the shapes of the abstract state (never computed).
      initial_params: `() -> params`, the pretrained checkpoint's params (random without one).
      tx: the optimiser.
      data_order: restored from the checkpoint's metadata on resume.
      init_from: another run's work or `checkpoints/` directory (or a converted checkpoint);
        ignored when the work directory has a checkpoint (resume wins).
      params_from: `(init_from, abstract_params) -> params`, the task's mapping of another run's
        parts onto its own (partial restore into the abstract targets, fresh parts initialised).

    Returns:
      The replicated `TrainState`; `self.origin` says where it came from.

    Raises:
      FileNotFoundError: if `init_from` holds no checkpoint.
      ValueError: if a checkpoint does not fit the model.
    """
    abstract = train_state_lib.abstract_train_state(random_params, tx, self.mesh)
    latest = self.checkpoints.latest_step()
    if latest is not None:
      params, opt_state, meta = self.checkpoints.restore(latest, abstract.params,
                                                         abstract.opt_state)
      data_order.restore(meta["data"])
      step = jax.device_put(jnp.asarray(latest, jnp.int32), sharding.replicated(self.mesh))
      self.origin = f"resumed from {self.checkpoints.directory} step {latest}"
      state = TrainState(step=step, params=params, opt_state=opt_state)
    else:
      if init_from:
        if params_from is None:
          raise ValueError("this task cannot start from init_from")
        params = params_from(init_from, abstract.params)
        self.origin = f"params from {init_from}"
      else:
        params = initial_params()
        self.origin = "initial params (pretrained checkpoint, else random)"
      state = train_state_lib.create_train_state(params, tx, self.mesh)
    logging.info("train state: %s", self.origin)
    return state

  # ------------------------------------------------------------------------------------- loop

  def fit(self, task: Task, state: TrainState, rng: jax.Array) -> tuple[TrainState,
                                                                          dict[str, Any]]:
    """Trains from `state.step` to `num_train_steps`; returns the final state and a summary.

    Returns:
      `(state, summary)`: `train` (the last logged window), `history` (every logged window, with
      `step`), `evals` (periodic evaluations, with `step` and `train_time_s`, the seconds spent
      training since the start of this `fit`, evaluations excluded), `start_step`, `steps`,
      `nonfinite_steps`, and `timings` `train_s` (evaluations included), `host_s`, `eval_s`,
      `device_s` (seconds).

    Raises:
      FloatingPointError: with `nan_policy="stop"`, at the first logged or checkpointed window that
        saw a non-finite loss; the last checkpoint written before it is intact.
    """
    cfg = self.config
    step_fn = jit_train_step(task.train_step, self.mesh, cfg.nan_policy)
    start = int(jax.device_get(state.step))
    window: list[Mapping[str, jax.Array]] = []
    history, evals = [], []
    last: dict[str, float] = {}
    host_s = window_host_s = window_wait_s = eval_s = 0.0
    previous = None
    nonfinite_total = 0
    t_train = t_window = time.perf_counter()
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(range(start, cfg.num_train_steps), desc=task.name, unit="step",
                    disable=not self.is_main)
    try:
      for step in bar:
        done = step + 1
        with self._profiling(done):
          t = time.perf_counter()
          if task.batch_needs_params and previous is not None:
            jax.block_until_ready(previous)  # The previous step, whose params next_batch reads.
            window_wait_s += time.perf_counter() - t
            t = time.perf_counter()
          batch = sharding.global_batch_from_local(dict(task.next_batch(step, state)), self.mesh)
          window_host_s += time.perf_counter() - t
          state, metrics = step_fn(state, batch, rng)
          window.append(metrics)
          previous = metrics
        final = done == cfg.num_train_steps
        if done % cfg.log_every_steps == 0 or final:
          last, nonfinite = self._window_means(window, done)
          nonfinite_total += nonfinite
          wall = time.perf_counter() - t_window
          last.update(self._perf(task, len(window), wall, window_host_s, done))
          last["perf/device_wait_fraction"] = window_wait_s / max(wall, 1e-9)
          if task.host_metrics is not None:
            last.update(task.host_metrics(step))
          history.append(dict(last, step=done))
          self.writer.write(done, last)
          bar.set_postfix({k.split("/")[-1]: f"{last[k]:.3f}" for k in task.progress if k in last})
          logging.info("%s step %d: %s", task.name, done, last)
          host_s += window_host_s
          window, window_host_s, window_wait_s, t_window = [], 0.0, 0.0, time.perf_counter()
        if cfg.eval_every_steps and task.evaluate is not None and done % cfg.eval_every_steps == 0:
          t = time.perf_counter()
          train_time_s = t - t_train - eval_s  # The curve's x axis: training time, evals excluded.
          result = task.evaluate(state.params, done)
          eval_s += time.perf_counter() - t
          evals.append(dict(result, step=done, train_time_s=train_time_s))
          self.writer.write(done, result, prefix="eval")
        if self.checkpoints.should_save(done) or final:
          if window:  # A checkpoint never follows a non-finite loss under the "stop" policy.
            self._check_finite(window, done)
          self.checkpoints.save(done, state.params, state.opt_state,
                                dict(task.checkpoint_meta, data=task.data_order.state()),
                                force=final)
    except BaseException:  # The metrics written so far are flushed (and a W&B run finished).
      self.writer.close()
      raise
    finally:  # A failure (e.g. a non-finite loss) still commits the saves in flight.
      bar.close()
      self.checkpoints.wait_until_finished()
    train_s = time.perf_counter() - t_train
    host_s += window_host_s
    return state, {"train": last, "history": history, "evals": evals, "start_step": start,
                   "steps": max(cfg.num_train_steps, start), "nonfinite_steps": nonfinite_total,
                   "timings": {"train_s": train_s, "host_s": host_s, "eval_s": eval_s,
                               "device_s": max(train_s - host_s - eval_s, 0.0)}}

  def _window_means(self, window: Sequence[Mapping[str, jax.Array]], step: int
                    ) -> tuple[dict[str, float], int]:
    """Means over the window's finite steps; `train/nonfinite_steps` is the window's count."""
    values = jax.device_get(list(window))
    bad = np.asarray([v[NONFINITE] for v in values]) > 0
    if bad.any() and self.config.nan_policy == "stop":
      raise FloatingPointError(f"step {step}: non-finite loss or gradient norm at step(s) "
                               f"{[step - len(values) + 1 + int(i) for i in np.flatnonzero(bad)]}")
    good = [v for v, b in zip(values, bad) if not b] or values
    means = {k: float(np.mean([v[k] for v in good])) for k in values[-1] if k != NONFINITE}
    means[NONFINITE] = float(bad.sum())
    return means, int(bad.sum())

  def _check_finite(self, window: Sequence[Mapping[str, jax.Array]], step: int) -> None:
    if self.config.nan_policy == "stop":
      self._window_means(window, step)

  def _perf(self, task: Task, steps: int, wall_s: float, host_s: float, step: int
            ) -> dict[str, float]:
    out = {"perf/step_time_s": wall_s / steps,
           "perf/examples_per_s": task.global_batch_size * steps / max(wall_s, 1e-9),
           "perf/host_fraction": host_s / max(wall_s, 1e-9)}
    if task.learning_rate is not None:
      out["train/learning_rate"] = float(task.learning_rate(step - 1))
    return out

  @contextlib.contextmanager
  def _profiling(self, step: int) -> Iterator[None]:
    """Starts a `jax.profiler` trace before the first profiled step, stops it after the last."""
    profile = self.config.profile_steps
    if not profile or step not in (profile[0], profile[1]):
      yield
      return
    if step == profile[0]:
      self._profile_dir = fileio.join(self.workdir, "profile")
      local = self._profile_dir
      if fileio.is_url(local):  # The profiler writes local files; they are uploaded at the end.
        local = tempfile.mkdtemp(prefix="realm_jax_profile_")
      self._profile_local = str(local)
      jax.profiler.start_trace(self._profile_local)
    try:
      yield
    finally:
      if step == profile[1]:
        jax.effects_barrier()
        jax.profiler.stop_trace()
        if fileio.is_url(self._profile_dir):
          for root, _, files in os.walk(self._profile_local):
            for name in files:
              rel = os.path.relpath(os.path.join(root, name), self._profile_local)
              fileio.upload_file(os.path.join(root, name), fileio.join(self._profile_dir, rel))
        logging.info("profile of steps %d-%d written to %s", profile[0], profile[1],
                     self._profile_dir)

  # ------------------------------------------------------------------------------------ end

  def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
    """Closes the checkpoints and the writer and writes `WORKDIR/summary.json` (process 0).

    `summary["timings"]["total_s"]` is set to the seconds since the trainer was created.

    Returns:
      `summary`.
    """
    self.checkpoints.close()
    summary.setdefault("timings", {})["total_s"] = time.time() - self._t0
    metric_writer.write_summary_json(
        self.workdir, {k: v for k, v in summary.items() if k != "examples"})
    self.writer.close()
    return summary
