"""Tests for targets + losses against a NumPy re-implementation of MAE's forward_loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pr_mim_jax import patch_tokens
from pr_mim_jax.method import losses
from pr_mim_jax.method import masking
from pr_mim_jax.method import targets
from pr_mim_jax.models import mae
from pr_mim_jax.models import vit
from pr_mim_jax.training import optim
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training.train_state import TrainState


def mae_patchify_nchw(imgs, p):
  """MAE's patchify: [N, 3, H, W] -> [N, h*w, p*p*3]."""
  n, c, hh, ww = imgs.shape
  h, w = hh // p, ww // p
  x = imgs.reshape(n, c, h, p, w, p)
  x = np.einsum('nchpwq->nhwpqc', x)
  return x.reshape(n, h * w, p * p * c)


def mae_forward_loss(imgs_nchw, pred, mask, p, norm_pix_loss):
  """MAE's forward_loss in NumPy (float64); pred covers all L patches, mask = 1 on masked."""
  target = mae_patchify_nchw(imgs_nchw.astype(np.float64), p)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)  # torch default: unbiased
    target = (target - mean) / (var + 1e-6) ** .5
  loss = ((pred.astype(np.float64) - target) ** 2).mean(axis=-1)
  return (loss * mask).sum() / mask.sum()


@pytest.mark.slow
@pytest.mark.parametrize('target,norm', [('pixel', False), ('norm_pixel', True)])
@pytest.mark.parametrize('seed', [0, 1])
def test_pipeline_loss_matches_mae_forward_loss(target, norm, seed):
  batch, size, p = 3, 16, 4
  length = (size // p) ** 2
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32) * 2.0 + 0.5
  split = masking.token_split(length, 0.75, 0.0)
  masks = masking.random_masks(jax.random.key(seed), batch, split)
  ids_dec = np.asarray(masks.ids_dec)
  pred_dec = rng.normal(size=(batch, split.n_dec, p * p * 3)).astype(np.float32)

  # Our pipeline: targets for all patches, gathered at ids_dec, plain mean over them.
  tgt = targets.patch_targets(jnp.asarray(images), p, target)
  tgt = jnp.take_along_axis(tgt, jnp.asarray(ids_dec)[..., None], axis=1)
  ours = float(losses.patch_mse(jnp.asarray(pred_dec), tgt))

  # Reference: pred scattered back to all L patches (visible ones hold junk that the
  # mask must zero out), mask = 1 at every masked patch.
  pred_full = rng.normal(size=(batch, length, p * p * 3)) * 100.0
  mask = np.zeros((batch, length))
  for b in range(batch):
    pred_full[b, ids_dec[b]] = pred_dec[b]
    mask[b, ids_dec[b]] = 1.0
  assert mask.sum() == batch * split.n_dec
  ref = mae_forward_loss(images.transpose(0, 3, 1, 2), pred_full, mask, p, norm)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_norm_pixel_targets_match_numpy_per_patch():
  rng = np.random.default_rng(3)
  images = rng.uniform(0, 255, size=(2, 8, 8, 3)).astype(np.float32)
  out = np.asarray(targets.patch_targets(jnp.asarray(images), 4, 'norm_pixel'))
  # Hand-rolled per patch: patch (gy, gx) of image b is images[b, 4gy:4gy+4, 4gx:4gx+4].
  for b in range(2):
    for gy in range(2):
      for gx in range(2):
        vals = images[b, 4 * gy:4 * gy + 4, 4 * gx:4 * gx + 4].astype(np.float64).ravel()
        n = vals.size
        mean = vals.sum() / n
        var = ((vals - mean) ** 2).sum() / (n - 1)
        expected = (vals - mean) / np.sqrt(var + 1e-6)
        np.testing.assert_allclose(out[b, 2 * gy + gx], expected, rtol=1e-4, atol=1e-5)


def test_norm_pixel_constant_patch_is_finite_zero():
  images = jnp.full((1, 4, 4, 3), 7.0)
  out = np.asarray(targets.patch_targets(images, 4, 'norm_pixel'))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_pixel_targets_are_float32_patches():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.uint8).reshape(2, 4, 4, 3)
  out = targets.patch_targets(images, 2, 'pixel')
  assert out.dtype == jnp.float32 and out.shape == (2, 4, 12)
  expected = mae_patchify_nchw(np.asarray(images, np.float32).transpose(0, 3, 1, 2), 2)
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_unknown_target_raises():
  with pytest.raises(ValueError, match='bogus'):
    targets.patch_targets(jnp.zeros((1, 4, 4, 3)), 2, 'bogus')


@pytest.mark.parametrize('size,p', [(16, 4), (12, 3), (8, 8)])
def test_patchify_matches_mae_nchw_and_roundtrips(size, p):
  rng = np.random.default_rng(size + p)
  images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  patches = np.asarray(patch_tokens.patchify(jnp.asarray(images), p))
  np.testing.assert_array_equal(patches, mae_patchify_nchw(images.transpose(0, 3, 1, 2), p))
  back = np.asarray(patch_tokens.unpatchify(jnp.asarray(patches), p))
  np.testing.assert_array_equal(back, images)


def test_patchify_hand_case():
  # 1 image, 2x2 pixels, 1 px patches: patch l is pixel (l // 2, l % 2), channels last.
  images = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
  patches = np.asarray(patch_tokens.patchify(jnp.asarray(images), 1))
  np.testing.assert_array_equal(patches[0], [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
  # 4x4 image, 2 px patches, one channel value = 10*row + col: check patch 1 (top right).
  img = (10 * np.arange(4)[:, None] + np.arange(4)[None]).astype(np.float32)
  images = np.repeat(img[None, :, :, None], 3, axis=-1)
  patches = np.asarray(patch_tokens.patchify(jnp.asarray(images), 2))
  np.testing.assert_array_equal(patches[0, 1].reshape(2, 2, 3)[..., 0], [[2, 3], [12, 13]])
  np.testing.assert_array_equal(patches[0, 2].reshape(2, 2, 3)[..., 0], [[20, 21], [30, 31]])


def test_reconstruction_loss_weighs_thrown_tokens_by_hand():
  # B=1. Decoded: 2 patches, P=2, per-patch MSE [(1+1)/2, (4+0)/2] = [1, 2], mean 1.5.
  # Thrown: 1 patch, per-patch MSE (9+9)/2 = 9.
  pred_dec, pred_throw = jnp.array([[[1.0, 1.0], [2.0, 0.0]]]), jnp.array([[[3.0, -3.0]]])
  zeros = jnp.zeros_like
  loss, parts = losses.reconstruction_loss(pred_dec, zeros(pred_dec))
  assert float(loss) == pytest.approx(1.5) and set(parts) == {'loss_decoded'}
  for weight, want in [(1.0, (1 + 2 + 9) / 3), (0.5, (1 + 2 + 0.5 * 9) / 2.5), (0.0, 1.5)]:
    loss, parts = losses.reconstruction_loss(pred_dec, zeros(pred_dec), pred_throw,
                                             zeros(pred_throw), thrown_weight=weight)
    assert float(loss) == pytest.approx(want), weight
    assert float(parts['loss_decoded']) == pytest.approx(1.5)
    assert float(parts['loss_thrown']) == pytest.approx(9.0)


def test_patch_mse_2x2_batch():
  # B=2, K=2, P=1: squared errors [[1, 4], [9, 16]] -> mean 7.5.
  pred = jnp.array([[[1.0], [2.0]], [[3.0], [4.0]]])
  assert float(losses.patch_mse(pred, jnp.zeros((2, 2, 1)))) == pytest.approx(7.5)


def test_patch_mse_bf16_pred_is_float32_loss():
  pred = jnp.full((1, 2, 3), 1.5, jnp.bfloat16)
  loss = losses.patch_mse(pred, jnp.zeros((1, 2, 3), jnp.float32))
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(2.25)


def test_patch_mse_gradient():
  # d/dpred mean((pred - t)^2) = 2 (pred - t) / (B*K*P).
  pred = jnp.array([[[1.0, -2.0], [0.5, 3.0]]])
  target = jnp.array([[[0.0, 0.0], [1.0, 1.0]]])
  g = jax.grad(losses.patch_mse)(pred, target)
  np.testing.assert_allclose(np.asarray(g), 2 * (np.asarray(pred) - np.asarray(target)) / 4,
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------
# The training step on a tiny model.

def _tiny_setup(lr=1e-3):
  model = mae.MaskedAutoencoder(vit.VitSpec(16, 1, 2, 4), 16, decoder_width=8,
                                decoder_depth=1, decoder_heads=2)
  split = masking.token_split(16, 0.75, 0.25)  # 4 visible, 8 decoded, 4 thrown
  cfg = ml_collections.ConfigDict(dict(base_lr=lr, weight_decay=0.05, b1=0.9, b2=0.95,
                                       epochs=1.0, warmup_epochs=0.0, clip_grad_norm=0.0))
  schedule = optax.constant_schedule(lr)
  tx = optim.make_optimizer(cfg, schedule)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)

  # Params from NumPy (xavier-like scale): cheaper than compiling the model's initialisers.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images[:1],
                                   jnp.zeros((1, split.n_vis), jnp.int32),
                                   jnp.zeros((1, split.n_dec), jnp.int32))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape) * (0.02 if x.ndim < 2 else 1 / np.sqrt(x.shape[0])),
      jnp.float32), shapes)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=jax.jit(tx.init)(params),
                     rng=jax.random.key_data(jax.random.key(1)))

  task = train_step_lib.Task(split=split, grid=4, patch=4, target='norm_pixel')
  step_fn = jax.jit(lambda s, b: train_step_lib.train_step(
      s, b, model=model, tx=tx, task=task, schedule=schedule))
  return model, task, state, step_fn, images, train_step_lib


@pytest.mark.slow
def test_loss_fn_matches_mae_reference_and_train_step_learns():
  model, task, state, step_fn, images, ts = _tiny_setup(lr=3e-3)
  masks = ts.step_masks(state.rng, 0, 2, task)
  # Masks are a pure function of (rng, step), and change with the step.
  again = ts.step_masks(state.rng, 0, 2, task)
  np.testing.assert_array_equal(np.asarray(masks.ids_vis), np.asarray(again.ids_vis))
  other = ts.step_masks(state.rng, 1, 2, task)
  assert not np.array_equal(np.asarray(masks.ids_restore), np.asarray(other.ids_restore))
  assert masks.ids_dec.shape == (2, 8) and masks.ids_throw.shape == (2, 4)

  loss, (preds, _) = jax.jit(lambda p: ts.loss_fn(p, model, images, masks, task))(state.params)
  pred = preds.dec
  assert pred.shape == (2, 8, 48) and preds.throw is None
  # Reference: MAE's loss with mask = 1 on decoded patches only (thrown ones are ignored).
  ids_dec = np.asarray(masks.ids_dec)
  pred_full = np.zeros((2, 16, 48))
  mask = np.zeros((2, 16))
  for b in range(2):
    pred_full[b, ids_dec[b]] = np.asarray(pred[b])
    mask[b, ids_dec[b]] = 1.0
  ref = mae_forward_loss(np.asarray(images).transpose(0, 3, 1, 2), pred_full, mask, 4, True)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)

  new_state, metrics = step_fn(state, {'image': images})
  assert int(new_state.step) == 1
  np.testing.assert_allclose(float(metrics['loss']), ref, rtol=1e-5)  # step 0 uses those masks
  assert float(metrics['lr']) == pytest.approx(3e-3)
  assert float(metrics['grad_norm']) > 0
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, new_state.params)
  assert all(jax.tree.leaves(changed))
  # A few more steps on the same images lower the loss (new masks every step, so compare
  # averages over a window).
  losses_seen = [float(metrics['loss'])]
  s = new_state
  for _ in range(29):
    s, m = step_fn(s, {'image': images})
    losses_seen.append(float(m['loss']))
  assert int(s.step) == 30
  assert np.all(np.isfinite(losses_seen))
  assert np.mean(losses_seen[-5:]) < np.mean(losses_seen[:5])


@pytest.mark.slow
@pytest.mark.parametrize('progressive', [False, True])
def test_every_masked_token_scores_all_masked_patches_equally(progressive):
  """The study's metric: each masked patch once, weight 1, whatever the training weights."""
  model = mae.MaskedAutoencoder(vit.VitSpec(16, 1, 2, 4), 16, decoder_width=8, decoder_depth=1,
                                decoder_heads=2, aggregator_heads=2, key_width=8,
                                thrown_reconstruction='progressive' if progressive else 'none')
  split = masking.token_split(16, 0.75, 0.25)  # 4 visible, 8 decoded, 4 thrown
  task = train_step_lib.Task(split=split, grid=4, patch=4, target='pixel',
                             reconstruct_thrown=progressive, thrown_loss_weight=0.3)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  masks = train_step_lib.step_masks(jax.random.key_data(jax.random.key(1)), 0, 2, task)
  params = jax.jit(model.init)(jax.random.key(0), images, masks.ids_vis, masks.ids_dec,
                              masks.ids_throw if progressive else None)['params']
  loss, (preds, _) = train_step_lib.loss_fn(params, model, images, masks, task,
                                            every_masked_token=True)
  pred = np.concatenate([preds.dec] + ([preds.throw] if progressive else []), axis=1)
  ids = np.concatenate([masks.ids_dec, masks.ids_throw], axis=1) if progressive else masks.ids_mask
  assert pred.shape[1] == 12 and sorted(np.asarray(ids)[0]) == sorted(np.asarray(masks.ids_mask)[0])
  patches = np.asarray(patch_tokens.patchify(images, 4), np.float64)  # the 'pixel' target
  want = np.mean([(pred[b] - patches[b, np.asarray(ids)[b]]) ** 2 for b in range(2)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
