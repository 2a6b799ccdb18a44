"""The pure pre-training step: masks, forward, loss, gradients, AdamW update."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from pr_mim_jax import patch_tokens
from pr_mim_jax.data import pixels
from pr_mim_jax.method import losses
from pr_mim_jax.method import masking
from pr_mim_jax.method import targets
from pr_mim_jax.models import mae
from pr_mim_jax.models import vit
from pr_mim_jax.training.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Task:
  """Static description of what one step masks, throws, reconstructs and scores."""
  split: masking.TokenSplit
  grid: int
  patch: int
  throw_strategy: str = "random"
  num_stages: int = 1
  target: str = "norm_pixel"
  reconstruct_thrown: bool = False  # PR-MIM: thrown tokens are predicted and scored
  thrown_loss_weight: float = 1.0
  grad_accum_steps: int = 1  # micro-batches per step; one optimizer update on their mean grads


def task_from_config(config) -> Task:
  patch = vit.parse_variant(config.model.variant).patch
  grid = config.model.image_size // patch
  reconstruct_thrown = config.reconstruction.thrown_reconstruction == "progressive"
  return Task(
      split=masking.token_split(grid * grid, config.masking.mask_ratio, config.masking.throw_ratio),
      grid=grid, patch=patch,
      throw_strategy=config.masking.throw_strategy,
      # stages order the thrown tokens only for a method that reconstructs them
      num_stages=config.reconstruction.num_stages if reconstruct_thrown else 1,
      target=config.loss.target,
      reconstruct_thrown=reconstruct_thrown,
      thrown_loss_weight=config.loss.thrown_loss_weight,
      grad_accum_steps=config.train.get("grad_accum_steps", 1))


def model_from_config(config) -> mae.MaskedAutoencoder:
  """The pre-training model of a full config: head sized for the target, PR-MIM stages."""
  patch = vit.parse_variant(config.model.variant).patch
  return mae.build(config.model, config.reconstruction,
                   targets.target_dim(config.loss.target, patch))


@functools.partial(jax.jit, static_argnums=(2, 3))
def step_masks(rng, step, batch_size: int, task: Task) -> masking.Masks:
  """The masks of one step: a pure function of (rng, step). Jitted for eager callers (the
  pictures, tools, tests), where each sampling op would compile on its own."""
  return masking.make_masks(jax.random.fold_in(rng, step), batch_size, task.split,
                            task.throw_strategy, task.grid, task.num_stages)


def loss_fn(params, model, images, masks: masking.Masks, task: Task,
            every_masked_token: bool = False):
  """The one scoring path: masks -> predictions -> targets -> weighted loss (losses.py).

  Returns (loss, (preds, parts)). Training, the study's reconstruction metric and the
  reconstruction pictures all use it. In training, decoded tokens weigh 1; with progressive
  reconstruction the thrown tokens are scored too, with weight `thrown_loss_weight`,
  otherwise never. `every_masked_token` (the study's metric) scores every masked token
  with weight 1: PR-MIM's decoded and reconstructed thrown tokens, and for MAE and partial
  reconstruction the decoder run over all masked tokens. `images` may be uint8 pixels
  (normalised here, on the device) or already normalised floats.
  """
  images = pixels.model_input(images)  # [B, H, W, 3] float32
  ids_query = masks.ids_dec
  if every_masked_token and not task.reconstruct_thrown:
    ids_query = masks.ids_mask
  ids_throw = masks.ids_throw if task.reconstruct_thrown else None
  preds = model.apply({"params": params}, images, masks.ids_vis, ids_query, ids_throw)
  tgt = targets.patch_targets(images, task.patch, task.target)  # [B, L, P]
  loss, parts = losses.reconstruction_loss(
      preds.dec, patch_tokens.gather_tokens(tgt, ids_query),
      preds.throw, None if preds.throw is None else patch_tokens.gather_tokens(tgt, ids_throw),
      thrown_weight=1.0 if every_masked_token else task.thrown_loss_weight)
  return loss, (preds, parts)


def micro_batches(tree, k: int):
  """Leaves [B, ...] -> [k, B/k, ...]; micro-batch j holds examples j, j+k, j+2k, ...

  Strided, so a batch sharded contiguously over devices stays local when each device's
  shard divides by k.
  """
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1),
                      tree)


def loss_and_grads(params, images, masks, *, model, task: Task):
  """(loss, parts, grads), averaged over `task.grad_accum_steps` micro-batches.

  Every micro-batch scores the same number of tokens, so the mean of the micro-batch losses
  and grads equals the full batch's (up to float rounding).
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, task=task), has_aux=True)

  def micro(images, masks):
    (loss, (_, parts)), grads = grad_fn(params, images=images, masks=masks)
    return loss, parts, grads

  k = task.grad_accum_steps
  if k == 1:
    return micro(images, masks)

  def body(acc, batch):  # batch: ([B/k, H, W, 3], Masks of [B/k, ...])
    return jax.tree.map(lambda a, x: a + x / k, acc, micro(*batch)), None

  xs = micro_batches((images, masks), k)  # leaves [k, B/k, ...]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(micro, *jax.tree.map(lambda x: x[0], xs)))
  (loss, parts, grads), _ = jax.lax.scan(body, zeros, xs)
  return loss, parts, grads


def train_step(state: TrainState, batch, *, model, tx, task: Task, schedule):
  """(state, {'image': [B, H, W, 3]}) -> (new state, scalar metrics).

  The masks are drawn for the whole batch, then split with the images into
  `task.grad_accum_steps` micro-batches, so accumulation changes memory, not the update.
  """
  images = batch["image"]
  masks = step_masks(state.rng, state.step, images.shape[0], task)
  loss, parts, grads = loss_and_grads(state.params, images, masks, model=model, task=task)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      **parts,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "lr": schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
