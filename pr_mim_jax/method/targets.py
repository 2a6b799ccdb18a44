"""Reconstruction targets per patch: raw pixels, MAE's normalised pixels, or HOG (MaskFeat).

`hog` is our reading of MaskFeat's target, computed per patch so every target has one
vector per token:
- Computed per RGB channel on the normalised input image (the one the encoder sees).
- Gradients by centred differences [-1, 0, 1]: gx = I[y, x+1] - I[y, x-1],
  gy = I[y+1, x] - I[y-1, x] (rows grow downwards), with zero padding at the border.
  In normalised units zero is the dataset mean colour, so the border sees a step to it.
- Magnitude sqrt(gx^2 + gy^2); unsigned orientation atan2(gy, gx) mod pi, hard-binned
  into 9 bins of 20 degrees (bin k covers [k pi/9, (k+1) pi/9)). A vertical edge has a
  horizontal gradient and lands in bin 0, a horizontal edge in bin 4.
- Each patch is split into 2x2 cells of patch/2 pixels (8 px at patch 16, MaskFeat's
  cell size); a cell's histogram sums the magnitudes of its pixels per channel and bin.
- Layout within a patch: [cell_row, cell_col, channel, bin] flattened, 2*2*3*9 = 108.
- The whole 108-vector is L2-normalised, x / sqrt(sum x^2 + eps) (MaskFeat normalises per
  patch); a flat patch stays all zeros.
"""

import jax.numpy as jnp

from pr_mim_jax import patch_tokens

TARGETS = ("pixel", "norm_pixel", "hog")
NORM_EPS = 1e-6
HOG_BINS = 9
HOG_CELLS = 2  # cells per patch side
HOG_EPS = 1e-6


def hog_supported(patch: int) -> bool:
  """HOG needs 2x2 whole cells per patch, i.e. an even patch size."""
  return patch > 0 and patch % HOG_CELLS == 0


def target_dim(target: str, patch: int) -> int:
  """Length of one patch's target vector (the prediction head's output width)."""
  if target in ("pixel", "norm_pixel"):
    return patch * patch * 3
  if target == "hog":
    return HOG_CELLS * HOG_CELLS * 3 * HOG_BINS
  raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def hog_patches(images, patch: int):
  """images: [B, H, W, C] -> [B, L, 4*C*9] float32 per-patch HOG (see module docstring)."""
  if not hog_supported(patch):
    raise ValueError(f"hog target needs an even patch size (2x2 cells per patch), got {patch}")
  x = images.astype(jnp.float32)
  b, h, w, c = x.shape
  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, H+2, W+2, C]
  gx = pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2]  # [B, H, W, C]
  gy = pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1]
  mag = jnp.sqrt(gx * gx + gy * gy)
  # atan2 is in (-pi, pi]; floor(.) mod 9 folds theta and theta + pi into one bin.
  bins = jnp.floor(jnp.arctan2(gy, gx) * (HOG_BINS / jnp.pi)).astype(jnp.int32) % HOG_BINS
  # One bin at a time keeps the intermediates at [B, H, W, C] (no [B, H, W, C, 9]).
  cell = patch // HOG_CELLS
  hist = jnp.stack([
      jnp.where(bins == k, mag, 0.0).reshape(b, h // cell, cell, w // cell, cell, c).sum((2, 4))
      for k in range(HOG_BINS)], axis=-1)  # [B, H/cell, W/cell, C, 9]
  gh, gw = h // patch, w // patch
  hist = hist.reshape(b, gh, HOG_CELLS, gw, HOG_CELLS, c, HOG_BINS)
  hist = hist.transpose(0, 1, 3, 2, 4, 5, 6)  # [B, gh, gw, cell_row, cell_col, C, 9]
  hist = hist.reshape(b, gh * gw, HOG_CELLS * HOG_CELLS * c * HOG_BINS)  # [B, L, 108]
  return hist / jnp.sqrt((hist * hist).sum(-1, keepdims=True) + HOG_EPS)


def patch_targets(images, patch: int, target: str):
  """images: [B, H, W, 3] -> [B, L, target_dim(target, patch)] float32 targets."""
  if target == "hog":
    return hog_patches(images, patch)
  patches = patch_tokens.patchify(images.astype(jnp.float32), patch)
  if target == "pixel":
    return patches
  if target == "norm_pixel":
    # MAE's norm_pix_loss: per-patch mean and unbiased (ddof=1) variance.
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_EPS)
  raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
