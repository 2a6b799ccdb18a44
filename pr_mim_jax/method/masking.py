"""Per-example masking with static shapes, inside jit.

Each image draws its own uniform noise over the L patches; sorting it gives a random
permutation whose first n_vis patches are visible. This visible set is the same for every
throw strategy given the same rng, so methods can be compared on identical inputs. The
strategy then picks which n_dec masked patches are decoded; the other n_throw are thrown:
  random:       the next n_dec in noise order (partial reconstruction, PR).
  running_cell: a fixed pattern within each 2x2 cell (VideoMAE V2's decoder masking).
  furthest:     furthest-point sampling seeded by the visible set (PR-MIM); with
                num_stages > 1 the thrown patches are ordered in progressive stages.
Every count is a Python int, so every shape is static. With `jax_threefry_partitionable`
the noise, and so the masks, do not depend on the device count.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pr_mim_jax import patch_tokens
from pr_mim_jax.method import furthest_sampling
from pr_mim_jax.models import progressive

THROW_STRATEGIES = ("random", "running_cell", "furthest")

# VideoMAE V2 running-cell order of the positions (row % 2, col % 2) in a 2x2 cell.
_CELL_ORDER = ((0, 0), (1, 1), (0, 1), (1, 0))


@dataclasses.dataclass(frozen=True)
class TokenSplit:
  """Static token counts for L patches (docs/method.md)."""
  num_patches: int
  n_vis: int
  n_dec: int
  n_throw: int

  @property
  def n_mask(self) -> int:
    return self.n_dec + self.n_throw


def token_split(num_patches: int, mask_ratio: float, throw_ratio: float = 0.0) -> TokenSplit:
  """n_vis = int(L(1-mask)) (truncated, as the official MAE), n_throw = round(L*throw) (a share
  of ALL patches). At 224 px, mask 0.7 keeps 58 tokens and mask 0.9 keeps 19."""
  n_vis = int(num_patches * (1.0 - mask_ratio))
  n_throw = int(round(num_patches * throw_ratio))
  n_dec = num_patches - n_vis - n_throw
  if n_vis < 1 or n_dec < 1 or n_throw < 0:
    raise ValueError(f"mask_ratio={mask_ratio}, throw_ratio={throw_ratio} leave "
                     f"{n_vis} visible and {n_dec} decoded of {num_patches} patches; need >= 1 each")
  return TokenSplit(num_patches, n_vis, n_dec, n_throw)


@flax.struct.dataclass
class Masks:
  ids_vis: jax.Array      # [B, n_vis] visible patch indices
  ids_dec: jax.Array      # [B, n_dec] masked patches the decoder reconstructs
  ids_throw: jax.Array    # [B, n_throw] masked patches thrown away
  ids_restore: jax.Array  # [B, L] inverse permutation: position of patch l in (vis, dec, throw)

  @property
  def ids_mask(self) -> jax.Array:
    """[B, n_dec + n_throw] every masked patch."""
    return jnp.concatenate([self.ids_dec, self.ids_throw], axis=1)


def random_masks(rng: jax.Array, batch: int, split: TokenSplit) -> Masks:
  """Uniformly random visible / decoded / thrown sets, independently per example."""
  noise = jax.random.uniform(rng, (batch, split.num_patches))  # [B, L]
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)  # [B, L]
  a, b = split.n_vis, split.n_vis + split.n_dec
  return Masks(ids_shuffle[:, :a], ids_shuffle[:, a:b], ids_shuffle[:, b:],
               _inverse_permutation(ids_shuffle))


def _inverse_permutation(ids_shuffle: jax.Array) -> jax.Array:
  """[B, L] permutations -> [B, L] int32 inverses, by a scatter (O(L)) rather than a sort."""
  batch, length = ids_shuffle.shape
  return patch_tokens.scatter_rows(jnp.zeros((batch, length), jnp.int32), ids_shuffle,
                      jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))


def binary_mask(ids: jax.Array, num_patches: int) -> jax.Array:
  """[B, K] indices -> [B, L] float mask with 1 at those patches."""
  return patch_tokens.scatter_rows(jnp.zeros((ids.shape[0], num_patches), jnp.float32), ids,
                      jnp.ones(ids.shape, jnp.float32))


def _assemble(ids_vis, ids_dec, ids_throw) -> Masks:
  """Masks from the three index sets; ids_restore inverts their concatenation."""
  ids_shuffle = jnp.concatenate([ids_vis, ids_dec, ids_throw], axis=1).astype(jnp.int32)  # [B, L]
  return Masks(ids_vis.astype(jnp.int32), ids_dec.astype(jnp.int32),
               ids_throw.astype(jnp.int32), _inverse_permutation(ids_shuffle))


def _untaken_in_order(ids_order: jax.Array, taken: jax.Array, n: int) -> jax.Array:
  """[B, n] the patches of ids_order [B, K] with taken [B, L] False, keeping their order.

  A stable compaction by cumsum and scatter, O(K) per example instead of a sort.
  """
  batch = ids_order.shape[0]
  free = ~jnp.take_along_axis(taken, ids_order, axis=1)  # [B, K]
  slot = jnp.where(free, jnp.cumsum(free, axis=1) - 1, n)  # [B, K], n = dropped
  return patch_tokens.scatter_rows(jnp.zeros((batch, n), jnp.int32), slot, ids_order, mode="drop")


def running_cell_pattern(grid: int, split: TokenSplit) -> np.ndarray:
  """[L] bool: the first k positions of each 2x2 cell, k matching the decoder's share of L.

  VideoMAE V2 defines its decoder mask over all tokens, so k = round(4 (n_vis + n_dec) / L):
  mask 0.75 with throw 0.5 keeps the diagonal (0, 0), (1, 1) of every cell.
  """
  k = int(np.clip(round(4 * (split.n_vis + split.n_dec) / split.num_patches), 1, 4))
  preferred = set(_CELL_ORDER[:k])
  return np.array([(l // grid % 2, l % grid % 2) in preferred for l in range(grid * grid)])


def make_masks(rng: jax.Array, batch: int, split: TokenSplit, strategy: str, grid: int,
               num_stages: int = 1) -> Masks:
  """Visible / decoded / thrown sets for one batch under a throw strategy (module docstring).

  The visible set depends on rng alone, so it is the same for every strategy, and
  "random" equals random_masks. ids_throw is in noise order except for "furthest" with
  num_stages > 1, where consecutive chunks of progressive.stage_sizes(n_throw, num_stages) are the
  stages, formed by continuing furthest sampling over the thrown patches. Noise order needs
  no stage sizes, so "random" and "running_cell" accept any num_stages >= 1 (a method that
  does not reconstruct thrown tokens leaves num_stages unused).
  """
  if strategy not in THROW_STRATEGIES:
    raise ValueError(f"unknown throw strategy {strategy!r}; choose one of {THROW_STRATEGIES}")
  if grid * grid != split.num_patches:
    raise ValueError(f"grid {grid} gives {grid * grid} patches, split has {split.num_patches}")
  if num_stages < 1:
    raise ValueError(f"num_stages={num_stages}; need >= 1")
  if strategy == "random":
    return random_masks(rng, batch, split)

  noise = jax.random.uniform(rng, (batch, split.num_patches))  # [B, L], as in random_masks
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)  # [B, L]
  ids_vis, ids_masked = ids_shuffle[:, :split.n_vis], ids_shuffle[:, split.n_vis:]  # noise order
  kept = binary_mask(ids_vis, split.num_patches) > 0  # [B, L]
  # Independent noise for choosing decoded patches, so it does not correlate with visibility.
  noise2 = jax.random.uniform(jax.random.fold_in(rng, 1), (batch, split.num_patches))

  if strategy == "running_cell":
    on_pattern = jnp.asarray(running_cell_pattern(grid, split), jnp.float32)  # [L]
    priority = jnp.where(kept, -1.0, on_pattern[None] + noise2)  # [B, L]
    _, ids_dec = jax.lax.top_k(priority, split.n_dec)  # [B, n_dec]
    taken = kept | (binary_mask(ids_dec, split.num_patches) > 0)
    ids_throw = _untaken_in_order(ids_masked, taken, split.n_throw)
    return _assemble(ids_vis, ids_dec, ids_throw)

  # furthest: the last stage is whatever is left, so it needs no picks.
  sizes = progressive.stage_sizes(split.n_throw, num_stages)
  n_picks = split.n_dec + split.n_throw - (sizes[-1] if sizes else 0)
  picks = furthest_sampling.furthest_point_sample(noise2, kept, grid, n_picks)  # [B, n_picks]
  taken = kept | (binary_mask(picks, split.num_patches) > 0)
  rest = _untaken_in_order(ids_masked, taken, split.num_patches - split.n_vis - n_picks)
  ids_throw = jnp.concatenate([picks[:, split.n_dec:], rest], axis=1)  # [B, n_throw]
  return _assemble(ids_vis, picks[:, :split.n_dec], ids_throw)
