"""AdamW with MAE's settings: scaled lr, warmup + cosine, decay mask, optional clipping."""

import flax.traverse_util
import optax

# Params never decayed besides biases and norms (which are caught by ndim == 1).
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embedding")


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
  """Linear warmup from 0 to `peak`, then half-cosine decay to 0 at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 1), total_steps, 0.0)


def decay_mask(params):
  """True where weight decay applies: matrices, not biases/norms/tokens/posembs."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: (leaf.ndim > 1 and path[-1] not in NO_DECAY_NAMES) for path, leaf in flat.items()}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(optim_cfg, schedule) -> optax.GradientTransformation:
  parts = []
  if optim_cfg.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
