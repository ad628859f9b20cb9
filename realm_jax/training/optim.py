"""BERT's AdamW and learning-rate schedules (REFERENCE "Hyper-parameters"; Devlin et al., 2019).

The optimiser used everywhere in REALM/ORQA: Adam with decoupled weight decay 0.01,
β = (0.9, 0.999), ε = 1e-6, no decay on LayerNorm parameters and biases, global-norm clipping at
1.0, and BERT's schedule (`optimization.create_optimizer`): `tf.train.polynomial_decay(lr, step,
num_train_steps, end_learning_rate=0, power=1)`, i.e. `lr · (1 − step / num_train_steps)`,
replaced during the first `num_warmup_steps` steps by the linear warm-up
`lr · step / num_warmup_steps`. The decay counts from step 0, not from the end of the warm-up, so
the rate drops from about `lr` to `lr · (1 − warmup / num_train_steps)` when the warm-up ends, as
in BERT.

One deliberate difference from BERT's `AdamWeightDecayOptimizer`: that optimiser has no Adam bias
correction (it divides the raw moments, `m / (sqrt(v) + ε)`), while `optax.adamw` divides the
bias-corrected moments `m̂ = m / (1 − β1^t)`, `v̂ = v / (1 − β2^t)` (and adds ε to `sqrt(v̂)`).
With β = (0.9, 0.999), BERT's Adam step is larger by `(1 − β1^t) / sqrt(1 − β2^t)` (ε aside):
3.2× at step 1, 6.5× at step 10, 3.2× at step 100, 1.26× at step 1,000, and within 1 % from step
3,925 on. The difference is confined to the first few thousand steps, mostly inside the warm-up
where the rate is small; reproducing BERT's early steps exactly would need a transformation without
bias correction. Weight decay is decoupled in both (`lr · (adam_step + weight_decay · param)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """BERT AdamW settings.

  Attributes:
    learning_rate: peak learning rate (1e-5 for Open-QA fine-tuning, 3e-5 for REALM pre-training,
      1e-4 for ICT in the paper).
    num_train_steps: total steps; the schedule decays linearly to 0 at this step.
    warmup_steps: linear warm-up steps; `None` uses the official fine-tuning rule
      `min(10000, max(100, num_train_steps // 10))`.
    weight_decay: decoupled weight decay (not applied to LayerNorm and biases).
    b1, b2, eps: Adam moments.
    clip_norm: global gradient-norm clip; 0 disables it.
    part_learning_rate_scales: `((part, scale), ...)`: the updates of the top-level params part
      `part` (e.g. `"retriever"`) are multiplied by `scale`, i.e. that part trains with
      `scale × learning_rate` (0 freezes it). Empty: one rate for every part.
    part_frozen_steps: `((part, n), ...)`: the top-level params part `part` does not change during
      the first `n` updates: its gradients are zeroed before the clipping and Adam (they count
      neither in the global norm nor in Adam's moments) and so are its updates, weight decay
      included. From update `n` on it trains at the schedule's rate of that step (no warm-up of its
      own). E.g. `(("retriever", 40),)` in REALM pre-training: the encoder's fresh masked-LM head
      learns for 40 steps before the retriever is trained through it.

  Raises:
    ValueError: on a negative step count, a non-positive learning rate, a negative scale or a
      negative number of frozen steps.
  """

  learning_rate: float = 1e-5
  num_train_steps: int = 10_000
  warmup_steps: int | None = None
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  clip_norm: float = 1.0
  part_learning_rate_scales: tuple[tuple[str, float], ...] = ()
  part_frozen_steps: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be positive, got {self.learning_rate}")
    if self.num_train_steps < 0:  # 0: an evaluation-only run (`realm-jax evaluate`).
      raise ValueError(f"OptimizerConfig.num_train_steps must be >= 0, got {self.num_train_steps}")
    object.__setattr__(self, "part_learning_rate_scales",
                       tuple((str(p), float(s)) for p, s in self.part_learning_rate_scales))
    if any(s < 0 for _, s in self.part_learning_rate_scales):
      raise ValueError(f"OptimizerConfig.part_learning_rate_scales must be >= 0, got "
                       f"{self.part_learning_rate_scales}")
    object.__setattr__(self, "part_frozen_steps",
                       tuple((str(p), int(n)) for p, n in self.part_frozen_steps))
    if any(n < 0 for _, n in self.part_frozen_steps):
      raise ValueError(f"OptimizerConfig.part_frozen_steps must be >= 0, got "
                       f"{self.part_frozen_steps}")

  @property
  def resolved_warmup_steps(self) -> int:
    if self.warmup_steps is not None:
      return min(self.warmup_steps, self.num_train_steps)
    return min(self.num_train_steps, min(10_000, max(100, self.num_train_steps // 10)))


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """BERT's schedule: warm-up `lr · step / warmup`, then `lr · (1 − step / num_train_steps)`.

  The linear decay is `tf.train.polynomial_decay` (power 1, end 0) counted from step 0, as in
  BERT's `create_optimizer`; it reaches 0 at `num_train_steps` and stays there. `step` is the
  number of updates already applied (optax's count; TF's `global_step` before the update).

  Returns:
    An `optax.Schedule`: step (int) → learning rate (float32 scalar).
  """
  warmup = config.resolved_warmup_steps
  total = max(config.num_train_steps, 1)
  return optax.join_schedules([
      optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
      optax.linear_schedule(config.learning_rate * (1.0 - warmup / total), 0.0,
                            max(total - warmup, 1)),
  ], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the parameters that get weight decay: every kernel/embedding, not LayerNorm or bias.

  Args:
    params: a Flax parameter pytree (nested dicts).

  Returns:
    A pytree of bools with the same structure.
  """
  flat = traverse_util.flatten_dict(params)
  mask = {}
  for path, _ in flat.items():
    name = path[-1]
    in_norm = any("norm" in str(p).lower() for p in path)
    mask[path] = not (in_norm or name in ("bias", "scale", "output_bias"))
  return traverse_util.unflatten_dict(mask)


def bert_adamw(config: OptimizerConfig,
               trainable: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """The BERT AdamW optimiser with clipping and the linear schedule.

  Args:
    config: the optimiser settings.
    trainable: optional function from params to a bool pytree; False leaves are frozen (their
      updates are zeroed and no Adam state is kept for them), e.g. the document tower in Open-QA
      fine-tuning when the towers are not shared.

  Returns:
    An `optax.GradientTransformation`.
  """
  chain = []
  frozen = {part: n for part, n in config.part_frozen_steps if n > 0}
  if frozen:  # no gradient into the clipping norm or Adam's moments while frozen
    chain.append(_freeze_parts(frozen))
  if config.clip_norm:
    chain.append(optax.clip_by_global_norm(config.clip_norm))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask))
  if config.part_learning_rate_scales:
    chain.append(_scale_parts(dict(config.part_learning_rate_scales)))
  if frozen:  # nor any update (AdamW's weight decay) while frozen
    chain.append(_freeze_parts(frozen))
  tx = optax.chain(*chain)
  if trainable is None:
    return tx

  def labels(params):
    return jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable(params))

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _check_parts(name: str, parts, updates) -> None:
  missing = set(parts) - set(updates)
  if missing:
    raise ValueError(f"{name} names parts {sorted(missing)} that the params do not have "
                     f"({sorted(updates)})")


def _scale_parts(scales: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of each top-level params part named in `scales` by its scale."""

  def update(updates, state, params=None):
    del params
    _check_parts("part_learning_rate_scales", scales, updates)
    return {k: (jax.tree_util.tree_map(lambda u, s=scales[k]: u * s, v) if k in scales else v)
            for k, v in updates.items()}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class FreezePartsState(NamedTuple):
  count: jax.Array  # updates seen so far (int32)


def _freeze_parts(steps: dict[str, int]) -> optax.GradientTransformation:
  """Zeroes the updates of each top-level params part named in `steps` during its first n updates."""

  def init(params):
    del params
    return FreezePartsState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    _check_parts("part_frozen_steps", steps, updates)
    out = {k: (jax.tree_util.tree_map(
        lambda u, n=steps[k]: jnp.where(state.count < n, jnp.zeros_like(u), u), v)
               if k in steps else v) for k, v in updates.items()}
    return out, FreezePartsState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)
