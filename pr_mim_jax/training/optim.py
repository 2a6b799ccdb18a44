"""Optimizers with MAE's settings.

Pre-training: AdamW with scaled lr, warmup + cosine, decay mask, optional clipping.
Fine-tuning: the same AdamW with layer-wise lr decay (BEiT / MAE). Linear probing: LARS on
the head only. Plus an EMA of params.
"""

import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Only weight matrices are decayed; biases, norms, cls/mask tokens and posembs are not.
DECAY_NAMES = ("kernel", "patch_embed_kernel")


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch; the remainder of each epoch is dropped."""
  return num_examples // global_batch


def schedule_steps(optim_cfg, num_examples: int, global_batch: int, total_steps_override: int = 0):
  """(total_steps, warmup_steps) from epochs and the dataset size."""
  spe = steps_per_epoch(num_examples, global_batch)
  total = total_steps_override or max(1, int(round(optim_cfg.epochs * spe)))
  warmup = int(round(optim_cfg.warmup_epochs * spe))
  if total_steps_override:  # keep the warmup share of a shortened run
    warmup = int(round(total * optim_cfg.warmup_epochs / optim_cfg.epochs))
  return total, min(warmup, total - 1)


def peak_lr(optim_cfg, global_batch: int) -> float:
  """lr = base_lr * global_batch / 256 (MAE's linear scaling rule)."""
  return optim_cfg.base_lr * global_batch / 256


def lr_schedule(peak: float, total_steps: int, warmup_steps: int):
  """Linear warmup from 0 to `peak` over `warmup_steps`, then half-cosine decay to 0 at
  `total_steps` (MAE's per-iteration schedule). With no warmup, step 0 is at peak."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    return jnp.where(step < warmup_steps, warm, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress)))
  return schedule


def decay_mask(params):
  """True where weight decay applies: weight matrices, not biases/norms/tokens/posembs.

  Decided by name, not rank: the qkv bias is [3, heads, head_dim] yet must not decay.
  """
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: path[-1] in DECAY_NAMES for path in flat}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(optim_cfg, schedule) -> optax.GradientTransformation:
  parts = []
  if optim_cfg.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad_norm))
  mu_dtype = optim_cfg.get("mu_dtype", "") or None  # None: the params' dtype
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask,
                           mu_dtype=mu_dtype))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------------------
# Layer-wise lr decay (BEiT / MAE's param_groups_lrd): layer 0 is the embedding, block i
# is layer i+1, everything after the blocks (final norm, head) is layer depth+1; a param's
# lr (and with it its weight decay) is scaled by decay ** (depth + 1 - layer).

EMBED_NAMES = ("patch_embed_kernel", "patch_embed_bias", "cls_token", "pos_embedding")
_BLOCK = re.compile(r"block(\d+)")


def layer_id(path: tuple, depth: int) -> int:
  """Layer of the param at `path` (e.g. ('encoder', 'block3', 'attn', 'qkv', 'kernel') -> 4).

  Scanned encoder params ('blocks', one row per layer) span all blocks: use
  `layer_decay_scales`, which handles them.
  """
  if "blocks" in path:
    raise ValueError(f"{'/'.join(path)} is a scanned param spanning layers 1..{depth}")
  for name in path:
    match = _BLOCK.fullmatch(name)
    if match:
      return int(match.group(1)) + 1
  return 0 if path[-1] in EMBED_NAMES else depth + 1


def layer_decay_scales(params, depth: int, decay: float):
  """lr multipliers decay ** (depth + 1 - layer_id), one per param leaf.

  Scalars (floats), except under 'blocks' (scanned layout): float32 arrays [depth, 1, ...]
  with the leaf's rank, row i for block i, which broadcast against the leaf.
  """
  def scale(path, leaf):
    path = tuple(getattr(k, "key", k) for k in path)
    if "blocks" in path:
      rows = decay ** (depth - np.arange(depth, dtype=np.float64))  # block i: layer i+1
      return rows.astype(np.float32).reshape((depth,) + (1,) * (len(leaf.shape) - 1))
    return float(decay ** (depth + 1 - layer_id(path, depth)))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching leaf of `scales` (a params-shaped tree)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_finetune_optimizer(optim_cfg, schedule, params,
                            depth: int) -> optax.GradientTransformation:
  """AdamW (decay mask as pre-training) whose whole update, weight decay included, is scaled
  per param by layer_decay_scales(optim_cfg.layer_decay): MAE's per-group lr_scale.

  Reads optim_cfg.{b1, b2 (default 0.999), weight_decay, layer_decay, clip_grad_norm (0 =
  off)}. `params` may be abstract (ShapeDtypeStructs): only the tree and ranks are used.
  """
  scales = layer_decay_scales(params, depth, optim_cfg.layer_decay)
  parts = []
  if optim_cfg.get("clip_grad_norm", 0.0):
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.get("b2", 0.999),
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  parts.append(scale_by_tree(scales))
  return optax.chain(*parts)


def _matrices(params):
  """True for params of rank > 1: MAE's LARS skips biases and norms for decay and trust."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


LARS_TRUST = 0.001  # MAE's LARS trust coefficient


def lars(schedule, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = LARS_TRUST) -> optax.GradientTransformation:
  """LARS as MAE's (MoCo v3's) util/lars.py.

  For rank > 1 params: d = g + wd * p, scaled by trust_coefficient * |p| / |d| (1 where a
  norm is 0); other params use g unscaled. Momentum accumulates d, then lr scales it:
  mu = m * mu + d; p -= lr * mu. optax.lars instead decays and trust-scales every param by
  default (masks default True) and applies the lr before the momentum, so a changing lr
  enters the momentum buffer; hence this chain of optax's own pieces in MAE's order.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_matrices),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _matrices),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(schedule))


CLASSIFY_OPTIMIZERS = ("lars", "adamw")  # the probe's and fine-tuning's config.optim.optimizer


def make_probe_optimizer(optim_cfg, schedule) -> optax.GradientTransformation:
  """LARS (optim_cfg.momentum, default 0.9; weight_decay, default 0) on params['head'] only; every
  other top-level subtree (the frozen encoder) gets zero updates and keeps no state."""
  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "frozen", v)
            for k, v in params.items()}
  head = lars(schedule, weight_decay=optim_cfg.get("weight_decay", 0.0),
              momentum=optim_cfg.get("momentum", 0.9))
  return optax.multi_transform({"head": head, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema_params, params, decay: float):
  """decay * ema + (1 - decay) * params, leafwise, in the EMA's dtypes."""
  return jax.tree.map(
      lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
                    ).astype(e.dtype), ema_params, params)
