"""Masked autoencoder: ViT encoder over visible patches, light decoder over a token subset.

The decoder runs over cls + visible + decoded tokens only. Self-attention is
permutation-equivariant once position embeddings are added, so no unshuffle is needed:
visible tokens come first, then one mask token per decoded patch, each with its own
position. With throw_ratio = 0 the decoded set is every masked patch (plain MAE).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.models import vit


class MaskedAutoencoder(nn.Module):
  spec: vit.VitSpec
  image_size: int
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  posemb: str = "sincos"
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = vit.Encoder(self.spec, self.image_size, self.posemb, self.mlp_ratio,
                               self.dtype, name="encoder")
    self.decoder_embed = nn.Dense(
        self.decoder_width, dtype=self.dtype,
        kernel_init=vit.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
        bias_init=vit.partitioned(nn.initializers.zeros, ("embed",)))
    self.mask_token = self.param(
        "mask_token", vit.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, 1, self.decoder_width))
    self.decoder_blocks = [vit.Block(self.decoder_heads, self.mlp_ratio, self.dtype,
                                     name=f"decoder_block{i}") for i in range(self.decoder_depth)]
    self.decoder_norm = vit.layer_norm(self.dtype, "decoder_norm")
    self.decoder_pred = nn.Dense(
        self.spec.patch ** 2 * 3, dtype=self.dtype,
        kernel_init=vit.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
        bias_init=vit.partitioned(nn.initializers.zeros, (None,)))

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.spec.patch) ** 2

  def encode(self, images, ids_keep=None):
    """[B, H, W, 3] -> [B, 1+K, D] encoder features (K = all patches when ids_keep is None)."""
    return self.encoder(images, ids_keep)

  def decode(self, latent, ids_vis, ids_dec):
    """latent: [B, 1+n_vis, D] -> predictions [B, n_dec, p*p*3] for patches ids_dec."""
    b = latent.shape[0]
    dw = self.decoder_width
    table = jnp.asarray(posemb_lib.sincos_2d(dw, self.image_size // self.spec.patch))  # [1+L, Dd]
    pos = jnp.broadcast_to(table[1:][None], (b, self.num_patches, dw))  # [B, L, Dd]
    x = self.decoder_embed(latent)  # [B, 1+n_vis, Dd]
    vis = x[:, 1:] + vit.gather_tokens(pos, ids_vis).astype(self.dtype)
    cls = x[:, :1] + table[:1][None].astype(self.dtype)
    queries = (self.mask_token + vit.gather_tokens(pos, ids_dec)).astype(self.dtype)  # [B, n_dec, Dd]
    x = jnp.concatenate([cls, vis, queries], axis=1)  # [B, 1+n_vis+n_dec, Dd]
    x = vit.constrain(x, ("batch", "tokens", "embed"))
    for block in self.decoder_blocks:
      x = block(x)
    x = self.decoder_norm(x)
    n_dec = ids_dec.shape[1]
    return self.decoder_pred(x[:, x.shape[1] - n_dec:])  # [B, n_dec, p*p*3]

  def __call__(self, images, ids_vis, ids_dec):
    """images: [B, H, W, 3] -> predicted patches [B, n_dec, p*p*3] (float32)."""
    latent = self.encode(images, ids_vis)
    return self.decode(latent, ids_vis, ids_dec).astype(jnp.float32)


def build(model_cfg) -> MaskedAutoencoder:
  """Model from the `config.model` fields."""
  spec = vit.parse_variant(model_cfg.variant)
  spec = vit.VitSpec(model_cfg.width or spec.width, model_cfg.depth or spec.depth,
                     model_cfg.heads or spec.heads, spec.patch)
  return MaskedAutoencoder(
      spec=spec,
      image_size=model_cfg.image_size,
      decoder_width=model_cfg.decoder_width,
      decoder_depth=model_cfg.decoder_depth,
      decoder_heads=model_cfg.decoder_heads,
      posemb=model_cfg.posemb,
      dtype=jnp.dtype(model_cfg.compute_dtype))
