"""Per-example random masking with static shapes, inside jit.

Each image draws its own uniform noise over the L patches; sorting it gives a random
permutation. The first n_vis patches are visible, the next n_dec are decoded masked
patches, and the last n_throw are thrown (never decoded). Every count is a Python int,
so every shape is static. With `jax_threefry_partitionable` the noise, and so the masks,
do not depend on the device count.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TokenSplit:
  """Static token counts for L patches (DESIGN section 1)."""
  num_patches: int
  n_vis: int
  n_dec: int
  n_throw: int

  @property
  def n_mask(self) -> int:
    return self.n_dec + self.n_throw


def token_split(num_patches: int, mask_ratio: float, throw_ratio: float = 0.0) -> TokenSplit:
  """n_vis = round(L(1-mask)), n_throw = round(L*throw) (a share of ALL patches)."""
  n_vis = int(round(num_patches * (1.0 - mask_ratio)))
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
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  a, b = split.n_vis, split.n_vis + split.n_dec
  return Masks(ids_shuffle[:, :a], ids_shuffle[:, a:b], ids_shuffle[:, b:], ids_restore)


def binary_mask(ids: jax.Array, num_patches: int) -> jax.Array:
  """[B, K] indices -> [B, L] float mask with 1 at those patches."""
  return jnp.zeros((ids.shape[0], num_patches), jnp.float32).at[
      jnp.arange(ids.shape[0])[:, None], ids].set(1.0)
