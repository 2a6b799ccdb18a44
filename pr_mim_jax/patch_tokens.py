"""Images to patch tokens and back, and tokens gathered or scattered by patch id.

Small array ops that the models, the method (masks, targets) and the pictures all use.
"""

import jax
import jax.numpy as jnp
import numpy as np


def patchify(images, patch: int):
  """[B, H, W, C] -> [B, L, patch*patch*C], patches row-major, pixels in (p, q, c) order."""
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  x = images.reshape(b, gh, patch, gw, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, p, p, C]
  return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches, patch: int, channels: int = 3):
  """Inverse of `patchify` for square images: [B, L, p*p*C] -> [B, H, W, C]."""
  b, length, _ = patches.shape
  g = int(round(np.sqrt(length)))
  x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


def gather_tokens(x, ids):
  """x: [B, L, ...], ids: [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, ids.reshape(ids.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter_rows(x: jax.Array, ids: jax.Array, values: jax.Array, mode=None) -> jax.Array:
  """x [B, L, ...] with x[b, ids[b, k]] = values[b, k] for ids [B, K], values [B, K, ...].

  Under a mesh of several devices the scatter is written per example under vmap, so it
  carries the batch as a batching dimension and XLA keeps it sharded over the batch axes;
  indexing with an explicit row iota let XLA gather the whole global batch onto every
  device under FSDP. On one device the row-iota form is used, which XLA's CPU backend runs
  faster (3% on the demo's PR-MIM step, 2-core CPU dev machine, 2026-11-29:
  docs/performance.md). Both compute the same array.
  """
  values = values.astype(x.dtype)
  if _on_several_devices():
    return jax.vmap(lambda xb, ib, vb: xb.at[ib].set(vb, mode=mode))(x, ids, values)
  rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
  return x.at[rows, ids].set(values, mode=mode)


def _on_several_devices() -> bool:
  """Whether the computation being traced runs under a mesh of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1
