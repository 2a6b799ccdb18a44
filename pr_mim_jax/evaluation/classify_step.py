"""The pure supervised steps: one probing / fine-tuning update, one exact evaluation batch."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from pr_mim_jax.data import pixels
from pr_mim_jax.evaluation import mixup
from pr_mim_jax.training import optim
from pr_mim_jax.training.train_state import ClassifierState


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Static description of what one update does to its batch and targets."""
  num_classes: int
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  ema_decay: float = 0.0  # 0 = no EMA of the params


def recipe_from_config(config, num_classes: int) -> Recipe:
  m = config.mixup
  return Recipe(num_classes=num_classes, label_smoothing=config.label_smoothing,
                mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, mix_prob=m.prob,
                switch_prob=m.switch_prob, ema_decay=config.ema.decay)


def train_step(state: ClassifierState, batch, *, model, tx, recipe: Recipe, schedule):
  """(state, {'image': [B, H, W, 3], 'label': [B]}) -> (new state, scalar metrics)."""
  mix_rng, drop_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  targets = mixup.one_hot_smoothed(batch["label"], recipe.num_classes, recipe.label_smoothing)
  images = pixels.model_input(batch["image"])  # [B, H, W, 3] float32
  images, targets = mixup.mix(mix_rng, images, targets, mixup_alpha=recipe.mixup_alpha,
                              cutmix_alpha=recipe.cutmix_alpha, switch_prob=recipe.switch_prob,
                              prob=recipe.mix_prob)  # [B, H, W, 3], [B, C]

  def loss_fn(params):
    logits, updated = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                  train=True, rngs={"dropout": drop_rng},
                                  mutable=["batch_stats"])  # [B, C]
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (logits, updated.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if recipe.ema_decay:
    ema = optim.ema_update(ema, params, recipe.ema_decay)
  metrics = {
      "loss": loss,
      # Against the dominant (mixed) target: a rough training accuracy.
      "train_top1": jnp.mean(logits.argmax(-1) == targets.argmax(-1)),
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  return new_state, metrics


def eval_step(params, batch_stats, batch, *, model):
  """Sums over the real (mask 1) examples of one padded batch: correct top-1 / top-5, loss."""
  logits = model.apply({"params": params, "batch_stats": batch_stats},
                       pixels.model_input(batch["image"]),
                       train=False).astype(jnp.float32)  # [B, C]
  labels, mask = batch["label"], batch["mask"]  # [B], [B] (0 = padding)
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]  # [B, k]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
      "correct_top1": jnp.sum((top_k[:, 0] == labels) * mask),
      "correct_top5": jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
      "loss_sum": jnp.sum(loss * mask),
      "count": jnp.sum(mask),
  }
