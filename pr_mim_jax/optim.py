"""AdamW with MAE's settings: scaled lr, warmup + cosine, decay mask, optional clipping."""

import flax.traverse_util
import jax.numpy as jnp
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
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
