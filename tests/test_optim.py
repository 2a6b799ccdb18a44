"""Tests for pr_mim_jax.optim: decay mask, lr scaling and schedule, AdamW, clipping."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pr_mim_jax import optim
from pr_mim_jax.models import mae
from pr_mim_jax.models import vit

IMAGE, PATCH = 16, 4
L = (IMAGE // PATCH) ** 2


def optim_cfg(**overrides):
  values = dict(base_lr=1.5e-4, weight_decay=0.05, b1=0.9, b2=0.95, epochs=8.0,
                warmup_epochs=1.0, clip_grad_norm=0.0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def mae_param_shapes(posemb='learned', depth=1):
  model = mae.MaskedAutoencoder(vit.VitSpec(16, depth, 2, PATCH), IMAGE, decoder_width=8,
                                decoder_depth=depth, decoder_heads=2, posemb=posemb)
  ids_vis = jnp.zeros((1, 4), jnp.int32)
  ids_dec = jnp.zeros((1, 12), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)),
                             ids_vis, ids_dec)
  return nn.unbox(variables['params'])


def np_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) + 2.0, jnp.float32), shapes)


def _expected_decay(path):
  """Independent rule: decay kernels (Dense / patch embed) only."""
  name = path[-1]
  if name in ('bias', 'scale', 'cls_token', 'mask_token', 'pos_embedding', 'patch_embed_bias'):
    return False
  assert name in ('kernel', 'patch_embed_kernel'), path
  return True


def test_decay_mask_on_mae_params():
  shapes = mae_param_shapes('learned', depth=2)
  flat_mask = flax.traverse_util.flatten_dict(optim.decay_mask(shapes))
  flat = flax.traverse_util.flatten_dict(shapes)
  assert set(flat_mask) == set(flat)
  # The special leaves exist in this tree.
  for path in [('encoder', 'cls_token'), ('mask_token',), ('encoder', 'pos_embedding'),
               ('encoder', 'patch_embed_kernel'), ('encoder', 'block0', 'attn', 'qkv', 'bias')]:
    assert path in flat, path
  wrong = {'/'.join(p): bool(flat_mask[p]) for p in flat
           if bool(flat_mask[p]) != _expected_decay(p)}
  assert not wrong, f'decay_mask disagrees with kernels-only decay at {wrong}'


@pytest.mark.parametrize('path,expected', [
    (('encoder', 'block0', 'attn', 'qkv', 'kernel'), True),
    (('encoder', 'block0', 'attn', 'proj', 'kernel'), True),
    (('encoder', 'block0', 'mlp', 'fc1', 'kernel'), True),
    (('encoder', 'patch_embed_kernel'), True),
    (('decoder_embed', 'kernel'), True),
    (('decoder_pred', 'kernel'), True),
    (('encoder', 'block0', 'mlp', 'fc1', 'bias'), False),
    (('encoder', 'block0', 'attn', 'proj', 'bias'), False),
    (('encoder', 'block0', 'attn', 'qkv', 'bias'), False),  # shape [3, heads, head_dim]
    (('encoder', 'block0', 'norm1', 'scale'), False),
    (('encoder', 'block0', 'norm1', 'bias'), False),
    (('encoder', 'norm', 'scale'), False),
    (('decoder_norm', 'bias'), False),
    (('encoder', 'patch_embed_bias'), False),
    (('encoder', 'cls_token'), False),
    (('encoder', 'pos_embedding'), False),
    (('mask_token',), False),
])
def test_decay_mask_named_leaves(path, expected):
  flat_mask = flax.traverse_util.flatten_dict(optim.decay_mask(mae_param_shapes('learned')))
  assert bool(flat_mask[path]) is expected


def test_peak_lr_linear_scaling():
  assert optim.peak_lr(optim_cfg(base_lr=1.5e-4), 4096) == pytest.approx(2.4e-3)
  assert optim.peak_lr(optim_cfg(base_lr=1e-3), 256) == pytest.approx(1e-3)
  assert optim.peak_lr(optim_cfg(base_lr=1e-3), 128) == pytest.approx(5e-4)


def test_schedule_steps():
  cfg = optim_cfg(epochs=8.0, warmup_epochs=1.0)
  assert optim.steps_per_epoch(1000, 100) == 10
  assert optim.steps_per_epoch(1099, 100) == 10  # the partial batch is dropped
  assert optim.schedule_steps(cfg, 1000, 100) == (80, 10)
  assert optim.schedule_steps(cfg, 1099, 100) == (80, 10)
  # MAE ImageNet: 1,281,167 images / 4096 = 312 steps per epoch.
  mae_cfg = optim_cfg(epochs=800.0, warmup_epochs=40.0)
  assert optim.schedule_steps(mae_cfg, 1_281_167, 4096) == (800 * 312, 40 * 312)
  # An explicit total keeps the warmup share (1/8).
  assert optim.schedule_steps(cfg, 1000, 100, total_steps_override=40) == (40, 5)
  # Fractional epochs.
  assert optim.schedule_steps(optim_cfg(epochs=2.5, warmup_epochs=0.5), 1000, 100) == (25, 5)
  # Warmup never reaches the total.
  total, warmup = optim.schedule_steps(optim_cfg(epochs=1.0, warmup_epochs=1.0), 1000, 100)
  assert warmup < total


def test_lr_schedule_hand_values():
  peak, total, warmup = 2.0, 110, 10
  sched = optim.lr_schedule(peak, total, warmup)
  lr = lambda s: float(sched(s))
  assert lr(0) == pytest.approx(0.0, abs=1e-7)
  assert lr(5) == pytest.approx(1.0)  # linear warmup
  assert lr(1) == pytest.approx(0.2)
  assert lr(10) == pytest.approx(2.0)
  assert lr(60) == pytest.approx(1.0, rel=1e-5)  # cosine midpoint: peak / 2
  assert lr(35) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert lr(85) == pytest.approx(peak * 0.5 * (1 + math.cos(3 * math.pi / 4)), rel=1e-4)
  assert lr(110) == pytest.approx(0.0, abs=1e-6)
  # Monotone up during warmup, down after it.
  values = np.array([lr(s) for s in range(0, 111, 5)])
  assert np.all(np.diff(values[:3]) > 0) and np.all(np.diff(values[2:]) <= 1e-7)


def _np_adamw(params, grads_list, lr, b1, b2, wd, mask, eps=1e-8):
  """Reference AdamW (decoupled decay, torch / optax convention) over several steps."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_list, start=1):
    for k in p:
      g = np.asarray(grads[k], np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      mhat, vhat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
      update = mhat / (np.sqrt(vhat) + eps) + (wd * p[k] if mask[k] else 0.0)
      p[k] = p[k] - lr * update
  return p


def test_adamw_betas_and_masked_decay_match_reference():
  params = {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]), 'bias': jnp.array([1.0, -1.0])}
  g1 = {'kernel': jnp.array([[0.1, -0.3], [0.2, 0.0]]), 'bias': jnp.array([0.5, 0.1])}
  g2 = {'kernel': jnp.array([[-0.2, 0.1], [0.4, 0.3]]), 'bias': jnp.array([-0.1, 0.3])}
  lr, wd = 0.1, 0.05
  tx = optim.make_optimizer(optim_cfg(weight_decay=wd), optax.constant_schedule(lr))
  state = tx.init(params)
  p = params
  for g in (g1, g2):
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  ref = _np_adamw(params, [g1, g2], lr, 0.9, 0.95, wd, {'kernel': True, 'bias': False})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)
  # Default optax betas (0.9, 0.999) would give a different result, so betas are checked.
  other = _np_adamw(params, [g1, g2], lr, 0.9, 0.999, wd, {'kernel': True, 'bias': False})
  assert np.abs(other['kernel'] - ref['kernel']).max() > 1e-4


def test_weight_decay_only_where_mask_says_on_mae_tree():
  shapes = mae_param_shapes('learned')
  params = np_params(shapes)
  lr, wd = 0.5, 0.1
  tx = optim.make_optimizer(optim_cfg(weight_decay=wd), optax.constant_schedule(lr))

  @jax.jit
  def one_step(p):
    zeros = jax.tree.map(jnp.zeros_like, p)
    updates, _ = tx.update(zeros, tx.init(p), p)
    return optax.apply_updates(p, updates)

  new = flax.traverse_util.flatten_dict(one_step(params))
  old = flax.traverse_util.flatten_dict(params)
  for path in old:
    before, after = np.asarray(old[path]), np.asarray(new[path])
    if _expected_decay(path):
      np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6, err_msg=str(path))
    else:
      np.testing.assert_array_equal(after, before, err_msg=f'{path} was decayed')


def _first_moment(state):
  return optax.tree_utils.tree_get(state, 'mu')


def test_clip_grad_norm():
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  grads = {'kernel': jnp.full((2, 2), 3.0), 'bias': jnp.array([4.0, 0.0])}  # norm sqrt(52)
  norm = math.sqrt(4 * 9 + 16)
  sched = optax.constant_schedule(0.1)
  clipped = optim.make_optimizer(optim_cfg(clip_grad_norm=1.0), sched)
  _, state = clipped.update(grads, clipped.init(params), params)
  mu = _first_moment(state)
  for k in grads:  # mu after one step = (1 - b1) * clipped gradient
    np.testing.assert_allclose(np.asarray(mu[k]), 0.1 * np.asarray(grads[k]) / norm, rtol=1e-5)
  unclipped = optim.make_optimizer(optim_cfg(clip_grad_norm=0.0), sched)
  _, state = unclipped.update(grads, unclipped.init(params), params)
  mu = _first_moment(state)
  for k in grads:
    np.testing.assert_allclose(np.asarray(mu[k]), 0.1 * np.asarray(grads[k]), rtol=1e-5)
  # A norm below the threshold is left alone.
  loose = optim.make_optimizer(optim_cfg(clip_grad_norm=100.0), sched)
  _, state = loose.update(grads, loose.init(params), params)
  np.testing.assert_allclose(np.asarray(_first_moment(state)['kernel']), 0.3, rtol=1e-5)


def test_optimizer_with_real_schedule_starts_at_zero_lr():
  cfg = optim_cfg()
  total, warmup = optim.schedule_steps(cfg, 1000, 100)
  sched = optim.lr_schedule(optim.peak_lr(cfg, 100), total, warmup)
  tx = optim.make_optimizer(cfg, sched)
  params = {'kernel': jnp.ones((2, 2))}
  grads = {'kernel': jnp.ones((2, 2))}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(updates['kernel']), 0.0)  # lr(0) = 0


@pytest.mark.parametrize('override', [1, 2, 3])
def test_very_short_runs_have_a_valid_schedule(override):
  # e.g. --config.train.total_steps=1 for a smoke test (validation allows any value >= 0).
  cfg = optim_cfg(epochs=8.0, warmup_epochs=1.0)
  total, warmup = optim.schedule_steps(cfg, 1000, 100, total_steps_override=override)
  assert total == override and 0 <= warmup < total
  sched = optim.lr_schedule(1.0, total, warmup)
  values = [float(sched(s)) for s in range(total + 1)]
  assert all(0.0 <= v <= 1.0 for v in values)
  assert values[-1] == pytest.approx(0.0, abs=1e-6)
