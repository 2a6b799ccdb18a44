"""Reconstruction targets per patch: raw pixels or MAE's per-patch normalised pixels."""

import jax.numpy as jnp

from pr_mim_jax.models import vit

TARGETS = ("pixel", "norm_pixel")
NORM_EPS = 1e-6


def patch_targets(images, patch: int, target: str):
  """images: [B, H, W, 3] -> [B, L, p*p*3] float32 targets."""
  patches = vit.patchify(images.astype(jnp.float32), patch)
  if target == "pixel":
    return patches
  if target == "norm_pixel":
    # MAE's norm_pix_loss: per-patch mean and unbiased (ddof=1) variance.
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_EPS)
  raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
