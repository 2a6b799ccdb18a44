"""What the evaluation tests share: tiny data, configs, and a tiny pre-training run."""

import fcntl
import os
import pathlib
import shutil

import pytest

from conftest import SHARED, TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.training import pretrain

# The embedded dataset's 'easy' variant at 32 px: a tiny encoder trains in seconds, and its
# classes are linearly separable. (On the default 'hard' variant a briefly pre-trained encoder
# is at chance; see docs/evaluation.md.)
SIZE = 32
DATA = {"data.shapes.image_size": SIZE, "data.shapes.train_size": 512,
        "data.shapes.test_size": 100, "data.shapes.difficulty": "easy", "data.backend": "numpy",
        "data.crop_min_scale": 1.0}  # whole-image crops: the shapes are centred at a fixed size
PRETRAIN = dict(TINY_OVERRIDES, **DATA, **{
    "model.image_size": SIZE, "model.variant": "Ti/4", "batch_size": 32, "optim.epochs": 2.0,
    "train.checkpoint_every": 1000, "train.image_every": 1000, "knn.enabled": False})


def eval_config(mode, init, **overrides):
  c = classify_config.get_config(mode, f"init={init},dataset=shapes")
  return apply_overrides(c, {
      **DATA, "batch_size": 32,
      "eval.batch_size": 24,  # 100 test images: the last batch is padded
      "optim.epochs": 2.0, "optim.warmup_epochs": 0.5, "train.log_every": 4,
      "train.checkpoint_every": 1000, **overrides})


@pytest.fixture(scope="session")
def pretrained():
  """A pre-training workdir: the tiny encoder trained for 32 steps on 32 px shapes. Made
  once per test session: the first pytest worker to ask trains it under a lock and the
  others wait for it. Tests only read it."""
  shared = pathlib.Path(os.environ[SHARED])
  workdir, done = shared / "pretrain", shared / "pretrain.done"
  with open(shared / "pretrain.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # what a failed try left
      config = apply_overrides(load_config("method=pr_mim,dataset=shapes"), PRETRAIN)
      pretrain.train(config, str(workdir))
      done.touch()
  return str(workdir)


def pretrain_config_json(tmp_path, variant):
  """A workdir holding only the config.json of an ImageNet pre-training run of `variant`."""
  (tmp_path / "config.json").write_text(load_config(f"variant={variant}").to_json())
  return str(tmp_path)


def tiny_probe(tmp_path, init="", **overrides):
  return eval_config("linear_probe", init, **{
      "model.variant": "Ti/4", "model.image_size": SIZE, "model.width": 32, "model.depth": 1,
      "model.heads": 2, "data.data_dir": str(tmp_path / "tfds"), **overrides})


def small_batch_probe(tmp_path):
  """Base lr 0.1 at batch 32 (peak 0.0125) for 36 steps: LARS (trust 0.001) moves the head
  about 0.17% of its norm, so the probe would report its random init."""
  return tiny_probe(tmp_path, **{"train.total_steps": 36, "optim.base_lr": 0.1,
                                 "optim.epochs": 4.0, "optim.warmup_epochs": 1.0})
