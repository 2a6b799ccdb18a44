"""Tests for pr_mim_jax.training.optim: decay mask, lr scaling and schedule, AdamW, clipping, layer-wise
lr decay, the linear-probe LARS and the EMA."""

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pr_mim_jax.models import classifier
from pr_mim_jax.models import mae
from pr_mim_jax.models import vit
from pr_mim_jax.training import optim

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


# ----------------------------------------------------------------------------------------
# Fine-tuning (layer-wise lr decay), linear probing (LARS on the head), EMA.

DEPTH = 3


def classifier_shapes(scan_layers=False, posemb='learned'):
  model = classifier.Classifier(vit.VitSpec(16, DEPTH, 2, PATCH), IMAGE, 5, posemb=posemb,
                                scan_layers=scan_layers)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, IMAGE, IMAGE, 3)))
  return nn.unbox(variables['params'])


_BLOCK_LEAVES = ('norm1/scale', 'norm1/bias', 'attn/qkv/kernel', 'attn/qkv/bias',
                 'attn/proj/kernel', 'attn/proj/bias', 'norm2/scale', 'norm2/bias',
                 'mlp/fc1/kernel', 'mlp/fc1/bias', 'mlp/fc2/kernel', 'mlp/fc2/bias')
# BEiT / MAE layer ids of a depth-3 classifier, written out by hand.
LAYER_IDS = {
    'encoder/patch_embed_kernel': 0, 'encoder/patch_embed_bias': 0,
    'encoder/cls_token': 0, 'encoder/pos_embedding': 0,
    **{f'encoder/block0/{k}': 1 for k in _BLOCK_LEAVES},
    **{f'encoder/block1/{k}': 2 for k in _BLOCK_LEAVES},
    **{f'encoder/block2/{k}': 3 for k in _BLOCK_LEAVES},
    'encoder/norm/scale': 4, 'encoder/norm/bias': 4,
    'head/dense/kernel': 4, 'head/dense/bias': 4,
}


def _flat(tree):
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_layer_id_for_every_param():
  flat = _flat(classifier_shapes())
  assert set(flat) == set(LAYER_IDS)
  got = {k: optim.layer_id(tuple(k.split('/')), DEPTH) for k in flat}
  assert got == LAYER_IDS
  with pytest.raises(ValueError, match='scanned'):
    optim.layer_id(('encoder', 'blocks', 'attn', 'qkv', 'kernel'), DEPTH)


def test_layer_decay_scales_hand_values():
  decay = 0.5
  # decay ** (4 - id): embed 1/16, block0 1/8, block1 1/4, block2 1/2, norm + head 1.
  by_id = {0: 0.0625, 1: 0.125, 2: 0.25, 3: 0.5, 4: 1.0}
  scales = _flat(optim.layer_decay_scales(classifier_shapes(), DEPTH, decay))
  assert scales == {k: by_id[i] for k, i in LAYER_IDS.items()}
  # Scanned: one row per block, broadcasting against the stacked leaf.
  shapes = classifier_shapes(scan_layers=True)
  scanned = _flat(optim.layer_decay_scales(shapes, DEPTH, decay))
  flat_shapes = _flat(shapes)
  for k, s in scanned.items():
    if '/blocks/' in k:
      leaf = flat_shapes[k]
      assert s.shape == (DEPTH,) + (1,) * (len(leaf.shape) - 1), k
      np.testing.assert_array_equal(s.reshape(-1), [0.125, 0.25, 0.5])
      assert np.broadcast_shapes(s.shape, leaf.shape) == leaf.shape
    else:
      assert s == by_id[LAYER_IDS[k]], k
  assert {k.replace('/blocks/', '/block0/') for k in scanned} == {
      k for k in LAYER_IDS if '/block1/' not in k and '/block2/' not in k}


def ft_cfg(**overrides):
  return optim_cfg(**dict(dict(b2=0.999, layer_decay=0.75), **overrides))


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_finetune_update_is_layer_scaled_adamw(scan_layers):
  shapes = classifier_shapes(scan_layers)
  params = np_params(shapes, seed=1)
  rng = np.random.default_rng(2)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  lr, wd, decay = 0.01, 0.05, 0.75
  tx = optim.make_finetune_optimizer(ft_cfg(weight_decay=wd, layer_decay=decay),
                                     optax.constant_schedule(lr), shapes, DEPTH)
  ref_tx = optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=wd, mask=optim.decay_mask)

  @jax.jit
  def updates(params, grads):
    ours, _ = tx.update(grads, tx.init(params), params)
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    return ours, ref

  ours, ref = map(_flat, updates(params, grads))
  for k in ref:
    ids = np.arange(1, DEPTH + 1) if '/blocks/' in k else LAYER_IDS[k]
    scale = np.asarray(decay ** (DEPTH + 1.0 - ids)).reshape((-1,) + (1,) * (ref[k].ndim - 1))
    expected = np.asarray(ref[k]) * (scale if '/blocks/' in k else scale.item())
    np.testing.assert_allclose(np.asarray(ours[k]), expected, rtol=1e-6, err_msg=k)
  # Block 0's kernel moves decay ** depth as far as the head's, relative to plain AdamW.
  if scan_layers:
    ratio_block = np.asarray(ours['encoder/blocks/mlp/fc1/kernel'])[0] / np.asarray(
        ref['encoder/blocks/mlp/fc1/kernel'])[0]
  else:
    ratio_block = np.asarray(ours['encoder/block0/mlp/fc1/kernel']) / np.asarray(
        ref['encoder/block0/mlp/fc1/kernel'])
  ratio_head = np.asarray(ours['head/dense/kernel']) / np.asarray(ref['head/dense/kernel'])
  np.testing.assert_allclose(ratio_block, decay ** DEPTH, rtol=1e-5)
  np.testing.assert_allclose(ratio_head, 1.0, rtol=1e-6)


@pytest.mark.slow
def test_finetune_weight_decay_is_layer_scaled_too():
  shapes = classifier_shapes()
  params = np_params(shapes)
  lr, wd, decay = 0.5, 0.1, 0.5
  tx = optim.make_finetune_optimizer(ft_cfg(weight_decay=wd, layer_decay=decay),
                                     optax.constant_schedule(lr), shapes, DEPTH)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  new = _flat(optax.apply_updates(params, updates))
  old = _flat(params)
  for k in old:
    scale = decay ** (DEPTH + 1 - LAYER_IDS[k])
    factor = 1 - lr * scale * wd if _expected_decay(tuple(k.split('/'))) else 1.0
    np.testing.assert_allclose(np.asarray(new[k]), np.asarray(old[k]) * factor, rtol=1e-6,
                               err_msg=k)


def test_finetune_clipping_and_default_b2():
  shapes = {'head': {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}}
  grads = {'head': {'dense': {'kernel': jnp.full((2, 2), 3.0), 'bias': jnp.array([4.0, 0.0])}}}
  cfg = ml_collections.ConfigDict(dict(b1=0.9, weight_decay=0.0, layer_decay=0.75,
                                       clip_grad_norm=1.0))  # no b2: 0.999
  tx = optim.make_finetune_optimizer(cfg, optax.constant_schedule(0.1), shapes, DEPTH)
  _, state = tx.update(grads, tx.init(shapes), shapes)
  mu = _first_moment(state)['head']['dense']
  nu = optax.tree_utils.tree_get(state, 'nu')['head']['dense']
  np.testing.assert_allclose(np.asarray(mu['kernel']), 0.1 * 3.0 / math.sqrt(52), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(nu['kernel']), 0.001 * 9.0 / 52, rtol=1e-5)


def _np_mae_lars(params, grads_list, lrs, wd, momentum=0.9, trust=0.001):
  """MAE's util/lars.py: decay + trust ratio on matrices only; mu = m mu + d; p -= lr mu."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  for grads, lr in zip(grads_list, lrs):
    for k in p:
      d = np.asarray(grads[k], np.float64)
      if p[k].ndim > 1:
        d = d + wd * p[k]
        pn, dn = np.linalg.norm(p[k]), np.linalg.norm(d)
        d = d * (trust * pn / dn if pn > 0 and dn > 0 else 1.0)
      mu[k] = momentum * mu[k] + d
      p[k] = p[k] - lr * mu[k]
  return p


def test_probe_optimizer_trains_head_only_as_mae_lars():
  shapes = classifier_shapes()
  params = np_params(shapes, seed=3)
  rng = np.random.default_rng(4)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(3)]
  lrs = [0.1, 0.2, 0.05]  # a changing lr: MAE scales the momentum buffer by today's lr
  sched = lambda step: jnp.asarray(lrs)[step]
  tx = optim.make_probe_optimizer(ml_collections.ConfigDict(dict(weight_decay=0.1)), sched)
  state = tx.init(params)
  # The frozen encoder keeps no optimizer state: only the head's momentum (+ step counts).
  head_size = sum(x.size for x in jax.tree.leaves(params['head']))
  assert head_size <= sum(x.size for x in jax.tree.leaves(state)) <= head_size + 4
  step = jax.jit(tx.update)
  p = params
  for g in grads:
    updates, state = step(g, state, p)
    p = optax.apply_updates(p, updates)
  for k, v in _flat(params['encoder']).items():
    np.testing.assert_array_equal(np.asarray(_flat(p['encoder'])[k]), np.asarray(v), err_msg=k)
  head = lambda t: {k: v for k, v in _flat(t['head']).items()}
  ref = _np_mae_lars(head(params), [head(g) for g in grads], lrs, wd=0.1)
  for k, v in head(p).items():
    assert np.abs(np.asarray(v) - np.asarray(head(params)[k])).max() > 1e-4, k
    np.testing.assert_allclose(np.asarray(v), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Default weight decay is 0.
  tx0 = optim.make_probe_optimizer(ml_collections.ConfigDict(), optax.constant_schedule(0.1))
  updates, _ = jax.jit(tx0.update)(grads[0], tx0.init(params), params)
  ref = _np_mae_lars(head(params), [head(grads[0])], [0.1], wd=0.0)
  for k, v in head(optax.apply_updates(params, updates)).items():
    np.testing.assert_allclose(np.asarray(v), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_ema_update():
  ema = {'a': jnp.array([1.0, 2.0]), 'b': {'c': jnp.array(4.0, jnp.bfloat16)}}
  params = {'a': jnp.array([3.0, -2.0]), 'b': {'c': jnp.array(0.0, jnp.bfloat16)}}
  out = jax.jit(optim.ema_update)(ema, params, 0.75)
  np.testing.assert_allclose(np.asarray(out['a']), [1.5, 1.0], rtol=1e-6)
  assert out['b']['c'].dtype == jnp.bfloat16 and float(out['b']['c']) == 3.0
  same = optim.ema_update(ema, params, 1.0)
  np.testing.assert_array_equal(np.asarray(same['a']), np.asarray(ema['a']))


def test_mu_dtype_bfloat16_keeps_the_first_moment_in_bf16():
  params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros((2,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
  moments = {}
  for mu_dtype in ('', 'bfloat16'):
    tx = optim.make_optimizer(optim_cfg(mu_dtype=mu_dtype), optax.constant_schedule(0.1))
    _, state = tx.update(grads, tx.init(params), params)
    (adam,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'mu'))
               if hasattr(s, 'mu')]
    moments[mu_dtype] = adam
  assert moments[''].mu['kernel'].dtype == jnp.float32
  assert moments['bfloat16'].mu['kernel'].dtype == jnp.bfloat16
  assert moments['bfloat16'].nu['kernel'].dtype == jnp.float32  # only mu shrinks
  # (1 - b1) * g = 0.025 after one step, in either dtype.
  np.testing.assert_allclose(np.asarray(moments['bfloat16'].mu['kernel'], np.float32), 0.025,
                             rtol=1e-2)


def test_probe_optimizer_reads_momentum_from_the_config():
  """optim.momentum = 0.5: two LARS steps (lr 5: the trust ratio makes the kernel's steps
  small) follow MAE's update with that momentum; 0.9, the default, moves every leaf further."""
  params = {'head': {'kernel': jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)) + 1.0,
                                           jnp.float32),
                     'bias': jnp.array([0.5, -0.5])},
            'encoder': {'kernel': jnp.ones((2, 2))}}
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(2)]
  tx = optim.make_probe_optimizer(ml_collections.ConfigDict(dict(momentum=0.5)),
                                  optax.constant_schedule(5.0))
  state, p = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  ref = _np_mae_lars(params['head'], [g['head'] for g in grads], [5.0, 5.0], wd=0.0, momentum=0.5)
  other = _np_mae_lars(params['head'], [g['head'] for g in grads], [5.0, 5.0], wd=0.0)
  for k in ref:
    np.testing.assert_allclose(np.asarray(p['head'][k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.abs(ref[k] - other[k]).max() > 1e-3


def test_epoch_counts_round_to_the_nearest_step():
  """0.57 epochs of 100 steps are 57 steps (the float product is 56.999...), 0.29 are 29; an
  epoch count shorter than half a step still trains one step."""
  cfg = optim_cfg(epochs=0.57, warmup_epochs=0.29)
  assert optim.schedule_steps(cfg, 10_000, 100) == (57, 29)
  assert optim.schedule_steps(optim_cfg(epochs=0.04, warmup_epochs=0.0), 1000, 100) == (1, 0)


def test_without_warmup_the_first_step_is_at_peak_lr():
  """A 1-step smoke run (its warmup rounds to 0) must take a real step, not an lr-0 one."""
  total, warmup = optim.schedule_steps(optim_cfg(), 1000, 100, total_steps_override=1)
  assert (total, warmup) == (1, 0)
  sched = optim.lr_schedule(2.0, 10, 0)
  assert float(sched(0)) == pytest.approx(2.0)
  assert float(sched(5)) == pytest.approx(1.0, rel=1e-5)  # cosine midpoint of 10 steps
