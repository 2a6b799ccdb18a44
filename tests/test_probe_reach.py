"""How far a LARS probe's schedule can move its head, and the warning when it cannot."""


import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eval_setup import small_batch_probe
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.evaluation import probe_reach
from pr_mim_jax.training import optim


def test_lars_reach_is_the_step_by_step_sum():
  """Peak 0.5, 5 steps, 2 warmup: lrs 0, 0.25, then the half cosine 0.5, 0.375, 0.125; a unit
  trust-scaled update per step feeds a momentum buffer of norm 1, 1.9, 2.71, ..."""
  lrs = [0.0, 0.25] + [0.25 * (1 + np.cos(np.pi * k / 3)) for k in range(3)]
  buffer, want = 0.0, 0.0
  for lr in lrs:
    buffer = 0.9 * buffer + 1.0
    want += lr * 0.001 * buffer
  got = probe_reach.lars_reach(optim.lr_schedule(0.5, 5, 2), 5, momentum=0.9)
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
  reach = probe_reach.lars_reach(schedule, 30, momentum=0.9)
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
    assert probe_reach.probe_lr_warning(config, *_probe_schedule(config, num_train)) == ""
  imagenet.optim.base_lr = 6.4  # a reach far past exp's float range: no OverflowError
  assert probe_reach.probe_lr_warning(imagenet, *_probe_schedule(imagenet, 1281167)) == ""


def test_a_small_batch_probe_with_maes_base_lr_says_its_head_cannot_move(tmp_path):
  config = small_batch_probe(tmp_path)
  text = probe_reach.probe_lr_warning(config, *_probe_schedule(config, 512))
  assert "can move its head by at most 0.168% of its initial norm in 36 steps" in text
  assert text.endswith(": raise config.optim.base_lr (--config.optim.base_lr=51.2 gives MAE's "
                       "peak lr 6.4 at batch 32) or set more config.train.total_steps")
  config.optim.base_lr = 51.2  # peak 6.4: the head can move
  assert probe_reach.probe_lr_warning(config, *_probe_schedule(config, 512)) == ""
  config.optim.base_lr, config.train.total_steps = 51.2, 1  # one step at MAE's peak
  assert probe_reach.probe_lr_warning(config, *_probe_schedule(config, 512)).endswith(
      "features: set more config.train.total_steps")  # base_lr is no longer the cause


def _constant(lr):
  return lambda steps: jnp.full(jnp.shape(steps), lr, jnp.float32)


def test_the_probe_warning_uses_the_configs_momentum_and_says_e_to_the_r_minus_1():
  """Without momentum each step moves the head at most lr * trust * |w|: 100 steps at lr 5
  reach R = 0.5, so at most e^0.5 - 1 = 64.9% of its norm (< 100%: warned). With momentum
  0.9 the buffer grows to ~10 units and the same run reaches R = 4.55 (no warning)."""
  config = classify_config.get_config("linear_probe", "dataset=shapes")
  config.train.total_steps, config.optim.momentum = 100, 0.0
  config.optim.base_lr = 6.4 * 256 / config.batch_size  # MAE's peak: base_lr is not the advice
  assert probe_reach.lars_reach(_constant(5.0), 100, momentum=0.0) == pytest.approx(0.5, rel=1e-6)
  text = probe_reach.probe_lr_warning(config, _constant(5.0), 100, 5.0)
  assert text.startswith("the LARS probe can move its head by at most 64.9% of its initial norm "
                         "in 100 steps at peak lr 5;")
  assert text.endswith("features: set more config.train.total_steps")
  config.optim.momentum = 0.9
  assert probe_reach.probe_lr_warning(config, _constant(5.0), 100, 5.0) == ""


def test_the_probe_warning_threshold_is_a_reach_of_ln_2():
  """e^R - 1 < 1 warns: R = 0.69 (just under ln 2) warns, R = 0.70 does not."""
  config = classify_config.get_config("linear_probe", "dataset=shapes")
  config.train.total_steps, config.optim.momentum = 100, 0.0
  assert "at most 99.4% of" in probe_reach.probe_lr_warning(config, _constant(6.9), 100, 6.9)
  assert probe_reach.probe_lr_warning(config, _constant(7.0), 100, 7.0) == ""


def test_a_fine_tune_gets_no_probe_warning():
  """AdamW is not LARS: a tiny lr for few steps is no reason for the probe's warning."""
  config = classify_config.get_config("finetune", "dataset=shapes")
  config.train.total_steps = 2
  assert probe_reach.probe_lr_warning(config, _constant(1e-6), 2, 1e-6) == ""


def test_a_run_sized_in_epochs_is_told_to_raise_its_epochs():
  """train.total_steps 0 (the length from optim.epochs): the advice is the field that sets
  the length, config.optim.epochs, not total_steps."""
  config = classify_config.get_config("linear_probe", "dataset=shapes")
  config.train.total_steps, config.optim.momentum = 0, 0.0
  config.optim.base_lr = 6.4 * 256 / config.batch_size  # MAE's peak: base_lr is not the advice
  text = probe_reach.probe_lr_warning(config, _constant(5.0), 100, 5.0)
  assert text.endswith("features: raise config.optim.epochs")
