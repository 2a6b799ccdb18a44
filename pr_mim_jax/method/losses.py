"""Reconstruction losses: MAE's per-patch MSE, and how decoded and thrown tokens are weighed."""

import jax.numpy as jnp


def patch_mse(pred, target):
  """pred, target: [B, K, P] -> scalar float32.

  Each patch's loss is the mean squared error over its P values (MAE's forward_loss); the
  loss is the mean over the patches.
  """
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # [B, K]
  return jnp.mean(per_patch)


def reconstruction_loss(pred_dec, target_dec, pred_throw=None, target_throw=None,
                        thrown_weight: float = 1.0):
  """(loss, parts) over the decoded [B, n_dec, P] and, if given, thrown [B, n_throw, P] tokens.

  A decoded token weighs 1 and a thrown one `thrown_weight`: the loss is sum(w * l) / sum(w)
  over tokens, l a token's patch MSE. `parts` holds each group's own mean (loss_decoded,
  loss_thrown), for logging.
  """
  loss_dec = patch_mse(pred_dec, target_dec)
  if pred_throw is None:
    return loss_dec, {"loss_decoded": loss_dec}
  loss_throw = patch_mse(pred_throw, target_throw)
  n_dec, n_throw = pred_dec.shape[1], pred_throw.shape[1] * thrown_weight
  loss = (n_dec * loss_dec + n_throw * loss_throw) / (n_dec + n_throw)
  return loss, {"loss_decoded": loss_dec, "loss_thrown": loss_throw}
