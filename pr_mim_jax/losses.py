"""Per-patch MSE over reconstructed tokens, weighted: sum(w * l) / sum(w)."""

import jax.numpy as jnp


def weighted_patch_mse(pred, target, weights=None):
  """pred, target: [B, K, P]; weights: [B, K] or None (all ones) -> scalar loss.

  Each patch's loss is the mean squared error over its P values (MAE's forward_loss);
  patches are then averaged with the given weights.
  """
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # [B, K]
  if weights is None:
    return jnp.mean(per_patch)
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
