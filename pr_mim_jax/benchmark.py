r"""Train-step timing on synthetic, device-resident data (no TensorFlow needed).

  python -m pr_mim_jax.benchmark --config=configs/pretrain.py:variant=B/16 --batch=256 --steps=20

Prints one JSON line: compile time, median step time, images/s and peak device memory.
Timed work lives here, never in tests.
"""

import functools
import json
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from pr_mim_jax import optim
from pr_mim_jax import pretrain
from pr_mim_jax import sharding
from pr_mim_jax import train_step as train_step_lib
from pr_mim_jax.models import mae

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch; 0 = the config's.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")


def time_train_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  pretrain.setup_jax(config)
  mesh, rules = sharding.make_mesh(), sharding.DATA_PARALLEL_RULES
  model = mae.build(config.model)
  split = pretrain.token_split(config)
  schedule = optim.lr_schedule(optim.peak_lr(config.optim, batch_size), 10_000, 100)
  tx = optim.make_optimizer(config.optim, schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_sharding = pretrain.create_state(model, tx, split, config.seed, mesh, rules)
    size = config.model.image_size
    images = jax.device_put(
        np.random.default_rng(0).standard_normal((batch_size, size, size, 3), np.float32),
        sharding.batch_sharding(mesh))
    step_fn = jax.jit(
        functools.partial(train_step_lib.train_step, model=model, tx=tx, split=split,
                          target=config.loss.target, schedule=schedule),
        in_shardings=(state_sharding, {"image": sharding.batch_sharding(mesh)}),
        out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
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


def main(argv):
  del argv
  config = _CONFIG.value
  result = time_train_step(config, _BATCH.value or config.batch_size, _STEPS.value, _WARMUP.value)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
