"""Pictures of the token split and of reconstructions (NumPy, for PNGs and TensorBoard).

A row of `reconstruction_grid` is original | token map | reconstruction.

Token map (`token_map`), per patch class:
- visible: the image as it is;
- decoded (masked, reconstructed by the decoder): flat grey (128, 128, 128);
- thrown (masked, never decoded): dark red (140, 20, 20) over a faint copy of the image
  (25% image), so the eye reads them as "thrown" and still sees what was there.

Reconstruction: visible patches as they are, decoded patches predicted. Thrown patches
are predicted when `pred_throw` is given (PR-MIM), with a light red tint (30% of
(220, 40, 40)) to mark them; without predictions (partial reconstruction) they are solid
dark red. Predictions of `norm_pixel` are mapped back to pixels with each patch's own
mean and std (as MAE's demo does). `hog` predictions are not pixels, so for that target
the reconstruction column is left out.
"""

import io

import numpy as np
from PIL import Image

from pr_mim_jax.models import vit

GREY = 0.5  # decoded patches in the token map, in [0, 1] display units
THROWN_RGB = (140, 20, 20)  # thrown patches: token map tint; reconstruction with no prediction
THROWN_IMAGE_ALPHA = 0.25  # share of the image kept under the token map's thrown tint
PRED_TINT_RGB = (220, 40, 40)  # tint over predicted thrown patches
PRED_TINT_ALPHA = 0.3
VISIBLE, DECODED, THROWN = 0, 1, 2  # patch classes
NORM_EPS = 1e-6


def patch_classes(ids_vis, ids_dec, num_patches: int) -> np.ndarray:
  """[B, L] int8: VISIBLE / DECODED at those ids, THROWN everywhere else."""
  ids_vis, ids_dec = np.asarray(ids_vis), np.asarray(ids_dec)
  classes = np.full((ids_vis.shape[0], num_patches), THROWN, np.int8)
  rows = np.arange(ids_vis.shape[0])[:, None]
  classes[rows, ids_vis] = VISIBLE
  classes[rows, ids_dec] = DECODED
  return classes


def _pixel_classes(classes: np.ndarray, patch: int) -> np.ndarray:
  """[B, L] patch classes -> [B, H, W] per-pixel classes (square grid)."""
  g = int(round(np.sqrt(classes.shape[1])))
  grid_cls = classes.reshape(-1, g, g)
  return np.repeat(np.repeat(grid_cls, patch, axis=1), patch, axis=2)


def _blend(pixels, rgb, alpha: float):
  """alpha * rgb + (1 - alpha) * pixels, float."""
  return alpha * np.asarray(rgb, np.float32) + (1.0 - alpha) * pixels


def token_map(images, ids_vis, ids_dec, ids_throw, patch: int, denormalize) -> np.ndarray:
  """Normalised images [B, H, W, 3] -> uint8 [B, H, W, 3] map of the token split.

  ids_throw may be None: every patch that is neither visible nor decoded is thrown.
  """
  del ids_throw  # the complement of visible and decoded patches
  images = np.asarray(images, np.float32)
  num_patches = (images.shape[1] // patch) * (images.shape[2] // patch)
  classes = patch_classes(ids_vis, ids_dec, num_patches)
  where = _pixel_classes(classes, patch)[..., None]  # [B, H, W, 1]
  pixels = np.asarray(denormalize(images), np.float32)  # [B, H, W, 3] in 0..255
  out = np.where(where == DECODED, GREY * 255, pixels)
  out = np.where(where == THROWN, _blend(pixels, THROWN_RGB, 1 - THROWN_IMAGE_ALPHA), out)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _pred_to_patches(pred, patches, ids, target: str) -> np.ndarray:
  """Predictions [B, K, P] -> normalised-space patches; norm_pixel uses the targets' stats."""
  pred = np.asarray(pred, np.float32)
  if target != "norm_pixel":
    return pred
  tgt = np.take_along_axis(patches, np.asarray(ids)[..., None], axis=1)  # [B, K, P]
  mean = tgt.mean(-1, keepdims=True)
  std = np.sqrt(tgt.var(-1, keepdims=True, ddof=1) + NORM_EPS)
  return pred * std + mean


def reconstruction(images, pred_dec, ids_vis, ids_dec, patch: int, target: str, denormalize,
                   ids_throw=None, pred_throw=None) -> np.ndarray:
  """uint8 [B, H, W, 3]: visible as they are, decoded (and thrown, if given) predicted."""
  if pred_throw is not None and ids_throw is None:
    raise ValueError("pred_throw needs ids_throw")
  images = np.asarray(images, np.float32)
  patches = np.asarray(vit.patchify(images, patch))  # [B, L, P]
  rows = np.arange(patches.shape[0])[:, None]
  recon = patches.copy()
  recon[rows, np.asarray(ids_dec)] = _pred_to_patches(pred_dec, patches, ids_dec, target)
  if pred_throw is not None:
    recon[rows, np.asarray(ids_throw)] = _pred_to_patches(pred_throw, patches, ids_throw, target)
  pixels = np.asarray(denormalize(vit.unpatchify(recon, patch)), np.float32)
  where = _pixel_classes(patch_classes(ids_vis, ids_dec, patches.shape[1]), patch)[..., None]
  thrown = (_blend(pixels, PRED_TINT_RGB, PRED_TINT_ALPHA) if pred_throw is not None
            else np.broadcast_to(np.asarray(THROWN_RGB, np.float32), pixels.shape))
  out = np.where(where == THROWN, thrown, pixels)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
  """Tiles of equal size -> one uint8 picture with white gaps."""
  h, w = rows[0][0].shape[:2]
  ncol = max(len(r) for r in rows)
  out = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, tile in enumerate(row):
      out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
  return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour integer upscaling of [..., H, W, C], so patches stay sharp."""
  return np.repeat(np.repeat(image, factor, axis=-3), factor, axis=-2)


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def reconstruction_grid(images, pred_dec, ids_vis, ids_dec, patch, target, denormalize,
                        ids_throw=None, pred_throw=None) -> np.ndarray:
  """One row per example: original | token map | reconstruction, as uint8 [H', W', 3].

  pred_dec: [B, n_dec, P] predictions of the decoded patches; pred_throw: [B, n_throw, P]
  of the thrown ones (PR-MIM) or None. For target 'hog' the row is original | token map.
  """
  originals = np.asarray(denormalize(np.asarray(images, np.float32)), np.uint8)
  columns = [originals, token_map(images, ids_vis, ids_dec, ids_throw, patch, denormalize)]
  if target != "hog":
    columns.append(reconstruction(images, pred_dec, ids_vis, ids_dec, patch, target,
                                  denormalize, ids_throw, pred_throw))
  return grid([list(row) for row in zip(*columns)])
