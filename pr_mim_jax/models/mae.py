"""Masked autoencoder: ViT encoder over visible patches, light decoder over a token subset.

The decoder runs over cls + visible + decoded tokens only. Self-attention is
permutation-equivariant once position embeddings are added, so no unshuffle is needed:
visible tokens come first, then one mask token per decoded patch, each with its own
position. With throw_ratio = 0 the decoded set is every masked patch (plain MAE).

`decoder='cross_attention'` is CrossMAE's decoder: the decoded tokens' queries attend only
to the encoder features (projected to the decoder width), never to each other.

With `thrown_reconstruction='progressive'` (PR-MIM) the thrown tokens are rebuilt after the
decoder, from the kept tokens' features (models/progressive.py) or, for the `last_block`
aggregator, by a query-only pass through the last decoder block. Either way nothing the
decoded tokens see depends on the thrown tokens.
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pr_mim_jax import patch_tokens
from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.models import progressive
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import logical_axes

DECODERS = ("self_attention", "cross_attention")
THROWN_RECONSTRUCTIONS = ("none", "progressive")


class Predictions(NamedTuple):
  dec: jax.Array  # [B, n_dec, P] float32
  throw: Optional[jax.Array]  # [B, n_throw, P] float32, or None without progressive reconstruction


class MaskedAutoencoder(nn.Module):
  spec: vit.VitSpec
  image_size: int
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  posemb: str = "sincos"
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  pred_dim: int = 0  # prediction head outputs per patch; 0 = patch*patch*3 (pixels)
  decoder: str = "self_attention"
  thrown_reconstruction: str = "none"
  aggregator: str = "local_attention"
  num_stages: int = 1
  window: int = 3
  key_width: int = 64
  aggregator_heads: int = 4
  remat: str = "none"  # per transformer block (encoder and decoder): a vit.REMAT_POLICIES key
  scan_layers: bool = False  # nn.scan over the encoder blocks
  attention: str = "einsum"  # every transformer block's: a vit.ATTENTIONS entry

  def setup(self):
    self.encoder = vit.Encoder(self.spec, self.image_size, self.posemb, self.mlp_ratio,
                               self.dtype, self.remat, self.scan_layers,
                               attention=self.attention, name="encoder")
    self.decoder_embed = nn.Dense(
        self.decoder_width, dtype=self.dtype,
        kernel_init=logical_axes.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
        bias_init=logical_axes.partitioned(nn.initializers.zeros, ("embed",)))
    self.mask_token = self.param(
        "mask_token", logical_axes.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, 1, self.decoder_width))
    block = vit.block_class(self.remat)
    self.decoder_blocks = [block(self.decoder_heads, self.mlp_ratio, self.dtype,
                                 attention=self.attention, name=f"decoder_block{i}") for i in range(self.decoder_depth)]
    self.decoder_norm = vit.layer_norm(self.dtype, "decoder_norm")
    if self.thrown_reconstruction == "progressive" and self.aggregator != "last_block":
      self.thrown = progressive.LocalAggregator(
          self.grid, self.window, self.aggregator, self.key_width, self.aggregator_heads,
          self.dtype, name="thrown")
    self.decoder_pred = nn.Dense(
        self.pred_dim or self.spec.patch ** 2 * 3, dtype=self.dtype,
        kernel_init=logical_axes.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
        bias_init=logical_axes.partitioned(nn.initializers.zeros, (None,)))

  @property
  def grid(self) -> int:
    return self.image_size // self.spec.patch

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  def encode(self, images, ids_keep=None):
    """[B, H, W, 3] -> [B, 1+K, D] encoder features (K = all patches when ids_keep is None)."""
    return self.encoder(images, ids_keep)

  def _positions(self, batch):
    table = jnp.asarray(posemb_lib.sincos_2d(self.decoder_width, self.grid))  # [1+L, Dd]
    return table[:1][None], jnp.broadcast_to(table[1:][None], (batch, self.num_patches,
                                                                 self.decoder_width))

  def mask_queries(self, ids):
    """[B, n] patch ids -> [B, n, Dd] decoder queries: mask token + position."""
    _, pos = self._positions(ids.shape[0])
    return (self.mask_token + patch_tokens.gather_tokens(pos, ids)).astype(self.dtype)

  def decode(self, latent, ids_vis, ids_dec, ids_throw=None, thrown_queries=None) -> Predictions:
    """latent: [B, 1+n_vis, D] -> predictions for patches ids_dec (and ids_throw if progressive).

    `thrown_queries` [B, n_throw, Dd] replaces the thrown tokens' mask-token queries (tests
    use it to show the decoded predictions do not depend on them).
    """
    cls_pos, pos = self._positions(latent.shape[0])
    x = self.decoder_embed(latent)  # [B, 1+n_vis, Dd]
    context = jnp.concatenate([x[:, :1] + cls_pos.astype(self.dtype),
                               x[:, 1:] + patch_tokens.gather_tokens(pos, ids_vis).astype(
                                   self.dtype)], 1)
    context = logical_axes.constrain(context, ("batch", "tokens", "embed"))  # [B, 1+n_vis, Dd]
    queries = self.mask_queries(ids_dec)  # [B, n_dec, Dd]
    n_dec = ids_dec.shape[1]
    if self.decoder == "self_attention":
      x = jnp.concatenate([context, queries], axis=1)  # [B, 1+n_vis+n_dec, Dd]
      x = logical_axes.constrain(x, ("batch", "tokens", "embed"))
      for block in self.decoder_blocks[:-1]:
        x = block(x)
      last_input = x  # the kept tokens' inputs of the last block
      feats = self.decoder_norm(self.decoder_blocks[-1](x))
      kept_feats, glob = feats[:, 1:], feats[:, 0]  # visible + decoded, cls
    elif self.decoder == "cross_attention":
      x = queries
      for block in self.decoder_blocks:
        x = block(x, context)
      last_input = context
      dec_feats = self.decoder_norm(x)  # [B, n_dec, Dd]
      # Visible tokens have no decoder outputs: the canvas holds their projected encoder features.
      kept_feats = jnp.concatenate([context[:, 1:], dec_feats], axis=1)
      feats, glob = dec_feats, context[:, 0]
    else:
      raise ValueError(f"unknown decoder {self.decoder!r}; expected one of {DECODERS}")
    pred_dec = self.decoder_pred(feats[:, feats.shape[1] - n_dec:])  # [B, n_dec, P]
    if self.thrown_reconstruction != "progressive" or ids_throw is None:
      return Predictions(pred_dec.astype(jnp.float32), None)

    if thrown_queries is None:
      thrown_queries = self.mask_queries(ids_throw)  # [B, n_throw, Dd]
    if self.aggregator == "last_block":
      thrown = progressive.last_block_pass(self.decoder_blocks[-1], self.decoder_norm,
                                           thrown_queries, last_input)
    else:
      thrown = progressive.staged(self.thrown, kept_feats, glob,
                                  jnp.concatenate([ids_vis, ids_dec], axis=1), ids_throw,
                                  thrown_queries, self.num_patches, self.num_stages)
    pred_throw = self.decoder_pred(thrown)  # [B, n_throw, P]
    return Predictions(pred_dec.astype(jnp.float32), pred_throw.astype(jnp.float32))

  def __call__(self, images, ids_vis, ids_dec, ids_throw=None, thrown_queries=None) -> Predictions:
    """images: [B, H, W, 3] -> Predictions (float32) for the decoded and thrown patches."""
    latent = self.encode(images, ids_vis)
    return self.decode(latent, ids_vis, ids_dec, ids_throw, thrown_queries)


def build(model_cfg, reconstruction_cfg=None, pred_dim: int = 0) -> MaskedAutoencoder:
  """Model from the `config.model` (and `config.reconstruction`) fields."""
  spec = vit.parse_variant(model_cfg.variant)
  spec = vit.VitSpec(model_cfg.width or spec.width, model_cfg.depth or spec.depth,
                     model_cfg.heads or spec.heads, spec.patch)
  extra = {}
  if reconstruction_cfg is not None:
    r = reconstruction_cfg
    extra = dict(thrown_reconstruction=r.thrown_reconstruction, aggregator=r.aggregator,
                 num_stages=r.num_stages, window=r.window, key_width=r.key_width,
                 aggregator_heads=r.heads)
  return MaskedAutoencoder(
      spec=spec,
      image_size=model_cfg.image_size,
      decoder_width=model_cfg.decoder_width,
      decoder_depth=model_cfg.decoder_depth,
      decoder_heads=model_cfg.decoder_heads,
      posemb=model_cfg.posemb,
      dtype=jnp.dtype(model_cfg.compute_dtype),
      pred_dim=pred_dim,
      decoder=model_cfg.get("decoder", "self_attention"),
      remat=model_cfg.get("remat", "none"),
      scan_layers=model_cfg.get("scan_layers", False),
      attention=model_cfg.get("attention", "einsum"),
      **extra)


