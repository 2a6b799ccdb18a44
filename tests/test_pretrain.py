"""End-to-end pre-training: loss falls, checkpoints, resume after SIGTERM, fault handling."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_OVERRIDES, override_flags
from pr_mim_jax.errors import UserError
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import optim
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training import trainer


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_params(config, workdir, step=None):
  """(step, params as numpy) of a checkpoint in workdir (default: the newest)."""
  model = train_step_lib.model_from_config(config)
  split = train_step_lib.task_from_config(config).split
  tx = optim.make_optimizer(config.optim, optim.lr_schedule(1e-3, 10, 1))
  mesh = sharding.make_mesh()
  state, state_sharding = pretrain.create_state(model, tx, split, config.seed, mesh,
                                                sharding.DATA_PARALLEL_RULES)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  try:
    restored = ckpt.restore(trainer.abstract_with_shardings(state, state_sharding), step)
  finally:
    ckpt.close()
  return int(restored.step), jax.tree.map(np.asarray, restored.params)


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_everything(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  tiny_config.train.total_steps = 24
  tiny_config.train.profile_start_step, tiny_config.train.profile_steps = 4, 2
  summary = pretrain.train(tiny_config, workdir)
  assert summary["step"] == 24
  traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces  # one trace of steps 5..6
  losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
  assert len(losses) == 6  # log_every=4
  assert losses[-1] < losses[0]
  assert checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir)).latest_step() == 24
  assert sorted(os.listdir(os.path.join(workdir, "images"))) == [
      "reconstruction_0000016.png", "reconstruction_0000024.png"]
  for name in ("config.json", "provenance.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 16
  final = [m for m in read_metrics(workdir) if "knn_top1_random_init" in m]
  assert [(m["step"], m["knn_top1"], m["knn_top1_random_init"]) for m in final] == [
      (24, summary["knn_top1"], summary["knn_top1_random_init"])]
  for acc in (summary["knn_top1"], summary["knn_top1_random_init"]):  # counts of 32 test images
    assert acc * 32 == pytest.approx(round(acc * 32), abs=1e-6)

  # Run again on the finished workdir: it reports the recorded results and writes nothing.
  written = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
             for d, _, files in os.walk(workdir) for f in files}
  again = pretrain.train(tiny_config, workdir)
  assert again["finished_before"] and again["step"] == 24
  assert again["knn_top1"] == summary["knn_top1"] and again["loss"] == summary["loss"]
  assert {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(workdir) for f in files} == written


def _cli(workdir, data_dir, total_steps, extra=()):
  cmd = [sys.executable, "-m", "pr_mim_jax.main", "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         f"--config.train.total_steps={total_steps}", "--config.knn.enabled=False",
         *override_flags(TINY_OVERRIDES), *extra]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return cmd, env


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted_run(tiny_config, tmp_path):
  data_dir = str(tmp_path / "tfds")
  total = 150
  # Uninterrupted reference, in process.
  ref_dir = str(tmp_path / "reference")
  tiny_config.train.total_steps = total
  tiny_config.train.image_every = 1000  # pictures and saves only at the end (and at the stop):
  tiny_config.train.checkpoint_every = 1000  # they cost time and do not change the state
  tiny_config.knn.enabled = False
  pretrain.train(tiny_config, ref_dir)

  # Interrupted run: SIGTERM once a few steps are logged, then resume to the end.
  run_dir = str(tmp_path / "interrupted")
  cmd, env = _cli(run_dir, data_dir, total, ["--config.train.log_every=1",
                                             "--config.train.image_every=1000",
                                             "--config.train.checkpoint_every=1000"])
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 120
  while not any(m.get("step", 0) >= 5 for m in read_metrics(run_dir)):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.monotonic() < deadline, "the run logged no steps in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  stopped_at, _ = final_params(tiny_config, run_dir)
  assert 5 <= stopped_at < total, f"SIGTERM checkpoint at step {stopped_at}"
  assert "rerun the same command to resume" in out

  resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr

  step_a, params_a = final_params(tiny_config, ref_dir)
  step_b, params_b = final_params(tiny_config, run_dir)
  assert step_a == step_b == total
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.mark.slow
def test_resume_with_grad_accum_across_an_epoch_keeps_the_run_and_its_metrics(tiny_config,
                                                                               tmp_path):
  """A run that lost its last two checkpoints (killed after logging, before saving) resumes
  from step 8 with 2 micro-batches per step, across the epoch boundary at step 16 (256
  examples, batch 16): the same final state as the uninterrupted run, each step logged
  once, and a changed batch size refused before anything is touched."""
  tiny_config.train.total_steps = 24
  tiny_config.train.grad_accum_steps = 2
  tiny_config.train.log_every = 8
  tiny_config.train.image_every = 1000
  tiny_config.knn.enabled = False
  reference = str(tmp_path / "reference")
  pretrain.train(tiny_config, reference)
  workdir = str(tmp_path / "killed")
  shutil.copytree(reference, workdir)
  for step in ("16", "24"):  # saved after the rows of steps 16 and 24 were logged
    shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(workdir), step))
  summary = pretrain.train(tiny_config, workdir)
  assert summary["start_step"] == 8 and summary["step"] == 24
  step_a, params_a = final_params(tiny_config, reference)
  step_b, params_b = final_params(tiny_config, workdir)
  assert step_a == step_b == 24
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert [m["step"] for m in read_metrics(workdir)] == [8, 16, 24]

  files = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
           for d, _, names in os.walk(workdir) for f in names}
  tiny_config.train.total_steps = 32  # extend, but with another batch size
  tiny_config.batch_size = 32
  with pytest.raises(UserError, match=r"^config\.batch_size: 16 in .*--config\.batch_size=16"):
    pretrain.train(tiny_config, workdir)
  assert {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
          for d, _, names in os.walk(workdir) for f in names} == files


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(tiny_config, tmp_path):
  workdir = str(tmp_path / "nan")
  tiny_config.train.total_steps = 16
  tiny_config.optim.base_lr = 1e12  # diverges within a few steps
  tiny_config.optim.warmup_epochs = 0.0
  tiny_config.train.checkpoint_every = 1
  tiny_config.train.log_every = 1
  with pytest.raises(trainer.NonFiniteLossError, match="NOT saved"):
    pretrain.train(tiny_config, workdir)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  for step in ckpt.all_steps():  # every saved state is finite
    _, params = final_params(tiny_config, workdir, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_incompatible_checkpoint_is_named_and_left_alone(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  tiny_config.train.total_steps = 8
  tiny_config.knn.enabled = False
  pretrain.train(tiny_config, workdir)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(ckpt_dir) for p in fs}
  tiny_config.model.width = 64  # a different model in the same workdir
  with pytest.raises(UserError, match="checkpoints/8"):
    pretrain.train(tiny_config, workdir)
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(ckpt_dir) for p in fs}
  assert before == after
  tiny_config.model.width = TINY_OVERRIDES["model.width"]
  tiny_config.seed = 1  # a finished run is compared too, not summarised as if it had this seed
  with pytest.raises(UserError, match=r"^config\.seed: 0 in .*, 1 now"):
    pretrain.train(tiny_config, workdir)


@pytest.mark.slow
def test_trains_without_tensorflow(tmp_path):
  """GPU machines often lack TensorFlow: the NumPy source and JSONL metrics take over."""
  workdir = tmp_path / "run"
  script = f"""
import sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax.training import pretrain
config = apply_overrides(load_config(), TINY_OVERRIDES)
config.train.total_steps = 8
summary = pretrain.train(config, {str(workdir)!r})
assert 'tensorflow' not in sys.modules or sys.modules['tensorflow'] is None
print('KNN', summary['knn_top1'])
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "KNN" in proc.stdout
  assert [m["step"] for m in read_metrics(workdir) if "loss" in m] == [4, 8]
  assert not (workdir / "tensorboard").exists()
  assert (workdir / "images" / "reconstruction_0000008.png").exists()


def test_unlabeled_folder_needs_knn_off(tiny_config, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(20):
    Image.fromarray(np.full((20, 20, 3), i * 10, np.uint8)).save(folder / f"{i}.png")
  tiny_config.data.dataset = f"folder:{folder}"
  with pytest.raises(UserError, match="knn.enabled"):
    pretrain.check_config(tiny_config)
  tiny_config.knn.enabled = False
  assert pretrain.check_config(tiny_config).num_train == 20


def test_unlabeled_tfds_needs_knn_off_before_training(tiny_config, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.core.registered.skip_registration():
    class PrMimNoLabels(tfds.core.GeneratorBasedBuilder):
      """16 train + 4 test images, no 'label' feature."""
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(None, None, 3))}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(16), "test": self._generate_examples(4)}

      def _generate_examples(self, n):
        for i in range(n):
          yield i, {"image": np.full((20, 20, 3), i * 10, np.uint8)}
  data_dir = str(tmp_path / "tfds")
  PrMimNoLabels(data_dir=data_dir, file_format="array_record").download_and_prepare()
  tiny_config.data.dataset = "pr_mim_no_labels"
  with pytest.raises(UserError, match="no 'label'.*turn the k-NN monitor off with "
                                      "--config.knn.enabled=False"):
    pretrain.check_config(tiny_config)
  tiny_config.knn.enabled = False
  assert pretrain.check_config(tiny_config).num_train == 16
