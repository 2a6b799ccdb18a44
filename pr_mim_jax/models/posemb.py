"""Fixed 2-D sin-cos position embeddings in MAE's layout.

The first half of the channels encodes the column (x) coordinate and the second half
the row (y), each as [sin | cos] over geometrically spaced frequencies; an optional zero
row is prepended for the cls token. These are constants, never params: AdamW would
otherwise decay them.
"""

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
