"""The pre-training loop, top to bottom: setup, resume, train, monitor, checkpoint."""

import functools
import logging
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from pr_mim_jax.data import pipeline, pixels
from pr_mim_jax.errors import UserError
from pr_mim_jax.errors import naming
from pr_mim_jax.method import masking
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import knn
from pr_mim_jax.training import metrics as metrics_lib
from pr_mim_jax.training import optim
from pr_mim_jax.training import profiler
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training import trainer
from pr_mim_jax.training import visualize
from pr_mim_jax.training import workdir_records
from pr_mim_jax.training.train_state import TrainState


# What the finished steps trained on (their examples, masks and loss): a resume may not
# change these (workdir_records.check_resume_config).
FIXED_ON_RESUME = ("seed", "batch_size", "method", "masking", "reconstruction", "loss",
                   "data.dataset", "data.train_split", "data.shapes", "data.crop_min_scale",
                   "model.image_size")


def _dummy_inputs(model, split: masking.TokenSplit):
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  ids = jnp.arange(split.num_patches, dtype=jnp.int32)[None]
  a, b = split.n_vis, split.n_vis + split.n_dec
  return images, ids[:, :a], ids[:, a:b], ids[:, b:]


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_params(model, split, rng):
  """Unboxed float32 params (a pure function of rng). Jitted: run eagerly (a tool, a test),
  each of init's few hundred ops would compile on its own."""
  return nn.unbox(model.init(rng, *_dummy_inputs(model, split))["params"])


def _state_init(model, tx, split, mesh, rules):
  """(init_fn(PRNGKey(seed)) -> TrainState, the state's shardings): the one recipe behind
  create_state and abstract_state, so a compile-only run lays the state out exactly as
  training does. Nothing runs eagerly, so the mesh may hold compile-only devices."""
  def init_fn(rng):
    param_rng, state_rng = jax.random.split(rng)
    params = init_params(model, split, param_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  boxed = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(model, split))["params"])
  abstract = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0)))
  return init_fn, trainer.state_shardings(
      abstract, sharding.param_shardings(boxed, mesh, rules), mesh)


def create_state(model, tx, split, seed: int, mesh, rules):
  """(TrainState born sharded, its shardings)."""
  init_fn, state_sharding = _state_init(model, tx, split, mesh, rules)
  return trainer.born_sharded(init_fn, state_sharding, jax.random.PRNGKey(seed)), state_sharding


def abstract_state(model, tx, split, mesh, rules):
  """create_state without running init: ShapeDtypeStructs carrying the same shardings."""
  init_fn, state_sharding = _state_init(model, tx, split, mesh, rules)
  abstract = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0)))
  return trainer.abstract_with_shardings(abstract, state_sharding), state_sharding


def jit_train_step(model, tx, task, schedule, mesh, state_sharding):
  """The donated, sharded, jitted train step that every loop (and the benchmark) runs."""
  return trainer.jit_step(
      functools.partial(train_step_lib.train_step, model=model, tx=tx, task=task,
                        schedule=schedule),
      state_sharding, {"image": sharding.batch_sharding(mesh)}, mesh)


class KnnMonitor:
  """k-NN accuracy of encoder features on fixed labeled subsets (loaded once, lazily)."""

  def __init__(self, config, model):
    self.cfg, self.data_cfg, self.model = config.knn, config.data, model
    self._arrays = None

  def _load(self):
    if self._arrays is None:
      size = self.model.image_size
      self._arrays = (
          pipeline.labeled_arrays(self.data_cfg, self.data_cfg.train_split,
                                  num_examples=self.cfg.train_examples, image_size=size),
          pipeline.labeled_arrays(self.data_cfg, self.data_cfg.eval_split,
                                  num_examples=self.cfg.test_examples, image_size=size))
    return self._arrays

  @property
  def k(self) -> int:
    """The k the vote uses: knn.k, or every train image where the split has fewer."""
    return min(self.cfg.k, len(self._load()[0][1]))

  def accuracy(self, params, encoder: str = "trained") -> float:
    (x_tr, y_tr), (x_te, y_te) = self._load()
    logging.info("k-NN of the %s encoder: embedding %d train and %d test images", encoder,
                 len(y_tr), len(y_te))
    feats = functools.partial(knn.extract_features, self.model, params,
                              feature=self.cfg.feature, batch_size=self.cfg.batch_size)
    return knn.knn_accuracy(feats(x_tr), y_tr, feats(x_te), y_te, k=self.cfg.k,
                            temperature=self.cfg.temperature)


@functools.partial(jax.jit, static_argnames=("model", "task"))
def _reconstruct(params, images, state_rng, step, *, model, task):
  """(predictions, masks) of `images` [N, H, W, 3] under the masks of 0-based step `step`.

  One compile per run: `step` is traced. Drawn eagerly, the masks cost op-by-op compiles
  (6.6 s for a process's first 8 demo pictures on the 2-core CPU dev machine, 2026-12-07).
  """
  masks = train_step_lib.step_masks(state_rng, step, images.shape[0], task)
  _, (preds, _) = train_step_lib.loss_fn(params, model, images, masks, task)
  return preds, masks


def write_reconstructions(workdir, writer, model, params, images, state_rng, step, task):
  """PNG (workdir/images/) and TensorBoard grid of original | token map | reconstruction.

  `images` is the batch of step `step` (1-based count of finished steps), shown with the
  masks it was trained with; thrown tokens are drawn distinctly (visualize.py).
  """
  preds, masks = _reconstruct(params, images, state_rng, step - 1, model=model, task=task)
  images, preds, masks = sharding.to_host((images, preds, masks))
  picture = visualize.reconstruction_grid(images, preds.dec, masks.ids_vis, masks.ids_dec,
                                          task.patch, task.target, pixels.denormalize,
                                          ids_throw=masks.ids_throw, pred_throw=preds.throw)
  if jax.process_index() == 0:
    out = epath.Path(workdir) / "images"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"reconstruction_{step:07d}.png"
    with naming(path):
      path.write_bytes(visualize.encode_png(picture))
    writer.write_images(step, {"reconstruction": picture})
    logging.info("wrote %s", path)


class Checked(NamedTuple):
  """What check_config found, for the run to use: no second validation, no second mesh."""
  mesh: Mesh
  num_train: int


def check_config(config) -> Checked:
  """Every config and dataset check, once per run."""
  config_validation.validate_mesh(config)  # before the device count is used
  mesh = sharding.mesh_from_config(config)
  config_validation.validate_pretrain(config, sharding.num_batch_shards(mesh))
  pipeline.check_dataset(config.data, eval_split=config.knn.enabled)  # only k-NN reads it
  if config.knn.enabled and config.data.dataset.startswith("folder:"):
    raise UserError(f"config.knn.enabled: {config.data.dataset} has no labels for the k-NN "
                    "monitor; add --config.knn.enabled=False")
  if config.knn.enabled:
    try:
      pipeline.num_classes(config.data)  # the monitor needs labels: fail now, not after training
    except UserError as e:
      raise UserError(f"config.knn.enabled: {e}, or turn the k-NN monitor off with "
                      "--config.knn.enabled=False") from e
  num_train = pipeline.num_examples(config.data, config.data.train_split)
  if config.batch_size > num_train:
    raise UserError(f"config.batch_size: {config.batch_size} exceeds the {num_train} training "
                    f"examples of {config.data.dataset!r}; use a smaller batch")
  return Checked(mesh, num_train)


def train(config, workdir: str, checked: Checked | None = None) -> dict:
  """Pre-train per `config` in `workdir`, resuming from its latest checkpoint.

  `checked`: check_config's result when the caller already ran it. Returns a summary dict
  (final step, last logged loss, k-NN accuracies when computed).
  """
  trainer.setup_jax(config)
  mesh, num_train = checked or check_config(config)
  rules = sharding.rules_from_config(config)
  logging.info("mesh %s, sharding rules %s", dict(mesh.shape), rules)

  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  split = task.split
  total_steps, warmup_steps = optim.schedule_steps(config.optim, num_train, config.batch_size,
                                                   config.train.total_steps)
  peak = optim.peak_lr(config.optim, config.batch_size)
  schedule = optim.lr_schedule(peak, total_steps, warmup_steps)
  tx = optim.make_optimizer(config.optim, schedule)
  logging.info("%s: model %s (%s), %d train examples, %d steps (%d warmup), peak lr %.3g, "
               "tokens %s, throw %s", config.method, config.model.variant,
               config.model.compute_dtype, num_train, total_steps, warmup_steps, peak, split,
               task.throw_strategy)

  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    max_to_keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:  # before anything compiles, and before a finished run's summary
    workdir_records.check_resume_config(workdir, config, latest, FIXED_ON_RESUME)
  if latest is not None and latest >= total_steps:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      ckpt.check(abstract_state(model, tx, split, mesh, rules)[0], latest,
                 vit.CHECKPOINT_RELAYOUTS)  # a finished run of another model is an error
    knn_keys = ("knn_top1", "knn_top1_random_init")
    done = trainer.finished_summary(workdir, latest, ("loss",) + knn_keys,
                                    needed=knn_keys if config.knn.enabled else ())
    if done is not None:
      ckpt.close()
      return done
  trainer.log_outputs(workdir, ckpt.directory, pictures=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_sharding = create_state(model, tx, split, config.seed, mesh, rules)
    if latest is not None:
      state = ckpt.restore(trainer.abstract_with_shardings(state, state_sharding),
                           relayouts=vit.CHECKPOINT_RELAYOUTS, fallback=True)
      logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    start_step = int(state.step)
    # After the restore: a config that does not fit the checkpoint leaves config.json as it was.
    workdir_records.write_records(workdir, config)
    workdir_records.drop_metrics_after(workdir, start_step)  # rows of steps never saved
    writer = metrics_lib.MetricWriter(workdir, start_step=start_step)
    batches = pipeline.train_batches(config.data, seed=config.seed, global_batch=config.batch_size,
                                     image_size=config.model.image_size, start_step=start_step,
                                     sharding=sharding.batch_sharding(mesh))
    knn_monitor = KnnMonitor(config, model) if config.knn.enabled else None
    trace = profiler.StepWindow(str(epath.Path(workdir) / "profile"),
                                config.train.get("profile_start_step", 0),
                                config.train.get("profile_steps", 0))
    trace.after_step(start_step)  # a window that starts here (step 0, or a resume)

    def after_step(step, state, batch, metrics, last):
      trace.after_step(step, metrics)
      if step % config.train.image_every == 0 or last:
        write_reconstructions(workdir, writer, model, state.params,
                              batch["image"][:config.train.num_images], state.rng, step, task)
      if knn_monitor and config.knn.every and step % config.knn.every == 0 and not last:
        writer.write_scalars(step, {"knn_top1": knn_monitor.accuracy(state.params)})

    try:
      state, summary = trainer.run(
          state, jit_train_step(model, tx, task, schedule, mesh, state_sharding), batches,
          start_step=start_step, total_steps=total_steps, log_every=config.train.log_every,
          peak_lr=peak, ckpt=ckpt, checkpoint_every=config.train.checkpoint_every,
          writer=writer, after_step=after_step)
      summary.update(start_step=start_step, total_steps=total_steps)
      if knn_monitor and summary["step"] == total_steps and not summary["stopped"]:
        summary.update(final_knn(config, model, split, knn_monitor, state.params, writer,
                                 total_steps))
    finally:
      trace.close()
      ckpt.close()
      writer.close()
  return summary


def final_knn(config, model, split, monitor, params, writer, step: int) -> dict:
  """k-NN of the trained encoder next to the same architecture at random init, written."""
  trained = monitor.accuracy(params)
  # Jitted: eager sharding constraints reject init's batch of 1 on a multi-device mesh.
  init_fn = jax.jit(functools.partial(init_params, model, split))
  random_init = monitor.accuracy(
      init_fn(jax.random.split(jax.random.PRNGKey(config.seed))[0]), "random-init")
  writer.write_scalars(step, {"knn_top1": trained, "knn_top1_random_init": random_init})
  logging.info("k-NN top-1 (k=%d): trained %.2f%% vs random init %.2f%%", monitor.k,
               100 * trained, 100 * random_init)
  return {"knn_top1": trained, "knn_top1_random_init": random_init}
