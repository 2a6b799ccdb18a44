"""End-to-end pre-training: loss falls, checkpoints, resume after SIGTERM, fault handling."""

import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, TINY_OVERRIDES, override_flags, tensorboard_steps
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


def test_a_folder_laid_out_with_classes_still_needs_knn_off(tiny_config, tmp_path):
  """Pre-training reads a folder as unlabeled even when it has train/ and validation/ class
  folders: the k-NN monitor is refused with the flag that turns it off, not run on them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ("train", "validation"):
    for label in ("cat", "dog"):
      (tmp_path / split / label).mkdir(parents=True)
      for i in range(8):
        Image.new("RGB", (20, 20), (i * 10, 0, 0)).save(tmp_path / split / label / f"{i}.png")
  tiny_config.data.dataset = f"folder:{tmp_path}"
  with pytest.raises(UserError, match=r"^config.knn.enabled: .* has no labels for the k-NN "
                                      r"monitor; add --config.knn.enabled=False"):
    pretrain.check_config(tiny_config)
  tiny_config.knn.enabled = False
  assert pretrain.check_config(tiny_config).num_train == 16


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
  # Only the k-NN monitor reads the eval split: with it off, a split the dataset lacks (the
  # ImageNet default 'validation' on a train-only dataset) is no reason to refuse the run.
  tiny_config.data.eval_split = "validation"
  assert pretrain.check_config(tiny_config).num_train == 16


# ------------------------------------------------- the loop's decisions, fast (no training)

def test_a_batch_of_the_whole_training_set_is_allowed_and_one_more_is_not(tiny_config):
  tiny_config.batch_size = 256  # data.shapes.train_size: one step per epoch
  assert pretrain.check_config(tiny_config).num_train == 256
  tiny_config.batch_size = 264
  with pytest.raises(UserError, match=r"^config.batch_size: 264 exceeds the 256 training"):
    pretrain.check_config(tiny_config)


def _no_input(monkeypatch):
  """The fake runs read no batch: start no input pipeline (its threads would outlive the test)."""
  monkeypatch.setattr(pretrain.pipeline, "train_batches", lambda *args, **kwargs: iter(()))


def _fake_run(calls, stopped_at_start=()):
  """trainer.run without training: after_step at every step, the last step saved; `stopped`
  as a stop request at the last step leaves it for the runs starting at `stopped_at_start`."""
  def run(state, step_fn, batches, *, start_step, total_steps, ckpt, after_step, **kwargs):
    calls.append(start_step)
    batch = {"image": np.zeros((16, 16, 16, 3), np.float32)}
    for step in range(start_step + 1, total_steps + 1):
      after_step(step, state, batch, {}, step == total_steps)
    if start_step < total_steps:
      ckpt.save(total_steps, state.replace(step=np.int32(total_steps)))
    return state, {"step": total_steps, "stopped": start_step in stopped_at_start, "loss": 1.0}
  return run


def _record_final_knn(steps):
  def final_knn(config, model, split, monitor, params, writer, step):
    steps.append(step)
    result = {"knn_top1": 0.5, "knn_top1_random_init": 0.125}
    writer.write_scalars(step, result)
    return result
  return final_knn


def test_pictures_and_knn_come_on_their_cadence_and_the_final_knn_once(tiny_config, tmp_path,
                                                                       monkeypatch):
  """Pictures every image_every steps and at the last; the k-NN monitor every knn.every steps
  but not at the last, where the final k-NN (trained vs random init) takes its place."""
  pictures, knn, final, calls = [], [], [], []
  monkeypatch.setattr(pretrain, "write_reconstructions",
                      lambda workdir, writer, model, params, images, rng, step, task:
                      pictures.append((step, images.shape[0])))
  monkeypatch.setattr(pretrain.KnnMonitor, "accuracy",
                      lambda self, params, encoder="trained": knn.append(encoder) or 0.25)
  monkeypatch.setattr(pretrain, "final_knn", _record_final_knn(final))
  monkeypatch.setattr(pretrain.trainer, "run", _fake_run(calls))
  _no_input(monkeypatch)
  tiny_config.train.total_steps, tiny_config.train.image_every = 12, 5
  tiny_config.knn.every = 4
  summary = pretrain.train(tiny_config, str(tmp_path / "run"))
  assert pictures == [(5, 4), (10, 4), (12, 4)]  # train.num_images = 4
  rows = read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in rows if "knn_top1" in r] == [4, 8, 12]
  assert [r["step"] for r in rows if "knn_top1_random_init" in r] == [12] and final == [12]
  assert summary["knn_top1"] == 0.5 and calls == [0]


def test_a_stop_at_the_last_step_leaves_the_final_knn_to_the_rerun(tiny_config, tmp_path,
                                                                   monkeypatch):
  """A stop request may give no time for the final k-NN: the stopped run skips it, and the
  rerun, finding the last checkpoint but no final k-NN, computes it (and only it); a third
  run finds everything and reports the record."""
  final, calls = [], []
  monkeypatch.setattr(pretrain, "write_reconstructions", lambda *args: None)
  monkeypatch.setattr(pretrain, "final_knn", _record_final_knn(final))
  monkeypatch.setattr(pretrain.trainer, "run", _fake_run(calls, stopped_at_start=(0,)))
  _no_input(monkeypatch)
  tiny_config.train.total_steps = 8
  workdir = str(tmp_path / "run")
  assert pretrain.train(tiny_config, workdir)["stopped"] and final == []
  resumed = pretrain.train(tiny_config, workdir)
  assert calls == [0, 8] and final == [8] and resumed["knn_top1"] == 0.5
  again = pretrain.train(tiny_config, workdir)
  assert again["finished_before"] and again["knn_top1"] == 0.5
  assert calls == [0, 8] and final == [8]


def test_the_pictures_show_the_masks_their_step_trained_with(tiny_config, tmp_path, monkeypatch):
  """Step 5 (1-based) runs from a state whose step counter is 4, and train_step draws its masks
  from that counter: the picture of step 5 must show those masks, not step 6's."""
  shown = []
  monkeypatch.setattr(pretrain.visualize, "reconstruction_grid",
                      lambda images, pred, ids_vis, ids_dec, *args, **kwargs:
                      shown.append((np.asarray(ids_vis), np.asarray(ids_dec)))
                      or np.zeros((4, 4, 3), np.uint8))

  class Writer:
    def write_images(self, step, images):
      pass

  # The predictions do not matter here: the masks do.
  monkeypatch.setattr(pretrain.train_step_lib, "loss_fn", lambda params, model, x, m, task: (
      jnp.zeros(()), (collections.namedtuple("Preds", "dec throw")(jnp.zeros((1,)), None), None)))
  task = train_step_lib.task_from_config(tiny_config)
  rng = jax.random.key_data(jax.random.key(7))
  images = np.zeros((4, 16, 16, 3), np.float32)
  pretrain.write_reconstructions(str(tmp_path), Writer(), None, {}, images, rng, 5, task)
  trained = train_step_lib.step_masks(rng, 4, 4, task)  # what train_step draws at state.step 4
  np.testing.assert_array_equal(shown[0][0], np.asarray(trained.ids_vis))
  np.testing.assert_array_equal(shown[0][1], np.asarray(trained.ids_dec))
  assert (tmp_path / "images" / "reconstruction_0000005.png").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_picture_on_a_full_disk_names_its_file(tiny_config, tmp_path, monkeypatch):
  """The PNG's write fails (a link to /dev/full, which refuses every write): the disk's
  error carries the picture's path, for the one error line cli.run prints."""
  monkeypatch.setattr(pretrain, "_reconstruct", lambda *args, **kwargs: (None, None))
  monkeypatch.setattr(pretrain.sharding, "to_host", lambda tree: (
      None, collections.namedtuple("Preds", "dec throw")(None, None),
      collections.namedtuple("Masks", "ids_vis ids_dec ids_throw")(None, None, None)))
  monkeypatch.setattr(pretrain.visualize, "reconstruction_grid",
                      lambda *args, **kwargs: np.zeros((4, 4, 3), np.uint8))
  png = tmp_path / "images" / "reconstruction_0000005.png"
  png.parent.mkdir()
  png.symlink_to("/dev/full")
  task = train_step_lib.task_from_config(tiny_config)
  with pytest.raises(OSError) as e:
    pretrain.write_reconstructions(str(tmp_path), None, None, {}, None, None, 5, task)
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(png))


def test_a_fallback_past_a_damaged_checkpoint_drops_the_metrics_logged_after_its_step(
    tiny_config, tmp_path, monkeypatch):
  """Saved at 4 and 8, step 8 damaged: the resume falls back to 4, and the rows and
  TensorBoard events of steps 5-8 (states it no longer has) go, or the curve would hold two
  copies of those steps."""
  calls = []

  def run(state, step_fn, batches, *, start_step, total_steps, ckpt, writer, **kwargs):
    calls.append(start_step)
    if start_step == 0:
      for step in (4, 8):
        writer.write_scalars(step, {"loss": 1.0 / step})
        ckpt.save(step, state.replace(step=np.int32(step)))
    return state, {"step": 8, "stopped": True, "loss": 1.0}

  monkeypatch.setattr(pretrain.trainer, "run", run)
  _no_input(monkeypatch)
  tiny_config.train.total_steps, tiny_config.knn.enabled = 12, False
  workdir = tmp_path / "run"
  pretrain.train(tiny_config, str(workdir))
  assert [r["step"] for r in read_metrics(str(workdir))] == [4, 8]
  assert tensorboard_steps(str(workdir), "loss") in (None, [4, 8])
  ckpts = workdir / "checkpoints"
  shutil.rmtree(ckpts / "8" / "state")  # valid files of other values: fails its checksums
  shutil.copytree(ckpts / "4" / "state", ckpts / "8" / "state")
  resumed = pretrain.train(tiny_config, str(workdir))
  assert calls == [0, 4] and resumed["start_step"] == 4
  assert [r["step"] for r in read_metrics(str(workdir))] == [4]
  assert tensorboard_steps(str(workdir), "loss") in (None, [4])


def test_the_knn_monitor_votes_with_every_train_image_when_the_split_has_fewer_than_k(
    tiny_config, monkeypatch):
  sizes = {tiny_config.data.train_split: 3, tiny_config.data.eval_split: 2}
  monkeypatch.setattr(pretrain.pipeline, "labeled_arrays",
                      lambda data, split, num_examples, image_size: (
                          np.zeros((sizes[split], 8, 8, 3), np.uint8),
                          np.zeros(sizes[split], np.int32)))
  tiny_config.knn.k = 5
  monitor = pretrain.KnnMonitor(tiny_config, model=types.SimpleNamespace(image_size=8))
  assert monitor.k == 3
  tiny_config.knn.k = 2
  assert pretrain.KnnMonitor(tiny_config, model=types.SimpleNamespace(image_size=8)).k == 2
