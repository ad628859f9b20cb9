"""realm_jax: REALM (Guu et al., 2020) in JAX/Flax.

`realm_jax.Predictor` (`realm_jax.predict.Predictor`) answers questions with a trained work
directory; it is imported on first use, so `import realm_jax` stays light (no JAX import).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
  """Lazy exports: `realm_jax.Predictor` imports `realm_jax.predict` when first used."""
  if name == "Predictor":
    from realm_jax import predict  # pylint: disable=g-import-not-at-top
    return predict.Predictor
  raise AttributeError(f"module 'realm_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + ["Predictor"])
