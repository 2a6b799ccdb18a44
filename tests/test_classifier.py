"""Tests for the classifier on a pre-trained encoder: param tree, heads, freezing, loading."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pr_mim_jax.models import classifier
from pr_mim_jax.models import mae
from pr_mim_jax.models import posemb
from pr_mim_jax.models import vit

IMAGE, PATCH, CLASSES = 16, 4, 5
SPEC = vit.VitSpec(32, 2, 2, PATCH)


def _images(seed=0, batch=4, size=IMAGE):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def _flat(tree):
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in _flat(tree).items()}


def mae_encoder_shapes(posemb_kind='sincos', scan_layers=False, image=IMAGE):
  model = mae.MaskedAutoencoder(SPEC, image, decoder_width=8, decoder_depth=1, decoder_heads=2,
                                posemb=posemb_kind, scan_layers=scan_layers)
  n = (image // PATCH) ** 2
  ids_vis, ids_dec = jnp.zeros((1, n // 4), jnp.int32), jnp.zeros((1, n - n // 4), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), _images(batch=1, size=image),
                             ids_vis, ids_dec)
  return nn.unbox(variables['params'])['encoder']


def _variables(model, seed=0, scale=0.3, size=IMAGE):
  """Variables with the model's tree, params drawn from NumPy (no compile)."""
  shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                   jax.random.key(0), _images(batch=1, size=size)))
  rng = np.random.default_rng(seed)
  out = dict(shapes, params=jax.tree.map(
      lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes['params']))
  if 'batch_stats' in shapes:
    out['batch_stats'] = {'head': {'bn': {'mean': jnp.zeros((SPEC.width,)),
                                          'var': jnp.ones((SPEC.width,))}}}
  return out


@pytest.mark.parametrize('posemb_kind', ['sincos', 'learned'])
@pytest.mark.parametrize('scan_layers', [False, True])
def test_encoder_tree_equals_mae_encoder(posemb_kind, scan_layers):
  for head in classifier.HEADS:
    model = classifier.Classifier(SPEC, IMAGE, CLASSES, posemb=posemb_kind, head=head,
                                  scan_layers=scan_layers)
    params = _variables(model)['params']
    assert set(params) == {'encoder', 'head'}
    assert _shapes(params['encoder']) == _shapes(mae_encoder_shapes(posemb_kind, scan_layers))
    assert _shapes(params['head']) == {'dense/kernel': (SPEC.width, CLASSES),
                                       'dense/bias': (CLASSES,)}


@pytest.mark.slow
@pytest.mark.parametrize('pool', ['gap', 'cls'])
def test_logits_are_head_of_pooled_encoder(pool):
  model = classifier.Classifier(SPEC, IMAGE, CLASSES, pool=pool)
  params = _variables(model, seed=1)['params']
  images = _images(seed=2)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, images)
  assert logits.shape == (4, CLASSES) and logits.dtype == jnp.float32
  encoder = vit.Encoder(SPEC, IMAGE)
  encode = jax.jit(lambda p, x: encoder.apply({'params': p}, x, pool=pool))
  feats = encode(params['encoder'], images)
  dense = params['head']['dense']
  ref = np.asarray(feats, np.float64) @ np.asarray(dense['kernel']) + np.asarray(dense['bias'])
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def test_bf16_compute_gives_float32_logits():
  model = classifier.Classifier(SPEC, IMAGE, CLASSES, dtype=jnp.bfloat16)
  variables = _variables(model)
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.float32)}
  logits = jax.eval_shape(lambda v: model.apply(v, _images(), train=False), variables)
  assert logits.dtype == jnp.float32


@pytest.mark.slow
def test_head_inits():
  images = _images(batch=1)
  for head, std in (('linear', 2e-5), ('batchnorm_linear', 0.01)):
    model = classifier.Classifier(vit.VitSpec(32, 1, 2, PATCH), IMAGE, 1000, head=head)
    variables = nn.unbox(jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), images))
    kernel = np.asarray(variables['params']['head']['dense']['kernel'])  # 32000 draws
    assert abs(kernel.std() / std - 1) < 0.03, (head, kernel.std())
    assert np.abs(kernel).max() <= 2 * std / 0.8796 * 1.0001  # truncated at 2 std (untruncated)
    np.testing.assert_array_equal(np.asarray(variables['params']['head']['dense']['bias']), 0.0)


@pytest.mark.slow
def test_frozen_encoder_gets_exactly_zero_gradient():
  images = _images(seed=3)
  labels = jnp.arange(4) % CLASSES

  def grads(freeze):
    model = classifier.Classifier(SPEC, IMAGE, CLASSES, head='batchnorm_linear',
                                  freeze_encoder=freeze, drop_path=0.2)
    variables = _variables(model, seed=4)

    def loss(params):
      logits, _ = model.apply(dict(variables, params=params), images, train=True,
                              rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return jax.jit(jax.grad(loss))(variables['params'])

  frozen = grads(True)
  for path, g in _flat(frozen['encoder']).items():
    np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=path)
  for path, g in _flat(frozen['head']).items():
    assert np.abs(np.asarray(g)).max() > 0, path
  trained = grads(False)
  assert np.abs(np.asarray(trained['encoder']['patch_embed_kernel'])).max() > 0


def test_batchnorm_head_running_stats():
  model = classifier.Classifier(SPEC, IMAGE, CLASSES, head='batchnorm_linear',
                                freeze_encoder=True)
  variables = _variables(model, seed=5)
  images = _images(seed=6, batch=8)
  feats = np.asarray(jax.jit(lambda p, x: vit.Encoder(SPEC, IMAGE).apply(
      {'params': p}, x, pool='gap'))(variables['params']['encoder'], images), np.float64)
  dense = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params']['head']['dense'])

  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = train(variables, images)
  mean, var = feats.mean(0), feats.var(0)
  # Training normalizes by the batch's statistics ...
  ref = (feats - mean) / np.sqrt(var + 1e-6) @ dense['kernel'] + dense['bias']
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)
  # ... and moves the running ones by 0.1 towards them (torch momentum 0.1; the variance is
  # the biased one, where torch would track var * B / (B - 1)).
  stats = updates['batch_stats']['head']['bn']
  np.testing.assert_allclose(np.asarray(stats['mean']), 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats['var']), 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
  # Eval uses the running statistics and updates nothing.
  variables = dict(variables, batch_stats=updates['batch_stats'])
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  ref = ((feats - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-6) @ dense['kernel']
         + dense['bias'])
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)


def test_drop_path_only_in_training():
  model = classifier.Classifier(SPEC, IMAGE, CLASSES, drop_path=0.5, pool='cls')
  params = _variables(model, seed=7)['params']
  images = jnp.broadcast_to(_images(seed=8, batch=1), (16, IMAGE, IMAGE, 3))
  run = jax.jit(lambda p, x, train: model.apply({'params': p}, x, train=train,
                                                rngs={'dropout': jax.random.key(1)}),
                static_argnums=2)
  # Evaluation: the same logits for every copy, to float32 rounding (with jax 0.7.1 on an AMD
  # EPYC, XLA's CPU kernels gave some rows 1 ulp apart).
  evals = np.asarray(run(params, images, False))
  np.testing.assert_allclose(evals, np.broadcast_to(evals[:1], evals.shape), rtol=1e-6,
                             atol=1e-6)
  # Training drops whole residual branches per example: copies differ far beyond rounding.
  trains = np.asarray(run(params, images, True))
  assert np.ptp(trains, axis=0).max() > 0.05


def test_from_config():
  cfg = ml_collections.ConfigDict(dict(
      model=dict(variant='Ti/4', image_size=16, width=32, depth=2, heads=4, posemb='learned',
                 compute_dtype='bfloat16', remat='full', scan_layers=True, drop_path=0.1),
      head=dict(pool='cls', kind='batchnorm_linear', freeze_encoder=True)))
  model = classifier.from_config(cfg, num_classes=7)
  assert model.spec == vit.VitSpec(32, 2, 4, 4)
  assert (model.image_size, model.num_classes, model.posemb) == (16, 7, 'learned')
  assert jnp.dtype(model.dtype) == jnp.bfloat16
  assert (model.pool, model.head, model.freeze_encoder) == ('cls', 'batchnorm_linear', True)
  assert (model.drop_path, model.remat, model.scan_layers) == (0.1, 'full', True)
  cfg.model.width = cfg.model.depth = cfg.model.heads = 0  # 0: from the variant
  assert classifier.from_config(cfg, 7).spec == vit.VitSpec(192, 12, 3, 4)


# ----------------------------------------------------------------------------------------
# load_encoder

def _pretrained(posemb_kind='sincos', scan_layers=False, image=IMAGE, seed=10):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                      mae_encoder_shapes(posemb_kind, scan_layers, image))


@pytest.mark.parametrize('source_scanned,target_scanned',
                         [(False, False), (False, True), (True, False), (True, True)])
def test_load_encoder_copies_every_leaf_across_layouts(source_scanned, target_scanned):
  pretrained = _pretrained('learned', source_scanned)
  model = classifier.Classifier(SPEC, IMAGE, CLASSES, posemb='learned', scan_layers=target_scanned)
  params = _variables(model)['params']
  loaded = classifier.load_encoder(params, pretrained)
  assert _shapes(loaded) == _shapes(params)
  want = _flat(pretrained if source_scanned == target_scanned else
               (vit.scan_params(pretrained) if target_scanned else vit.unscan_params(pretrained)))
  got = _flat(loaded['encoder'])
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  assert loaded['head'] is params['head']
  # Block i of the unrolled layout is row i of the scanned one.
  unrolled = loaded['encoder'] if not target_scanned else vit.unscan_params(loaded['encoder'])
  source = pretrained if not source_scanned else vit.unscan_params(pretrained)
  np.testing.assert_array_equal(np.asarray(unrolled['block1']['mlp']['fc1']['kernel']),
                                np.asarray(source['block1']['mlp']['fc1']['kernel']))


def test_load_encoder_resizes_learned_posemb():
  pretrained = _pretrained('learned', image=IMAGE)  # 4 x 4 grid
  model = classifier.Classifier(SPEC, 24, CLASSES, posemb='learned')  # 6 x 6 grid
  params = _variables(model, size=24)['params']
  loaded = classifier.load_encoder(params, pretrained)
  table = np.asarray(loaded['encoder']['pos_embedding'])
  assert table.shape == (37, SPEC.width)
  np.testing.assert_array_equal(table, np.asarray(posemb.resize_learned(
      pretrained['pos_embedding'], 6)))
  np.testing.assert_array_equal(table[0], np.asarray(pretrained['pos_embedding'][0]))
  # The model runs at the new resolution.
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      loaded, _images(batch=2, size=24))
  assert logits.shape == (2, CLASSES)
  # Sin-cos: nothing to resize, the same params load at any resolution.
  sincos = classifier.Classifier(SPEC, 24, CLASSES)
  loaded = classifier.load_encoder(_variables(sincos, size=24)['params'], _pretrained())
  np.testing.assert_array_equal(np.asarray(loaded['encoder']['cls_token']),
                                np.asarray(_pretrained()['cls_token']))


def test_load_encoder_accepts_abstract_target():
  model = classifier.Classifier(SPEC, IMAGE, CLASSES)
  abstract = nn.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                     jax.random.key(0), _images(batch=1)))['params']
  params = _variables(model)['params']
  loaded = classifier.load_encoder(dict(abstract, head=params['head']), _pretrained())
  assert _shapes(loaded) == _shapes(params)


def test_load_encoder_errors_on_mismatch():
  model = classifier.Classifier(SPEC, IMAGE, CLASSES)  # sincos: no pos_embedding
  params = _variables(model)['params']
  with pytest.raises(ValueError, match=r'unexpected: \[\'pos_embedding\'\]'):
    classifier.load_encoder(params, _pretrained('learned'))
  learned = _variables(classifier.Classifier(SPEC, IMAGE, CLASSES, posemb='learned'))['params']
  with pytest.raises(ValueError, match=r'missing: \[\'pos_embedding\'\]'):
    classifier.load_encoder(learned, _pretrained('sincos'))
  pretrained = _pretrained()
  pretrained['norm'] = dict(pretrained['norm'], scale=jnp.ones((SPEC.width + 1,)))
  with pytest.raises(ValueError, match=r'norm/scale: pretrained \(33,\) vs model \(32,\)'):
    classifier.load_encoder(params, pretrained)
  deeper = vit.VitSpec(SPEC.width, 3, SPEC.heads, PATCH)
  params3 = _variables(classifier.Classifier(deeper, IMAGE, CLASSES))['params']
  with pytest.raises(ValueError, match='missing: .*block2/attn/proj/bias'):
    classifier.load_encoder(params3, pretrained)


@pytest.mark.parametrize('offset,spread', [(1e4, 1.0), (0.0, 1e-3)])
def test_batchnorm_head_normalizes_exactly(offset, spread):
  """The probe's BatchNorm against float64 NumPy on features far from zero mean (where
  E[x^2] - E[x]^2 in float32 loses the variance) and on features with a variance near
  eps (where 1e-6 vs 1e-5 matters)."""
  head = classifier.Head(3, 'batchnorm_linear')
  rng = np.random.default_rng(11)
  feats = (offset + spread * rng.normal(size=(16, 8))).astype(np.float32)
  shapes = nn.unbox(jax.eval_shape(functools.partial(head.init, train=False),
                                   jax.random.key(0), feats))
  dense = {'kernel': rng.normal(size=(8, 3)).astype(np.float32), 'bias': np.zeros(3, np.float32)}
  variables = {'params': {'dense': dense},
               'batch_stats': {'bn': {'mean': np.zeros(8, np.float32), 'var': np.ones(8, np.float32)}}}
  assert jax.tree.structure(variables) == jax.tree.structure(shapes)
  logits, _ = jax.jit(lambda v, f: head.apply(v, f, train=True, mutable=['batch_stats']))(
      variables, feats)
  f = feats.astype(np.float64)
  normed = (f - f.mean(0)) / np.sqrt(((f - f.mean(0)) ** 2).mean(0) + 1e-6)
  np.testing.assert_allclose(np.asarray(logits), normed @ dense['kernel'], rtol=1e-2, atol=2e-2)


def test_frozen_encoder_is_deterministic_while_training():
  """freeze_encoder runs the encoder without drop path even when the head trains."""
  model = classifier.Classifier(SPEC, IMAGE, CLASSES, drop_path=0.5, pool='cls',
                                freeze_encoder=True)
  params = _variables(model, seed=12)['params']
  images = jnp.broadcast_to(_images(seed=13, batch=1), (16, IMAGE, IMAGE, 3))
  run = jax.jit(lambda p, x, train: model.apply({'params': p}, x, train=train,
                                                rngs={'dropout': jax.random.key(1)}),
                static_argnums=2)
  np.testing.assert_allclose(np.asarray(run(params, images, True)),
                             np.asarray(run(params, images, False)), rtol=1e-6, atol=1e-6)
