"""Image classifier on a pre-trained ViT encoder: fine-tuning and linear probing (MAE recipes).

Params are {'encoder': <the same tree as MaskedAutoencoder's params['encoder']>, 'head': ...},
so a pre-trained encoder loads by replacing one subtree (`load_encoder`).

Heads: 'linear' (fine-tuning) is a Dense layer with MAE's tiny init (std 2e-5, zero bias);
'batchnorm_linear' (linear probing) normalizes the features by a BatchNorm without affine
params (stats in the 'batch_stats' collection) before a Dense layer (std 0.01).
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import logical_axes

HEADS = ("linear", "batchnorm_linear")
POOLS = ("gap", "cls")
# Std of a standard normal truncated to [-2, 2]: flax's truncated_normal takes the std
# before truncation, MAE's trunc_normal_(std=s) (cut at +-2 absolute) has std ~s.
_TRUNC_STD = 0.87962566103423978


def trunc_normal(std: float):
  """Normal truncated at 2 std, whose own std is `std`."""
  return nn.initializers.truncated_normal(std / _TRUNC_STD)


class Head(nn.Module):
  """[B, D] float32 features -> [B, C] float32 logits."""
  num_classes: int
  kind: str = "linear"

  @nn.compact
  def __call__(self, feats, train: bool):
    if self.kind == "linear":
      std = 2e-5
    elif self.kind == "batchnorm_linear":
      std = 0.01
      # torch BatchNorm1d(affine=False, eps=1e-6) with its momentum 0.1 = flax momentum 0.9,
      # except that the running variance tracks the biased batch variance (torch: unbiased,
      # x B / (B - 1): 0.006% apart at MAE's batch 16384).
      # Two-pass variance: frozen features can have means far above their spread, where
      # E[x^2] - E[x]^2 cancels badly in float32. Under jit over a sharded batch the
      # statistics are global-batch ones.
      feats = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                           use_bias=False, use_scale=False, use_fast_variance=False,
                           dtype=jnp.float32, name="bn")(feats)
    else:
      raise ValueError(f"unknown head {self.kind!r}; use one of {HEADS}")
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="dense",
                    kernel_init=logical_axes.partitioned(trunc_normal(std), ("embed", None)),
                    bias_init=logical_axes.partitioned(nn.initializers.zeros, (None,)))(feats)


class Classifier(nn.Module):
  """ViT encoder, pooled features, classification head.

  With freeze_encoder the features pass through stop_gradient (the encoder gets exactly
  zero gradient and XLA drops its backward pass) and the encoder runs deterministically.
  """
  spec: vit.VitSpec
  image_size: int
  num_classes: int
  posemb: str = "sincos"
  dtype: Any = jnp.float32
  pool: str = "gap"  # 'gap' (MAE fine-tuning) | 'cls'
  head: str = "linear"  # 'linear' (fine-tuning) | 'batchnorm_linear' (linear probing)
  freeze_encoder: bool = False
  drop_path: float = 0.0
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "einsum"  # a vit.ATTENTIONS entry

  @nn.compact
  def __call__(self, images, train: bool):
    """images: [B, H, W, 3] -> logits [B, C] float32."""
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; use one of {POOLS}")
    encoder = vit.Encoder(self.spec, self.image_size, self.posemb, dtype=self.dtype,
                          remat=self.remat, scan_layers=self.scan_layers,
                          drop_path=self.drop_path, attention=self.attention, name="encoder")
    feats = encoder(images, train=train and not self.freeze_encoder, pool=self.pool)  # [B, D]
    feats = feats.astype(jnp.float32)
    if self.freeze_encoder:
      feats = jax.lax.stop_gradient(feats)
    return Head(self.num_classes, self.head, name="head")(feats, train)  # [B, C]


def from_config(config, num_classes: int) -> Classifier:
  """Classifier from config.model (encoder fields as in pre-training, plus drop_path) and
  config.head (pool, kind, freeze_encoder)."""
  m, h = config.model, config.head
  spec = vit.parse_variant(m.variant)
  spec = vit.VitSpec(m.width or spec.width, m.depth or spec.depth, m.heads or spec.heads,
                     spec.patch)
  return Classifier(
      spec=spec,
      image_size=m.image_size,
      num_classes=num_classes,
      posemb=m.posemb,
      dtype=jnp.dtype(m.compute_dtype),
      pool=h.pool,
      head=h.kind,
      freeze_encoder=h.get("freeze_encoder", False),
      drop_path=m.get("drop_path", 0.0),
      remat=m.get("remat", "none"),
      scan_layers=m.get("scan_layers", False),
      attention=m.get("attention", "einsum"))


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def load_encoder(params, pretrained_encoder_params, new_grid=None):
  """`params` with 'encoder' replaced by pre-trained encoder params (e.g. mae params['encoder']).

  The layout (scanned 'blocks' or unrolled 'block{i}') is converted to the target's, and a
  learned pos_embedding is resized to `new_grid` (default: the target's grid). Leaves are
  cast to the target's dtypes. Raises ValueError on missing/unexpected keys or shape
  mismatches.
  """
  target = params["encoder"]
  source = dict(nn.unbox(pretrained_encoder_params))
  if "blocks" in target and "blocks" not in source:
    source = vit.scan_params(source)
  elif "blocks" not in target and "blocks" in source:
    source = vit.unscan_params(source)
  if "pos_embedding" in source:
    if new_grid is None and "pos_embedding" in target:
      new_grid = int(round(np.sqrt(target["pos_embedding"].shape[0] - 1)))
    if new_grid is not None:
      source = posemb_lib.adapt_encoder_params(source, new_grid)

  want, have = _flat(target), _flat(source)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  mismatched = sorted(f"{k}: pretrained {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
                      for k in set(want) & set(have)
                      if tuple(have[k].shape) != tuple(want[k].shape))
  if missing or unexpected or mismatched:
    raise ValueError("pre-trained encoder params do not fit the classifier's encoder:\n"
                     f"  missing: {missing}\n  unexpected: {unexpected}\n"
                     f"  shape mismatches: {mismatched}")
  loaded = {k: jnp.asarray(v, want[k].dtype) for k, v in have.items()}
  loaded = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in loaded.items()})
  return dict(params, encoder=loaded)
