"""Linear probing and fine-tuning from a pre-training workdir, end to end on tiny data."""

import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, apply_overrides, load_config, run_with_fake_devices, tensorboard_steps
from eval_setup import (DATA, SIZE, eval_config, pretrain_config_json,
                        pretrained,  # pylint: disable=unused-import (a fixture)
                        small_batch_probe, tiny_probe)
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify
from pr_mim_jax.evaluation import classify_step
from pr_mim_jax.evaluation import init_run
from pr_mim_jax.models import classifier
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import trainer
from pr_mim_jax.training import workdir_records
from pr_mim_jax.training.train_state import ClassifierState


def encoder_checkpoint(workdir):
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  try:
    params, _ = ckpt.restore_subtree(("params", "encoder"),
                                     sharding.replicated(sharding.make_mesh()))
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, params)


INIT_RUN = object()  # fresh_state: the encoder that config.init.workdir saved


def fresh_state(config, encoder=None):
  """(model, state) as classify.train builds them. `encoder`: None (random init), the encoder
  params to load, or INIT_RUN (what config.init.workdir saved)."""
  _, config, _, num_classes = classify.check_config(config)
  model = classifier.from_config(config, num_classes)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    if encoder is INIT_RUN:
      encoder = init_run.read_pretrained_encoder(config, mesh, False)
    state, _, _ = classify.create_state(
        config, model, lambda p: classify.make_optimizer(config, lambda s: 1e-3, p, 2), mesh,
        sharding.DATA_PARALLEL_RULES, encoder)
  return model, state


def _init_run(tmp_path):
  """A workdir holding only the config.json of a tiny pre-training run (a probe's init)."""
  init = tmp_path / "pre"
  init.mkdir()
  (init / "config.json").write_text(
      apply_overrides(load_config("dataset=shapes"), {
          "model.variant": "Ti/4", "model.image_size": SIZE, "model.width": 32,
          "model.depth": 1, "model.heads": 2}).to_json())
  return init


@pytest.mark.slow
def test_finetune_starts_from_every_pretrained_encoder_weight(pretrained):
  _, state = fresh_state(eval_config("finetune", pretrained), INIT_RUN)
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
  model, state = fresh_state(config)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    eval_fn = jax.jit(lambda p, b, batch: classify_step.eval_step(p, b, batch, model=model))
    result = classify.evaluate(eval_fn, state.params, state.batch_stats, config, SIZE, mesh)
  assert result["count"] == 100
  # Reference: plain NumPy accuracy of the same model on all 100 test images at once.
  from pr_mim_jax.data import pipeline, pixels
  images, labels = pipeline.labeled_arrays(config.data, "test", num_examples=100, image_size=SIZE)
  logits = np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                  pixels.normalize(images), train=False))  # uint8 -> model input
  assert result["top1"] == pytest.approx(np.mean(logits.argmax(-1) == labels))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert result["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)))


@pytest.mark.slow
def test_finetune_cli_runs_resumes_and_reports(pretrained, tmp_path):
  workdir = str(tmp_path / "ft")
  args = [sys.executable, "-m", "pr_mim_jax.main",
          f"--config=pr_mim_jax/configs/finetune.py:init={pretrained},dataset=shapes",
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
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
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
def test_evaluation_is_exact_on_a_multi_device_mesh():
  """On 4 fake devices (the last batch padded to the device grid) the counts equal 1 device's."""
  code = """
import sys, jax
sys.path.insert(0, "tests")
from eval_setup import eval_config, SIZE
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
  checkpointing.write_checkpoint(workdir, 6, {"params": np.zeros(1)})  # a stand-in: the config
  # check comes first
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


@pytest.mark.slow
def test_the_probe_run_logs_that_its_head_cannot_move(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(classify.trainer, "run", _fake_run([]))
  monkeypatch.setattr(classify, "evaluate", lambda *args, **kwargs: {
      "top1": 0.5, "top5": 1.0, "loss": 1.0, "count": 1.0})
  _no_input(monkeypatch)
  with caplog.at_level("WARNING"):
    classify.train(small_batch_probe(tmp_path), str(tmp_path / "probe"))
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
  config = tiny_probe(tmp_path, **{"train.total_steps": total, "train.eval_every": eval_every})
  workdir = str(tmp_path / "probe")
  summary = classify.train(config, workdir)
  assert config.ema.decay == 0 and len(evaluated) == len(expected)  # no EMA: one pass each
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "eval_top1" in r] == expected
  assert not any("eval_ema_top1" in r for r in rows)
  assert summary["eval_step"] == total and calls == [(0, total)]
  again = classify.train(config, workdir)  # finished at its last step: nothing runs again
  assert again["finished_before"] and again["eval_top1"] == 0.5 and calls == [(0, total)]


def test_a_probe_run_names_its_outputs_and_promises_no_pictures(tmp_path, monkeypatch, caplog):
  """A probe writes no reconstruction pictures, so its start-up line must not send the user
  to an images/ folder (pre-training's does)."""
  monkeypatch.setattr(classify, "evaluate", lambda *args, **kwargs: {
      "top1": 0.5, "top5": 1.0, "loss": 1.0, "count": 1.0})
  monkeypatch.setattr(classify.trainer, "run", _fake_run([]))
  _no_input(monkeypatch)
  workdir = str(tmp_path / "probe")
  with caplog.at_level("INFO"):
    classify.train(tiny_probe(tmp_path, **{"train.total_steps": 2}), workdir)
  line, = [r.getMessage() for r in caplog.records if r.getMessage().startswith("writing to")]
  assert workdir in line and "metrics.jsonl" in line and "images/" not in line
  assert not os.path.exists(os.path.join(workdir, "images"))


def test_a_resume_reads_no_encoder_so_a_moved_init_run_does_not_stop_it(tmp_path, monkeypatch):
  """The encoder is read once, into the fresh state before the first run's steps; a resume
  takes everything from its own checkpoint (the init run may have moved since:
  fixed_on_resume then lets its new path in), and its input continues at the step it resumes
  from (a restart at 0 would train the resumed steps on batches already taken)."""
  init = _init_run(tmp_path)
  reads, starts, calls = [], [], []
  monkeypatch.setattr(classify.init_run, "read_pretrained_encoder",
                      lambda config, mesh, scan: reads.append((config.init.workdir, len(calls))))
  monkeypatch.setattr(classify.pipeline, "labeled_train_batches",
                      lambda *args, start_step, **kwargs: starts.append(start_step) or iter(()))
  monkeypatch.setattr(classify, "evaluate", lambda *a, **k: {"top1": 0.5, "top5": 0.75,
                                                             "loss": 1.0, "count": 100.0})
  config = tiny_probe(tmp_path, str(init), **{"train.total_steps": 8})
  workdir = str(tmp_path / "probe")
  monkeypatch.setattr(classify.trainer, "run", _fake_run(calls, stop_at=4))
  assert classify.train(config, workdir)["stopped"]
  monkeypatch.setattr(classify.trainer, "run", _fake_run(calls))
  summary = classify.train(config, workdir)
  assert (summary["start_step"], summary["step"]) == (4, 8)
  assert calls == [(0, 8), (4, 8)] and starts == [0, 4] and reads == [(str(init), 0)]


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
  config = tiny_probe(tmp_path, **{"train.total_steps": 8})
  workdir = str(tmp_path / "probe")
  classify.train(config, workdir)
  assert tensorboard_steps(workdir, "loss") in (None, [2, 4, 6])
  classify.train(config, workdir)
  assert starts == [0, 4]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert tensorboard_steps(workdir, "loss") in (None, [2, 4])


def test_a_batch_of_the_whole_train_split_is_accepted_and_one_more_is_refused(tmp_path):
  """512 training examples: batch 512 is accepted; batch 513 has no full batch."""
  assert classify.check_config(tiny_probe(tmp_path, batch_size=512)).num_train == 512
  with pytest.raises(UserError, match=r"^config.batch_size: 513 exceeds the 512 training"):
    classify.check_config(tiny_probe(tmp_path, batch_size=513))


def test_the_ema_is_evaluated_on_its_own_params_and_reported_apart(tmp_path, monkeypatch):
  """With an EMA, each evaluation runs twice: on the params (eval_top1 / top5) and on the EMA
  params (eval_ema_top1 / top5). Here the EMA params are zeros and score 0.25 / 0.5."""
  def run(state, step_fn, batches, *, total_steps, ckpt, after_step, **kwargs):
    state = state.replace(ema_params=jax.tree.map(jnp.zeros_like, state.params))
    summary = dict(step=total_steps, stopped=False, loss=1.0,
                   **after_step(total_steps, state, None, {}, True))
    ckpt.save(total_steps, state.replace(step=jnp.asarray(total_steps, jnp.int32)))
    return state, summary

  def evaluate(eval_fn, params, batch_stats, config, image_size, mesh):
    zeros = all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(params))
    return ({"top1": 0.25, "top5": 0.5, "loss": 2.0, "count": 100.0} if zeros else
            {"top1": 0.5, "top5": 0.75, "loss": 1.0, "count": 100.0})

  monkeypatch.setattr(classify, "evaluate", evaluate)
  monkeypatch.setattr(classify.trainer, "run", run)
  _no_input(monkeypatch)
  config = tiny_probe(tmp_path, **{"train.total_steps": 2, "ema.decay": 0.9})
  workdir = str(tmp_path / "probe")
  summary = classify.train(config, workdir)
  want = {"eval_top1": 0.5, "eval_top5": 0.75, "eval_ema_top1": 0.25, "eval_ema_top5": 0.5}
  assert {k: summary[k] for k in want} == want
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [{k: r[k] for k in want} for r in rows if "eval_top1" in r] == [want]


def test_a_fresh_state_starts_from_the_encoder_and_so_does_its_ema(tmp_path):
  """create_state loads the given encoder into params['encoder'], and the EMA starts as those
  loaded params (not the random init they replaced)."""
  config = tiny_probe(tmp_path, **{"ema.decay": 0.9})
  _, random = fresh_state(config)
  _, state = fresh_state(config, jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype),
                                              random.params["encoder"]))
  for got, ema in zip(jax.tree.leaves(state.params["encoder"]),
                      jax.tree.leaves(state.ema_params["encoder"])):
    np.testing.assert_array_equal(np.asarray(got), 0.5)
    np.testing.assert_array_equal(np.asarray(ema), 0.5)


def test_the_result_line_of_a_run_stopped_before_evaluating_says_how_to_resume():
  line = classify.result_line(eval_config("finetune", ""), {"step": 5, "total_steps": 1000})
  assert "stopped at step 5 of 1000" in line and "rerun the same command to resume" in line


def test_mix_prob_0_trains_on_the_batch_unmixed():
  """Recipe.mix_prob is the chance to mix a batch and switch_prob the CutMix share: with
  mix_prob 0 the loss is the unmixed batch's, whatever switch_prob. (On 2x2 images a CutMix
  box is empty, so only a batch that is Mixup-mixed differs: the control.)"""
  params, stats = _tiny_variables(4)
  images = np.random.default_rng(5).integers(0, 256, (6, 2, 2, 3)).astype(np.uint8)
  tx = optax.sgd(0.0)
  state = ClassifierState(step=jnp.int32(0), params=params, batch_stats=stats,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  def loss(recipe):
    step = functools.partial(classify_step.train_step, model=_TinyClassifier(), tx=tx,
                             recipe=recipe, schedule=lambda s: 0.0)
    return float(jax.jit(step)(state, {"image": images, "label": np.arange(6)})[1]["loss"])
  plain = loss(classify_step.Recipe(num_classes=7))
  recipe = lambda mix, switch: classify_step.Recipe(
      num_classes=7, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=mix, switch_prob=switch)
  assert loss(recipe(0.0, 1.0)) == pytest.approx(plain, rel=1e-6)
  assert loss(recipe(0.0, 0.0)) == pytest.approx(plain, rel=1e-6)
  assert loss(recipe(1.0, 0.0)) != pytest.approx(plain, rel=1e-6)  # Mixup, always


def test_an_encoder_that_does_not_fit_the_model_is_one_line_naming_init_workdir(tmp_path):
  config = tiny_probe(tmp_path)
  encoder = dict(fresh_state(config)[1].params["encoder"], extra=np.zeros(3, np.float32))
  with pytest.raises(UserError, match=r"^config.init.workdir: the pre-trained encoder does "
                                      r"not fit this model: .*extra"):
    fresh_state(config, encoder)
