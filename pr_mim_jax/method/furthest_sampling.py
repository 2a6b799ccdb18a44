"""Batched furthest-point sampling of masked patches on the patch grid (the PR-MIM paper's Figure 5).

Seeded by the kept (visible) patches, each pick is the masked patch furthest from every
kept or already picked patch, so the picks spread evenly over the image. The loop is
unrolled in Python (the pick count is static): a GPU while-loop pays a fixed cost per
iteration, while the unrolled body is a few fused [B, L] elementwise ops and one argmax.
Everything is elementwise over the batch, so a batch-sharded input gives the same result.
"""

import jax
import jax.numpy as jnp


def _grid_coords(grid: int) -> tuple[jax.Array, jax.Array]:
  """Row-major patch coordinates: patch l is at (l // grid, l % grid)."""
  ids = jnp.arange(grid * grid, dtype=jnp.int32)  # [L]
  return ids // grid, ids % grid


def kept_sq_distance(kept: jax.Array, grid: int) -> jax.Array:
  """[B, L] bool -> [B, L] int32 squared distance from each patch to its nearest kept one.

  Separable in rows and columns, so it costs O(L * grid) per example instead of the
  O(L^2) of an all-pairs min: first the nearest kept column within each row, then the
  best row. Where nothing is kept, the distance is at least 2 * grid**2.
  """
  batch = kept.shape[0]
  axis = jnp.arange(grid, dtype=jnp.int32)
  sq = (axis[:, None] - axis[None, :]) ** 2  # [g, g]
  far = 2 * grid * grid  # more than any squared distance on the grid
  kept = kept.reshape(batch, grid, grid)  # [B, row, col]
  # Within each row r': squared column distance to the row's nearest kept patch.
  in_row = jnp.min(jnp.where(kept[:, :, None, :], sq[None, None], far), axis=3)  # [B, r', c]
  # Across rows: min over r' of (r - r')^2 + in_row[r', c].
  dist = jnp.min(sq[None, :, :, None] + in_row[:, None, :, :], axis=2)  # [B, r, c]
  return dist.reshape(batch, grid * grid)


def furthest_point_sample(noise: jax.Array, kept: jax.Array, grid: int,
                          num_samples: int) -> jax.Array:
  """Picks `num_samples` not-kept patches by furthest-point sampling; [B, num_samples] int32.

  noise: [B, L] in [0, 1), breaks distance ties per example. kept: [B, L] bool, True for
  the seed (visible) patches. The score of a patch is its squared distance to the nearest
  kept-or-picked patch plus 0.5 * noise: squared distances are integers, so the noise only
  orders equal distances. Kept and picked patches sit at distance 0 (score < 1) while every
  unpicked masked patch is at >= 1, so no patch is picked twice as long as num_samples is
  at most the number of masked patches.
  """
  batch, length = noise.shape
  if length != grid * grid:
    raise ValueError(f"noise has {length} patches, expected grid**2 = {grid * grid}")
  rows, cols = _grid_coords(grid)  # [L], [L]
  min_sq = kept_sq_distance(kept, grid).astype(jnp.float32)  # [B, L]
  half_noise = 0.5 * noise.astype(jnp.float32)  # [B, L]
  picks = []
  for _ in range(num_samples):
    pick = jnp.argmax(min_sq + half_noise, axis=1).astype(jnp.int32)  # [B]
    picks.append(pick)
    d_row = rows[None, :] - (pick // grid)[:, None]  # [B, L]
    d_col = cols[None, :] - (pick % grid)[:, None]  # [B, L]
    min_sq = jnp.minimum(min_sq, (d_row * d_row + d_col * d_col).astype(jnp.float32))
  if not picks:
    return jnp.zeros((batch, 0), jnp.int32)
  return jnp.stack(picks, axis=1)  # [B, num_samples]
