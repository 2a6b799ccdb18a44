"""ViT building blocks with timm/MAE-compatible structure and logical axis names.

Pre-norm blocks, exact (erf) GELU, LayerNorm eps 1e-6, qkv with bias. The fused qkv
kernel is stored as [D, 3, heads, head_dim], which reshapes to timm's [3*D, D] weight
(transposed) and lets tensor parallelism shard whole heads.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pr_mim_jax import patch_tokens
from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.parallel import logical_axes

# name -> (width, depth, heads); mlp is 4x width for all of them.
VARIANTS = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

LN_EPS = 1e-6
Dtype = Any

# Rematerialization per transformer block: 'none' keeps every activation for the backward
# pass; 'full' keeps only each block's input; 'dots_saveable' also keeps the outputs of
# matmuls without batch dims (the Dense/qkv/proj/MLP products; attention logits and softmax
# are recomputed) via jax.checkpoint_policies.dots_with_no_batch_dims_saveable.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# How attention is computed (config.model.attention); every choice is the same function:
# 'einsum': two einsums and a float32 softmax, spelled out here (runs everywhere);
# 'xla': jax.nn.dot_product_attention's XLA path; 'cudnn': its cuDNN fused kernel (GPU only);
# 'cudnn_padded': cuDNN on sequences zero-padded to a multiple of CUDNN_SEQ_MULTIPLE, the
# padded keys masked out by length (on an H200 cuDNN refused MAE's lengths 50 / 197).
ATTENTIONS = ("einsum", "xla", "cudnn", "cudnn_padded")
CUDNN_SEQ_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class VitSpec:
  """Encoder shape parsed from a variant name like 'B/16'."""
  width: int
  depth: int
  heads: int
  patch: int


def parse_variant(variant: str) -> VitSpec:
  """'B/16' -> VitSpec(768, 12, 12, 16). Raises ValueError on an unknown name."""
  name, sep, patch = variant.partition("/")
  if name not in VARIANTS or not sep or not patch.isdigit() or int(patch) <= 0:
    raise ValueError(
        f"unknown variant {variant!r}; use NAME/PATCH with NAME in {sorted(VARIANTS)}, e.g. 'B/16'")
  width, depth, heads = VARIANTS[name]
  return VitSpec(width, depth, heads, int(patch))


class HeadsDense(nn.Module):
  """Dense layer over head-structured axes with logical names on its kernel.

  Contracts the last `in_axes` axes of x with a kernel [*in, *features] (Xavier-uniform
  over the flattened fan-in/out, as MAE's Linear init). flax's DenseGeneral reshapes
  a flat kernel at init, which breaks logical constraints inside a mesh.
  """
  features: tuple
  in_axes: int
  names: tuple
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, part=None):
    """`part` (a slice of the first feature axis) applies only those outputs, e.g. q of qkv."""
    in_shape = x.shape[-self.in_axes:]
    n_in = len(in_shape)
    init = nn.initializers.xavier_uniform(
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(self.features))))
    kernel = self.param("kernel", logical_axes.partitioned(init, self.names), in_shape + tuple(self.features))
    bias = self.param("bias", logical_axes.partitioned(nn.initializers.zeros, self.names[n_in:]), tuple(self.features))
    if part is not None:
      kernel, bias = kernel[(slice(None),) * n_in + (part,)], bias[part]
    x_axes = tuple(range(x.ndim - n_in, x.ndim))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((x_axes, tuple(range(n_in))), ((), ())))
    return y + bias.astype(self.dtype)


def _pad_tokens(x, multiple: int):
  """[B, N, H, hd] -> [B, ceil(N / multiple) * multiple, H, hd], zeros appended."""
  pad = -x.shape[1] % multiple
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def padded_attention(q, k, v, implementation: str, multiple: int = CUDNN_SEQ_MULTIPLE):
  """jax.nn.dot_product_attention on sequences zero-padded to a multiple of `multiple`.

  The padded keys are masked out by length and the padded queries' rows dropped, so this
  is exactly attention over the real tokens. q: [B, N, H, hd]; k, v: [B, M, H, hd].
  """
  n, m = q.shape[1], k.shape[1]
  out = jax.nn.dot_product_attention(
      _pad_tokens(q, multiple), _pad_tokens(k, multiple), _pad_tokens(v, multiple),
      key_value_seq_lengths=jnp.full((q.shape[0],), m, jnp.int32),
      implementation=implementation)
  return out[:, :n]  # [B, N, H, hd]


def attend(q, k, v, implementation: str = "einsum"):
  """softmax(q k^T / sqrt(hd)) v. q: [B, N, H, hd]; k, v: [B, M, H, hd] -> [B, N, H, hd]."""
  if implementation == "einsum":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  if implementation == "cudnn_padded":
    return padded_attention(q, k, v, "cudnn")
  raise ValueError(f"unknown attention {implementation!r}; use one of {ATTENTIONS}")


class Attention(nn.Module):
  """Multi-head attention; with `context`, queries come from x and keys/values from context."""
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "einsum"  # one of ATTENTIONS

  @nn.compact
  def __call__(self, x, context=None):  # x: [B, N, D], context: [B, M, D] or None
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv_dense = HeadsDense((3, self.heads, head_dim), 1, ("embed", None, "heads", "kv"),
                           self.dtype, name="qkv")
    if context is None:
      qkv = qkv_dense(x)  # [B, N, 3, H, hd]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd] each
    else:
      q = qkv_dense(x, part=slice(0, 1))[:, :, 0]  # [B, N, H, hd]
      kv = qkv_dense(context, part=slice(1, 3))  # [B, M, 2, H, hd]
      k, v = kv[:, :, 0], kv[:, :, 1]
    q = logical_axes.constrain(q, ("batch", "tokens", "heads", "kv"))
    out = attend(q, k, v, self.implementation)  # [B, N, H, hd]
    out = HeadsDense((width,), 2, ("heads", "kv", "embed"), self.dtype, name="proj")(out)
    return logical_axes.constrain(out, ("batch", "tokens", "embed"))


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, N, D]
    width = x.shape[-1]
    kinit = nn.initializers.xavier_uniform()
    h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1",
                 kernel_init=logical_axes.partitioned(kinit, ("embed", "mlp")),
                 bias_init=logical_axes.partitioned(nn.initializers.zeros, ("mlp",)))(x)
    h = logical_axes.constrain(nn.gelu(h, approximate=False), ("batch", "tokens", "mlp"))
    return nn.Dense(width, dtype=self.dtype, name="fc2",
                    kernel_init=logical_axes.partitioned(kinit, ("mlp", "embed")),
                    bias_init=logical_axes.partitioned(nn.initializers.zeros, ("embed",)))(h)


def layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name,
                      scale_init=logical_axes.partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=logical_axes.partitioned(nn.initializers.zeros, ("embed",)))


def stochastic_depth(branch, rate, rng):
  """Stochastic depth: zero a residual branch [B, ...] per example with prob `rate`.

  Kept examples are scaled by 1 / (1 - rate) so the expectation is unchanged. `rate` may be
  traced (a scanned per-layer rate); rate 0 keeps every example with scale 1, exactly.
  """
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(rng, keep_prob, (branch.shape[0],) + (1,) * (branch.ndim - 1))
  scale = jnp.where(keep, 1.0 / keep_prob, 0.0).astype(branch.dtype)  # [B, 1, ...]
  return branch * scale


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

  With `context` [B, M, D] the block cross-attends: x's tokens query ln(context) (the same
  norm1) and nothing attends to x. CrossMAE's decoder and the `last_block` aggregator use it.

  `drop_path` is this block's stochastic-depth rate; each residual branch is dropped per
  example (rng stream 'dropout') unless `deterministic`. A `drop_rate` call argument
  overrides it, so nn.scan can feed one rate per layer. With rate 0 or deterministic=True
  the block is exactly the plain one.
  """
  heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  drop_path: float = 0.0
  attention: str = "einsum"  # one of ATTENTIONS

  def __call__(self, x, context=None, deterministic=True, drop_rate=None):  # [B, N, D]
    # All arguments go positionally to `forward`, the method nn.remat lifts: jax.checkpoint's
    # static_argnums (deterministic) must index a passed argument.
    return self.forward(x, context, deterministic, drop_rate)

  @nn.compact
  def forward(self, x, context, deterministic, drop_rate):
    rate = self.drop_path if drop_rate is None else drop_rate
    active = not deterministic and not (isinstance(rate, (int, float)) and rate == 0)

    def residual(branch):
      return stochastic_depth(branch, rate, self.make_rng("dropout")) if active else branch

    norm1 = layer_norm(self.dtype, "norm1")
    kv = None if context is None else norm1(context)
    x = x + residual(Attention(self.heads, self.dtype, self.attention, name="attn")(norm1(x), kv))
    hidden = int(x.shape[-1] * self.mlp_ratio)
    x = x + residual(Mlp(hidden, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x)))
    return logical_axes.constrain(x, ("batch", "tokens", "embed"))


def block_class(remat: str = "none", prevent_cse: bool = True):
  """Block, wrapped in nn.remat for remat != 'none'; param names are unchanged.

  Only `Block.forward` is rematerialized, with `deterministic` (argument 3) static.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat {remat!r}; use one of {tuple(REMAT_POLICIES)}")
  if remat == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse,
                  static_argnums=(3,), methods=["forward"])


def drop_path_rates(drop_path: float, depth: int) -> np.ndarray:
  """Per-block stochastic-depth rates rising linearly from 0 to `drop_path` (timm)."""
  return np.linspace(0.0, drop_path, depth)


POOLS = ("none", "cls", "gap")


def check_image_shape(shape, image_size: int, patch: int):
  """Raises ValueError unless images [B, H, W, 3] are image_size square, in whole patches.

  The position table and the patch ids are built for an image_size grid; other images
  would be patchified on another grid and, with ids_keep, silently take wrong positions.
  """
  if image_size % patch:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
  if len(shape) != 4 or tuple(shape[1:3]) != (image_size, image_size):
    raise ValueError(f"images have shape {tuple(shape)}; the model expects "
                     f"[batch, {image_size}, {image_size}, 3] (its image_size)")


class Encoder(nn.Module):
  """ViT encoder over a subset of patches: patch embed, posemb, cls, blocks, final norm.

  The patch embedding is a conv-equivalent kernel [p, p, 3, D] applied only to the
  selected patches, so masked patches cost nothing.

  Pooling for classification: 'cls' is the normed cls token; 'gap' is MAE's global pool,
  fc_norm(mean of the patch tokens' block outputs). Here fc_norm IS the final 'norm': MAE
  drops its pre-trained final norm and trains a fresh fc_norm, while reusing it keeps every
  pre-trained weight in use and the param tree identical for all pool modes.
  """
  spec: VitSpec
  image_size: int
  posemb: str = "sincos"  # 'sincos' (fixed, MAE) | 'learned' (timm, covers cls too)
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat: str = "none"  # a REMAT_POLICIES key
  scan_layers: bool = False  # nn.scan over blocks: params 'blocks' with a leading 'layers' axis
  drop_path: float = 0.0  # stochastic depth of the last block (linear from 0 at the first)
  attention: str = "einsum"  # one of ATTENTIONS

  @property
  def grid(self) -> int:
    return self.image_size // self.spec.patch

  @nn.compact
  def __call__(self, images, ids_keep=None, *, train: bool = False, pool: str = "none"):
    """images: [B, H, W, 3]; ids_keep: [B, K] patch indices or None (all).

    Returns [B, 1+K, D] for pool='none', else [B, D]. `train` turns drop path on (needs
    the 'dropout' rng when drop_path > 0).
    """
    if pool not in POOLS:
      raise ValueError(f"unknown pool {pool!r}; use one of {POOLS}")
    check_image_shape(images.shape, self.image_size, self.spec.patch)
    d, p = self.spec.width, self.spec.patch
    patches = patch_tokens.patchify(images, p)  # [B, L, p*p*3]
    if ids_keep is not None:
      patches = patch_tokens.gather_tokens(patches, ids_keep)  # [B, K, p*p*3]
    kernel = self.param("patch_embed_kernel", logical_axes.partitioned(
        nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
        (None, None, None, "embed")), (p, p, 3, d))
    bias = self.param("patch_embed_bias", logical_axes.partitioned(nn.initializers.zeros, ("embed",)), (d,))
    x = patches.astype(self.dtype) @ kernel.reshape(p * p * 3, d).astype(self.dtype)
    x = x + bias.astype(self.dtype)  # [B, K, D]

    length = self.grid ** 2
    if self.posemb == "sincos":
      table = jnp.asarray(posemb_lib.sincos_2d(d, self.grid, cls_token=True))  # [1+L, D]
    elif self.posemb == "learned":
      table = self.param("pos_embedding", logical_axes.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                         (1 + length, d))
    else:
      raise ValueError(f"unknown posemb {self.posemb!r}")
    patch_pos = table[1:][None]  # [1, L, D]
    if ids_keep is not None:
      patch_pos = patch_tokens.gather_tokens(jnp.broadcast_to(patch_pos, (x.shape[0], length, d)), ids_keep)
    x = x + patch_pos.astype(self.dtype)

    cls = self.param("cls_token", logical_axes.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, d))
    cls = (cls + table[:1][None]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)  # [B, 1+K, D]
    x = logical_axes.constrain(x, ("batch", "tokens", "embed"))
    deterministic = not train or self.drop_path == 0
    rates = drop_path_rates(self.drop_path, self.spec.depth)
    if self.scan_layers:
      block = block_class(self.remat, prevent_cse=False)(
          self.spec.heads, self.mlp_ratio, self.dtype, attention=self.attention, name="blocks")
      body = lambda mdl, carry, rate: (mdl(carry, None, deterministic, rate), None)
      scan = nn.scan(body, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     length=self.spec.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scan(block, x, None if deterministic else jnp.asarray(rates, jnp.float32))
    else:
      cls = block_class(self.remat)
      for i in range(self.spec.depth):
        x = cls(self.spec.heads, self.mlp_ratio, self.dtype, float(rates[i]), self.attention,
                name=f"block{i}")(x, None, deterministic)
    norm = layer_norm(self.dtype, "norm")
    if pool == "cls":
      return norm(x[:, 0])  # [B, D]
    if pool == "gap":
      mean = x[:, 1:].astype(jnp.float32).mean(axis=1).astype(self.dtype)  # [B, D]
      return norm(mean)
    return norm(x)  # [B, 1+K, D]


# Scanned <-> unscanned encoder layouts. Both walk any pytree (params, or a whole train
# state whose optimizer holds params-shaped subtrees): a dict with keys block0..block{n-1}
# (the encoder's; decoder blocks are named decoder_block{i}) <-> one key 'blocks' whose
# leaves carry a leading layer axis. Leaves may be arrays or ShapeDtypeStructs (the
# NamedSharding spec gains / loses a leading None).
_BLOCK_KEY = re.compile(r"block(\d+)")


def _block_ids(node) -> list[int]:
  if not isinstance(node, dict):
    return []
  return sorted(int(m.group(1)) for k in node if isinstance(k, str)
                for m in [_BLOCK_KEY.fullmatch(k)] if m)


def _stack(*xs):
  x = xs[0]
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=sharding)
  return jnp.stack(xs)


def _unstack(x, n: int) -> list:
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return [jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)] * n
  return [x[i] for i in range(n)]


def scan_params(tree):
  """{..., 'block0': t0, ..., 'block{n-1}': t} -> {..., 'blocks': stack(t_i)} wherever it occurs."""
  def convert(node):
    ids = _block_ids(node)
    if not ids:
      return node
    assert ids == list(range(len(ids))), f"blocks are not block0..block{len(ids) - 1}: {ids}"
    out = {k: v for k, v in node.items() if not (isinstance(k, str) and _BLOCK_KEY.fullmatch(k))}
    out["blocks"] = jax.tree.map(_stack, *[node[f"block{i}"] for i in ids])
    return out
  return jax.tree.map(convert, tree, is_leaf=lambda n: bool(_block_ids(n)))


def unscan_params(tree):
  """Inverse of `scan_params`: 'blocks' [n, ...] -> 'block0'..'block{n-1}'."""
  is_scanned = lambda n: isinstance(n, dict) and "blocks" in n

  def convert(node):
    if not is_scanned(node):
      return node
    blocks = node["blocks"]
    n = jax.tree.leaves(blocks)[0].shape[0]
    out = {k: v for k, v in node.items() if k != "blocks"}
    per_leaf = jax.tree.map(lambda x: _unstack(x, n), blocks)
    for i in range(n):
      out[f"block{i}"] = jax.tree.map(lambda parts: parts[i], per_leaf,
                                      is_leaf=lambda v: isinstance(v, list))
    return out
  return jax.tree.map(convert, tree, is_leaf=is_scanned)


# For checkpointing.Checkpointer.restore: a checkpoint of either layout loads into a model of
# the other. (to_saved, from_saved) pairs over the whole train state.
CHECKPOINT_RELAYOUTS = ((scan_params, unscan_params), (unscan_params, scan_params))
