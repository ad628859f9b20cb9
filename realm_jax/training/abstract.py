"""Weight-free views of a train step: its shapes (`jax.eval_shape`) and its compiled memory.

Each train module (`finetune`, `pretrain`, `ict`) describes one step by three things — a function
initialising its params from a PRNG key, its pure `train_step(state, batch, rng)`, and the shapes of a
global batch — and these helpers turn that into what a config check or a memory plan needs, without
any weights, data or accelerator (STYLE: build sharded state from `jax.eval_shape`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from realm_jax.training import finetune

StepFn = Callable[..., tuple[Any, Mapping[str, jax.Array]]]


def _abstract_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation
                    ) -> finetune.TrainState:
  def init(rng):
    params = init_params(rng)
    return finetune.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  return jax.eval_shape(init, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))


def train_step_shapes(init_params: Callable[[jax.Array], Any], step: StepFn,
                      batch: Mapping[str, jax.ShapeDtypeStruct], tx: optax.GradientTransformation
                      ) -> dict[str, Any]:
  """Traces init and one step abstractly.

  Args:
    init_params: `rng -> params` (random initialisation; shapes only are used).
    step: `train_step(state, batch, rng) -> (state, metrics)` with its static arguments bound.
    batch: `{name: jax.ShapeDtypeStruct}` of one global batch.
    tx: the optimiser (its state shapes are part of the result).

  Returns:
    `{"params", "opt_state", "metrics"}` pytrees of `jax.ShapeDtypeStruct`.

  Raises:
    Whatever tracing raises for an inconsistent configuration (shape errors name the op).
  """
  state = _abstract_state(init_params, tx)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  _, metrics = jax.eval_shape(step, state, dict(batch), rng)
  return {"params": state.params, "opt_state": state.opt_state, "metrics": metrics}


def compiled_temp_bytes(init_params: Callable[[jax.Array], Any], step: StepFn,
                        batch: Mapping[str, jax.ShapeDtypeStruct],
                        tx: optax.GradientTransformation) -> int:
  """Bytes of temporary buffers (activations) of the step compiled for ONE device of the backend.

  Compiles from abstract shapes (no weights) and reads XLA's memory analysis; on XLA:CPU it
  estimates what a TPU core needs for the same per-device batch.
  """
  state = _abstract_state(init_params, tx)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  compiled = jax.jit(step).lower(state, dict(batch), rng).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)
