"""k-NN evaluation of a pre-training checkpoint's encoder (the `knn` mode of main).

Embeds a labelled dataset's train and test splits with the init run's encoder, streamed and
exact (padding left out), and scores the test split by weighted k-NN votes (training/knn.py).
Its records (config.json, metrics.jsonl) go to a workdir of its own, never another run's.
"""

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pr_mim_jax.data import pipeline, pixels
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import init_run
from pr_mim_jax.models import posemb as posemb_lib
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import knn
from pr_mim_jax.training import metrics as metrics_lib
from pr_mim_jax.training import trainer
from pr_mim_jax.training import workdir_records


def split_features(encoder, params, data, split, n, config, mesh):
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
    params = posemb_lib.adapt_encoder_params(
        init_run.read_pretrained_encoder(config, mesh, False), model_cfg.image_size // spec.patch)
    train = split_features(encoder, params, config.data, config.data.train_split,
                           config.knn.train_examples, config, mesh)
    test = split_features(encoder, params, config.data, config.data.eval_split,
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
  model = init_run.resolve_model(config)
  config_validation.validate_encoder(model)
  pipeline.check_labeled_dataset(config.data)
  return model
