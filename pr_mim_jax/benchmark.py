r"""Train-step cost and timing on synthetic, device-resident data (no TensorFlow needed).

  python -m pr_mim_jax.benchmark --config=configs/pretrain.py --methods=mae,partial,pr_mim \
      --variants=B/16,L/16 --no-timing
  python -m pr_mim_jax.benchmark --config=configs/pretrain.py:variant=B/16 --batch=256 --steps=20

Prints one JSON line per (method, variant) setting: the analytic fwd+bwd GFLOP per image
split into encoder / decoder / thrown-token reconstruction, and its ratio to MAE at the same
variant; unless --no-timing, also compile time, median step time, images/s, achieved
TFLOP/s and peak device memory. Timed work lives here, never in tests.
"""

import json
import sys
import time
import types

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from pr_mim_jax import cli
from pr_mim_jax import config_validation
from pr_mim_jax import flops
from pr_mim_jax import methods
from pr_mim_jax import optim
from pr_mim_jax import pretrain
from pr_mim_jax import sharding
from pr_mim_jax import train_step as train_step_lib
from pr_mim_jax.errors import UserError
from pr_mim_jax.models import mae



def _define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined when it runs (so importing this module defines none)."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True),
      batch=flags.DEFINE_integer("batch", 0, "Global batch; 0 = the config's."),
      steps=flags.DEFINE_integer("steps", 20, "Timed steps."),
      warmup=flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation."),
      methods=flags.DEFINE_list("methods", [], f"Methods to run, from {list(methods.METHODS)}; "
                                "default: the config's."),
      variants=flags.DEFINE_list("variants", [], "Encoder variants, e.g. B/16,L/16; default: the "
                                 "config's."),
      no_timing=flags.DEFINE_boolean("no-timing", False, "Only print the analytic cost model."))


def settings(config, method_names, variants):
  """One config per (method, variant); the config's own when a list is empty."""
  out = []
  for variant in variants or [config.model.variant]:
    for method in method_names or [config.method]:
      c = methods.with_method(config, method) if method_names else config.copy_and_resolve_references()
      if variants:
        with c.unlocked():
          c.model.variant = variant
          c.model.width = c.model.depth = c.model.heads = 0  # all from the variant
      out.append(c)
  return out


def cost(config) -> dict:
  """The analytic cost of one setting, with its ratio to MAE on the same model."""
  model = mae.from_config(config)
  task = train_step_lib.task_from_config(config)
  f = flops.step_flops(model, task.split, task.reconstruct_thrown)
  mae_task = train_step_lib.task_from_config(methods.with_method(config, "mae"))
  mae_total = flops.step_flops(model, mae_task.split, False).total
  return {
      "method": config.method, "variant": config.model.variant,
      "image_size": config.model.image_size, "mask_ratio": config.masking.mask_ratio,
      "throw_ratio": config.masking.throw_ratio, "throw_strategy": config.masking.throw_strategy,
      "thrown_reconstruction": config.reconstruction.thrown_reconstruction,
      "aggregator": config.reconstruction.aggregator if task.reconstruct_thrown else None,
      "decoder": config.model.decoder, "target": config.loss.target,
      "tokens": {"vis": task.split.n_vis, "dec": task.split.n_dec, "throw": task.split.n_throw},
      "gflop_per_img": {"encoder": round(f.encoder, 3), "decoder": round(f.decoder, 3),
                        "thrown": round(f.thrown, 3), "total": round(f.total, 3)},
      "flop_ratio_vs_mae": round(f.total / mae_total, 4),
  }


def time_train_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  pretrain.setup_jax(config)
  mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
  model = mae.from_config(config)
  task = train_step_lib.task_from_config(config)
  schedule = optim.lr_schedule(optim.peak_lr(config.optim, batch_size), 10_000, 100)
  tx = optim.make_optimizer(config.optim, schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_sharding = pretrain.create_state(model, tx, task.split, config.seed, mesh, rules)
    size = config.model.image_size
    images = jax.device_put(
        np.random.default_rng(0).standard_normal((batch_size, size, size, 3), np.float32),
        sharding.batch_sharding(mesh))
    step_fn = pretrain.jit_train_step(model, tx, task, schedule, mesh, state_sharding)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, {"image": images}).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, metrics = compiled(state, {"image": images})
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, {"image": images})
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  return {
      "variant": config.model.variant, "image_size": size, "batch": batch_size,
      "mask_ratio": config.masking.mask_ratio, "throw_ratio": config.masking.throw_ratio,
      "dtype": config.model.compute_dtype, "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "compile_s": round(compile_s, 2),
      "step_ms": round(step_s * 1e3, 2), "img_per_s": round(batch_size / step_s, 1),
      "peak_gib": round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
      "loss": float(metrics["loss"]),
  }


def _run(f: types.SimpleNamespace):
  unknown = set(f.methods.value) - set(methods.METHODS)
  if unknown:
    raise UserError(f"--methods: unknown {sorted(unknown)}; use names from {list(methods.METHODS)}")
  for config in settings(f.config.value, f.methods.value, f.variants.value):
    batch = f.batch.value or config.batch_size
    config_validation.validate_pretrain(config, 1)
    result = cost(config)
    if not f.no_timing.value:
      result.update(time_train_step(config, batch, f.steps.value, f.warmup.value))
      result["tflop_per_s"] = round(result["gflop_per_img"]["total"] * result["img_per_s"] / 1e3, 4)
    print(json.dumps(result), flush=True)


def main(argv=None) -> int:
  f = _define_flags()
  return cli.run(lambda: _run(f), {"config": "configs/pretrain.py:variant=B/16"}, argv)


if __name__ == "__main__":
  sys.exit(main())
