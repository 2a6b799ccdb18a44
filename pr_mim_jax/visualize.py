"""Reconstruction pictures: rows of original | masked input | reconstruction.

Predictions of the `norm_pixel` target are mapped back to pixels with each patch's own
mean and std (as MAE's demo does). The reconstruction shows visible patches as they
are and predicted patches elsewhere; thrown patches (never decoded) stay grey.
"""

import io

import numpy as np
from PIL import Image

from pr_mim_jax.models import vit

GREY = 0.5  # fill for patches with no pixels, in [0, 1] display units


def reconstruct_patches(images, pred, ids_vis, ids_dec, patch: int, target: str):
  """Numpy: images [B,H,W,3] (normalised), pred [B,n_dec,P] -> (masked, recon) images.

  Both outputs are normalised-space images; patches neither visible nor decoded get NaN.
  """
  patches = np.asarray(vit.patchify(np.asarray(images, np.float32), patch))  # [B, L, P]
  pred = np.asarray(pred, np.float32)
  if target == "norm_pixel":
    tgt = np.take_along_axis(patches, ids_dec[..., None], axis=1)
    mean, std = tgt.mean(-1, keepdims=True), np.sqrt(tgt.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  rows = np.arange(patches.shape[0])[:, None]
  masked = np.full_like(patches, np.nan)
  masked[rows, ids_vis] = patches[rows, ids_vis]
  recon = masked.copy()
  recon[rows, ids_dec] = pred
  return vit.unpatchify(masked, patch), vit.unpatchify(recon, patch)


def grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
  h, w = rows[0][0].shape[:2]
  ncol = max(len(r) for r in rows)
  out = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, tile in enumerate(row):
      out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
  return out


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def to_uint8(normalised: np.ndarray, denormalize) -> np.ndarray:
  """Normalised image with NaN holes -> uint8, holes grey."""
  holes = np.isnan(normalised)
  pixels = denormalize(np.nan_to_num(normalised)).astype(np.float32)
  pixels[holes] = GREY * 255
  return np.clip(pixels, 0, 255).astype(np.uint8)


def reconstruction_grid(images, pred, ids_vis, ids_dec, patch, target, denormalize) -> np.ndarray:
  """One row per example: original | masked input | reconstruction, as uint8 [H', W', 3]."""
  masked, recon = reconstruct_patches(images, pred, np.asarray(ids_vis), np.asarray(ids_dec),
                                      patch, target)
  rows = [[to_uint8(np.asarray(x), denormalize), to_uint8(m, denormalize), to_uint8(r, denormalize)]
          for x, m, r in zip(images, masked, recon)]
  return grid(rows)
