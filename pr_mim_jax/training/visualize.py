"""Pictures of the token split and of reconstructions (NumPy + Pillow, for PNGs and TensorBoard).

A row of `reconstruction_grid` is original | token map | reconstruction; a title band names
the columns and a legend under the tiles explains the markings. Tiles are upscaled (nearest
neighbour) to at least MIN_TILE px so that the text fits.

Token map (`token_map`), per patch class:
- visible: the image as it is;
- decoded (masked, reconstructed by the decoder): flat grey (128, 128, 128);
- thrown (masked, never decoded): opaque diagonal stripes of black and yellow (MARK_DARK,
  MARK_LIGHT). Two far-apart colours in a regular pattern stay visible on any image; a
  see-through tint vanished on images of that colour. The original column shows what was there.

Reconstruction: visible patches as they are, decoded patches predicted. Thrown patches are
predicted when `pred_throw` is given (PR-MIM) and framed by a dashed black-and-yellow border
(the same stripes, on the patch's edge only), so the prediction shows inside the frame;
without predictions (partial reconstruction) they carry the token map's stripes. Predictions
of `norm_pixel` are mapped back to pixels with each patch's own mean and std (as MAE's demo
does). `hog` predictions are not pixels, so for that target the reconstruction column is left
out.
"""

import io
import math

import numpy as np
from PIL import Image

from pr_mim_jax import patch_tokens
from pr_mim_jax.data.pixels import normalized
from pr_mim_jax.training import picture_text

GREY = 0.5  # decoded patches in the token map, in [0, 1] display units
MARK_DARK = (0, 0, 0)  # thrown-patch stripes and frames: two far-apart colours
MARK_LIGHT = (255, 221, 0)
VISIBLE, DECODED, THROWN = 0, 1, 2  # patch classes
NORM_EPS = 1e-6
MIN_TILE = 128  # px; reconstruction_grid upscales smaller tiles so titles fit above them
BACKGROUND = picture_text.BACKGROUND  # white gaps


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


def stripes(height: int, width: int, stripe: int) -> np.ndarray:
  """uint8 [height, width, 3]: diagonal stripes of MARK_DARK and MARK_LIGHT, `stripe` px apart.

  The thrown-patch marking: no solid image content looks like it.
  """
  y, x = np.indices((height, width))
  dark = ((x + y) // max(1, stripe)) % 2 == 0  # [height, width]
  return np.where(dark[..., None], MARK_DARK, MARK_LIGHT).astype(np.uint8)


def patch_frame(height: int, width: int, patch: int, border: int) -> np.ndarray:
  """bool [height, width]: pixels within `border` px of their patch's edge."""
  y, x = np.indices((height, width))
  near = lambda v: (v % patch < border) | (v % patch >= patch - border)
  return near(y) | near(x)


def _stripe_px(patch: int) -> int:
  """Stripe (and dash) width: two dark-light periods per patch."""
  return max(1, patch // 4)


def _frame_px(patch: int) -> int:
  """Frame width around predicted thrown patches: thin, so the prediction shows."""
  return max(1, patch // 8)


def token_map(images, ids_vis, ids_dec, ids_throw, patch: int, denormalize) -> np.ndarray:
  """Images [B, H, W, 3] (uint8 pixels or normalised) -> uint8 [B, H, W, 3] map of the token
  split.

  ids_throw may be None: every patch that is neither visible nor decoded is thrown.
  """
  del ids_throw  # the complement of visible and decoded patches
  images = normalized(images)  # [B, H, W, 3] as the model saw them
  num_patches = (images.shape[1] // patch) * (images.shape[2] // patch)
  classes = patch_classes(ids_vis, ids_dec, num_patches)
  where = _pixel_classes(classes, patch)[..., None]  # [B, H, W, 1]
  pixels = np.asarray(denormalize(images), np.float32)  # [B, H, W, 3] in 0..255
  out = np.where(where == DECODED, GREY * 255, pixels)
  out = np.where(where == THROWN, stripes(*images.shape[1:3], _stripe_px(patch)), out)
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
  """uint8 [B, H, W, 3]: visible as they are, decoded (and thrown, if given) predicted.

  Thrown patches are framed by stripes when predicted, filled with stripes when not.
  """
  if pred_throw is not None and ids_throw is None:
    raise ValueError("pred_throw needs ids_throw")
  images = normalized(images)  # [B, H, W, 3] as the model saw them
  patches = np.asarray(patch_tokens.patchify(images, patch))  # [B, L, P]
  rows = np.arange(patches.shape[0])[:, None]
  recon = patches.copy()
  recon[rows, np.asarray(ids_dec)] = _pred_to_patches(pred_dec, patches, ids_dec, target)
  if pred_throw is not None:
    recon[rows, np.asarray(ids_throw)] = _pred_to_patches(pred_throw, patches, ids_throw, target)
  pixels = np.asarray(denormalize(patch_tokens.unpatchify(recon, patch)),
                      np.float32)  # [B, H, W, 3]
  where = _pixel_classes(patch_classes(ids_vis, ids_dec, patches.shape[1]), patch)[..., None]
  h, w = pixels.shape[1:3]
  marks = stripes(h, w, _stripe_px(patch))  # [H, W, 3]
  if pred_throw is not None:
    frame = patch_frame(h, w, patch, _frame_px(patch))[..., None]  # [H, W, 1]
    thrown = np.where(frame, marks, pixels)
  else:
    thrown = np.broadcast_to(marks, pixels.shape)
  out = np.where(where == THROWN, thrown, pixels)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def legend_items(reconstructed: bool = False, predicted_thrown: bool = False,
                 swatch: int = picture_text.LEGEND_PX + 4, thrown: bool = True) -> list:
  """[(swatch uint8 [s, s, 3] or None, text)]: each marking drawn as in the tiles, and its meaning.

  reconstructed: the picture has a reconstruction column (decoded patches are grey only in
  the token map); predicted_thrown: it frames predicted thrown patches (PR-MIM); thrown:
  some patch is thrown (False for MAE, whose legend then has no stripes entry).
  """
  s = swatch
  marks = stripes(s, s, s // 4)  # [s, s, 3]
  decoded = "decoded: masked, reconstructed" + (" (grey in token map)" if reconstructed else "")
  items = [(None, "visible: the image"),
           (np.full((s, s, 3), round(GREY * 255), np.uint8), decoded)]
  if thrown:
    items.append((marks, "thrown: masked, never decoded"))
  if thrown and predicted_thrown:
    frame = patch_frame(s, s, s, max(2, s // 8))[..., None]  # [s, s, 1]
    framed = np.where(frame, marks, np.uint8(BACKGROUND)).astype(np.uint8)
    items.append((framed, "thrown, predicted (PR-MIM)"))
  return items


def grid(rows: list[list[np.ndarray]], gap: int = 2, titles=None, legend=None) -> np.ndarray:
  """Tiles of equal size -> one uint8 picture with white gaps.

  titles: one per column, drawn in a band above the tiles; legend: legend_items, drawn below.
  """
  h, w = rows[0][0].shape[:2]
  ncol = max(len(r) for r in rows)
  out = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), BACKGROUND, np.uint8)
  for i, row in enumerate(rows):
    for j, tile in enumerate(row):
      out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
  bands = [out]
  if titles:
    bands.insert(0, picture_text.title_band(titles, w, gap, out.shape[1]))
  if legend:
    bands.append(picture_text.legend_band(legend, out.shape[1]))
  return np.concatenate(bands, axis=0)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour integer upscaling of [..., H, W, C], so patches stay sharp."""
  return np.repeat(np.repeat(image, factor, axis=-3), factor, axis=-2)


def fit_factor(size: int, min_size: int = MIN_TILE) -> int:
  """Smallest integer upscaling that makes `size` px at least `min_size` px."""
  return max(1, math.ceil(min_size / size))


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def reconstruction_grid(images, pred_dec, ids_vis, ids_dec, patch, target, denormalize,
                        ids_throw=None, pred_throw=None, *, scale=None) -> np.ndarray:
  """One row per example: original | token map | reconstruction, as uint8 [H', W', 3].

  pred_dec: [B, n_dec, P] predictions of the decoded patches; pred_throw: [B, n_throw, P]
  of the thrown ones (PR-MIM) or None. For target 'hog' the row is original | token map.
  Columns are titled and a legend explains the markings; tiles are upscaled by `scale`
  (None: the smallest factor that makes them >= MIN_TILE px, room for the titles).
  """
  originals = np.asarray(denormalize(normalized(images)), np.uint8)  # [B, H, W, 3]
  columns = [originals, token_map(images, ids_vis, ids_dec, ids_throw, patch, denormalize)]
  titles = ["original", "token map"]
  if target != "hog":
    columns.append(reconstruction(images, pred_dec, ids_vis, ids_dec, patch, target,
                                  denormalize, ids_throw, pred_throw))
    titles.append("reconstruction")
  factor = scale or fit_factor(originals.shape[2])
  columns = [upscale(c, factor) for c in columns]
  num_patches = (originals.shape[1] // patch) * (originals.shape[2] // patch)
  thrown = np.shape(ids_vis)[1] + np.shape(ids_dec)[1] < num_patches  # MAE: none thrown
  legend = legend_items(reconstructed=target != "hog",
                        predicted_thrown=target != "hog" and pred_throw is not None,
                        thrown=thrown)
  return grid([list(row) for row in zip(*columns)], titles=titles, legend=legend)
