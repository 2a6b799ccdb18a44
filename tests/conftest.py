"""Shared fixtures: a tiny pre-training config on a tiny embedded dataset.

One persistent XLA compilation cache serves the whole test session: the pytest workers and
every subprocess a test starts inherit JAX_COMPILATION_CACHE_DIR, so the same tiny step
compiled by several tests and processes compiles once (it halved the CPU time of
test_pretrain.py). Likewise PR_MIM_JAX_TEST_SHARED holds what the workers make once and
share (eval_setup's tiny pre-training run). Both are fresh per session and removed at its
end; a directory you set yourself is used as it is and kept (delete a kept
PR_MIM_JAX_TEST_SHARED after changing pre-training: its run would be reused).

XLA compiles for the tests at LLVM optimisation level 0 (TEST_XLA_FLAGS, inherited the same
way): the tests' tiny steps spend far more time compiling than running, and level 0 took
about 45% off the CPU time of the 8-device sharding test. It changes machine code, not what
a program computes. An XLA_FLAGS of your own that sets the level is kept as it is.
"""

import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# Both folders are made by the session's first process; the workers inherit them.
SHARED = "PR_MIM_JAX_TEST_SHARED"
for _name, _prefix in (("JAX_COMPILATION_CACHE_DIR", "pr_mim_jax_test_xla_"),  # before jax loads
                       (SHARED, "pr_mim_jax_test_shared_")):
  if _name not in os.environ:
    os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the session's first process owns it
      atexit.register(shutil.rmtree, os.environ[_name], True)
# Every compile goes in that cache, not only those over JAX's default of a second: the tiny
# steps compile in well under one, and each subprocess and worker compiled them again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from pr_mim_jax.configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Overrides that make pr_mim_jax/configs/pretrain.py:dataset=shapes train in seconds on a CPU.
TINY_OVERRIDES = {
    "batch_size": 16,
    "model.image_size": 16,
    "model.variant": "Ti/4",
    "model.width": 32,
    "model.depth": 2,
    "model.heads": 2,
    "model.decoder_width": 32,
    "model.decoder_depth": 1,
    "model.decoder_heads": 2,
    "data.shapes.image_size": 16,
    "data.shapes.train_size": 256,
    "data.shapes.test_size": 64,
    "optim.base_lr": 1e-2,
    "optim.epochs": 2.0,
    "optim.warmup_epochs": 0.25,
    "train.log_every": 4,
    "train.checkpoint_every": 8,
    "train.image_every": 16,
    "train.num_images": 4,
    "knn.k": 5,
    "knn.train_examples": 128,
    "knn.test_examples": 32,
    "knn.batch_size": 64,
}


def fake_devices_env(devices: int, **extra) -> dict:
  """Environment for a subprocess whose JAX sees `devices` CPU devices (the count must be set
  before JAX initialises, hence a fresh process), keeping the session's XLA flags."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  ).strip(), **extra)


def run_with_fake_devices(code: str, devices: int = 8, timeout: int = 600):
  """Runs `python -c code` with `devices` fake CPU devices; returns the finished process."""
  env = fake_devices_env(devices)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def load_config(arg: str = "dataset=shapes"):
  return pretrain_config.get_config(arg)


def apply_overrides(config, overrides: dict):
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def override_flags(overrides: dict) -> list[str]:
  """The same overrides as --config.x=y command-line flags."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def without_tensorflow(folder) -> dict:
  """Environment for a subprocess, and the processes it starts, in which TensorFlow, tfds and
  clu cannot be imported: like the GPU machines the benchmark and the study must run on.
  `folder` (made if missing) gets the sitecustomize.py that blocks them."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "sitecustomize.py").write_text(
      "import sys\nfor name in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
      "  sys.modules[name] = None  # import fails\n")
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


def tensorboard_steps(workdir, tag):
  """Sorted steps of `tag` in workdir/tensorboard, or None where clu/TensorFlow are absent."""
  if not os.path.isdir(os.path.join(workdir, "tensorboard")):
    return None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps = []
  for path in tf.io.gfile.glob(os.path.join(workdir, "tensorboard", "*tfevents*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return sorted(steps)


@pytest.fixture
def tiny_config(tmp_path):
  """The tiny config with its own tfds data_dir under tmp_path."""
  config = apply_overrides(load_config(), TINY_OVERRIDES)
  config.data.data_dir = str(tmp_path / "tfds")
  return config
