"""Linear probing and fine-tuning from a pre-training workdir, end to end on tiny data."""

import functools
import json
import math
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import (ROOT, TINY_OVERRIDES, apply_overrides, load_config, run_with_fake_devices,
                      tensorboard_steps)
from pr_mim_jax import cli
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.configs import knn as knn_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify
from pr_mim_jax.evaluation import classify_step
from pr_mim_jax.models import classifier
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import optim
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training import trainer
from pr_mim_jax.training import workdir_records
from pr_mim_jax.training.train_state import ClassifierState

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


def load_knn_config(arg):
  return knn_config.get_config(arg)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pre-training workdir: the tiny encoder trained for 64 steps on 32 px shapes."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  config = apply_overrides(load_config("method=pr_mim,dataset=shapes"), PRETRAIN)
  pretrain.train(config, workdir)
  return workdir


def encoder_checkpoint(workdir):
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  try:
    params, _ = ckpt.restore_subtree(("params", "encoder"), sharding.replicated(sharding.make_mesh()))
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, params)


def fresh_state(config, pretrained_encoder: bool):
  """(model, state) as classify.train builds them, with or without the init run's encoder."""
  _, config, _, num_classes = classify.check_config(config)
  model = classifier.from_config(config, num_classes)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    encoder = classify.read_pretrained_encoder(config, mesh, False) if pretrained_encoder else None
    state, _, _ = classify.create_state(
        config, model, lambda p: classify.make_optimizer(config, lambda s: 1e-3, p, 2), mesh,
        sharding.DATA_PARALLEL_RULES, encoder)
  return model, state


@pytest.mark.slow
def test_finetune_starts_from_every_pretrained_encoder_weight(pretrained):
  _, state = fresh_state(eval_config("finetune", pretrained), pretrained_encoder=True)
  saved = encoder_checkpoint(pretrained)
  loaded = jax.tree.map(np.asarray, state.params["encoder"])
  assert jax.tree.structure(saved) == jax.tree.structure(loaded)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_linear_probe_beats_chance_and_keeps_the_encoder(pretrained, tmp_path):
  # MAE's peak lr (0.1 x 16384 / 256 = 6.4) at batch 32.
  config = eval_config("linear_probe", pretrained, **{"optim.epochs": 5.0, "optim.base_lr": 51.2})
  summary = classify.train(config, str(tmp_path / "probe"))
  assert summary["eval_top1"] > 3 * (1 / 12), summary  # 12 classes: chance is 8.3%
  assert summary["eval_top5"] >= summary["eval_top1"]
  # The frozen encoder is exactly the pre-trained one at the end.
  final = encoder_checkpoint(str(tmp_path / "probe"))
  for a, b in zip(jax.tree.leaves(encoder_checkpoint(pretrained)), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_evaluation_counts_every_example_once(pretrained):
  config = eval_config("linear_probe", pretrained)
  model, state = fresh_state(config, pretrained_encoder=False)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    eval_fn = jax.jit(lambda p, b, batch: classify_step.eval_step(p, b, batch, model=model))
    result = classify.evaluate(eval_fn, state.params, state.batch_stats, config, SIZE, mesh)
  assert result["count"] == 100
  # Reference: plain NumPy accuracy of the same model on all 100 test images at once.
  from pr_mim_jax.data import pipeline, pixels
  images, labels = pipeline.labeled_arrays(config.data, "test", num_examples=100, image_size=SIZE)
  logits = np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                  pixels.normalize(images), train=False))  # uint8 -> the model's input
  assert result["top1"] == pytest.approx(np.mean(logits.argmax(-1) == labels))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert result["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)))


@pytest.mark.slow
def test_finetune_cli_runs_resumes_and_reports(pretrained, tmp_path):
  workdir = str(tmp_path / "ft")
  args = [sys.executable, "-m", "pr_mim_jax.main", f"--config=pr_mim_jax/configs/finetune.py:init={pretrained},dataset=shapes",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in DATA.items()],
          "--config.batch_size=32", "--config.eval.batch_size=24", "--config.train.log_every=2",
          "--config.ema.decay=0.9", "--config.model.image_size=48"]  # 48 px: posembs resized
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(args + ["--config.train.total_steps=3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  second = subprocess.run(args + ["--config.train.total_steps=5"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "eval_top1" in r]
  assert [r["step"] for r in evals] == [3, 5]
  for r in evals:
    assert r["eval_top1"] <= r["eval_top5"] and "eval_ema_top1" in r
    for key in ("eval_top1", "eval_top5", "eval_ema_top1"):  # exact counts of 100 test images
      assert r[key] * 100 == pytest.approx(round(r[key] * 100), abs=1e-6), (key, r[key])


def test_bad_init_workdir_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pr_mim_jax.main",
       f"--config=pr_mim_jax/configs/linear_probe.py:init={tmp_path},dataset=shapes",
       f"--workdir={tmp_path / 'probe'}", "--config.data.backend=numpy"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: config.init.workdir:"), result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_architecture_conflict_names_the_field(pretrained):
  config = eval_config("finetune", pretrained, **{"model.variant": "Ti/8"})
  with pytest.raises(UserError, match=r"config.model.variant: 'Ti/8' differs"):
    classify.check_config(config)


def test_random_init_needs_a_variant():
  config = eval_config("linear_probe", "")
  with pytest.raises(UserError, match="config.model.variant"):
    classify.check_config(config)


@pytest.mark.slow
def test_knn_mode_matches_the_pretraining_monitor(pretrained, tmp_path):
  """pr_mim_jax/configs/knn.py streams features through a bare encoder; the monitor uses the MAE model
  on in-memory arrays. Both must give the same accuracy."""
  config = apply_overrides(load_knn_config(f"init={pretrained},dataset=shapes"), {
      **DATA, "knn.train_examples": 200, "knn.test_examples": 50, "knn.batch_size": 32, "knn.k": 5})
  got = classify.knn_eval(config, str(tmp_path / "knn"))["knn_top1"]
  pre = apply_overrides(load_config("method=pr_mim,dataset=shapes"), PRETRAIN)
  pre.knn.train_examples, pre.knn.test_examples, pre.knn.k = 200, 50, 5
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(pretrained))
  try:
    params, _ = ckpt.restore_subtree(("params",), sharding.replicated(sharding.make_mesh()))
  finally:
    ckpt.close()
  want = pretrain.KnnMonitor(pre, train_step_lib.model_from_config(pre)).accuracy(params)
  assert got == pytest.approx(want, abs=1 / 50 + 1e-9)  # at most one float-tie flip
  with open(tmp_path / "knn" / "metrics.jsonl") as f:
    assert json.loads(f.readline())["knn_top1"] == pytest.approx(got)
  # config.json records the architecture evaluated (PRETRAIN's), not the '' / 0 left empty.
  recorded = json.loads((tmp_path / "knn" / "config.json").read_text())["model"]
  assert (recorded["variant"], recorded["width"], recorded["depth"], recorded["image_size"]) == (
      "Ti/4", 32, 2, SIZE)


def test_knn_image_size_off_the_patch_grid_is_one_line(pretrained):
  # Checked once the model is resolved against the init run (Ti/4 here): was a traceback
  # after the data was read.
  config = apply_overrides(load_knn_config(f"init={pretrained},dataset=shapes"),
                           {**DATA, "model.image_size": 34})
  with pytest.raises(UserError, match="^config.model.image_size: 34 is not divisible"):
    classify.check_knn_config(config)


@pytest.mark.slow
def test_evaluation_is_exact_on_a_multi_device_mesh():
  """On 4 fake devices (the last batch padded to the device grid) the counts equal 1 device's."""
  code = """
import sys, jax
sys.path.insert(0, "tests")
from test_classify import eval_config, SIZE
from pr_mim_jax.evaluation import classify, classify_step
from pr_mim_jax.models import classifier
from pr_mim_jax.parallel import sharding
config = eval_config("linear_probe", "", **{"model.variant": "Ti/8", "model.image_size": SIZE,
                                            "model.width": 32, "model.depth": 1, "model.heads": 2})
_, config, _, num_classes = classify.check_config(config)
model = classifier.from_config(config, num_classes)
results = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = sharding.make_mesh(devices)
  with jax.set_mesh(mesh):
    state, _, _ = classify.create_state(config, model, lambda p: classify.make_optimizer(
        config, lambda s: 0.1, p, 1), mesh, sharding.DATA_PARALLEL_RULES, None)
    eval_fn = jax.jit(lambda p, b, batch: classify_step.eval_step(p, b, batch, model=model))
    results.append(classify.evaluate(eval_fn, state.params, state.batch_stats, config, SIZE, mesh))
one, four = results
assert four["count"] == one["count"] == 100, results
assert four["top1"] == one["top1"] and four["top5"] == one["top5"], results
assert abs(four["loss"] - one["loss"]) < 1e-5, results
print("OK")
"""
  result = run_with_fake_devices(code, devices=4)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def pretrain_config_json(tmp_path, variant):
  """A workdir holding only the config.json of an ImageNet pre-training run of `variant`."""
  (tmp_path / "config.json").write_text(load_config(f"variant={variant}").to_json())
  return str(tmp_path)


def recipe(config):
  return (config.optim.epochs, config.optim.base_lr, config.optim.layer_decay,
          config.model.drop_path)


# MAE's FINETUNE.md: ViT-B 100 epochs, blr 5e-4, layer decay 0.65, drop path 0.1; ViT-L and
# ViT-H 50 epochs, blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3.
MAE_RECIPES = [("B/16", (100.0, 5e-4, 0.65, 0.1)), ("L/16", (50.0, 1e-3, 0.75, 0.2)),
               ("H/14", (50.0, 1e-3, 0.75, 0.3))]


@pytest.mark.parametrize("variant,expected", MAE_RECIPES)
def test_finetune_defaults_are_maes(variant, expected):
  """Random init with variant= (the baseline) gets that size's recipe."""
  c = classify_config.get_config("finetune", f"variant={variant}")
  assert recipe(c) == (None,) * 4  # left to the model's size
  assert recipe(classify.resolve_config(c)) == expected
  assert (c.batch_size, c.optim.warmup_epochs, c.optim.weight_decay, c.optim.b2) == (1024, 5.0, 0.05, 0.999)
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing) == (0.8, 1.0, 0.1)
  assert (c.data.augment, c.data.random_erase, c.head.pool, c.head.kind) == (
      "randaugment", 0.25, "gap", "linear")


@pytest.mark.parametrize("variant,expected", MAE_RECIPES)
def test_finetune_recipe_follows_the_pretrained_model(tmp_path, variant, expected):
  """Without variant=, the recipe is the init run's size's, not ViT-B's; a field set on the
  command line stays as set."""
  c = classify_config.get_config("finetune", f"init={pretrain_config_json(tmp_path, variant)}")
  resolved = classify.resolve_config(c)
  assert (resolved.model.variant, recipe(resolved)) == (variant, expected)
  c.optim.base_lr = 2e-3
  assert recipe(classify.resolve_config(c)) == (expected[0], 2e-3, *expected[2:])


def test_finetune_without_a_recipe_asks_for_the_fields(tmp_path):
  """MAE published no fine-tuning recipe for ViT-S: ImageNet scale stops and names the fields
  still empty; set, they pass. The demo scale, whose settings are its own, does not stop."""
  c = classify_config.get_config("finetune", f"init={pretrain_config_json(tmp_path, 'S/16')}")
  c.optim.base_lr = 1e-3
  with pytest.raises(UserError, match=r"^config.optim.epochs, config.optim.layer_decay, "
                     r"config.model.drop_path: .* this model is S/16; set them"):
    classify.resolve_config(c)
  c.optim.epochs, c.optim.layer_decay, c.model.drop_path = 100.0, 0.75, 0.1
  assert recipe(classify.resolve_config(c)) == (100.0, 1e-3, 0.75, 0.1)
  demo = classify_config.get_config("finetune", "variant=S/16,dataset=shapes")
  demo.model.image_size = 64
  assert recipe(classify.resolve_config(demo)) == (5.0, 1e-3, 0.75, 0.1)


def test_architecture_set_to_the_pretrained_value_passes(tmp_path):
  """The ImageNet pre-training config stores width/depth/heads as 0 (from the variant): the
  value they stand for is the pre-trained one, and another value names it."""
  c = classify_config.get_config("linear_probe", f"init={pretrain_config_json(tmp_path, 'B/16')}")
  c.model.depth, c.model.width = 12, 768
  assert (classify.resolve_model(c).depth, classify.resolve_model(c).width) == (12, 768)
  c.model.depth = 6
  with pytest.raises(UserError, match=r"config.model.depth: 6 differs from the pre-trained "
                     r"model's 12 "):
    classify.resolve_model(c)


def test_init_without_config_json_names_a_command_that_resolves(tmp_path):
  """The error's suggested `--config=pretrain` must name a real config from any directory."""
  with pytest.raises(UserError, match="has no config.json") as error:
    classify.pretrained_config(str(tmp_path))
  suggested = str(error.value).split("--config=")[1].split()[0]
  assert os.path.isfile(cli.packaged_config(suggested)), suggested


@pytest.mark.parametrize("mode", ["finetune", "knn"])
def test_init_at_a_knn_workdir_is_one_line(tmp_path, mode):
  """A k-NN workdir has a config.json (with the model left empty) but no checkpoint: was a
  raw ValueError from parse_variant('')."""
  knn_dir = tmp_path / "knn"
  knn_dir.mkdir()
  (knn_dir / "config.json").write_text(load_knn_config("init=/runs/pre,dataset=shapes").to_json())
  config = (classify_config.get_config(mode, f"init={knn_dir},dataset=shapes")
            if mode == "finetune" else load_knn_config(f"init={knn_dir},dataset=shapes"))
  with pytest.raises(UserError, match=r"^config.init.workdir: .* k-NN evaluation's workdir, "
                     r"which holds no checkpoint; .*'/runs/pre'"):
    classify.resolve_model(config)


def test_init_config_json_without_a_model_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {"variant": ""}}))
  config = classify_config.get_config("linear_probe", f"init={tmp_path},dataset=shapes")
  with pytest.raises(UserError, match=r"^config.init.workdir: .* names no model"):
    classify.resolve_model(config)


def test_resume_refuses_another_init_unless_the_recorded_one_moved(tmp_path):
  """A resume reads no encoder: a changed init.workdir / init.step was only a warning, and a
  finished workdir returned the old encoder's numbers for the new one. A recorded init run
  that is gone (moved) may be named by its new path."""
  old, new = tmp_path / "old", tmp_path / "new"
  old.mkdir(), new.mkdir()
  pretrain_config_json(old, "Ti/16"), pretrain_config_json(new, "Ti/16")
  workdir = str(tmp_path / "probe")
  data = {"data.data_dir": str(tmp_path / "tfds"), "train.total_steps": 6}  # 6: finished
  workdir_records.write_records(
      workdir, classify.check_config(eval_config("linear_probe", str(old), **data)).config)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  ckpt.save(6, {"params": np.zeros(1)})  # a stand-in: the config check comes first
  ckpt.close()
  for init, overrides in ((new, {}), (old, {"init.step": 3})):
    with pytest.raises(UserError, match=r"^config.init.(workdir|step): "):
      classify.train(eval_config("linear_probe", str(init), **data, **overrides), workdir)
  shutil.rmtree(old)  # moved: only its new path names it now
  with pytest.raises(UserError) as error:  # past the config check, to the stand-in checkpoint
    classify.train(eval_config("linear_probe", str(new), **data), workdir)
  assert not str(error.value).startswith("config.init"), error.value


def test_linear_probe_defaults_are_maes():
  c = classify_config.get_config("linear_probe", "")
  assert (c.optim.optimizer, c.optim.base_lr, c.batch_size, c.optim.epochs,
          c.optim.warmup_epochs, c.optim.weight_decay) == ("lars", 0.1, 16384, 90.0, 10.0, 0.0)
  assert (c.head.pool, c.head.kind, c.head.freeze_encoder, c.data.augment) == (
      "cls", "batchnorm_linear", True, "crop_flip")


def test_result_line_names_the_step_of_its_numbers():
  config = eval_config("finetune", "")
  stopped = {"step": 443, "total_steps": 1000, "eval_step": 312, "eval_top1": 0.18,
             "eval_top5": 0.625}
  line = classify.result_line(config, stopped)
  assert "top-1 18.00%" in line and "at step 312 of 1000" in line
  assert "stopped at step 443" in line
  finished = dict(stopped, step=1000, eval_step=1000)
  assert "stopped" not in classify.result_line(config, finished)
  assert "no evaluation" in classify.result_line(config, {"step": 5, "total_steps": 1000})


class _StopAt:
  """A stop request that arrives at `step` (what SIGTERM does, without a signal)."""

  def __init__(self, step):
    self.step, self.requested, self.signal_name = step, False, "test stop"

  def should_stop(self, step):
    self.requested = self.requested or step >= self.step
    return self.requested

  def restore(self):
    pass


@pytest.mark.slow
def test_stopped_run_reports_its_last_evaluation_step_and_resumes_scanned(pretrained, tmp_path,
                                                                         monkeypatch):
  """Stopped at step 3 with the last evaluation at step 2: the summary says so. The resume
  runs with scan_layers=True, so the unscanned checkpoint is relaid on restore."""
  workdir = str(tmp_path / "ft")
  overrides = {"train.total_steps": 4, "train.eval_every": 2, "eval.num_examples": 24}
  monkeypatch.setattr(trainer.preemption, "StopRequest", lambda: _StopAt(3))
  summary = classify.train(eval_config("finetune", pretrained, **overrides), workdir)
  assert (summary["step"], summary["eval_step"], summary["stopped"]) == (3, 2, True)
  monkeypatch.undo()
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics, "a") as f:  # logged by a run killed after step 3's save
    f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
  recorded = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(UserError, match=r"^config.batch_size: 32 in .*, 16 now"):
    classify.train(eval_config("finetune", pretrained, **overrides, batch_size=16), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == recorded
  config = eval_config("finetune", pretrained, **overrides, **{"model.scan_layers": True})
  resumed = classify.train(config, workdir)
  assert (resumed["start_step"], resumed["step"], resumed["eval_step"]) == (3, 4, 4)
  rows = [json.loads(line) for line in open(metrics)]
  assert 99.0 not in [r.get("loss") for r in rows]  # the lost step's row went, step 4's is new
  assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
  again = classify.train(config, workdir)  # finished: nothing recomputed or appended
  assert again["finished_before"] and again["eval_top1"] == resumed["eval_top1"]
  assert [json.loads(line) for line in open(metrics)] == rows


@pytest.mark.slow
def test_knn_reads_a_scanned_checkpoint(pretrained, tmp_path):
  """The same weights saved with stacked blocks (scan_layers=True) give the same k-NN."""
  scanned = tmp_path / "scanned"
  scanned.mkdir()
  config = json.loads(open(os.path.join(pretrained, "config.json")).read())
  config["model"]["scan_layers"] = True
  (scanned / "config.json").write_text(json.dumps(config))
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(pretrained))
  try:
    params, step = ckpt.restore_subtree(("params",), sharding.replicated(sharding.make_mesh()))
  finally:
    ckpt.close()
  out = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(scanned)))
  try:
    out.save(step, {"params": vit.scan_params(params)})
  finally:
    out.close()
  knn = {"knn.train_examples": 100, "knn.test_examples": 50, "knn.batch_size": 32, "knn.k": 5}
  tops = [classify.knn_eval(apply_overrides(load_knn_config(f"init={init},dataset=shapes"),
                                            {**DATA, **knn}), str(tmp_path / name))["knn_top1"]
          for name, init in (("plain", pretrained), ("from_scanned", scanned))]
  assert tops[0] == tops[1]


# ------------------------------------------------------- the pure steps, against NumPy, fast

_MEAN, _STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


class _TinyClassifier(nn.Module):
  """Flatten, BatchNorm (momentum 0.5), Dense: small enough to write out in NumPy."""
  num_classes: int = 7

  @nn.compact
  def __call__(self, x, train):
    x = x.reshape(x.shape[0], -1)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5, epsilon=1e-5)(x)
    return nn.Dense(self.num_classes)(x)


def _tiny_variables(seed=0):
  rng = np.random.default_rng(seed)
  params = {"BatchNorm_0": {"scale": rng.uniform(0.5, 1.5, 12), "bias": rng.normal(size=12)},
            "Dense_0": {"kernel": rng.normal(size=(12, 7)), "bias": rng.normal(size=7)}}
  stats = {"BatchNorm_0": {"mean": rng.normal(size=12) * 0.3, "var": rng.uniform(0.5, 2, 12)}}
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  return f32(params), f32(stats)


def _np_forward(params, images, stats=None):
  """Logits [B, 7] of the tiny classifier on uint8 pixels: eval mode with `stats`, else train
  mode (batch statistics, biased variance); returns (logits, batch mean, batch var)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = ((np.asarray(images, np.float64) / 255 - _MEAN) / _STD).reshape(len(images), -1)
  if stats is None:
    mean, var = x.mean(0), x.var(0)
  else:
    mean, var = (np.asarray(stats["BatchNorm_0"][k], np.float64) for k in ("mean", "var"))
  bn = p["BatchNorm_0"]
  x = (x - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
  return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], mean, var


def test_eval_step_counts_only_real_examples_against_numpy():
  params, stats = _tiny_variables()
  images = np.random.default_rng(1).integers(0, 256, (8, 2, 2, 3)).astype(np.uint8)
  logits, _, _ = _np_forward(params, images, stats)
  order = np.argsort(-logits, axis=1)  # [B, 7], best first
  # Labels: top-1 for examples 0, 1, 6; 5th best (top-5, not top-1) for 2, 7; worst for 3, 4, 5.
  labels = np.array([order[0, 0], order[1, 0], order[2, 4], order[3, 6], order[4, 6],
                     order[5, 6], order[6, 0], order[7, 4]])
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0])  # the last three are padding
  out = jax.jit(functools.partial(classify_step.eval_step, model=_TinyClassifier()))(
      params, stats, {"image": images, "label": labels, "mask": mask})
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  nll = -log_p[np.arange(8), labels]
  assert int(out["correct_top1"]) == 2 and int(out["correct_top5"]) == 3
  assert int(out["count"]) == 5
  np.testing.assert_allclose(float(out["loss_sum"]), nll[:5].sum(), rtol=1e-4)


def test_train_step_is_sgd_on_smoothed_cross_entropy_with_bn_stats_and_ema():
  """One update with SGD(0.1), label smoothing 0.1, EMA 0.5, no mixing, against NumPy's
  forward and JAX's gradient of the loss written out here."""
  params, _ = _tiny_variables(2)
  images = np.random.default_rng(3).integers(0, 256, (6, 2, 2, 3)).astype(np.uint8)
  labels = np.array([0, 3, 6, 1, 3, 5])
  stats = {"BatchNorm_0": {"mean": jnp.zeros(12), "var": jnp.ones(12)}}
  tx = optax.sgd(0.1)
  recipe = classify_step.Recipe(num_classes=7, label_smoothing=0.1, ema_decay=0.5)
  state = ClassifierState(step=jnp.int32(3), params=params, batch_stats=stats,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                          ema_params=jax.tree.map(jnp.zeros_like, params))
  step = jax.jit(functools.partial(classify_step.train_step, model=_TinyClassifier(), tx=tx,
                                   recipe=recipe, schedule=lambda s: 0.01 * s))
  new, metrics = step(state, {"image": images, "label": labels})

  targets = np.full((6, 7), 0.1 / 7) + 0.9 * np.eye(7)[labels]
  def ref_loss(p):  # the same network in jnp, train mode, for the gradient
    x = ((jnp.asarray(images, jnp.float32) / 255 - _MEAN) / _STD).reshape(6, -1)
    x = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5) * p["BatchNorm_0"]["scale"] + p[
        "BatchNorm_0"]["bias"]
    logits = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    return -(targets * jax.nn.log_softmax(logits)).sum(-1).mean()
  grads = jax.grad(ref_loss)(params)
  logits, mean, var = _np_forward(params, images)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(float(metrics["loss"]), -(targets * log_p).sum(1).mean(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(sum(
      float((g ** 2).sum()) for g in jax.tree.leaves(grads))), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["lr"]), 0.03, rtol=1e-6)  # schedule(state.step)
  assert float(metrics["train_top1"]) == np.mean(logits.argmax(1) == labels)
  assert int(new.step) == 4
  want = jax.tree.map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), params, grads)
  for got, w, e in zip(jax.tree.leaves(new.params), jax.tree.leaves(want),
                       jax.tree.leaves(new.ema_params)):
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(e), 0.5 * w, rtol=1e-4, atol=1e-5)  # of the new params
  np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["mean"], 0.5 * mean, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["var"], 0.5 + 0.5 * var, rtol=1e-4)


def test_train_step_mixes_with_a_key_per_step():
  """Mixup draws from fold_in(rng, step): the same step repeats exactly, another step mixes
  differently (a key reused every step would mix every batch the same way)."""
  params, stats = _tiny_variables(4)
  images = np.random.default_rng(5).integers(0, 256, (6, 2, 2, 3)).astype(np.uint8)
  tx = optax.sgd(0.0)
  recipe = classify_step.Recipe(num_classes=7, mixup_alpha=0.8)
  step = jax.jit(functools.partial(classify_step.train_step, model=_TinyClassifier(), tx=tx,
                                   recipe=recipe, schedule=lambda s: 0.0))
  def loss_at(s):
    state = ClassifierState(step=jnp.int32(s), params=params, batch_stats=stats,
                            opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    return float(step(state, {"image": images, "label": np.arange(6)})[1]["loss"])
  losses = [loss_at(s) for s in (0, 1, 2, 0)]
  assert losses[0] == losses[3] and len(set(losses[:3])) == 3


def test_recipe_from_config_reads_every_field():
  config = classify_config.get_config("finetune", "init=/x,dataset=shapes")
  config.mixup.update(mixup_alpha=0.3, cutmix_alpha=0.7, prob=0.6, switch_prob=0.2)
  config.label_smoothing, config.ema.decay = 0.15, 0.99
  assert classify_step.recipe_from_config(config, 11) == classify_step.Recipe(
      num_classes=11, label_smoothing=0.15, mixup_alpha=0.3, cutmix_alpha=0.7, mix_prob=0.6,
      switch_prob=0.2, ema_decay=0.99)


# ------------------------------------------------- the driver's decisions, fast (no training)

@pytest.mark.parametrize("field,value", [
    ("head.kind", "batchnorm_linear"), ("head.pool", "cls"), ("mixup.cutmix_alpha", 0.5),
    ("mixup.prob", 0.5), ("label_smoothing", 0.2), ("data.augment", "crop_flip"),
    ("data.random_erase", 0.1), ("data.randaugment.magnitude", 5), ("data.crop_min_scale", 0.5),
    ("data.train_split", "test"), ("mode", "linear_probe"), ("seed", 3)])
def test_resume_refuses_a_change_to_what_the_finished_steps_trained_on(tmp_path, field, value):
  """The head, its examples, their augmentation and the targets shaped the saved steps: a
  resume that changed one would no longer continue them."""
  workdir = tmp_path / "ft"
  workdir.mkdir()
  (workdir / "config.json").write_text(eval_config("finetune", "").to_json())
  changed = apply_overrides(eval_config("finetune", ""), {field: value})
  with pytest.raises(UserError, match=rf"^config\.{field}: "):
    workdir_records.check_resume_config(str(workdir), changed, 8,
                                        classify.fixed_on_resume(str(workdir)))


def _encoder(value):
  return {"block0": {"w": np.full((2, 3), value, np.float32)},
          "block1": {"w": np.full((2, 3), value + 1, np.float32)},
          "norm": {"scale": np.full((3,), value, np.float32)}}


def test_the_encoder_is_read_from_init_step_in_the_model_s_layout(tmp_path):
  """init.step 0 is the step-0 checkpoint (a converted run), -1 the newest; scan_layers
  stacks the blocks."""
  init = tmp_path / "pre"
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(init)))
  for step in (0, 5):
    ckpt.save(step, {"params": {"encoder": _encoder(10.0 * step)}})
  ckpt.close()
  mesh = sharding.make_mesh()
  for step, want in ((0, 0.0), (-1, 50.0), (5, 50.0)):
    config = eval_config("finetune", str(init), **{"init.step": step})
    got = jax.tree.map(np.asarray, classify.read_pretrained_encoder(config, mesh, False))
    jax.tree.map(np.testing.assert_array_equal, got, _encoder(want))
  scanned = classify.read_pretrained_encoder(eval_config("finetune", str(init)), mesh, True)
  assert sorted(scanned) == ["blocks", "norm"]
  np.testing.assert_array_equal(np.asarray(scanned["blocks"]["w"]),
                                np.stack([np.full((2, 3), 50.0), np.full((2, 3), 51.0)]))


def test_evaluation_sums_every_batch_before_dividing(monkeypatch):
  """Two batches, 6 and 2 real examples: top-1 (3 + 1) / 8, top-5 (5 + 2) / 8, loss (6 + 4) / 8."""
  sums = [{"correct_top1": 3.0, "correct_top5": 5.0, "loss_sum": 6.0, "count": 6.0},
          {"correct_top1": 1.0, "correct_top5": 2.0, "loss_sum": 4.0, "count": 2.0}]
  monkeypatch.setattr(classify.pipeline, "eval_batches",
                      lambda *a, **k: iter([{"i": 0}, {"i": 1}]))
  eval_fn = lambda params, stats, batch: {k: jnp.float32(v) for k, v in sums[batch["i"]].items()}
  got = classify.evaluate(eval_fn, None, None, eval_config("finetune", ""), SIZE,
                          sharding.make_mesh())
  assert got == {"top1": 0.5, "top5": 0.875, "loss": 1.25, "count": 8.0}


def test_a_finer_resolution_than_the_init_run_s_is_allowed_and_remembered(tmp_path):
  """Fine-tuning at 448 px from a 224 px run: allowed (position embeddings are interpolated
  from the init run's 14 x 14 grid, so that grid must be recorded)."""
  c = classify_config.get_config("finetune", f"init={pretrain_config_json(tmp_path, 'B/16')}")
  c.model.image_size = 448
  model = classify.resolve_model(c)
  assert (model.image_size, model.pretrained_image_size) == (448, 224)


def _fake_run(calls, stop_at=None):
  """trainer.run without training: after_step at every step, the last one (or the step a
  stop request came at) saved."""
  def run(state, step_fn, batches, *, start_step, total_steps, ckpt, after_step, **kwargs):
    calls.append((start_step, total_steps))
    end = total_steps if stop_at is None else stop_at
    summary = {"step": end, "stopped": end < total_steps, "loss": 1.0}
    for step in range(start_step + 1, end + 1):
      summary.update(after_step(step, state, None, {}, step == total_steps) or {})
    ckpt.save(end, state.replace(step=jnp.asarray(end, jnp.int32)))
    return state, summary
  return run


def _no_input(monkeypatch):
  """The fake runs read no batch: start no input pipeline (its threads would outlive the test)."""
  monkeypatch.setattr(classify.pipeline, "labeled_train_batches", lambda *args, **kwargs: iter(()))


def _tiny_probe(tmp_path, init="", **overrides):
  return eval_config("linear_probe", init, **{
      "model.variant": "Ti/4", "model.image_size": SIZE, "model.width": 32, "model.depth": 1,
      "model.heads": 2, "data.data_dir": str(tmp_path / "tfds"), **overrides})


def test_lars_reach_is_the_step_by_step_sum():
  """Peak 0.5, 5 steps, 2 warmup: lrs 0, 0.25, then the half cosine 0.5, 0.375, 0.125; a unit
  trust-scaled update per step feeds a momentum buffer of norm 1, 1.9, 2.71, ..."""
  lrs = [0.0, 0.25] + [0.25 * (1 + np.cos(np.pi * k / 3)) for k in range(3)]
  buffer, want = 0.0, 0.0
  for lr in lrs:
    buffer = 0.9 * buffer + 1.0
    want += lr * 0.001 * buffer
  got = classify.lars_reach(optim.lr_schedule(0.5, 5, 2), 5, momentum=0.9)
  assert got == pytest.approx(want, rel=1e-6)


def _probe_schedule(config, num_train):
  total, warmup = optim.schedule_steps(config.optim, num_train, config.batch_size,
                                       config.train.total_steps)
  peak = optim.peak_lr(config.optim, config.batch_size)
  return optim.lr_schedule(peak, total, warmup), total, peak


def test_lars_reach_bounds_how_far_optim_lars_moves_a_matrix():
  """A constant gradient against the weights makes |w| grow, so the distance LARS moves them
  lies between R |w0| (|w| never below |w0|) and (e^R - 1) |w0| (lars_reach's bound)."""
  schedule = optim.lr_schedule(10.0, 30, 5)  # R about 1
  reach = classify.lars_reach(schedule, 30, momentum=0.9)
  w0 = {"kernel": jnp.full((4, 3), 0.1), "bias": jnp.zeros((3,))}
  tx = optim.lars(schedule, momentum=0.9)
  w, state = w0, tx.init(w0)
  for _ in range(30):
    updates, state = tx.update({"kernel": -jnp.ones((4, 3)), "bias": jnp.ones((3,))}, state, w)
    w = optax.apply_updates(w, updates)
  moved = float(jnp.linalg.norm(w["kernel"] - w0["kernel"]))
  start = float(jnp.linalg.norm(w0["kernel"]))
  assert 0.5 < reach < 2.0  # far enough from 0 that the two bounds differ
  assert reach * start * (1 - 1e-5) <= moved <= math.expm1(reach) * start * (1 + 1e-5)


def test_maes_probe_recipe_and_the_demo_probe_move_their_heads():
  imagenet = classify_config.get_config("linear_probe", "")
  demo = classify_config.get_config("linear_probe", "dataset=shapes")
  for config, num_train in ((imagenet, 1281167), (demo, demo.data.shapes.train_size)):
    assert classify.probe_lr_warning(config, *_probe_schedule(config, num_train)) == ""
  imagenet.optim.base_lr = 6.4  # a reach far past exp's float range: no OverflowError
  assert classify.probe_lr_warning(imagenet, *_probe_schedule(imagenet, 1281167)) == ""


def _small_batch_probe(tmp_path):
  """Base lr 0.1 at batch 32 (peak 0.0125) for 36 steps: LARS (trust 0.001) moves the head
  about 0.17% of its norm, so the probe would report its random init."""
  return _tiny_probe(tmp_path, **{"train.total_steps": 36, "optim.base_lr": 0.1,
                                  "optim.epochs": 4.0, "optim.warmup_epochs": 1.0})


def test_a_small_batch_probe_with_maes_base_lr_says_its_head_cannot_move(tmp_path):
  config = _small_batch_probe(tmp_path)
  text = classify.probe_lr_warning(config, *_probe_schedule(config, 512))
  assert "can move its head by at most 0.168% of its initial norm in 36 steps" in text
  assert text.endswith(": raise config.optim.base_lr (--config.optim.base_lr=51.2 gives MAE's "
                       "peak lr 6.4 at batch 32) or set more config.train.total_steps")
  config.optim.base_lr = 51.2  # peak 6.4: the head can move
  assert classify.probe_lr_warning(config, *_probe_schedule(config, 512)) == ""
  config.optim.base_lr, config.train.total_steps = 51.2, 1  # one step at MAE's peak
  assert classify.probe_lr_warning(config, *_probe_schedule(config, 512)).endswith(
      "features: set more config.train.total_steps")  # base_lr is no longer the cause


@pytest.mark.slow
def test_the_probe_run_logs_that_its_head_cannot_move(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(classify.trainer, "run", _fake_run([]))
  monkeypatch.setattr(classify, "evaluate", lambda *args, **kwargs: {
      "top1": 0.5, "top5": 1.0, "loss": 1.0, "count": 1.0})
  _no_input(monkeypatch)
  with caplog.at_level("WARNING"):
    classify.train(_small_batch_probe(tmp_path), str(tmp_path / "probe"))
  assert "can move its head by at most 0.168% of its initial norm" in caplog.text


@pytest.mark.parametrize("eval_every,total,expected", [
    (3, 7, [3, 6, 7]),  # every 3 steps, and the last
    (0, 20, [16, 20]),  # 0: once an epoch (512 examples / batch 32 = 16 steps), and the last
])
def test_evaluations_every_eval_every_steps_and_at_the_last_then_never_again(
    tmp_path, monkeypatch, eval_every, total, expected):
  evaluated, calls = [], []

  def evaluate(eval_fn, params, batch_stats, config, image_size, mesh):
    evaluated.append(params)
    return {"top1": 0.5, "top5": 0.75, "loss": 1.0, "count": 100.0}

  monkeypatch.setattr(classify, "evaluate", evaluate)
  monkeypatch.setattr(classify.trainer, "run", _fake_run(calls))
  _no_input(monkeypatch)
  config = _tiny_probe(tmp_path, **{"train.total_steps": total, "train.eval_every": eval_every})
  workdir = str(tmp_path / "probe")
  summary = classify.train(config, workdir)
  assert config.ema.decay == 0 and len(evaluated) == len(expected)  # no EMA: one pass each
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "eval_top1" in r] == expected
  assert not any("eval_ema_top1" in r for r in rows)
  assert summary["eval_step"] == total and calls == [(0, total)]
  again = classify.train(config, workdir)  # finished at its last step: nothing runs again
  assert again["finished_before"] and again["eval_top1"] == 0.5 and calls == [(0, total)]


def test_a_resume_reads_no_encoder_so_a_moved_init_run_does_not_stop_it(tmp_path, monkeypatch):
  """The encoder is read once, into the fresh state; a resume takes everything from its own
  checkpoint (the init run may have moved since: fixed_on_resume then lets its new path in)."""
  init = tmp_path / "pre"
  init.mkdir()
  (init / "config.json").write_text(
      apply_overrides(load_config("dataset=shapes"), {
          "model.variant": "Ti/4", "model.image_size": SIZE, "model.width": 32,
          "model.depth": 1, "model.heads": 2}).to_json())
  reads, calls = [], []
  monkeypatch.setattr(classify, "read_pretrained_encoder",
                      lambda config, mesh, scan: reads.append(config.init.workdir))
  monkeypatch.setattr(classify, "evaluate", lambda *a, **k: {"top1": 0.5, "top5": 0.75,
                                                             "loss": 1.0, "count": 100.0})
  config = _tiny_probe(tmp_path, str(init), **{"train.total_steps": 8})
  workdir = str(tmp_path / "probe")
  monkeypatch.setattr(classify.trainer, "run", _fake_run(calls, stop_at=4))
  _no_input(monkeypatch)
  assert classify.train(config, workdir)["stopped"]
  monkeypatch.setattr(classify.trainer, "run", _fake_run(calls))
  summary = classify.train(config, workdir)
  assert (summary["start_step"], summary["step"]) == (4, 8)
  assert calls == [(0, 8), (4, 8)] and reads == [str(init)]


def test_a_resume_drops_the_metrics_logged_past_its_checkpoint(tmp_path, monkeypatch):
  """Logged at 2, 4 and 6, saved at 4 only: the resumed run starts at 4, and step 6 goes
  from metrics.jsonl and TensorBoard (it is logged again)."""
  starts = []

  def run(state, step_fn, batches, *, start_step, total_steps, ckpt, writer, **kwargs):
    starts.append(start_step)
    if start_step == 0:
      for step in (2, 4, 6):
        writer.write_scalars(step, {"loss": 1.0 / step})
      ckpt.save(4, state.replace(step=jnp.asarray(4, jnp.int32)))
    return state, {"step": 6, "stopped": True, "loss": 1.0}

  monkeypatch.setattr(classify, "evaluate", lambda *a, **k: {"top1": 0.5, "top5": 0.75,
                                                             "loss": 1.0, "count": 100.0})
  monkeypatch.setattr(classify.trainer, "run", run)
  _no_input(monkeypatch)
  config = _tiny_probe(tmp_path, **{"train.total_steps": 8})
  workdir = str(tmp_path / "probe")
  classify.train(config, workdir)
  assert tensorboard_steps(workdir, "loss") in (None, [2, 4, 6])
  classify.train(config, workdir)
  assert starts == [0, 4]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert tensorboard_steps(workdir, "loss") in (None, [2, 4])


@pytest.mark.parametrize("held", ["pretrain", "linear_probe", "checkpoints_only"])
def test_knn_refuses_a_workdir_holding_another_run_and_leaves_its_record(tmp_path, held):
  """--workdir = the run to evaluate (instead of init=) must not replace its config.json."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "6").mkdir(parents=True)
  record = json.dumps({"mode": held, "model": {"variant": "Ti/4"}})
  if held != "checkpoints_only":
    (workdir / "config.json").write_text(record)
  config = load_knn_config(f"init={workdir},dataset=shapes")
  with pytest.raises(UserError, match=r"--workdir: .* holds .*init=.* and a new --workdir"):
    classify.knn_eval(config, str(workdir))
  if held != "checkpoints_only":
    assert (workdir / "config.json").read_text() == record
  assert sorted(p.name for p in workdir.iterdir()) == (
      ["checkpoints"] + (["config.json"] if held != "checkpoints_only" else []))


@pytest.mark.parametrize("mode", ["linear_probe", "knn"])
def test_a_weights_file_as_init_says_to_convert_it(tmp_path, mode):
  weights = tmp_path / "mae_pretrain_vit_base.pth"
  weights.write_bytes(b"PK\x03\x04")
  config = (load_knn_config if mode == "knn" else functools.partial(
      classify_config.get_config, mode))(f"init={weights},dataset=shapes")
  with pytest.raises(UserError, match=r"is a file, not a workdir; convert .* "
                     r"python -m pr_mim_jax.interop.convert --from=\S+\.pth --to=DIR"):
    classify.resolve_model(config)


def test_knn_reruns_in_its_own_workdir(tmp_path, monkeypatch):
  monkeypatch.setattr(classify, "_features", lambda encoder, params, data, split, *args: (
      np.eye(2, dtype=np.float32), np.array([0, 1])))
  monkeypatch.setattr(classify, "read_pretrained_encoder", lambda *args: {})
  monkeypatch.setattr(classify.posemb_lib, "adapt_encoder_params", lambda params, grid: params)
  config = apply_overrides(load_knn_config("init=/nowhere,dataset=shapes"), {"knn.k": 1})
  model = ml_collections.ConfigDict({"variant": "Ti/4", "width": 8, "depth": 1, "heads": 1,
                                     "image_size": 8, "posemb": "sincos",
                                     "compute_dtype": "float32"})
  for _ in range(2):
    assert classify.knn_eval(config, str(tmp_path / "knn"), checked=model)["knn_top1"] == 1.0
  assert json.loads((tmp_path / "knn" / "config.json").read_text())["mode"] == "knn"


def test_knn_on_fewer_train_images_than_k_votes_with_all_and_says_so(tmp_path, monkeypatch,
                                                                   caplog):
  """3 train images and knn.k=5: the vote uses all 3, and the log and metrics say k=3, not 5."""
  feats = {"train": (np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], np.float32),
                     np.array([0, 0, 1])),
           "test": (np.array([[1.0, 0.05]], np.float32), np.array([0]))}
  monkeypatch.setattr(classify, "_features",
                      lambda encoder, params, data, split, *args: feats[split])
  monkeypatch.setattr(classify, "read_pretrained_encoder", lambda *args: {})
  monkeypatch.setattr(classify.posemb_lib, "adapt_encoder_params", lambda params, grid: params)
  config = apply_overrides(load_knn_config("init=/nowhere,dataset=shapes"), {
      "knn.k": 5, "knn.train_examples": 10, "data.train_split": "train",
      "data.eval_split": "test"})
  model = ml_collections.ConfigDict({"variant": "Ti/4", "width": 8, "depth": 1, "heads": 1,
                                     "image_size": 8, "posemb": "sincos",
                                     "compute_dtype": "float32"})
  with caplog.at_level("INFO"):
    result = classify.knn_eval(config, str(tmp_path / "knn"), checked=model)
  assert result["knn_top1"] == 1.0
  row = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text())
  assert (row["k"], row["train_examples"]) == (3, 3)
  assert "only 3 images, so k=3 (knn.k=5)" in caplog.text and "k-NN top-1 (k=3," in caplog.text


class _MeanEncoder:
  """Stands in for vit.Encoder: two tokens per image, both its mean input value."""
  image_size = 8

  def apply(self, variables, x):
    mean = x.reshape(x.shape[0], -1).mean(axis=1)
    return jnp.broadcast_to(mean[:, None, None], (x.shape[0], 2, 1))


def test_knn_features_leave_out_the_padding_of_the_last_batch(monkeypatch):
  """Two batches of 4, the second holding 2 real examples and 2 of padding: 6 features, in
  order, each of its own image."""
  def batches(*args, **kwargs):
    for labels, mask in (([0, 1, 2, 3], [1, 1, 1, 1]), ([4, 5, 0, 0], [1, 1, 0, 0])):
      images = np.stack([np.full((8, 8, 3), 20.0 * (i + 1), np.float32)
                         for i in labels]) * np.asarray(mask, np.float32)[:, None, None, None]
      yield {"image": images, "label": np.asarray(labels, np.int32),
             "mask": np.asarray(mask, np.float32)}

  monkeypatch.setattr(classify.pipeline, "eval_batches", batches)
  config = load_knn_config("init=/runs/pre,dataset=shapes")
  feats, labels = classify._features(_MeanEncoder(), {}, config.data, "test", None, config,  # pylint: disable=protected-access
                                     sharding.make_mesh())
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5])
  assert feats.shape == (6, 1) and np.all(np.diff(feats[:, 0]) > 0)


def _constant(lr):
  return lambda steps: jnp.full(jnp.shape(steps), lr, jnp.float32)


def test_the_probe_warning_uses_the_configs_momentum_and_says_e_to_the_r_minus_1():
  """Without momentum each step moves the head at most lr * trust * |w|: 100 steps at lr 5
  reach R = 0.5, so at most e^0.5 - 1 = 64.9% of its norm (< 100%: warned). With momentum
  0.9 the buffer grows to ~10 units and the same run reaches R = 4.55 (no warning)."""
  config = classify_config.get_config("linear_probe", "dataset=shapes")
  config.train.total_steps, config.optim.momentum = 100, 0.0
  config.optim.base_lr = 6.4 * 256 / config.batch_size  # MAE's peak: base_lr is not the advice
  assert classify.lars_reach(_constant(5.0), 100, momentum=0.0) == pytest.approx(0.5, rel=1e-6)
  text = classify.probe_lr_warning(config, _constant(5.0), 100, 5.0)
  assert text.startswith("the LARS probe can move its head by at most 64.9% of its initial norm "
                         "in 100 steps at peak lr 5;")
  assert text.endswith("features: set more config.train.total_steps")
  config.optim.momentum = 0.9
  assert classify.probe_lr_warning(config, _constant(5.0), 100, 5.0) == ""


def test_the_probe_warning_threshold_is_a_reach_of_ln_2():
  """e^R - 1 < 1 warns: R = 0.69 (just under ln 2) warns, R = 0.70 does not."""
  config = classify_config.get_config("linear_probe", "dataset=shapes")
  config.train.total_steps, config.optim.momentum = 100, 0.0
  assert "at most 99.4% of" in classify.probe_lr_warning(config, _constant(6.9), 100, 6.9)
  assert classify.probe_lr_warning(config, _constant(7.0), 100, 7.0) == ""


def test_a_fine_tune_gets_no_probe_warning():
  """AdamW is not LARS: a tiny lr for few steps is no reason for the probe's warning."""
  config = classify_config.get_config("finetune", "dataset=shapes")
  config.train.total_steps = 2
  assert classify.probe_lr_warning(config, _constant(1e-6), 2, 1e-6) == ""


@pytest.mark.parametrize("record,what", [
    ("{not json", "another run (config.json)"),  # a damaged record is no k-NN's either
    ("[]", "another run (config.json)"),  # JSON, but no mapping with a mode
    (json.dumps({"model": {"variant": "Ti/4"}}), "a pretrain run (config.json)"),  # no mode:
    # written before config.mode existed, by pre-training
    (json.dumps({"mode": "finetune"}), "a finetune run (config.json)"),
])
def test_knn_refuses_a_workdir_whose_config_json_is_not_a_knn_runs(tmp_path, record, what):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(record)
  with pytest.raises(UserError) as err:
    classify.check_knn_workdir(str(workdir))
  assert str(err.value) == (f"--workdir: {workdir} holds {what}, whose config.json a k-NN "
                            f"evaluation would replace; evaluate it with init={workdir} and a "
                            "new --workdir")
  assert (workdir / "config.json").read_text() == record


def test_knn_names_the_run_and_its_checkpoints_in_a_workdir_holding_both(tmp_path):
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps({"mode": "linear_probe"}))
  with pytest.raises(UserError, match=r" holds a linear_probe run \(checkpoints\), whose "):
    classify.check_knn_workdir(str(tmp_path))
  classify.check_knn_workdir(str(tmp_path / "new"))  # a new workdir passes
  (tmp_path / "knn").mkdir()
  (tmp_path / "knn" / "config.json").write_text(json.dumps({"mode": "knn"}))
  classify.check_knn_workdir(str(tmp_path / "knn"))  # and a k-NN's own
