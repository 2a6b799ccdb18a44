"""Progressive reconstruction of thrown tokens: cheap local aggregation over a window box.

The decoder reconstructs only the kept tokens (visible + decoded). Each thrown token is then
rebuilt from the features of already-reconstructed tokens inside a `window x window` box
around it, plus one global (cls) key so that an empty box still has something to attend to.
Features live on an [L, D] canvas; a static [L, window**2] index table gives every token's
box, and a validity mask hides positions off the grid or not yet reconstructed. Stages run
in order and each writes its outputs onto the canvas for the next (docs/method.md).

The `last_block` aggregator instead runs the thrown queries once through the decoder's
last block, attending to the kept tokens' inputs of that block (last_block_pass).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pr_mim_jax import patch_tokens
from pr_mim_jax.parallel import logical_axes

AGGREGATORS = ("local_attention", "interpolate", "last_block")
NEG_INF = -1e9


def stage_sizes(n_throw: int, num_stages: int) -> tuple[int, ...]:
  """Near-equal static sizes of the progressive stages; earlier stages take the extra one."""
  if num_stages < 1:
    raise ValueError(f"num_stages={num_stages}; need >= 1")
  if n_throw == 0:
    return ()
  if num_stages > n_throw:
    raise ValueError(f"num_stages={num_stages} exceeds the {n_throw} thrown tokens")
  base, extra = divmod(n_throw, num_stages)
  return tuple(base + (i < extra) for i in range(num_stages))


def neighbourhood(grid: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Static box table: (index [L, window**2] int32, on_grid [L, window**2] bool).

  Offsets are row-major over the box, centre included; off-grid entries point at patch 0
  and are marked invalid.
  """
  r = window // 2
  rows, cols = np.divmod(np.arange(grid * grid), grid)  # [L]
  dr, dc = np.divmod(np.arange(window * window), window)
  nr = rows[:, None] + dr[None] - r  # [L, w*w]
  nc = cols[:, None] + dc[None] - r
  on_grid = (nr >= 0) & (nr < grid) & (nc >= 0) & (nc < grid)
  index = np.where(on_grid, nr * grid + nc, 0).astype(np.int32)
  return index, on_grid


class LocalAggregator(nn.Module):
  """One stage: thrown queries aggregate their box neighbours and the global feature.

  `local_attention`: narrow (key_width) query/key projections, a learned key bias per box
  offset, values are the neighbours' features split over heads, then a narrow residual
  MLP that also sees the query (position). `interpolate`: weights from a learned logit per
  offset alone, no projections.
  """
  grid: int
  window: int
  kind: str = "local_attention"
  key_width: int = 64
  heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, canvas, known, glob, queries, ids):
    """canvas [B, L, D], known [B, L] bool, glob [B, D], queries [B, n, D], ids [B, n] -> [B, n, D]."""
    b, n = ids.shape
    d = canvas.shape[-1]
    index, on_grid = neighbourhood(self.grid, self.window)
    nb = jnp.asarray(index)[ids]  # [B, n, w*w]
    known_nb = patch_tokens.gather_tokens(known, nb.reshape(b, -1)).reshape(nb.shape)
    valid = jnp.asarray(on_grid)[ids] & known_nb
    valid = jnp.concatenate([valid, jnp.ones((b, n, 1), bool)], axis=-1)  # [B, n, K]; K = w*w+1
    feats = patch_tokens.gather_tokens(canvas, nb.reshape(b, -1)).reshape(b, n, -1, d)
    feats = jnp.concatenate([feats, jnp.broadcast_to(glob[:, None, None], (b, n, 1, d))], axis=2)
    num_keys = self.window ** 2 + 1
    heads = 1 if self.kind == "interpolate" else self.heads

    if self.kind == "interpolate":
      logits = self.param("offset_logit", logical_axes.partitioned(nn.initializers.zeros, (None,)),
                          (num_keys,))
      logits = jnp.broadcast_to(logits, (b, n, 1, num_keys))  # [B, n, 1, K]
    elif self.kind == "local_attention":
      hd = self.key_width // heads
      dense = lambda name: nn.Dense(  # noqa: E731
          self.key_width, dtype=self.dtype, name=name,
          kernel_init=logical_axes.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
          bias_init=logical_axes.partitioned(nn.initializers.zeros, (None,)))
      q = dense("query")(queries).reshape(b, n, heads, hd)
      key_dense = dense("key")
      k = patch_tokens.gather_tokens(key_dense(canvas), nb.reshape(b, -1))
      k = k.reshape(b, n, -1, self.key_width)
      k = jnp.concatenate([k, jnp.broadcast_to(key_dense(glob)[:, None, None],
                                               (b, n, 1, self.key_width))], axis=2)  # [B, n, K, kw]
      offset = self.param("offset_key",
                          logical_axes.partitioned(nn.initializers.normal(0.02), (None, None)),
                          (num_keys, self.key_width))
      k = (k + offset.astype(self.dtype)).reshape(b, n, num_keys, heads, hd)
      logits = jnp.einsum("bnhd,bnkhd->bnhk", q, k) / np.sqrt(hd).astype(self.dtype)
    else:
      raise ValueError(f"unknown aggregator {self.kind!r}; expected one of {AGGREGATORS[:2]}")

    logits = jnp.where(valid[:, :, None], logits.astype(jnp.float32), NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, n, h, K]
    values = feats.reshape(b, n, num_keys, heads, d // heads)
    out = jnp.einsum("bnhk,bnkhc->bnhc", weights, values).reshape(b, n, d)  # [B, n, D]
    if self.kind == "local_attention":
      h = nn.Dense(self.key_width, dtype=self.dtype, name="mlp_in",
                   kernel_init=logical_axes.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
                   bias_init=logical_axes.partitioned(nn.initializers.zeros, (None,)))(out + queries)
      out = out + nn.Dense(d, dtype=self.dtype, name="mlp_out",
                           kernel_init=logical_axes.partitioned(nn.initializers.zeros, (None, "embed")),
                           bias_init=logical_axes.partitioned(nn.initializers.zeros, ("embed",)))(
                               nn.gelu(h, approximate=False))
    return logical_axes.constrain(out, ("batch", "tokens", "embed"))


def staged(aggregate, kept_feats, glob, ids_kept, ids_throw, queries, num_patches: int,
           num_stages: int):
  """Thrown features [B, n_throw, D], rebuilt stage by stage on an [B, L, D] canvas.

  kept_feats [B, n_kept, D] at ids_kept [B, n_kept]; glob [B, D]; queries [B, n_throw, D] in
  the order of ids_throw [B, n_throw], whose consecutive runs of progressive.stage_sizes are the
  stages. `aggregate` is a LocalAggregator; each stage's outputs join the canvas.
  """
  canvas = jnp.zeros((kept_feats.shape[0], num_patches, kept_feats.shape[-1]), kept_feats.dtype)
  canvas = patch_tokens.scatter_rows(canvas, ids_kept, kept_feats)  # [B, L, D]
  known = patch_tokens.scatter_rows(jnp.zeros(canvas.shape[:2], bool), ids_kept,
                               jnp.ones(ids_kept.shape, bool))  # [B, L]
  outs, start = [], 0
  for size in stage_sizes(ids_throw.shape[1], num_stages):
    ids = ids_throw[:, start:start + size]
    out = aggregate(canvas, known, glob, queries[:, start:start + size], ids)  # [B, size, D]
    canvas = patch_tokens.scatter_rows(canvas, ids, out)
    known = patch_tokens.scatter_rows(known, ids, jnp.ones(ids.shape, bool))
    outs.append(out)
    start += size
  return jnp.concatenate(outs, axis=1)


def last_block_pass(block, norm, queries, kept_inputs):
  """The `last_block` aggregator: thrown queries [B, n_throw, D] attend to the kept tokens'
  inputs of the decoder's last block [B, n, D]; nothing attends to them. One stage."""
  return norm(block(queries, kept_inputs))

