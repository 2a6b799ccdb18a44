"""The pure pre-training step: masks, forward, loss, gradients, AdamW update."""

import functools

import jax
import jax.numpy as jnp
import optax

from pr_mim_jax import losses
from pr_mim_jax import masking
from pr_mim_jax import targets
from pr_mim_jax.train_state import TrainState


def step_masks(rng, step, batch_size: int, split: masking.TokenSplit) -> masking.Masks:
  """The masks of one step: a pure function of (rng, step)."""
  return masking.random_masks(jax.random.fold_in(rng, step), batch_size, split)


def loss_fn(params, model, images, masks: masking.Masks, target: str):
  """Masked reconstruction loss on the decoded tokens; returns (loss, predictions)."""
  pred = model.apply({"params": params}, images, masks.ids_vis, masks.ids_dec)  # [B, n_dec, P]
  tgt = targets.patch_targets(images, model.spec.patch, target)  # [B, L, P]
  tgt = jnp.take_along_axis(tgt, masks.ids_dec[..., None], axis=1)  # [B, n_dec, P]
  return losses.weighted_patch_mse(pred, tgt), pred


def train_step(state: TrainState, batch, *, model, tx, split: masking.TokenSplit,
               target: str, schedule):
  """(state, {'image': [B, H, W, 3]}) -> (new state, scalar metrics)."""
  images = batch["image"]
  masks = step_masks(state.rng, state.step, images.shape[0], split)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, target=target),
                               has_aux=True)
  (loss, _), grads = grad_fn(state.params, images=images, masks=masks)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "lr": schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
