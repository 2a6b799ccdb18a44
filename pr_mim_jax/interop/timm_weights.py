"""Our params <-> timm ViT / official MAE state dicts (flat name -> NumPy array).

One naming scheme: the official MAE encoder keys ARE timm's ViT names (cls_token,
pos_embed [1, 1+L, D], patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}, norm). MAE's decoder adds mask_token, decoder_pos_embed,
decoder_embed, decoder_blocks.N.*, decoder_norm and decoder_pred.

Layouts: torch Linear weights are [out, in], ours [in, out]; the fused qkv output axis is
(3, heads, head_dim) in that order in both, so it reshapes onto our [D, 3, H, hd] kernel;
proj's input axis is (heads, head_dim). The patch-embedding conv weight [D, 3, p, p]
becomes our [p, p, 3, D] kernel (patchify's (row, col, channel) order). Our sin-cos tables
are constants, not params: they are written out as pos_embed / decoder_pos_embed and, on
the way in, recognised by value to the stored dtype's rounding (`posemb='sincos'`; a
float16 / bfloat16 table too); any other table is a learned one.

Everything here is a pure function of NumPy dicts; errors list every problem at once.
"""

import dataclasses

import ml_dtypes
import numpy as np

from pr_mim_jax.errors import UserError
from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.models import vit

SINCOS_ATOL = 1e-5  # a stored float32 sin-cos table matches ours to its rounding
MAE_DECODER_HEADS = {512: 16}  # official MAE decoder width -> heads
IGNORED = ("head.weight", "head.bias")  # a classifier head: our encoder has none
_MAX_LISTED = 10
# timm's plain ViT entrypoints (vision_transformer.py: class token, token pooling, MLP ratio
# 4, nothing else set), by size: (embed_dim, depth, num_heads), then (patch_size, img_size)s.
# Each calls VisionTransformer(**dict(its shape, **kwargs)): our kwargs override its shape.
_TIMM_VITS = {
    "tiny": ((192, 12, 3), ((16, 224), (16, 384))),
    "small": ((384, 12, 6), ((32, 224), (32, 384), (16, 224), (16, 384), (8, 224))),
    "base": ((768, 12, 12), ((32, 224), (32, 384), (16, 224), (16, 384), (8, 224))),
    "large": ((1024, 24, 16), ((32, 224), (32, 384), (16, 224), (16, 384), (14, 224))),
    "huge": ((1280, 32, 16), ((14, 224),)),
}
TIMM_FALLBACK = "vit_base_patch16_224"  # the base when no entrypoint has our patch size


class WeightsError(UserError):
  """Weights that do not fit; the message lists every missing / unknown / mismatched key."""


def listing(items, limit: int = _MAX_LISTED) -> str:
  """'a, b, c' of the first `limit` items, then '... and N more'."""
  items = list(items)
  text = ", ".join(items[:limit])
  return text + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


@dataclasses.dataclass(frozen=True)
class Arch:
  """The shape of an encoder (and optional MAE decoder) as far as the weights define it."""
  width: int
  depth: int
  heads: int
  patch: int
  grid: int
  mlp_hidden: int
  posemb: str  # 'sincos' | 'learned'
  decoder_width: int = 0  # 0: no decoder
  decoder_depth: int = 0
  decoder_heads: int = 0
  decoder_hidden: int = 0
  pred_dim: int = 0

  @property
  def image_size(self) -> int:
    return self.grid * self.patch

  @property
  def mlp_ratio(self) -> float:
    return self.mlp_hidden / self.width

  @property
  def has_decoder(self) -> bool:
    return self.decoder_width > 0


def _block_shapes(prefix: str, width: int, hidden: int) -> dict:
  d, h = width, hidden
  return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
          f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
          f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
          f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
          f"{prefix}.mlp.fc1.weight": (h, d), f"{prefix}.mlp.fc1.bias": (h,),
          f"{prefix}.mlp.fc2.weight": (d, h), f"{prefix}.mlp.fc2.bias": (d,)}


def expected_shapes(arch: Arch, with_decoder: bool) -> dict[str, tuple]:
  """name -> torch shape of every array in a timm (or, with the decoder, MAE) state dict."""
  d, length = arch.width, arch.grid ** 2
  out = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + length, d),
         "patch_embed.proj.weight": (d, 3, arch.patch, arch.patch), "patch_embed.proj.bias": (d,),
         "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(arch.depth):
    out.update(_block_shapes(f"blocks.{i}", d, arch.mlp_hidden))
  if with_decoder:
    dd = arch.decoder_width
    out.update({"mask_token": (1, 1, dd), "decoder_pos_embed": (1, 1 + length, dd),
                "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
                "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                "decoder_pred.weight": (arch.pred_dim, dd), "decoder_pred.bias": (arch.pred_dim,)})
    for i in range(arch.decoder_depth):
      out.update(_block_shapes(f"decoder_blocks.{i}", dd, arch.decoder_hidden))
  return out


def check_keys(state: dict, expected: dict, ignored=IGNORED) -> None:
  """One WeightsError listing missing keys, unknown keys and shape mismatches."""
  missing = [k for k in expected if k not in state]
  unknown = [k for k in state if k not in expected and k not in ignored]
  shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
            if k in state and tuple(state[k].shape) != tuple(expected[k])]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {listing(missing)}")
  if unknown:
    problems.append(f"{len(unknown)} unknown: {listing(unknown)}")
  if shapes:
    problems.append(f"{len(shapes)} with another shape: {listing(shapes)}")
  if problems:
    raise WeightsError("the weights do not fit a ViT of this shape: " + "; ".join(problems))


def _indices(state: dict, prefix: str) -> list[int]:
  return sorted({int(k[len(prefix):].split(".")[0]) for k in state
                 if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()})


def _depth(state: dict, prefix: str) -> int:
  ids = _indices(state, prefix)
  if ids != list(range(len(ids))):
    raise WeightsError(f"blocks {prefix}N are not numbered 0..{len(ids) - 1}: {ids}")
  return len(ids)


def _grid(length: int, name: str) -> int:
  grid = int(round(np.sqrt(length)))
  if grid * grid != length:
    raise WeightsError(f"{name} has {length} patch positions, not a square grid (only square "
                       "grids are supported)")
  return grid


def _check_prefix_tokens(state: dict, rows: int) -> None:
  """A WeightsError naming the cause when the tokens before the patches are not exactly one
  class token with its own pos_embed row: timm's register tokens, or no_embed_class (DeiT
  III, ViT-reg), whose pos_embed has a row per patch only. Either would otherwise surface as
  a misleading 'not a square grid'."""
  if "reg_token" in state:
    raise WeightsError(f"register tokens (reg_token {tuple(state['reg_token'].shape)}) are not "
                       "supported: our ViT has a class token and patch tokens only")
  side = int(round(np.sqrt(rows)))
  if rows > 1 and side * side == rows:
    raise WeightsError(f"pos_embed has {rows} rows, one per patch of a {side}x{side} grid and none "
                       "for the class token (timm's no_embed_class, as in DeiT III); such models "
                       "are not supported")


def default_heads(width: int) -> int:
  """Heads of the standard ViT of this width (Ti 3, S 6, B 12, L 16, H 16); 0 if none."""
  return {w: h for w, _, h in vit.VARIANTS.values()}.get(width, 0)


def sincos_atol(dtype) -> float:
  """How far a stored sin-cos table may be from ours: SINCOS_ATOL, or the resolution (eps)
  of a coarser float dtype, since rounding |x| <= 1 to fp16 / bf16 moves it up to eps / 2."""
  dtype = np.dtype(dtype)
  coarse = dtype.kind == "f" or dtype == ml_dtypes.bfloat16
  return max(SINCOS_ATOL, float(ml_dtypes.finfo(dtype).eps)) if coarse else SINCOS_ATOL


def is_sincos(table: np.ndarray, grid: int) -> bool:
  """Whether a [1+L, D] table is our fixed 2-D sin-cos table (cls row zero), to the
  rounding of the table's dtype."""
  width = table.shape[-1]
  return width % 4 == 0 and np.allclose(np.asarray(table, np.float32),
                                        posemb_lib.sincos_2d(width, grid), rtol=0,
                                        atol=sincos_atol(table.dtype))


def infer_arch(state: dict, heads: int = 0, decoder_heads: int = 0) -> Arch:
  """The Arch a timm / MAE state dict implies; heads come from the caller or the standard
  widths (MAE's 512-wide decoder has 16)."""
  core = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight")
  absent = [k for k in core if k not in state]
  if absent:
    no_cls = "cls_token" in absent and len(absent) == 1
    raise WeightsError(
        "not a ViT with a class token in timm / MAE naming: missing " + listing(absent)
        + (" (models without a class token are not supported)" if no_cls else "")
        + f"; the file has {listing(sorted(state))}")
  proj = state["patch_embed.proj.weight"]  # [D, 3, p, p]
  if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
    raise WeightsError(f"patch_embed.proj.weight has shape {proj.shape}; expected [D, 3, p, p]")
  width, patch = proj.shape[0], proj.shape[2]
  pos = state["pos_embed"]
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
    raise WeightsError(f"pos_embed has shape {pos.shape}; expected [1, 1+L, {width}]")
  _check_prefix_tokens(state, pos.shape[1])
  if "fc_norm.weight" in state and "norm.weight" not in state:
    raise WeightsError("fc_norm and no final norm: a global-pool model (timm's global_pool='avg', "
                       "as MAE's fine-tuned checkpoints), whose norm follows the pooling; our "
                       "encoder ends in a per-token norm. Convert the pre-trained checkpoint")
  grid = _grid(pos.shape[1] - 1, "pos_embed (after its class-token row)")
  heads = heads or default_heads(width)
  if not heads:
    raise WeightsError(f"the number of heads of a {width}-wide encoder is not in the weights "
                       "and not a standard width; pass --heads=N")
  if width % heads:
    raise WeightsError(f"width {width} is not divisible by {heads} heads")
  arch = dict(width=width, depth=_depth(state, "blocks."), heads=heads, patch=patch, grid=grid,
              mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
              posemb="sincos" if is_sincos(pos[0], grid) else "learned")
  if "decoder_embed.weight" in state:
    dd = state["decoder_embed.weight"].shape[0]
    decoder_heads = decoder_heads or MAE_DECODER_HEADS.get(dd, 0)
    if not decoder_heads:
      raise WeightsError(f"the number of heads of a {dd}-wide decoder is not in the weights; "
                         "pass --decoder_heads=N")
    if dd % decoder_heads:
      raise WeightsError(f"decoder width {dd} is not divisible by {decoder_heads} heads")
    depth = _depth(state, "decoder_blocks.")
    fc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
    pred = state.get("decoder_pred.weight")
    if depth == 0 or fc1 is None or pred is None:
      raise WeightsError("the decoder is incomplete: it needs decoder_blocks.0.* and decoder_pred")
    arch.update(decoder_width=dd, decoder_depth=depth, decoder_heads=decoder_heads,
                decoder_hidden=fc1.shape[0], pred_dim=pred.shape[0])
  return Arch(**arch)


def is_decoder_key(name: str) -> bool:
  return name.startswith("decoder_") or name == "mask_token"


def has_decoder_keys(state: dict) -> bool:
  return any(map(is_decoder_key, state))


# --- torch -> ours -------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def _linear_in(state, name):
  return {"kernel": _f32(state[f"{name}.weight"].T), "bias": _f32(state[f"{name}.bias"])}


def _norm_in(state, name):
  return {"scale": _f32(state[f"{name}.weight"]), "bias": _f32(state[f"{name}.bias"])}


def _block_in(state, prefix, heads):
  qkv_w, qkv_b = state[f"{prefix}.attn.qkv.weight"], state[f"{prefix}.attn.qkv.bias"]
  width = qkv_w.shape[1]
  hd = width // heads
  return {
      "norm1": _norm_in(state, f"{prefix}.norm1"),
      "attn": {
          "qkv": {"kernel": _f32(qkv_w.T.reshape(width, 3, heads, hd)),  # [D, 3, H, hd]
                  "bias": _f32(qkv_b.reshape(3, heads, hd))},
          "proj": {"kernel": _f32(state[f"{prefix}.attn.proj.weight"].T.reshape(heads, hd, width)),
                   "bias": _f32(state[f"{prefix}.attn.proj.bias"])}},
      "norm2": _norm_in(state, f"{prefix}.norm2"),
      "mlp": {"fc1": _linear_in(state, f"{prefix}.mlp.fc1"),
              "fc2": _linear_in(state, f"{prefix}.mlp.fc2")},
  }


def from_state_dict(state: dict, arch: Arch) -> dict:
  """A checked timm / MAE state dict -> our params: {'encoder': ...} plus, when the state
  dict has MAE's decoder, decoder_embed, mask_token, decoder_block{i}, decoder_norm,
  decoder_pred. Raises WeightsError listing every problem."""
  check_keys(state, expected_shapes(arch, arch.has_decoder))
  encoder = {
      "patch_embed_kernel": _f32(state["patch_embed.proj.weight"].transpose(2, 3, 1, 0)),
      "patch_embed_bias": _f32(state["patch_embed.proj.bias"]),
      "cls_token": _f32(state["cls_token"]),
      "norm": _norm_in(state, "norm"),
  }
  if arch.posemb == "learned":
    encoder["pos_embedding"] = _f32(state["pos_embed"][0])  # [1+L, D]
  for i in range(arch.depth):
    encoder[f"block{i}"] = _block_in(state, f"blocks.{i}", arch.heads)
  params = {"encoder": encoder}
  if arch.has_decoder:
    if not is_sincos(state["decoder_pos_embed"][0], arch.grid):
      raise WeightsError("decoder_pos_embed is not the fixed 2-D sin-cos table MAE uses; our "
                         "decoder has no learned position table. Convert without the decoder "
                         "(drop the decoder_* and mask_token keys)")
    params.update(decoder_embed=_linear_in(state, "decoder_embed"),
                  mask_token=_f32(state["mask_token"]),
                  decoder_norm=_norm_in(state, "decoder_norm"),
                  decoder_pred=_linear_in(state, "decoder_pred"))
    for i in range(arch.decoder_depth):
      params[f"decoder_block{i}"] = _block_in(state, f"decoder_blocks.{i}", arch.decoder_heads)
  return params


# --- ours -> torch -------------------------------------------------------------------------

def _linear_out(p, name):
  return {f"{name}.weight": _f32(np.asarray(p["kernel"]).T), f"{name}.bias": _f32(p["bias"])}


def _norm_out(p, name):
  return {f"{name}.weight": _f32(p["scale"]), f"{name}.bias": _f32(p["bias"])}


def _block_out(p, prefix):
  qkv, proj = p["attn"]["qkv"], p["attn"]["proj"]
  width = np.shape(qkv["kernel"])[0]
  out = {f"{prefix}.attn.qkv.weight": _f32(np.asarray(qkv["kernel"]).reshape(width, -1).T),
         f"{prefix}.attn.qkv.bias": _f32(np.asarray(qkv["bias"]).reshape(-1)),
         f"{prefix}.attn.proj.weight": _f32(np.asarray(proj["kernel"]).reshape(-1, width).T),
         f"{prefix}.attn.proj.bias": _f32(proj["bias"])}
  out.update(_norm_out(p["norm1"], f"{prefix}.norm1"))
  out.update(_norm_out(p["norm2"], f"{prefix}.norm2"))
  out.update(_linear_out(p["mlp"]["fc1"], f"{prefix}.mlp.fc1"))
  out.update(_linear_out(p["mlp"]["fc2"], f"{prefix}.mlp.fc2"))
  return out


def to_state_dict(params: dict, arch: Arch, with_decoder: bool = False) -> dict[str, np.ndarray]:
  """Our params (scanned or not) -> a timm state dict of float32 arrays; with_decoder adds
  MAE's decoder keys. pos_embed / decoder_pos_embed hold the sin-cos tables when fixed."""
  params = vit.unscan_params(params)
  enc = params["encoder"]
  if "pos_embedding" in enc:
    pos = np.asarray(enc["pos_embedding"])
  else:
    pos = posemb_lib.sincos_2d(arch.width, arch.grid)
  out = {"cls_token": _f32(enc["cls_token"]), "pos_embed": _f32(pos[None]),
         "patch_embed.proj.weight": _f32(np.asarray(enc["patch_embed_kernel"]).transpose(3, 2, 0, 1)),
         "patch_embed.proj.bias": _f32(enc["patch_embed_bias"])}
  for i in range(arch.depth):
    out.update(_block_out(enc[f"block{i}"], f"blocks.{i}"))
  out.update(_norm_out(enc["norm"], "norm"))
  if with_decoder:
    out["mask_token"] = _f32(params["mask_token"])
    out["decoder_pos_embed"] = posemb_lib.sincos_2d(arch.decoder_width, arch.grid)[None]
    out.update(_linear_out(params["decoder_embed"], "decoder_embed"))
    for i in range(arch.decoder_depth):
      out.update(_block_out(params[f"decoder_block{i}"], f"decoder_blocks.{i}"))
    out.update(_norm_out(params["decoder_norm"], "decoder_norm"))
    out.update(_linear_out(params["decoder_pred"], "decoder_pred"))
  check_keys(out, expected_shapes(arch, with_decoder))
  return out


def timm_architectures() -> dict[str, dict]:
  """timm entrypoint name -> the shape kwargs it builds when given none."""
  return {f"vit_{size}_patch{patch}_{img}": dict(img_size=img, patch_size=patch, embed_dim=width,
                                                 depth=depth, num_heads=heads, mlp_ratio=4.0)
          for size, ((width, depth, heads), shapes) in _TIMM_VITS.items()
          for patch, img in shapes}


def shape_kwargs(arch: Arch) -> dict:
  """The create_model kwargs that fix the encoder's shape (those timm_architectures lists)."""
  return dict(embed_dim=arch.width, depth=arch.depth, num_heads=arch.heads,
              patch_size=arch.patch, img_size=arch.image_size, mlp_ratio=arch.mlp_ratio)


def base_architecture(shape: dict, known: dict) -> str:
  """The entrypoint whose shape is `shape`, else the nearest one: same patch size first,
  then width, depth / heads, image size; ties go to the Base width (ViT-B/p)."""
  def rank(name):
    k = known[name]
    return tuple(k[f] == shape[f] for f in ("patch_size", "embed_dim", "depth", "num_heads",
                                              "img_size")) + (k["embed_dim"] == 768,)
  best = max(known, key=rank)
  return best if known[best]["patch_size"] == shape["patch_size"] else TIMM_FALLBACK


def override_note(name: str, shape: dict, known: dict) -> str:
  """'' when `shape` is entrypoint `name`'s; else a sentence listing every kwarg that differs."""
  diffs = [f"{f}={v:g} (not {known[name][f]:g})" for f, v in shape.items() if v != known[name][f]]
  if not diffs:
    return ""
  return (f"not a standard timm model: kwargs override the architecture of {name}: "
          + ", ".join(diffs))


def timm_model(arch: Arch, num_classes: int = 0, global_pool: str = "token") -> dict:
  """{'name', 'kwargs'[, 'note']} so that timm.create_model(name, pretrained=False, **kwargs)
  builds the encoder. The name is timm's own when the shape (width, depth, heads, patch,
  image size, MLP ratio) is exactly one of its plain ViTs; otherwise it is the nearest such
  ViT (same patch size when timm has one), and 'note' says which kwargs override it, so the
  name never passes for the architecture. The kwargs always spell out the whole shape;
  a fine-tuned classifier's export sets num_classes and global_pool (classifier_state)."""
  known, shape = timm_architectures(), shape_kwargs(arch)
  name = base_architecture(shape, known)
  kwargs = dict(shape, class_token=True, global_pool=global_pool, num_classes=num_classes)
  note = override_note(name, shape, known)
  return {"name": name, "kwargs": kwargs, **({"note": note} if note else {})}


# --- a fine-tuned / probed classifier -> timm's pooling and head ---------------------------

POOL_TO_TIMM = {"gap": "avg", "cls": "token"}  # our config.head.pool -> timm's global_pool
BN_EPS = 1e-6  # the probe head's BatchNorm (models/classifier.Head)


def classifier_state(state: dict, head: dict, batch_stats: dict, pool: str,
                     kind: str) -> dict[str, np.ndarray]:
  """A timm encoder state dict (to_state_dict) made a classifier's: head.weight / head.bias
  from our head, and for pool 'gap' the final norm renamed fc_norm (timm's global_pool='avg'
  applies fc_norm to the mean of the patch tokens and has no per-token norm, as our 'gap').
  The probe head's BatchNorm (no affine, running statistics) is folded into the linear layer:
  (x - mean) / sqrt(var + eps) @ W + b = x @ (W / s) + (b - mean / s @ W)."""
  if pool not in POOL_TO_TIMM:
    raise UserError(f"config.head.pool {pool!r}: no timm pooling for it; "
                    f"use one of {sorted(POOL_TO_TIMM)}")
  kernel = np.asarray(head["dense"]["kernel"], np.float64)  # [D, C]
  bias = np.asarray(head["dense"]["bias"], np.float64)
  if kind == "batchnorm_linear":
    stats = batch_stats["bn"]
    scale = 1.0 / np.sqrt(np.asarray(stats["var"], np.float64) + BN_EPS)  # [D]
    bias = bias - (np.asarray(stats["mean"], np.float64) * scale) @ kernel
    kernel = kernel * scale[:, None]
  elif kind != "linear":
    raise UserError(f"config.head.kind {kind!r}: no timm head for it; use 'linear' or "
                    "'batchnorm_linear'")
  out = dict(state)
  if pool == "gap":
    out["fc_norm.weight"], out["fc_norm.bias"] = out.pop("norm.weight"), out.pop("norm.bias")
  out["head.weight"], out["head.bias"] = _f32(kernel.T), _f32(bias)
  return out
