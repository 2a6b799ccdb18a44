"""Linear probing and fine-tuning from a pre-training workdir, top to bottom.

Setup resolves the architecture from the pre-training run's config.json and reads only the
encoder weights of its checkpoint (init_run.py), then builds a sharded ClassifierState in
one jitted init (position embeddings interpolated when the resolution changes). Then the loop:
train, evaluate exactly over the whole eval split (padded, masked batches), checkpoint;
a rerun with the same workdir resumes from its own latest checkpoint.
"""

import functools
import json
import logging
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.sharding import Mesh

from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify_step
from pr_mim_jax.evaluation import init_run
from pr_mim_jax.evaluation import probe_reach
from pr_mim_jax.models import classifier as classifier_lib
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import metrics as metrics_lib
from pr_mim_jax.training import optim
from pr_mim_jax.training import trainer
from pr_mim_jax.training import workdir_records
from pr_mim_jax.training.train_state import ClassifierState

EVAL_KEYS = ("eval_top1", "eval_top5", "eval_loss", "eval_ema_top1", "eval_ema_top5")
# What the finished steps trained on (their examples, augmentation, targets and head): a
# resume may not change these (workdir_records.check_resume_config).
FIXED_ON_RESUME = ("mode", "seed", "batch_size", "head", "mixup", "label_smoothing",
                   "data.dataset", "data.train_split", "data.shapes", "data.augment",
                   "data.crop_min_scale", "data.randaugment", "data.random_erase",
                   "model.image_size")


def fixed_on_resume(workdir: str) -> tuple[str, ...]:
  """FIXED_ON_RESUME plus the encoder the checkpoints started from: init.step, and
  init.workdir unless the recorded one is gone (a moved init run, which only its new path
  can name). A resume reads no encoder, so a new init would otherwise go unused while
  config.json (or a finished run's summary) credits the old run's numbers to it."""
  path = epath.Path(workdir) / "config.json"
  try:
    recorded = json.loads(path.read_text())["init"]["workdir"] if path.exists() else ""
  except (ValueError, KeyError, TypeError):
    recorded = ""
  moved = bool(recorded) and not (epath.Path(recorded) / "config.json").exists()
  return FIXED_ON_RESUME + ("init.step",) + (() if moved else ("init.workdir",))


class Checked(NamedTuple):
  """What check_config found, for the run to use: no second validation, no second mesh."""
  mesh: Mesh
  config: ml_collections.ConfigDict  # the config resolved against its init run
  num_train: int
  num_classes: int


def checked_config(config, num_batch_shards: int) -> ml_collections.ConfigDict:
  """Every config check that needs no dataset; the resolved config (init_run.resolve_config)."""
  config_validation.validate_mesh(config)
  config_validation.validate_init_step(config)
  resolved = init_run.resolve_config(config)
  config_validation.validate_classify(resolved, num_batch_shards)
  return resolved


def check_config(config) -> Checked:
  """Config and dataset checks, once per run."""
  config_validation.validate_mesh(config)  # before the device count is used
  mesh = sharding.mesh_from_config(config)
  resolved = checked_config(config, sharding.num_batch_shards(mesh))
  pipeline.check_labeled_dataset(config.data)
  num_train = pipeline.num_examples(config.data, config.data.train_split, labeled=True)
  if config.batch_size > num_train:
    raise UserError(f"config.batch_size: {config.batch_size} exceeds the {num_train} training "
                    "examples; use a smaller batch")
  return Checked(mesh, resolved, num_train, pipeline.num_classes(config.data))


def make_optimizer(config, schedule, params, depth: int):
  """LARS on the head (linear probing) or AdamW with layer decay (fine-tuning)."""
  if config.optim.optimizer == "lars":
    return optim.make_probe_optimizer(config.optim, schedule)
  return optim.make_finetune_optimizer(config.optim, schedule, params, depth)


def _state_init(config, model, make_tx, mesh, rules, encoder):
  """(init_fn(PRNGKey(seed), encoder) -> ClassifierState, state shardings, tx): the one recipe
  behind create_state and abstract_state. Nothing runs eagerly, so the mesh may hold
  compile-only devices."""
  def variables(rng):
    dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    return model.init(rng, dummy, train=False)

  boxed = jax.eval_shape(lambda: variables(jax.random.PRNGKey(0)))
  tx = make_tx(jax.eval_shape(lambda: nn.unbox(variables(jax.random.PRNGKey(0)))["params"]))

  def init_fn(rng, encoder):
    param_rng, state_rng = jax.random.split(rng)
    init = nn.unbox(variables(param_rng))
    params = init["params"]
    if encoder is not None:
      params = classifier_lib.load_encoder(params, encoder)
    return ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=init.get("batch_stats", {}),
                           opt_state=tx.init(params), rng=state_rng,
                           ema_params=params if config.ema.decay else None)

  try:
    abstract = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0), encoder))
  except ValueError as e:  # load_encoder: missing / unexpected keys, shape mismatches
    raise UserError(f"config.init.workdir: the pre-trained encoder does not fit this model: "
                    f"{' '.join(str(e).split())}") from None
  params_sharding = sharding.param_shardings(boxed["params"], mesh, rules)
  return init_fn, trainer.state_shardings(abstract, params_sharding, mesh), tx


def create_state(config, model, make_tx, mesh, rules, encoder):
  """(state, state shardings, tx): a ClassifierState born sharded, with `encoder` (pre-trained
  params, or None for random init) loaded in. make_tx(abstract params) -> optax transform."""
  init_fn, state_sharding, tx = _state_init(config, model, make_tx, mesh, rules, encoder)
  state = trainer.born_sharded(init_fn, state_sharding, jax.random.PRNGKey(config.seed), encoder)
  return state, state_sharding, tx


def abstract_state(config, model, make_tx, mesh, rules):
  """create_state for a random init, without running it: ShapeDtypeStructs with the same
  shardings (the pre-trained encoder, when there is one, has the same shapes)."""
  init_fn, state_sharding, tx = _state_init(config, model, make_tx, mesh, rules, None)
  abstract = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0), None))
  return trainer.abstract_with_shardings(abstract, state_sharding), state_sharding, tx


def jit_train_step(model, tx, recipe, schedule, mesh, state_sharding):
  """The donated, sharded, jitted probing / fine-tuning step that `train` runs."""
  batch_sharding = sharding.batch_sharding(mesh)
  return trainer.jit_step(
      functools.partial(classify_step.train_step, model=model, tx=tx, recipe=recipe,
                        schedule=schedule),
      state_sharding, {"image": batch_sharding, "label": batch_sharding}, mesh)


def evaluate(eval_fn, params, batch_stats, config, image_size: int, mesh) -> dict:
  """Exact top-1 / top-5 / loss over the eval split (every process sees the same numbers)."""
  n = config.eval.num_examples or None
  totals = None
  for batch in pipeline.eval_batches(config.data, config.data.eval_split,
                                     global_batch=config.eval.batch_size, image_size=image_size,
                                     sharding=sharding.batch_sharding(mesh), num_examples=n):
    sums = eval_fn(params, batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals["count"], 1.0)
  return {"top1": totals["correct_top1"] / count, "top5": totals["correct_top5"] / count,
          "loss": totals["loss_sum"] / count, "count": totals["count"]}


def train(config, workdir: str, checked: Checked | None = None) -> dict:
  """Probe or fine-tune per `config` in `workdir`, resuming from its latest checkpoint.

  `checked`: check_config's result when the caller already ran it. Returns a summary dict:
  steps, the final eval top-1 / top-5 (and EMA's, when kept).
  """
  trainer.setup_jax(config)
  mesh, config, num_train, num_classes = checked or check_config(config)
  model_cfg = config.model
  rules = sharding.rules_from_config(config)
  model = classifier_lib.from_config(config, num_classes)
  recipe = classify_step.recipe_from_config(config, num_classes)
  total_steps, warmup_steps = optim.schedule_steps(config.optim, num_train, config.batch_size,
                                                   config.train.total_steps)
  peak = optim.peak_lr(config.optim, config.batch_size)
  schedule = optim.lr_schedule(peak, total_steps, warmup_steps)
  eval_every = config.train.eval_every or optim.steps_per_epoch(num_train, config.batch_size)
  logging.info("%s: %s (%s) at %d px, %d classes, %d train examples, %d steps (%d warmup), "
               "peak lr %.3g, layer decay %g, drop path %g", config.mode, model_cfg.variant,
               config.head.pool, model_cfg.image_size, num_classes, num_train, total_steps,
               warmup_steps, peak, config.optim.layer_decay, model_cfg.drop_path)

  lr_warning = probe_reach.probe_lr_warning(config, schedule, total_steps, peak)
  if lr_warning:
    logging.warning("%s", lr_warning)

  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    max_to_keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:  # before anything compiles, and before a finished run's summary
    workdir_records.check_resume_config(workdir, config, latest, fixed_on_resume(workdir))
  make_tx = functools.partial(make_optimizer, config, schedule, depth=model.spec.depth)
  if latest is not None and latest >= total_steps:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      ckpt.check(abstract_state(config, model, make_tx, mesh, rules)[0], latest,
                 vit.CHECKPOINT_RELAYOUTS)  # a finished run of another model is an error
    ckpt.close()
    return trainer.finished_summary(workdir, latest, EVAL_KEYS)
  trainer.log_outputs(workdir, ckpt.directory, pictures=False)
  workdir_records.write_records(workdir, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    resume = latest is not None
    encoder = (None if resume else
               init_run.read_pretrained_encoder(config, mesh, model_cfg.scan_layers))
    state, state_sharding, tx = create_state(config, model, make_tx, mesh, rules, encoder)
    del encoder
    if resume:
      state = ckpt.restore(trainer.abstract_with_shardings(state, state_sharding),
                           relayouts=vit.CHECKPOINT_RELAYOUTS, fallback=True)
      logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    start_step = int(state.step)
    workdir_records.drop_metrics_after(workdir, start_step)  # rows of steps never saved
    writer = metrics_lib.MetricWriter(workdir, start_step=start_step)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jit_train_step(model, tx, recipe, schedule, mesh, state_sharding)
    eval_fn = jax.jit(functools.partial(classify_step.eval_step, model=model),
                      out_shardings=sharding.replicated(mesh))
    run_eval = functools.partial(evaluate, eval_fn, config=config,
                                 image_size=model_cfg.image_size, mesh=mesh)

    def eval_all(state, step):
      results = {f"eval_{k}": v for k, v in run_eval(state.params, state.batch_stats).items()
                 if k != "count"}
      if state.ema_params is not None:
        ema = run_eval(state.ema_params, state.batch_stats)
        results.update(eval_ema_top1=ema["top1"], eval_ema_top5=ema["top5"])
      writer.write_scalars(step, results)
      return results

    batches = pipeline.labeled_train_batches(
        config.data, seed=config.seed, global_batch=config.batch_size,
        image_size=model_cfg.image_size, start_step=start_step, sharding=batch_sharding,
        augment=config.data.augment)

    def after_step(step, state, batch, metrics, last):
      if step % eval_every == 0 or last:
        return dict(eval_all(state, step), eval_step=step)
      return None

    try:
      state, summary = trainer.run(
          state, step_fn, batches, start_step=start_step, total_steps=total_steps,
          log_every=config.train.log_every, peak_lr=peak, ckpt=ckpt,
          checkpoint_every=config.train.checkpoint_every, writer=writer, after_step=after_step)
      summary.update(start_step=start_step, total_steps=total_steps)
    finally:
      ckpt.close()
      writer.close()
  logging.info("%s", result_line(config, summary))
  return summary


def result_line(config, summary) -> str:
  """What the run's evaluation says, naming the step it was made at (never a stale number
  presented as the result of a stopped run)."""
  if "eval_step" not in summary:
    return (f"{config.mode}: stopped at step {summary['step']} of {summary['total_steps']} "
            "with no evaluation since it started; rerun the same command to resume")
  line = (f"{config.mode}: top-1 {100 * summary['eval_top1']:.2f}%, top-5 "
          f"{100 * summary['eval_top5']:.2f}% on {config.data.eval_split} at step "
          f"{summary['eval_step']} of {summary['total_steps']}")
  if summary["eval_step"] != summary["step"]:
    line += (f" (the last evaluation: the run stopped at step {summary['step']}; rerun the "
             "same command to resume and finish)")
  return line


