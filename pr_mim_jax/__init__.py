"""pr_mim_jax: masked image modeling with partial reconstruction, in JAX/Flax."""

__version__ = "0.1.0"
