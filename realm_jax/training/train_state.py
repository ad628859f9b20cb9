"""The train state, its creation on the mesh, and weight-free views of a train step.

Every task (`finetune`, `pretrain`, `ict`) trains one `TrainState` with one pure step
`train_step(state, batch, rng) -> (state, metrics)`. A task describes its step by a `StepParts`: a
function initialising its params from a PRNG key, the step with its static arguments bound, the
shapes of one global batch and the optimiser. From that, this module gives the abstract state
(`jax.eval_shape`, the targets checkpoints are restored into), the step's output shapes (config
checks) and its compiled activation memory (memory plans), without weights, data or accelerator
(STYLE: build sharded state from `jax.eval_shape`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from realm_jax import sharding
from realm_jax.models import realm
from realm_jax.training import optim

Array = jax.Array
StepFn = Callable[..., tuple[Any, Mapping[str, Array]]]


@flax.struct.dataclass
class TrainState:
  """What a train step reads and returns.

  Attributes:
    step: `[]` int32, the number of updates applied.
    params: the model parameters, e.g. `{"retriever", "reader"}` (fine-tuning), `{"retriever",
      "encoder"}` (REALM pre-training) or `{"retriever"}` (ICT); float32 arrays.
    opt_state: the optimiser state of `params`.
  """

  step: Array
  params: Any
  opt_state: Any


def create_train_state(params: Any, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                       ) -> TrainState:
  """Step 0 with `params` and a fresh optimiser state, replicated on `mesh`.

  The optimiser state is created on the devices (`jax.jit(init, out_shardings=…)`), never on the
  host.

  Args:
    params: host or device arrays.
    tx: the optimiser.
    mesh: the device mesh.

  Returns:
    The replicated `TrainState`.
  """
  rep = sharding.replicated(mesh)
  params = jax.device_put(params, rep)

  @functools.partial(jax.jit, out_shardings=rep)
  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  return init(params)


def abstract_train_state(init_params: Callable[[Array], Any], tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """The `TrainState` as `jax.ShapeDtypeStruct`s, computed by `jax.eval_shape` (nothing allocated).

  Args:
    init_params: `rng -> params` (a random initialisation; only its shapes are used).
    tx: the optimiser (its state shapes are part of the result).
    mesh: when given, every leaf carries the replicated sharding of this mesh, so that a
      checkpoint restored into the result lands directly on its devices.

  Returns:
    A `TrainState` whose leaves are `jax.ShapeDtypeStruct`s.
  """
  def init(rng):
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  state = jax.eval_shape(init, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  if mesh is None:
    return state
  rep = sharding.replicated(mesh)
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                state)


@dataclasses.dataclass(frozen=True)
class StepParts:
  """One task's train step, described without weights or data.

  Attributes:
    init_params: `rng -> params`, the random initialisation (shapes).
    train_step: `train_step(state, batch, rng) -> (state, metrics)` with static arguments bound.
    batch: `{name: jax.ShapeDtypeStruct}` of one global batch.
    tx: the optimiser.
  """

  init_params: Callable[[Array], Any]
  train_step: StepFn
  batch: Mapping[str, jax.ShapeDtypeStruct]
  tx: optax.GradientTransformation


def make_step_parts(train_step: StepFn, model: Any, parts: tuple[str, ...],
                    batch: Mapping[str, jax.ShapeDtypeStruct],
                    tx: optax.GradientTransformation | None = None, **static: Any) -> StepParts:
  """A task's `StepParts`: the random init of `parts` of `model` (`realm.init_params`, no
  checkpoint), `train_step` with `tx` and `static` bound, and the batch shapes.

  Args:
    train_step: the task's `train_step(state, batch, rng, *, tx, **static)`.
    model: the `realm.ModelConfig`.
    parts: the params' parts, e.g. `("retriever", "reader")`.
    batch: `{name: jax.ShapeDtypeStruct}` of one global batch.
    tx: the optimiser (default: BERT's AdamW with default settings).
    **static: the step's other static arguments (configs, mesh).
  """
  tx = tx or optim.bert_adamw(optim.OptimizerConfig())
  return StepParts(functools.partial(realm.init_params, model, parts=parts, pretrained=False),
                   functools.partial(train_step, tx=tx, **static), batch, tx)


def train_step_shapes(parts: StepParts) -> dict[str, Any]:
  """Traces init and one step abstractly.

  Returns:
    `{"params", "opt_state", "metrics"}` pytrees of `jax.ShapeDtypeStruct`.

  Raises:
    Whatever tracing raises for an inconsistent configuration (shape errors name the op).
  """
  state = abstract_train_state(parts.init_params, parts.tx)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  _, metrics = jax.eval_shape(parts.train_step, state, dict(parts.batch), rng)
  return {"params": state.params, "opt_state": state.opt_state, "metrics": metrics}


def compiled_temp_bytes(parts: StepParts) -> int:
  """Bytes of temporary buffers (activations) of the step compiled for ONE device of the backend.

  Compiles from abstract shapes (no weights) and reads XLA's memory analysis; on XLA:CPU it
  estimates what a TPU core needs for the same per-device batch.
  """
  state = abstract_train_state(parts.init_params, parts.tx)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  compiled = jax.jit(parts.train_step).lower(state, dict(parts.batch), rng).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)
