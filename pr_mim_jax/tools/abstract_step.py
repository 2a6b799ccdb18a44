"""The train step of a config, built on any mesh without running anything.

Pre-training, linear probing and fine-tuning each get the very jitted step their loop
runs (`pretrain.jit_train_step`, `classify.jit_train_step`), an abstract state laid out by
the same code that creates the real one, and abstract batches, so the step can be traced,
lowered and compiled for devices that are only described (compile_targets.py).
"""

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax

from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify
from pr_mim_jax.evaluation import classify_step
from pr_mim_jax.method import flops
from pr_mim_jax.models import classifier
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import optim
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib

MODES = ("pretrain", "linear_probe", "finetune")


@dataclasses.dataclass(frozen=True)
class Step:
  """A jitted step ready to trace: its abstract state and abstract batches."""
  jitted: Callable
  state: object  # ShapeDtypeStructs with the state's shardings
  batch: Callable[[int], dict]  # global batch size -> abstract batch
  gflop_per_img: float | None  # our analytic fwd+bwd count; None where it is not modelled
  num_batch_shards: int
  mesh_shape: dict
  granularity: int  # per-device batches must be multiples of this (gradient accumulation)


def build(config, devices, num_classes: int) -> Step:
  """The train step `config.mode` runs, on the config's mesh over `devices`."""
  mode = config.get("mode", "pretrain")
  if mode not in MODES:
    raise UserError(f"config.mode: {mode!r} has no train step to compile; use a config with "
                    f"mode in {MODES}")
  config_validation.validate_mesh(config)
  mesh = sharding.mesh_from_config(config, devices)
  rules = sharding.rules_from_config(config)
  shards = sharding.num_batch_shards(mesh)
  # The schedule's constants do not change the program's size; a nominal one will do (a
  # fine-tuning config's base_lr may still be None, left to its recipe).
  schedule = optim.lr_schedule(1e-3, 1000, 100)
  make = _pretrain if mode == "pretrain" else functools.partial(_classify, num_classes=num_classes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted, state, image_size, gflop, granularity = make(config, mesh, rules, shards, schedule)
  batch_sharding = sharding.batch_sharding(mesh)
  labeled = mode != "pretrain"
  augment = config.data.get("augment", "crop_flip") if labeled else "crop_flip"
  return Step(jitted, state,
              lambda b: pipeline.abstract_batch(b, image_size, batch_sharding, labeled, augment),
              gflop, shards, dict(mesh.shape), granularity)


def _pretrain(config, mesh, rules, shards, schedule):
  config_validation.validate_pretrain(config, shards)
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  tx = optim.make_optimizer(config.optim, schedule)
  state, state_sharding = pretrain.abstract_state(model, tx, task.split, mesh, rules)
  jitted = pretrain.jit_train_step(model, tx, task, schedule, mesh, state_sharding)
  gflop = flops.step_flops(model, task.split, task.reconstruct_thrown).total
  return jitted, state, config.model.image_size, gflop, task.grad_accum_steps


def _classify(config, mesh, rules, shards, schedule, num_classes):
  config = classify.checked_config(config, shards)
  model = classifier.from_config(config, num_classes)
  recipe = classify_step.recipe_from_config(config, num_classes)
  make_tx = functools.partial(classify.make_optimizer, config, schedule, depth=model.spec.depth)
  state, state_sharding, tx = classify.abstract_state(config, model, make_tx, mesh, rules)
  jitted = classify.jit_train_step(model, tx, recipe, schedule, mesh, state_sharding)
  return jitted, state, config.model.image_size, None, 1
