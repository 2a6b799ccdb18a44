"""Position embeddings: fixed 2-D sin-cos tables, and resizing learned ones.

Sin-cos tables follow MAE's layout: the first half of the channels encodes the column (x)
coordinate and the second half the row (y), each as [sin | cos] over geometrically spaced
frequencies; an optional zero row is prepended for the cls token. These are constants,
never params: AdamW would otherwise decay them.

A learned table [1+L, D] (cls row, then a row-major grid) is carried to another resolution
by bicubic resizing of its grid, as when fine-tuning at a higher resolution than the
pre-training one.
"""

import jax
import jax.numpy as jnp
import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim] embedding, [sin | cos] halves."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {dim}")
  freqs = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = positions.reshape(-1).astype(np.float64)[:, None] * freqs[None]  # [M, dim/2]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """[(1 +) grid_size**2, dim] float32 table for a square grid in row-major order."""
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def resize_learned(table, new_grid: int):
  """[1+L, D] learned table -> [1+new_grid**2, D] float32: cls row kept, grid bicubic-resized.

  jax.image.resize 'bicubic' is Keys' cubic (a = -0.5) on half-pixel centres, with the
  weights of out-of-image taps renormalized away, as PIL. MAE's interpolate_pos_embed
  (torch's non-antialiased bicubic) uses a = -0.75 and repeats edge pixels instead, so its
  resized table differs everywhere, not just at the border. No antialiasing, so shrinking
  samples the grid as MAE does.
  """
  table = jnp.asarray(table, jnp.float32)
  length, dim = table.shape[0] - 1, table.shape[1]
  grid = int(round(np.sqrt(length)))
  if grid * grid != length:
    raise ValueError(f"position table has {length} patch rows, not a square grid")
  if grid == new_grid:
    return table
  patches = table[1:].reshape(grid, grid, dim)  # [g, g, D]
  patches = jax.image.resize(patches, (new_grid, new_grid, dim), "bicubic", antialias=False)
  return jnp.concatenate([table[:1], patches.reshape(new_grid * new_grid, dim)], axis=0)


def adapt_encoder_params(encoder_params, new_grid: int):
  """Encoder params with a learned 'pos_embedding' resized to `new_grid` (if it differs).

  Sin-cos tables are not params (recomputed from image_size), so nothing else changes.
  """
  table = encoder_params.get("pos_embedding")
  if table is None or table.shape[0] == 1 + new_grid * new_grid:
    return encoder_params
  return dict(encoder_params, pos_embedding=resize_learned(table, new_grid))
