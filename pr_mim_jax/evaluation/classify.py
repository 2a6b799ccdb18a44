"""Linear probing and fine-tuning from a pre-training workdir, top to bottom.

Setup resolves the architecture from the pre-training run's config.json, reads only the
encoder weights of its checkpoint, and builds a sharded ClassifierState in one jitted
init (position embeddings interpolated when the resolution changes). Then the loop:
train, evaluate exactly over the whole eval split (padded, masked batches), checkpoint;
a rerun with the same workdir resumes from its own latest checkpoint.
"""

import functools
import json
import logging
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from pr_mim_jax.data import pipeline, pixels
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify_step
from pr_mim_jax.models import classifier as classifier_lib
from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import knn
from pr_mim_jax.training import metrics as metrics_lib
from pr_mim_jax.training import optim
from pr_mim_jax.training import trainer
from pr_mim_jax.training import workdir_records
from pr_mim_jax.training.train_state import ClassifierState

ARCH_FIELDS = ("variant", "width", "depth", "heads", "posemb", "image_size")
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


def pretrained_config(init_workdir: str):
  """The config.json a pre-training run left in its workdir (a ConfigDict)."""
  path = epath.Path(init_workdir) / "config.json"
  if epath.Path(init_workdir).is_file():  # e.g. an official MAE .pth or a timm .safetensors
    raise UserError(f"config.init.workdir: {init_workdir} is a file, not a workdir; convert "
                    "PyTorch / timm weights to one first: python -m pr_mim_jax.interop.convert "
                    f"--from={init_workdir} --to=DIR, then init=DIR")
  if not path.exists():
    raise UserError(f"config.init.workdir: {init_workdir} has no config.json; point it at a "
                    "pre-training workdir (python -m pr_mim_jax.main --config=pretrain ... "
                    "--workdir=DIR); probing and fine-tuning also take init= (empty) with "
                    "--config.model.variant=... for random init")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise UserError(f"config.init.workdir: {path} is not valid JSON ({e})") from None
  if config.get("mode") == "knn":  # a k-NN workdir: a config.json, but no checkpoint
    raise UserError(f"config.init.workdir: {init_workdir} is a k-NN evaluation's workdir, "
                    "which holds no checkpoint; point it at the run it evaluated (its "
                    f"config.init.workdir: {config.init.workdir!r})")
  try:
    vit.parse_variant(config.model.variant)
  except (AttributeError, KeyError, TypeError, ValueError):
    raise UserError(f"config.init.workdir: {path} names no model (config.model.variant); "
                    "point it at a pre-training, probing or fine-tuning workdir") from None
  return config


def resolve_model(config) -> ml_collections.ConfigDict:
  """config.model with the architecture fields left empty ('' / 0) taken from the init run.

  A field set in both with different values is an error, except image_size: a different
  resolution is allowed and the position embeddings are interpolated. width, depth and heads
  compare as built: the init run's 0 means its variant's value.
  """
  model = ml_collections.ConfigDict(config.model.to_dict())
  if config.init.workdir:
    pre = pretrained_config(config.init.workdir).model
    spec = vit.parse_variant(pre.variant)
    for field in ARCH_FIELDS:
      built = pre[field] or getattr(spec, field, pre[field])
      if not model[field]:
        model[field] = pre[field]
      elif field != "image_size" and model[field] != built:
        raise UserError(f"config.model.{field}: {model[field]!r} differs from the pre-trained "
                        f"model's {built!r} ({config.init.workdir}/config.json); leave it "
                        "empty to use the pre-trained value")
    model.pretrained_image_size = pre.image_size
  else:
    model.posemb = model.posemb or "sincos"
    for field in ("variant", "image_size"):
      if not model[field]:
        raise UserError(f"config.model.{field}: needed when config.init.workdir is empty "
                        "(random init); set it, or set init=WORKDIR of a pre-training run")
    model.pretrained_image_size = model.image_size
  return model


# MAE's fine-tuning recipe per model size (its FINETUNE.md), for the RECIPE_FIELDS in order.
MAE_FINETUNE_RECIPES = {"B": (100.0, 5e-4, 0.65, 0.1), "L": (50.0, 1e-3, 0.75, 0.2),
                        "H": (50.0, 1e-3, 0.75, 0.3)}
RECIPE_FIELDS = (("optim", "epochs"), ("optim", "base_lr"), ("optim", "layer_decay"),
                 ("model", "drop_path"))


def resolve_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` with what it leaves empty filled in: config.model from the init run
  (resolve_model) and the RECIPE_FIELDS left None from MAE's recipe for that model's size.
  The recipe follows the model actually loaded, so a pre-trained ViT-L gets L's recipe."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model = resolve_model(config)
  empty = [(group, field) for group, field in RECIPE_FIELDS if resolved[group][field] is None]
  if not empty:
    return resolved
  size = resolved.model.variant.split("/")[0]
  if size not in MAE_FINETUNE_RECIPES:
    names = ", ".join(f"config.{group}.{field}" for group, field in empty)
    raise UserError(f"{names}: MAE's fine-tuning recipes cover ViT-B, L and H, and this model "
                    f"is {resolved.model.variant}; set them, e.g. from the ViT-B recipe: "
                    "--config.optim.epochs=100 --config.optim.base_lr=5e-4 "
                    "--config.optim.layer_decay=0.65 --config.model.drop_path=0.1")
  for (group, field), value in zip(RECIPE_FIELDS, MAE_FINETUNE_RECIPES[size]):
    if resolved[group][field] is None:
      resolved[group][field] = value
  return resolved


class Checked(NamedTuple):
  """What check_config found, for the run to use: no second validation, no second mesh."""
  mesh: Mesh
  config: ml_collections.ConfigDict  # the config resolved against its init run
  num_train: int
  num_classes: int


def checked_config(config, num_batch_shards: int) -> ml_collections.ConfigDict:
  """Every config check that needs no dataset; the resolved config (resolve_config)."""
  config_validation.validate_mesh(config)
  config_validation.validate_init_step(config)
  resolved = resolve_config(config)
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


MAE_PROBE_PEAK_LR = 6.4  # MAE's probe: base lr 0.1 x batch 16384 / 256


def lars_reach(schedule, total_steps: int, momentum: float,
               trust: float = optim.LARS_TRUST) -> float:
  """R = trust * sum_t lr_t * (1 - momentum^(t+1)) / (1 - momentum): LARS moves a weight
  matrix by lr_t * trust * |w| per unit of momentum buffer, whatever the gradient's size, so
  over the run the head moves about (e^R - 1) x its initial norm at most."""
  steps = np.arange(total_steps)
  lrs = np.asarray(jax.device_get(schedule(steps)), np.float64)  # [T]
  return float(trust * np.sum(lrs * (1.0 - momentum ** (steps + 1.0)) / (1.0 - momentum)))


def probe_lr_warning(config, schedule, total_steps: int, peak: float) -> str:
  """'' unless the LARS probe's head can move less than its own initial norm over the run
  (e^R - 1 < 1, lars_reach): it then stays near its random init, and the accuracy measures
  that init rather than the features. MAE's linear-scaling rule shrinks its peak lr 6.4 to
  0.1 x batch / 256 at a small batch, which does this on small datasets."""
  if config.optim.optimizer != "lars":
    return ""
  reach = lars_reach(schedule, total_steps, config.optim.get("momentum", 0.9))
  if reach >= math.log(2.0):  # e^R - 1 >= 1 (and no overflow for a long run's large R)
    return ""
  keep_base = MAE_PROBE_PEAK_LR * 256 / config.batch_size  # base lr giving MAE's peak
  advice = ["set more config.train.total_steps" if config.train.total_steps else
            "raise config.optim.epochs"]
  if config.optim.base_lr < keep_base:
    advice.insert(0, f"raise config.optim.base_lr (--config.optim.base_lr={keep_base:g} gives "
                     f"MAE's peak lr {MAE_PROBE_PEAK_LR:g} at batch {config.batch_size})")
  return (f"the LARS probe can move its head by at most {100 * math.expm1(reach):.3g}% of "
          f"its initial norm in {total_steps} steps at peak lr {peak:.3g}; it stays near its "
          f"random init, so its accuracy says little about the features: {' or '.join(advice)}")


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


def read_pretrained_encoder(config, mesh, scan_layers: bool):
  """Encoder params of the init run's checkpoint (replicated), or None for random init.

  Laid out for an encoder with `scan_layers` (stacked 'blocks') or without, whichever layout
  the checkpoint was saved in."""
  if not config.init.workdir:
    logging.warning("config.init.workdir is empty: the encoder starts from random init")
    return None
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(config.init.workdir),
                                    max_to_keep=1 << 30)
  try:
    encoder, step = ckpt.restore_subtree(("params", "encoder"), sharding.replicated(mesh),
                                         None if config.init.step < 0 else config.init.step)
  finally:
    ckpt.close()
  logging.info("encoder from %s, step %d", ckpt.directory, step)
  return vit.scan_params(encoder) if scan_layers else vit.unscan_params(encoder)


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

  lr_warning = probe_lr_warning(config, schedule, total_steps, peak)
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
  trainer.log_outputs(workdir, ckpt.directory)
  workdir_records.write_records(workdir, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    resume = latest is not None
    encoder = None if resume else read_pretrained_encoder(config, mesh, model_cfg.scan_layers)
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


def _features(encoder, params, data, split, n, config, mesh):
  """Pooled features [N, D] and labels [N] of the first n examples of a split, streamed."""
  def embed(p, x):
    tokens = encoder.apply({"params": p}, pixels.model_input(x))  # [B, 1+L, D]
    return knn.pool_features(tokens, config.knn.feature).astype(jnp.float32)

  embed = jax.jit(embed, out_shardings=sharding.replicated(mesh))
  logging.info("k-NN: embedding %s images of %s", f"up to {n}" if n else "all", split)
  feats, labels = [], []
  for batch in pipeline.eval_batches(data, split, global_batch=config.knn.batch_size,
                                     image_size=encoder.image_size,
                                     sharding=sharding.batch_sharding(mesh), num_examples=n):
    keep = np.asarray(sharding.to_host(batch["mask"])) > 0
    feats.append(np.asarray(embed(params, batch["image"]))[keep])
    labels.append(np.asarray(sharding.to_host(batch["label"]))[keep])
  labels = np.concatenate(labels)
  logging.info("k-NN: embedded %d images of %s", len(labels), split)
  return np.concatenate(feats), labels


def knn_eval(config, workdir: str, checked: ml_collections.ConfigDict | None = None) -> dict:
  """k-NN top-1 of a pre-training checkpoint's encoder (pr_mim_jax/configs/knn.py).

  `checked`: check_knn_config's result (the resolved model) when the caller already ran it."""
  check_knn_workdir(workdir)
  trainer.setup_jax(config)
  model_cfg = checked or check_knn_config(config)
  mesh = sharding.make_mesh()
  spec = vit.parse_variant(model_cfg.variant)
  spec = vit.VitSpec(model_cfg.width or spec.width, model_cfg.depth or spec.depth,
                     model_cfg.heads or spec.heads, spec.patch)
  encoder = vit.Encoder(spec, model_cfg.image_size, model_cfg.posemb,
                        dtype=jnp.dtype(model_cfg.compute_dtype))
  with jax.set_mesh(mesh):
    params = posemb_lib.adapt_encoder_params(read_pretrained_encoder(config, mesh, False),
                                             model_cfg.image_size // spec.patch)
    train = _features(encoder, params, config.data, config.data.train_split,
                      config.knn.train_examples, config, mesh)
    test = _features(encoder, params, config.data, config.data.eval_split,
                     config.knn.test_examples, config, mesh)
  k = min(config.knn.k, len(train[1]))  # what knn_accuracy votes with
  if k < config.knn.k:
    logging.warning("k-NN: the train split has only %d images, so k=%d (knn.k=%d)", k, k,
                    config.knn.k)
  top1 = knn.knn_accuracy(*train, *test, k=k, temperature=config.knn.temperature)
  workdir_records.write_records(workdir, _with_model(config, model_cfg))
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  writer.write_scalars(0, {"knn_top1": top1, "k": k, "train_examples": len(train[1]),
                           "test_examples": len(test[1])})
  writer.close()
  logging.info("k-NN top-1 (k=%d, %s features): %.2f%% on %d test images", k,
               config.knn.feature, 100 * top1, len(test[1]))
  return {"knn_top1": top1}


def check_knn_workdir(workdir: str) -> None:
  """A UserError when `workdir` holds another run (checkpoints, or a config.json of another
  mode): a k-NN evaluation writes its own config.json there, which would replace that run's
  record and leave its checkpoints unusable for resuming, probing or export. Rerunning
  k-NN in its own workdir is fine."""
  path = epath.Path(workdir)
  recorded = path / "config.json"
  mode = None
  if recorded.exists():
    try:
      mode = json.loads(recorded.read_text()).get("mode", "pretrain")
    except (ValueError, AttributeError, UnicodeDecodeError):
      mode = "unreadable"
  has_checkpoints = epath.Path(checkpointing.checkpoint_dir(workdir)).exists()
  if has_checkpoints or mode not in (None, "knn"):
    what = f"a {mode} run" if mode not in (None, "unreadable") else "another run"
    held = "checkpoints" if has_checkpoints else "config.json"
    raise UserError(f"--workdir: {workdir} holds {what} ({held}), whose config.json a k-NN "
                    f"evaluation would replace; evaluate it with init={workdir} and a new "
                    "--workdir")


def _with_model(config, model_cfg) -> ml_collections.ConfigDict:
  """`config` with config.model replaced by the resolved one, for config.json to record the
  architecture actually evaluated (not the '' / 0 left to the init run)."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.model = ml_collections.ConfigDict(model_cfg.to_dict())
  return resolved


def check_knn_config(config) -> ml_collections.ConfigDict:
  """Config and dataset checks of the k-NN evaluation, once per run; the resolved model."""
  config_validation.validate_knn_eval(config)
  model = resolve_model(config)
  config_validation.validate_encoder(model)
  pipeline.check_labeled_dataset(config.data)
  return model
