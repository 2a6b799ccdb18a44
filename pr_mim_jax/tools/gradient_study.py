r"""The paper's Figure 4: how far each method's encoder gradient is from MAE's.

  python -m pr_mim_jax.tools.gradient_study --config=pr_mim_jax/configs/pretrain.py:dataset=shapes \
      --out=workdirs/gradients [--settings=mae,partial,pr_mim:local_attention,...] [--steps=N]

Each setting pre-trains on its own from the same seed and data order. Every `--every` steps
it takes its current params and, on `--batches` fixed probe batches (same images and the
same visible set for every setting), measures

    relative distance = ||g_method - g_MAE|| / ||g_MAE||   over the encoder params,

where g_MAE decodes every masked token (thrown_reconstruction 'none', no throwing) with
the same params. It reports the mean and std over the probe batches; the MAE row shows the
batch-to-batch yardstick ||g_MAE(batch k) - g_MAE(batch k+1)|| / ||g_MAE(batch k)||
instead of its (zero) distance to itself. After training it measures k-NN top-1.
Writes gradient_distance.csv, gradient_distance.md, gradient_distance.png and summary.json
(every row and each setting's final loss, k-NN and seconds) under --out, after each
setting, so an interrupted study keeps the settings it finished. A rerun starts over.
"""

import csv
import json
import logging
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from absl import logging as absl_logging
from etils import epath

from pr_mim_jax import cli
from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError
from pr_mim_jax.method import masking
from pr_mim_jax.method import methods
from pr_mim_jax.models import progressive
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import optim
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training import trainer

DEFAULT_SETTINGS = ("mae", "partial") + tuple(f"pr_mim:{a}" for a in progressive.AGGREGATORS)



def _define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined when it runs (so importing this module defines none)."""
  return types.SimpleNamespace(
      config=cli.define_config_file("config", None, "Pre-training config.",
                                    lock_config=True),
      out=flags.DEFINE_string("out", None, "Output directory for the CSV, markdown and PNG."),
      settings=flags.DEFINE_list("settings", list(DEFAULT_SETTINGS),
                                 "method or pr_mim:AGGREGATOR entries."),
      steps=flags.DEFINE_integer("steps", 0, "Training steps per setting; 0 = from the config's "
                                 "epochs."),
      every=flags.DEFINE_integer("every", 0, "Steps between measurements; 0 = steps / 8."),
      batches=flags.DEFINE_integer("batches", 8, "Probe batches averaged per measurement (>= 2)."),
      probe_batch=flags.DEFINE_integer("probe_batch", 32, "Images per probe batch."))


def setting_config(config, setting: str):
  """'partial' or 'pr_mim:interpolate' -> a config switched to that method / aggregator."""
  method, _, aggregator = setting.partition(":")
  if method not in methods.METHODS or (aggregator and method != "pr_mim") or (
      aggregator and aggregator not in progressive.AGGREGATORS):
    raise UserError(f"--settings: unknown entry {setting!r}; use one of {list(DEFAULT_SETTINGS)}")
  c = methods.with_method(config, method)
  if aggregator:
    with c.unlocked():
      c.reconstruction.aggregator = aggregator
  return c


def check_settings(config, settings: list[str]) -> None:
  """Every --settings entry, checked before anything trains: none given, an unknown one, or
  one named twice (it trained twice, its rows doubled in the CSV and its table column)."""
  if not settings:
    raise UserError(f"--settings: none given; use some of {','.join(DEFAULT_SETTINGS)}")
  for s in settings:
    setting_config(config, s)
  repeated = sorted({s for s in settings if settings.count(s) > 1})
  if repeated:
    raise UserError(f"--settings: {repeated} named twice; name each setting once")


def encoder_grad(params, model, images, masks, task):
  """Gradient of the task's loss w.r.t. the encoder params only."""
  grads = jax.grad(lambda p: train_step_lib.loss_fn(p, model, images, masks, task)[0])(params)
  return grads["encoder"]


def mae_masks(masks: masking.Masks) -> masking.Masks:
  """The same visible set, every masked token decoded, none thrown."""
  empty = masks.ids_throw[:, :0]
  return masking.Masks(masks.ids_vis, masks.ids_mask, empty, masks.ids_restore)


def make_probe(model, task, mae_model, mae_task):
  """jit: (params, images, rng) -> (distance of method grad to MAE grad, ||g_MAE||, g_MAE)."""

  @jax.jit
  def probe(params, images, rng):
    masks = masking.make_masks(rng, images.shape[0], task.split, task.throw_strategy, task.grid,
                               task.num_stages)
    g_method = encoder_grad(params, model, images, masks, task)
    g_mae = encoder_grad(params, mae_model, images, mae_masks(masks), mae_task)
    diff = jax.tree.map(jnp.subtract, g_method, g_mae)
    return optax.tree.norm(diff), optax.tree.norm(g_mae), g_mae

  return probe


def measure(probe, params, probe_images, probe_rngs) -> dict:
  """Mean/std over probe batches of the relative distance, plus the MAE batch-noise yardstick."""
  rel, noise, previous = [], [], None
  for images, rng in zip(probe_images, probe_rngs):
    dist, mae_norm, g_mae = probe(params, images, rng)
    rel.append(float(dist / mae_norm))
    if previous is not None:
      noise.append(float(optax.tree.norm(jax.tree.map(jnp.subtract, g_mae, previous[0])) / previous[1]))
    previous = (g_mae, mae_norm)
  return {"rel_mean": float(np.mean(rel)), "rel_std": float(np.std(rel, ddof=1)),
          "noise_mean": float(np.mean(noise)), "noise_std": float(np.std(noise, ddof=1))
          if len(noise) > 1 else 0.0, "n": len(rel)}


def run_setting(config, setting: str, steps: int, every: int, probe_images, probe_rngs, num_train):
  """Train one setting, measuring at steps 0, every, 2*every, ..., steps; returns rows + k-NN."""
  config = setting_config(config, setting)
  pretrain.check_config(config)
  mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  mae_config = methods.with_method(config, "mae")
  mae_model = train_step_lib.model_from_config(mae_config)
  mae_task = train_step_lib.task_from_config(mae_config)
  total, warmup = optim.schedule_steps(config.optim, num_train, config.batch_size, steps)
  peak = optim.peak_lr(config.optim, config.batch_size)
  schedule = optim.lr_schedule(peak, total, warmup)
  tx = optim.make_optimizer(config.optim, schedule)
  rows = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_sharding = pretrain.create_state(model, tx, task.split, config.seed, mesh, rules)
    probe = make_probe(model, task, mae_model, mae_task)
    batches = pipeline.train_batches(config.data, seed=config.seed, global_batch=config.batch_size,
                                     image_size=config.model.image_size, start_step=0,
                                     sharding=sharding.batch_sharding(mesh))
    t0 = time.perf_counter()

    def record(step, state, batch=None, metrics=None, last=False):
      if step % every == 0 or last:
        m = measure(probe, state.params, probe_images, probe_rngs)
        rows.append({"setting": setting, "step": step, **m})
        logging.info("%s step %d: relative distance %.3f +- %.3f (MAE batch noise %.3f), %.0f s",
                     setting, step, m["rel_mean"], m["rel_std"], m["noise_mean"],
                     time.perf_counter() - t0)
      return {"final_loss": float(metrics["loss"])} if last else None

    record(0, state)
    state, summary = trainer.run(
        state, pretrain.jit_train_step(model, tx, task, schedule, mesh, state_sharding), batches,
        start_step=0, total_steps=total, log_every=every, peak_lr=peak, after_step=record)
    knn_top1 = pretrain.KnnMonitor(config, model).accuracy(state.params) if config.knn.enabled else None
  return rows, {"setting": setting, "final_loss": summary["final_loss"], "knn_top1": knn_top1,
                "seconds": time.perf_counter() - t0}


def write_outputs(out: epath.Path, rows: list, finals: list) -> None:
  with (out / "gradient_distance.csv").open("w") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  steps = sorted({r["step"] for r in rows})
  by = {(r["setting"], r["step"]): r for r in rows}
  cell = lambda r: (f"{r['noise_mean']:.3f} ± {r['noise_std']:.3f} (noise)"  # noqa: E731
                    if r["setting"] == "mae" else f"{r['rel_mean']:.3f} ± {r['rel_std']:.3f}")
  lines = ["| step | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
  lines += [f"| {s} | " + " | ".join(cell(by[(m, s)]) for m in settings) + " |" for s in steps]
  lines += ["", "| setting | final loss | k-NN top-1 | seconds |", "|---|---|---|---|"]
  lines += [f"| {f['setting']} | {f['final_loss']:.4f} | "
            f"{'-' if f['knn_top1'] is None else format(100 * f['knn_top1'], '.1f') + '%'} | "
            f"{f['seconds']:.0f} |" for f in finals]
  (out / "gradient_distance.md").write_text("\n".join(lines) + "\n")
  (out / "summary.json").write_text(json.dumps({"rows": rows, "finals": finals}, indent=1))
  plot(rows, out / "gradient_distance.png")


def plot(rows: list, path: epath.Path):
  """Distance to MAE's gradient against the step, one line per setting, titled with what
  the bars are; returns the (closed) figure."""
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  steps = sorted({r["step"] for r in rows})
  by = {(r["setting"], r["step"]): r for r in rows}
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for s in settings:
    rs = [by[(s, t)] for t in steps]
    key = "noise" if s == "mae" else "rel"
    label = "MAE batch-to-batch (yardstick)" if s == "mae" else s
    ax.errorbar(steps, [r[f"{key}_mean"] for r in rs], yerr=[r[f"{key}_std"] for r in rs],
                label=label, capsize=3, linestyle="--" if s == "mae" else "-")
  ax.set_xlabel("training step")
  ax.set_ylabel("||g - g_MAE|| / ||g_MAE|| (encoder)")
  ax.set_title(f"Encoder gradient vs MAE's, same params and visible set\n(mean ± std over "
               f"{rows[0]['n']} probe batches)", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(str(path))
  plt.close(fig)
  return fig


def _run(f: types.SimpleNamespace) -> int:
  config = f.config.value
  cli.at_least(f.steps, 0, "training steps per setting; 0 = from the config's epochs")
  cli.at_least(f.every, 0, "steps between measurements; 0 = steps / 8")
  cli.at_least(f.batches, 2, "probe batches per measurement; the spread needs several")
  cli.at_least(f.probe_batch, 1, "images per probe batch")
  settings = f.settings.value
  check_settings(config, settings)
  config_validation.validate_attention_backend(config.model, jax.default_backend())
  out = cli.output_dir(f.out.value, "out")
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  trainer.setup_jax(config)
  num_train = pretrain.check_config(setting_config(config, settings[0])).num_train
  total, _ = optim.schedule_steps(config.optim, num_train, config.batch_size, f.steps.value)
  every = f.every.value or max(1, total // 8)
  size = config.model.image_size
  wanted = f.batches.value * f.probe_batch.value
  images, _ = pipeline.labeled_arrays(config.data, config.data.eval_split,
                                      num_examples=wanted, image_size=size)  # [N, S, S, 3]
  if len(images) < wanted:  # labeled_arrays stops at the split's end
    raise UserError(f"--batches x --probe_batch: {f.batches.value} x {f.probe_batch.value} = "
                    f"{wanted} probe images, but the {config.data.eval_split!r} split of "
                    f"{config.data.dataset!r} has {len(images)}; lower --batches or --probe_batch")
  probe_images = [jnp.asarray(b) for b in np.split(images, f.batches.value)]
  probe_rngs = list(jax.random.split(jax.random.PRNGKey(config.seed + 1), f.batches.value))
  rows, finals = [], []
  for s in settings:
    setting_rows, final = run_setting(config, s, total, every, probe_images, probe_rngs, num_train)
    rows += setting_rows
    finals.append(final)
    write_outputs(out, rows, finals)  # partial results survive an interrupted study
  print((out / "gradient_distance.md").read_text())
  return 0


def main(argv=None) -> int:
  f = _define_flags()
  return cli.run(lambda: _run(f), {"config": "pr_mim_jax/configs/pretrain.py:dataset=shapes",
                                   "out": "workdirs/gradients"}, argv,
                 config_kinds=("pretrain",))


if __name__ == "__main__":
  sys.exit(main())
