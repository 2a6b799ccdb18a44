"""Tests for the ViT encoder, sin-cos position embeddings and the masked autoencoder."""

import functools

import flax
import flax.linen as nn
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from pr_mim_jax.method import masking
from pr_mim_jax.models import mae
from pr_mim_jax.models import posemb
from pr_mim_jax.models import vit

IMAGE, PATCH = 16, 4
L = (IMAGE // PATCH) ** 2  # 16 patches
SPEC = vit.VitSpec(width=16, depth=2, heads=2, patch=PATCH)


def tiny_mae(posemb_kind='sincos', dtype=jnp.float32):
  return mae.MaskedAutoencoder(SPEC, IMAGE, decoder_width=8, decoder_depth=2, decoder_heads=2,
                               posemb=posemb_kind, dtype=dtype)


# Inputs and params come from NumPy and every apply is jitted with the same shapes:
# eager op-by-op execution compiles each primitive separately and is much slower.

def _images(seed=0, batch=2):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, IMAGE, IMAGE, 3)),
                     jnp.float32)


def _masks(seed=0, batch=2, mask_ratio=0.75):
  """(ids_vis, ids_dec) as int32 arrays: a uniformly random split per example."""
  split = masking.token_split(L, mask_ratio)
  rng = np.random.default_rng(seed + 1000)
  perm = np.stack([rng.permutation(L) for _ in range(batch)]).astype(np.int32)
  return jnp.asarray(perm[:, :split.n_vis]), jnp.asarray(perm[:, split.n_vis:])


def _np_params(module, *args, seed=0, scale=0.3):
  """Params with the module's tree and shapes, drawn from NumPy (no compile)."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def _init(model, seed=0):
  ids_vis, ids_dec = _masks()
  return _np_params(model, _images(), ids_vis, ids_dec, seed=seed)


@functools.lru_cache(maxsize=None)
def _fns(posemb_kind='sincos', dtype=jnp.float32):
  """Jitted (forward, encode) of the tiny model."""
  model = tiny_mae(posemb_kind, dtype)
  forward = jax.jit(lambda p, x, v, d: model.apply({'params': p}, x, v, d).dec)
  encode = jax.jit(lambda p, x, k: model.apply({'params': p}, x, k, method=model.encode))
  return forward, encode


def _flat(params):
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


# ----------------------------------------------------------------------------------------
# Independent NumPy references.

def np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_attention(x, p):
  # qkv kernel [D, 3, H, hd] is timm's fused [3*D, D] weight, transposed.
  d = x.shape[-1]
  kernel = np.asarray(p['qkv']['kernel'], np.float64).reshape(d, -1)
  bias = np.asarray(p['qkv']['bias'], np.float64).reshape(-1)
  three, heads, hd = p['qkv']['kernel'].shape[1:]
  b, n, _ = x.shape
  qkv = (x @ kernel + bias).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # [3,B,H,N,hd]
  q, k, v = qkv
  attn = np_softmax(q @ k.transpose(0, 1, 3, 2) * hd ** -0.5)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, heads * hd)
  proj = np.asarray(p['proj']['kernel'], np.float64).reshape(heads * hd, d)
  return out @ proj + np.asarray(p['proj']['bias'])


def np_mlp(x, p):
  h = np_gelu(x @ np.asarray(p['fc1']['kernel'], np.float64) + p['fc1']['bias'])
  return h @ np.asarray(p['fc2']['kernel'], np.float64) + p['fc2']['bias']


def np_block(x, p):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = x + np_attention(np_layer_norm(x, p['norm1']), p['attn'])
  return x + np_mlp(np_layer_norm(x, p['norm2']), p['mlp'])


def mae_1d_sincos(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d_sincos(embed_dim, grid_size, cls_token=False):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # w goes first (default 'xy' indexing)
  grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
  emb_h = mae_1d_sincos(embed_dim // 2, grid[0])
  emb_w = mae_1d_sincos(embed_dim // 2, grid[1])
  emb = np.concatenate([emb_h, emb_w], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


def np_patchify(images, p):
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c))
  for i in range(h // p):
    for j in range(w // p):
      out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
  return out


def np_encoder(params, images, ids_keep, posemb_kind='sincos', final_norm=True):
  """MAE's forward_encoder: embed all patches, add posemb, keep a subset, prepend cls."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d, pp = SPEC.width, SPEC.patch
  x = np_patchify(np.asarray(images, np.float64), pp) @ p['patch_embed_kernel'].reshape(-1, d)
  x = x + p['patch_embed_bias']
  table = (mae_2d_sincos(d, IMAGE // pp, cls_token=True) if posemb_kind == 'sincos'
           else p['pos_embedding'])
  x = x + table[1:][None]
  x = np.stack([x[b, ids_keep[b]] for b in range(x.shape[0])])
  cls = p['cls_token'] + table[:1][None]
  x = np.concatenate([np.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
  for i in range(SPEC.depth):
    x = np_block(x, params[f'block{i}'])
  return np_layer_norm(x, p['norm']) if final_norm else x


def np_decoder(params, latent, ids_vis, ids_dec, dw=8, depth=2):
  """MAE's forward_decoder: append mask tokens, unshuffle to all L, add posemb, blocks."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b = latent.shape[0]
  x = latent @ p['decoder_embed']['kernel'] + p['decoder_embed']['bias']  # [B, 1+n_vis, dw]
  full = np.zeros((b, L, dw))
  for i in range(b):
    full[i, :] = p['mask_token'][0, 0]  # every non-visible patch gets the mask token
    full[i, ids_vis[i]] = x[i, 1:]
  x = np.concatenate([x[:, :1], full], axis=1) + mae_2d_sincos(dw, IMAGE // PATCH, True)[None]
  for i in range(depth):
    x = np_block(x, params[f'decoder_block{i}'])
  x = np_layer_norm(x, p['decoder_norm'])
  x = x @ p['decoder_pred']['kernel'] + p['decoder_pred']['bias']
  x = x[:, 1:]
  return np.stack([x[i, ids_dec[i]] for i in range(b)])


# ----------------------------------------------------------------------------------------

def test_parse_variant():
  assert vit.parse_variant('B/16') == vit.VitSpec(768, 12, 12, 16)
  assert vit.parse_variant('Ti/4') == vit.VitSpec(192, 12, 3, 4)
  assert vit.parse_variant('L/14') == vit.VitSpec(1024, 24, 16, 14)
  assert vit.parse_variant('H/14') == vit.VitSpec(1280, 32, 16, 14)
  assert vit.parse_variant('S/8') == vit.VitSpec(384, 12, 6, 8)
  for bad in ('X/16', 'B', 'B/', 'B/0', 'B/x', '/16', 'b/16'):
    with pytest.raises(ValueError):
      vit.parse_variant(bad)


@pytest.mark.slow
def test_output_shapes_and_dtypes():
  params = _init(tiny_mae())
  forward, encode = _fns()
  ids_vis, ids_dec = _masks()
  pred = forward(params, _images(), ids_vis, ids_dec)
  assert pred.shape == (2, 12, PATCH * PATCH * 3) and pred.dtype == jnp.float32
  latent = encode(params, _images(), ids_vis)
  assert latent.shape == (2, 1 + 4, SPEC.width) and latent.dtype == jnp.float32
  full = encode(params, _images(), None)
  assert full.shape == (2, 1 + L, SPEC.width)


def test_forward_matches_numpy_mae():
  """Encoder + decoder equal MAE's forward (decoder over ALL tokens, unshuffled)."""
  params = _init(tiny_mae(), seed=1)
  forward, encode = _fns()
  images, (ids_vis, ids_dec) = _images(seed=2), _masks(seed=3)
  latent = encode(params, images, ids_vis)
  ref_latent = np_encoder(params['encoder'], images, np.asarray(ids_vis))
  np.testing.assert_allclose(np.asarray(latent), ref_latent, rtol=2e-4, atol=2e-4)
  pred = forward(params, images, ids_vis, ids_dec)
  ref_pred = np_decoder(params, ref_latent, np.asarray(ids_vis), np.asarray(ids_dec))
  np.testing.assert_allclose(np.asarray(pred), ref_pred, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_learned_posemb_encoder_matches_numpy():
  params = _init(tiny_mae('learned'), seed=4)
  _, encode = _fns('learned')
  images, (ids_vis, _) = _images(seed=5), _masks(seed=6)
  latent = encode(params, images, ids_vis)
  ref = np_encoder(params['encoder'], images, np.asarray(ids_vis), posemb_kind='learned')
  np.testing.assert_allclose(np.asarray(latent), ref, rtol=2e-4, atol=2e-4)
  # All patches in order (ids_keep=None).
  full = encode(params, images, None)
  ref = np_encoder(params['encoder'], images, np.tile(np.arange(L), (2, 1)), 'learned')
  np.testing.assert_allclose(np.asarray(full), ref, rtol=2e-4, atol=2e-4)


def test_sincos_posemb_is_not_a_param_and_learned_adds_one():
  shapes = {}
  for kind in ('sincos', 'learned'):
    model = tiny_mae(kind)
    ids_vis, ids_dec = _masks()
    variables = jax.eval_shape(model.init, jax.random.key(0), _images(), ids_vis, ids_dec)
    shapes[kind] = {k: v.shape for k, v in _flat(nn.unbox(variables['params'])).items()}
  sincos, learned = shapes['sincos'], shapes['learned']
  assert not [k for k in sincos if 'pos' in k.split('/')[-1].lower()]
  extra = set(learned) - set(sincos)
  assert extra == {'encoder/pos_embedding'}
  assert learned['encoder/pos_embedding'] == (1 + L, SPEC.width)
  assert set(sincos) <= set(learned)


@pytest.mark.parametrize('dim,grid', [(16, 4), (8, 3), (768, 14), (512, 14)])
def test_sincos_2d_matches_mae(dim, grid):
  ours = posemb.sincos_2d(dim, grid, cls_token=True)
  ref = mae_2d_sincos(dim, grid, cls_token=True)
  assert ours.shape == (1 + grid * grid, dim) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(ours[0], 0.0)
  no_cls = posemb.sincos_2d(dim, grid, cls_token=False)
  np.testing.assert_allclose(no_cls, ref[1:], rtol=1e-6, atol=1e-6)


def test_sincos_2d_hand_case():
  # dim 4, grid 2: each 1-D half has one frequency (omega = 1): [sin(x), cos(x)].
  # Row-major patch order (0,0), (0,1), (1,0), (1,1); first half = column, second = row.
  ours = posemb.sincos_2d(4, 2, cls_token=False)
  s, c = np.sin(1.0), np.cos(1.0)
  expected = np.array([[0, 1, 0, 1], [s, c, 0, 1], [0, 1, s, c], [s, c, s, c]], np.float32)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)


def test_sincos_2d_rejects_bad_width():
  with pytest.raises(ValueError):
    posemb.sincos_2d(6, 2)


def test_vit_b16_param_count_matches_timm():
  spec = vit.parse_variant('B/16')
  assert (spec.width, spec.depth, spec.heads) == (768, 12, 12)
  encoder = vit.Encoder(spec, 224)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(variables['params'])))
  # timm vit_base_patch16_224 without head: 85,798,656, of which pos_embed is 197 x 768.
  assert count == 85_798_656 - 197 * 768
  learned = vit.Encoder(spec, 224, posemb='learned')
  variables = jax.eval_shape(learned.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(variables['params'])))
  assert count == 85_798_656


def test_default_decoder_is_mae():
  model = mae.MaskedAutoencoder(vit.parse_variant('B/16'), 224)
  assert (model.decoder_width, model.decoder_depth, model.decoder_heads) == (512, 8, 16)
  split = masking.token_split(196, 0.75)
  ids_vis = jnp.arange(split.n_vis)[None]
  ids_dec = jnp.arange(split.n_vis, 196)[None]
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                             ids_vis, ids_dec)
  flat = {k: v.shape for k, v in _flat(nn.unbox(variables['params'])).items()}
  blocks = {k.split('/')[0] for k in flat if k.startswith('decoder_block')}
  assert len(blocks) == 8
  assert flat['decoder_block0/attn/qkv/kernel'] == (512, 3, 16, 32)
  assert flat['decoder_block0/mlp/fc1/kernel'] == (512, 2048)
  assert flat['decoder_embed/kernel'] == (768, 512)
  assert flat['decoder_pred/kernel'] == (512, 16 * 16 * 3)
  assert flat['mask_token'] == (1, 1, 512)
  pred = jax.eval_shape(model.apply, variables, jnp.zeros((1, 224, 224, 3)), ids_vis, ids_dec)
  assert pred.dec.shape == (1, 147, 768) and pred.throw is None


def test_build_from_config():
  cfg = ml_collections.ConfigDict(dict(
      variant='Ti/4', image_size=16, width=32, depth=1, heads=4, decoder_width=8,
      decoder_depth=1, decoder_heads=2, posemb='learned', compute_dtype='bfloat16'))
  model = mae.build(cfg)
  assert model.spec == vit.VitSpec(32, 1, 4, 4)
  assert model.image_size == 16 and model.posemb == 'learned'
  assert (model.decoder_width, model.decoder_depth, model.decoder_heads) == (8, 1, 2)
  assert jnp.dtype(model.dtype) == jnp.bfloat16
  cfg.width = cfg.depth = cfg.heads = 0  # 0: from the variant
  assert mae.build(cfg).spec == vit.VitSpec(192, 12, 3, 4)


def test_mlp_block_exact_gelu():
  mlp = vit.Mlp(hidden=12)
  x = 2.0 * _images(seed=1)[:, :3, 0, :]  # [2, 3, 3]
  params = _np_params(mlp, x, seed=1)
  out = jax.jit(mlp.apply)({'params': params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xn = np.asarray(x, np.float64)
  ref = np_mlp(xn, p)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # The tanh approximation differs measurably here, so the test does tell them apart.
  h = xn @ p['fc1']['kernel'] + p['fc1']['bias']
  tanh = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  approx = tanh @ p['fc2']['kernel'] + p['fc2']['bias']
  assert np.abs(approx - ref).max() > 1e-4


def test_layer_norm_eps_1e6():
  ln = vit.layer_norm(jnp.float32, 'ln')
  # Tiny per-token variance (~1e-6) makes eps visible.
  x = 1e-3 * _images(seed=2)[:, 0]  # [2, 16, 3]
  x = x.reshape(2, 48)
  params = _np_params(ln, x, seed=2)
  out = np.asarray(jax.jit(ln.apply)({'params': params}, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(out, np_layer_norm(xn, p, eps=1e-6), rtol=1e-3, atol=1e-4)
  assert np.abs(out - np_layer_norm(xn, p, eps=1e-5)).max() > 0.05


def test_block_matches_numpy():
  block = vit.Block(heads=2)
  x = _images(seed=3)[:, :5, :, 0].reshape(2, 5, 16)[..., :8]  # [2, 5, 8]
  params = _np_params(block, x, seed=3)
  out = jax.jit(block.apply)({'params': params}, x)
  ref = np_block(np.asarray(x, np.float64), params)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bf16_compute_fp32_params():
  model = tiny_mae(dtype=jnp.bfloat16)
  images, (ids_vis, ids_dec) = _images(), _masks()
  variables = jax.eval_shape(model.init, jax.random.key(0), images, ids_vis, ids_dec)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables['params']))} == {
      jnp.dtype(jnp.float32)}
  params = _init(model)

  @jax.jit
  def run(p):
    return model.apply({'params': p}, images, ids_vis, ids_dec,
                       capture_intermediates=True, mutable=['intermediates'])

  (pred, _), state = run(params)
  assert pred.dtype == jnp.float32 and pred.shape == (2, 12, 48)
  inter = _flat(state['intermediates'])
  for name in ('encoder/block0/__call__', 'encoder/block1/attn/__call__',
               'encoder/block0/mlp/__call__', 'encoder/norm/__call__',
               'decoder_block0/__call__', 'decoder_norm/__call__', 'decoder_pred/__call__'):
    (value,) = inter[name]
    assert value.dtype == jnp.bfloat16, name
  latent = jax.eval_shape(lambda p: model.apply({'params': p}, images, ids_vis,
                                                method=model.encode), params)
  assert latent.dtype == jnp.bfloat16
  # bf16 predictions stay close to the float32 model's.
  ref = _fns()[0](params, images, ids_vis, ids_dec)
  assert np.abs(np.asarray(pred) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_encode_all_patches_in_order_equals_none():
  params = _init(tiny_mae())
  _, encode = _fns()
  images = _images(seed=7)
  full = encode(params, images, None)
  ids = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (2, L))
  explicit = encode(params, images, ids)
  np.testing.assert_allclose(np.asarray(explicit), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_predictions_invariant_to_visible_order_and_equivariant_in_decoded_order():
  params = _init(tiny_mae(), seed=8)
  forward, _ = _fns()
  images, (ids_vis, ids_dec) = _images(seed=9), _masks(seed=10)
  base = np.asarray(forward(params, images, ids_vis, ids_dec))
  rng = np.random.default_rng(0)
  perm_vis = rng.permutation(ids_vis.shape[1])
  perm_dec = rng.permutation(ids_dec.shape[1])
  shuffled_vis = np.asarray(forward(params, images, ids_vis[:, perm_vis], ids_dec))
  np.testing.assert_allclose(shuffled_vis, base, rtol=1e-5, atol=1e-5)
  shuffled_dec = np.asarray(forward(params, images, ids_vis, ids_dec[:, perm_dec]))
  np.testing.assert_allclose(shuffled_dec, base[:, perm_dec], rtol=1e-5, atol=1e-5)
  # Not vacuous: different decoded patches get different predictions.
  assert np.abs(base[:, 0] - base[:, 1]).max() > 1e-3


def test_predictions_depend_only_on_visible_pixels():
  params = _init(tiny_mae(), seed=11)
  forward, _ = _fns()
  images, (ids_vis, ids_dec) = _images(seed=12), _masks(seed=13)
  base = np.asarray(forward(params, images, ids_vis, ids_dec))
  # Overwrite every masked patch with noise: predictions must not change.
  vis = np.asarray(masking.binary_mask(ids_vis, L)).reshape(2, 4, 4)
  keep = np.kron(vis, np.ones((1, PATCH, PATCH)))[..., None]  # [2, 16, 16, 1]
  noise = 5 * np.random.default_rng(0).normal(size=images.shape)
  noisy = jnp.asarray(np.asarray(images) * keep + (1 - keep) * noise, jnp.float32)
  out = np.asarray(forward(params, noisy, ids_vis, ids_dec))
  np.testing.assert_allclose(out, base, rtol=1e-6, atol=1e-6)
  # ... but changing a visible patch does.
  changed = jnp.asarray(np.asarray(images) + keep * 0.5, jnp.float32)
  out = np.asarray(forward(params, changed, ids_vis, ids_dec))
  assert np.abs(out - base).max() > 1e-4


@pytest.mark.parametrize('shape', [(2, 2 * IMAGE, 2 * IMAGE, 3), (2, IMAGE, IMAGE + PATCH, 3),
                                   (2, IMAGE - 2, IMAGE - 2, 3)])
def test_images_of_another_size_are_rejected(shape):
  # A 32 px image has 64 patches: with ids_keep < 16 the encoder used to take its top rows
  # with the 16-patch grid's positions, and the loss's targets came from the 64-patch grid.
  model = tiny_mae()
  ids_vis, ids_dec = _masks()
  images = jnp.zeros(shape, jnp.float32)
  with pytest.raises(ValueError, match=f'{IMAGE}, {IMAGE}'):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, ids_vis, ids_dec), images)
  with pytest.raises(ValueError, match='image_size'):
    jax.eval_shape(lambda x: vit.Encoder(SPEC, IMAGE).init(jax.random.key(0), x), images)


# ----------------------------------------------------------------------------------------
# Drop path (stochastic depth) and pooled encoder outputs.

def _encoder_params(encoder, seed=0):
  return _np_params(encoder, _images(), seed=seed)


@functools.lru_cache(maxsize=None)
def _encoder_fn(drop_path=0.0, remat='none', scan_layers=False, train=False, pool='none',
                depth=SPEC.depth):
  spec = vit.VitSpec(SPEC.width, depth, SPEC.heads, PATCH)
  encoder = vit.Encoder(spec, IMAGE, remat=remat, scan_layers=scan_layers, drop_path=drop_path)
  fn = jax.jit(lambda p, x, key: encoder.apply({'params': p}, x, train=train, pool=pool,
                                               rngs={'dropout': key}))
  return encoder, fn


def test_drop_path_rates_linspace():
  np.testing.assert_allclose(vit.drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3])
  np.testing.assert_array_equal(vit.drop_path_rates(0.5, 1), [0.0])


def test_stochastic_depth_per_example_statistics():
  branch = jnp.ones((4096, 3, 2))
  out = np.asarray(jax.jit(vit.stochastic_depth)(branch, 0.5, jax.random.key(0)))
  per_example = out[:, 0, 0]
  # Whole examples are dropped (0) or kept and rescaled (1 / 0.5 = 2), never single tokens.
  assert set(np.unique(out)) == {0.0, 2.0}
  np.testing.assert_array_equal(out, np.broadcast_to(per_example[:, None, None], out.shape))
  assert abs((per_example == 0).mean() - 0.5) < 0.05  # binomial std ~0.008
  assert abs(out.mean() - 1.0) < 0.1  # expectation preserved
  # Rate 0 keeps everything, exactly; a traced rate works too (scan feeds one per layer).
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(vit.stochastic_depth(x, 0.0, jax.random.key(1))),
                                np.asarray(x))
  out = jax.jit(vit.stochastic_depth)(x, jnp.float32(0.25), jax.random.key(1))
  ratio = np.asarray(out) / np.asarray(x)  # [8, 3]
  assert np.all(np.isclose(ratio, 0.0) | np.isclose(ratio, 1 / 0.75, rtol=1e-6))


def test_block_drop_path_identity_when_off():
  x = _images(seed=3)[:, :5, :, 0].reshape(2, 5, 16)[..., :8]  # [2, 5, 8]
  params = _np_params(vit.Block(heads=2), x, seed=3)
  plain = np.asarray(jax.jit(vit.Block(heads=2).apply)({'params': params}, x))
  dropped = vit.Block(heads=2, drop_path=0.5)
  # deterministic (the default) -> bit-identical, and needs no rng.
  out = jax.jit(dropped.apply)({'params': params}, x)
  np.testing.assert_array_equal(np.asarray(out), plain)
  # Rate 0 while training -> bit-identical too.
  train = jax.jit(lambda p, x: vit.Block(heads=2).apply({'params': p}, x, None, False,
                                                        rngs={'dropout': jax.random.key(0)}))
  out = train(params, x)
  np.testing.assert_array_equal(np.asarray(out), plain)


def test_block_drop_path_drops_whole_branches_per_example():
  """Each example's output is x + ka * 2 attn(..) then + km * 2 mlp(..), ka, km in {0, 1}."""
  batch = 64
  x = jnp.asarray(np.random.default_rng(4).normal(size=(batch, 3, 8)), jnp.float32)
  block = vit.Block(heads=2, drop_path=0.5)
  params = _np_params(block, x, seed=4)
  out = np.asarray(jax.jit(lambda p, x: block.apply(
      {'params': p}, x, deterministic=False, rngs={'dropout': jax.random.key(5)}))(params, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xn = np.asarray(x, np.float64)
  combos = {}
  for ka in (0, 1):
    h = xn + ka * 2 * np_attention(np_layer_norm(xn, p['norm1']), p['attn'])
    for km in (0, 1):
      combos[(ka, km)] = h + km * 2 * np_mlp(np_layer_norm(h, p['norm2']), p['mlp'])
  seen = []
  for b in range(batch):
    match = [c for c, ref in combos.items() if np.allclose(out[b], ref[b], rtol=1e-4, atol=1e-4)]
    assert len(match) == 1, (b, match)
    seen.append(match[0])
  counts = {c: seen.count(c) for c in combos}
  assert all(n >= 5 for n in counts.values()), counts  # each ~16 of 64


@pytest.mark.slow
def test_encoder_drop_path_off_in_eval_and_at_rate_zero():
  params = _encoder_params(vit.Encoder(SPEC, IMAGE), seed=20)
  images, key = _images(seed=21), jax.random.key(0)
  base = np.asarray(_encoder_fn()[1](params, images, key))
  for kw in (dict(drop_path=0.5), dict(drop_path=0.0, train=True)):
    np.testing.assert_array_equal(np.asarray(_encoder_fn(**kw)[1](params, images, key)), base)
  # Depth 1: linspace(0, rate, 1) = [0], so training changes nothing either.
  params1 = _encoder_params(vit.Encoder(vit.VitSpec(16, 1, 2, PATCH), IMAGE), seed=22)
  eval1 = _encoder_fn(depth=1)[1](params1, images, key)
  train1 = _encoder_fn(drop_path=0.5, train=True, depth=1)[1](params1, images, key)
  np.testing.assert_array_equal(np.asarray(train1), np.asarray(eval1))


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_encoder_drop_path_under_remat_and_scan(scan_layers):
  """Identical examples: block 0 (rate 0) is deterministic, block 1 (rate 0.5) drops each
  branch per example, so training outputs take exactly 4 distinct values. Remat gives the
  same outputs (same rngs); gradients flow."""
  convert = vit.scan_params if scan_layers else (lambda t: t)
  params = convert(_encoder_params(vit.Encoder(SPEC, IMAGE), seed=23))
  images = jnp.broadcast_to(_images(seed=24, batch=1), (64, IMAGE, IMAGE, 3))
  key = jax.random.key(1)
  outs = {}
  for remat in ('none', 'full'):
    _, fn = _encoder_fn(0.5, remat, scan_layers, train=True, pool='gap')
    outs[remat] = np.asarray(fn(params, images, key))  # [64, D]
  np.testing.assert_allclose(outs['full'], outs['none'], rtol=1e-5, atol=1e-5)
  distinct = np.unique(np.round(outs['none'], 4), axis=0)
  assert len(distinct) == 4, len(distinct)
  # Eval: the same as the unrolled, drop-path-free encoder.
  _, eval_fn = _encoder_fn(0.5, 'full', scan_layers, pool='gap')
  unrolled = vit.unscan_params(params) if scan_layers else params
  ref = _encoder_fn(pool='gap')[1](unrolled, images[:2], key)
  np.testing.assert_allclose(np.asarray(eval_fn(params, images[:2], key)), np.asarray(ref),
                             rtol=1e-5, atol=1e-5)
  encoder, _ = _encoder_fn(0.5, 'full', scan_layers)
  loss = lambda p: encoder.apply({'params': p}, images[:4], train=True, pool='gap',
                                 rngs={'dropout': key}).sum()
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_encoder_pool_modes_match_numpy():
  params = _encoder_params(vit.Encoder(SPEC, IMAGE), seed=25)
  images, key = _images(seed=26), jax.random.key(0)
  ids = np.tile(np.arange(L), (2, 1))
  tokens = np.asarray(_encoder_fn(pool='none')[1](params, images, key))
  np.testing.assert_allclose(tokens, np_encoder(params, images, ids), rtol=2e-4, atol=2e-4)
  cls = np.asarray(_encoder_fn(pool='cls')[1](params, images, key))
  assert cls.shape == (2, SPEC.width)
  np.testing.assert_allclose(cls, tokens[:, 0], rtol=1e-6, atol=1e-6)
  # gap = MAE's fc_norm(mean of the pre-norm patch tokens), fc_norm being the encoder's 'norm'.
  gap = np.asarray(_encoder_fn(pool='gap')[1](params, images, key))
  pre_norm = np_encoder(params, images, ids, final_norm=False)
  norm = jax.tree.map(lambda a: np.asarray(a, np.float64), params['norm'])
  np.testing.assert_allclose(gap, np_layer_norm(pre_norm[:, 1:].mean(1), norm),
                             rtol=2e-4, atol=2e-4)
  # Not the mean of the normed tokens.
  assert np.abs(gap - tokens[:, 1:].mean(1)).max() > 1e-2
  with pytest.raises(ValueError):
    vit.Encoder(SPEC, IMAGE).apply({'params': params}, images, pool='max')


# ----------------------------------------------------------------------------------------
# Attention implementations (config.model.attention): all compute the same function.

def _qkv(n, m, heads=3, hd=8, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, t, heads, hd)), jnp.float32) for t in (n, m, m)]


def np_attend(q, k, v):
  """Reference in float64: softmax(q k^T / sqrt(hd)) v per head. [B, N, H, hd]."""
  q, k, v = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, hd]
  probs = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
  return (probs @ v).transpose(0, 2, 1, 3)


@pytest.mark.slow
@pytest.mark.parametrize('n,m', [(5, 5), (3, 7), (50, 50)])
@pytest.mark.parametrize('impl', ['einsum', 'xla'])
def test_attend_matches_numpy(impl, n, m):
  q, k, v = _qkv(n, m)
  np.testing.assert_allclose(np.asarray(vit.attend(q, k, v, impl)), np_attend(q, k, v),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('n,m,multiple', [(5, 5, 8), (3, 7, 4), (50, 50, 64), (16, 16, 8)])
def test_padded_attention_ignores_the_padding(n, m, multiple):
  # The padding path behind 'cudnn_padded', run through XLA (cuDNN needs a GPU): padded keys
  # get no weight and padded queries are dropped, so the result is attention over real tokens.
  q, k, v = _qkv(n, m, seed=1)
  out = vit.padded_attention(q, k, v, 'xla', multiple)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np_attend(q, k, v), rtol=1e-5, atol=1e-5)


def test_unknown_attention_is_rejected():
  q, k, v = _qkv(2, 2)
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    vit.attend(q, k, v, 'flash')


@pytest.mark.slow
def test_mae_forward_is_the_same_for_every_cpu_attention():
  params = _init(tiny_mae(), seed=5)
  images, (ids_vis, ids_dec) = _images(seed=6), _masks(seed=7)
  outs = {}
  for impl in ('einsum', 'xla'):
    model = mae.MaskedAutoencoder(SPEC, IMAGE, decoder_width=8, decoder_depth=2,
                                  decoder_heads=2, attention=impl)
    outs[impl] = np.asarray(jax.jit(lambda p: model.apply({'params': p}, images, ids_vis,
                                                           ids_dec).dec)(params))
  np.testing.assert_allclose(outs['xla'], outs['einsum'], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# The progressive (thrown-token) path of the whole model against
# NumPy, for both decoders. Catches features placed on the wrong canvas cells, the wrong
# global key, a missing decoder norm, or the wrong inputs of the last block.

def np_block_ctx(x, p, ctx=None):
  """np_block; with ctx, x's tokens query norm1(ctx) (keys and values) and nothing sees x."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  if ctx is None:
    return np_block(x, p)
  a = p['attn']
  d = x.shape[-1]
  three, heads, hd = a['qkv']['kernel'].shape[1:]
  kernel, bias = a['qkv']['kernel'].reshape(d, 3, heads * hd), a['qkv']['bias'].reshape(3, -1)
  xq, xc = np_layer_norm(x, p['norm1']), np_layer_norm(ctx, p['norm1'])
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
  q = split(xq @ kernel[:, 0] + bias[0])
  k, v = split(xc @ kernel[:, 1] + bias[1]), split(xc @ kernel[:, 2] + bias[2])
  o = (np_softmax(q @ k.transpose(0, 1, 3, 2) * hd ** -0.5) @ v).transpose(0, 2, 1, 3)
  o = o.reshape(x.shape[0], x.shape[1], heads * hd) @ a['proj']['kernel'].reshape(heads * hd, d)
  x = x + o + a['proj']['bias']
  return x + np_mlp(np_layer_norm(x, p['norm2']), p['mlp'])


def np_progressive_mae(params, images, ids_vis, ids_dec, ids_throw, decoder, aggregator,
                       num_stages, dw=8, depth=2):
  """(pred_dec, pred_throw) in float64: partial decoder, then thrown tokens (DESIGN.md)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  grid = IMAGE // PATCH
  b = images.shape[0]
  latent = np_encoder(params['encoder'], images, ids_vis)
  pos = mae_2d_sincos(dw, grid, cls_token=True)  # [1+L, dw]
  x = latent @ p['decoder_embed']['kernel'] + p['decoder_embed']['bias']
  context = np.concatenate([x[:, :1] + pos[0], x[:, 1:] + pos[1:][ids_vis]], axis=1)
  query = lambda ids: p['mask_token'][0] + pos[1:][ids]  # noqa: E731  [B, n, dw]
  blocks = [params[f'decoder_block{i}'] for i in range(depth)]
  ln = lambda t: np_layer_norm(t, p['decoder_norm'])  # noqa: E731
  if decoder == 'self_attention':
    h = np.concatenate([context, query(ids_dec)], axis=1)
    for blk in blocks[:-1]:
      h = np_block_ctx(h, blk)
    last_input = h
    feats = ln(np_block_ctx(h, blocks[-1]))
    kept, glob, dec_feats = feats[:, 1:], feats[:, 0], feats[:, 1 + ids_vis.shape[1]:]
  else:
    h = query(ids_dec)
    for blk in blocks:
      h = np_block_ctx(h, blk, context)
    last_input = context
    dec_feats = ln(h)
    kept, glob = np.concatenate([context[:, 1:], dec_feats], axis=1), context[:, 0]
  head = lambda t: t @ p['decoder_pred']['kernel'] + p['decoder_pred']['bias']  # noqa: E731
  if aggregator == 'last_block':
    return head(dec_feats), head(ln(np_block_ctx(query(ids_throw), blocks[-1], last_input)))
  # 'interpolate': softmax over the learned per-offset logits of the known 3x3 neighbours + cls.
  logit = p['thrown']['offset_logit']
  out = np.zeros(ids_throw.shape + (dw,))
  sizes = [len(c) for c in np.array_split(np.arange(ids_throw.shape[1]), num_stages)]
  for bi in range(b):
    canvas = np.zeros((grid * grid, dw))
    known = np.zeros(grid * grid, bool)
    ids_kept = np.concatenate([ids_vis[bi], ids_dec[bi]])
    canvas[ids_kept], known[ids_kept] = kept[bi], True
    start = 0
    for size in sizes:
      stage = range(start, start + size)
      for i in stage:
        r, c = divmod(int(ids_throw[bi, i]), grid)
        feats, logits = [], []
        for k, (dr, dc) in enumerate((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
          rr, cc = r + dr, c + dc
          if 0 <= rr < grid and 0 <= cc < grid and known[rr * grid + cc]:
            feats.append(canvas[rr * grid + cc])
            logits.append(logit[k])
        feats.append(glob[bi])
        logits.append(logit[9])
        w = np.exp(np.array(logits) - max(logits))
        out[bi, i] = (w / w.sum()) @ np.stack(feats)
      for i in stage:  # a stage's outputs join the canvas for the next stage only
        canvas[ids_throw[bi, i]], known[ids_throw[bi, i]] = out[bi, i], True
      start += size
  return head(dec_feats), head(out)


@pytest.mark.parametrize('decoder,aggregator,num_stages', [
    ('self_attention', 'interpolate', 2), ('cross_attention', 'interpolate', 1),
    ('self_attention', 'last_block', 1), ('cross_attention', 'last_block', 1)])
def test_progressive_predictions_match_numpy(decoder, aggregator, num_stages):
  model = mae.MaskedAutoencoder(SPEC, IMAGE, decoder_width=8, decoder_depth=2, decoder_heads=2,
                                decoder=decoder, thrown_reconstruction='progressive',
                                aggregator=aggregator, num_stages=num_stages)
  split = masking.token_split(L, 0.75, 0.5)  # 4 visible, 4 decoded, 8 thrown
  rng = np.random.default_rng(31)
  perm = np.stack([rng.permutation(L) for _ in range(2)]).astype(np.int32)
  ids_vis, ids_dec, ids_throw = (perm[:, :4], perm[:, 4:8], perm[:, 8:])
  assert (split.n_vis, split.n_dec, split.n_throw) == (4, 4, 8)
  images = _images(seed=32)
  params = _np_params(model, images, ids_vis, ids_dec, ids_throw, seed=33)
  preds = jax.jit(lambda p: model.apply({'params': p}, images, ids_vis, ids_dec, ids_throw))(params)
  ref_dec, ref_throw = np_progressive_mae(params, images, ids_vis, ids_dec, ids_throw, decoder,
                                          aggregator, num_stages)
  np.testing.assert_allclose(np.asarray(preds.dec), ref_dec, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(preds.throw), ref_throw, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------
# Initialization: MAE's _init_weights (xavier_uniform on every Linear, the patch embedding
# as a flattened [D, p*p*3] Linear, zero biases, LayerNorm 1/0) and cls token N(0, 0.02).

def test_encoder_init_distributions_match_mae():
  d, heads, p = 128, 4, PATCH
  encoder = vit.Encoder(vit.VitSpec(d, 1, heads, p), IMAGE, posemb='learned')
  params = nn.unbox(jax.jit(encoder.init)(jax.random.key(0), _images(batch=1))['params'])
  p_ = jax.tree.map(np.asarray, params)

  def check_xavier(w, fan_in, fan_out, name):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(w).max() <= limit * (1 + 1e-6), name
    assert np.abs(w).max() > 0.95 * limit, name  # fills the whole range ...
    assert abs(w.std() / (limit / np.sqrt(3)) - 1) < 0.05, (name, w.std())  # ... uniformly
    assert abs(w.mean()) < 0.05 * limit, name

  check_xavier(p_['patch_embed_kernel'], p * p * 3, d, 'patch_embed')
  blk = p_['block0']
  assert blk['attn']['qkv']['kernel'].shape == (d, 3, heads, d // heads)
  check_xavier(blk['attn']['qkv']['kernel'], d, 3 * d, 'qkv')  # timm Linear(D, 3D)
  check_xavier(blk['attn']['proj']['kernel'], d, d, 'proj')
  check_xavier(blk['mlp']['fc1']['kernel'], d, 4 * d, 'fc1')
  check_xavier(blk['mlp']['fc2']['kernel'], 4 * d, d, 'fc2')
  for name, b in (('patch_embed', p_['patch_embed_bias']), ('qkv', blk['attn']['qkv']['bias']),
                  ('proj', blk['attn']['proj']['bias']), ('fc1', blk['mlp']['fc1']['bias']),
                  ('fc2', blk['mlp']['fc2']['bias'])):
    np.testing.assert_array_equal(b, 0.0, err_msg=name)
  for norm in (blk['norm1'], blk['norm2'], p_['norm']):
    np.testing.assert_array_equal(norm['scale'], 1.0)
    np.testing.assert_array_equal(norm['bias'], 0.0)
  # N(0, 0.02): 128 cls draws give the std to ~10%; 17 x 128 position draws to ~2%.
  assert 0.014 < p_['cls_token'].std() < 0.026, p_['cls_token'].std()
  assert abs(p_['pos_embedding'].std() / 0.02 - 1) < 0.1, p_['pos_embedding'].std()


def test_block_default_mlp_is_four_times_the_width():
  """A Block built with its defaults is a standard ViT block: MLP hidden width 4 x D (timm)."""
  x = jnp.zeros((1, 3, 16), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(vit.Block(heads=2).init, jax.random.key(0), x)['params'])
  assert shapes['mlp']['fc1']['kernel'].shape == (16, 64)
  assert shapes['mlp']['fc2']['kernel'].shape == (64, 16)


def test_scanned_encoder_draws_every_layer_independently():
  """nn.scan splits the 'params' rng: each layer gets its own draw, as in the unrolled encoder
  (a shared rng would start every block from the same weights)."""
  encoder = vit.Encoder(vit.VitSpec(16, 3, 2, PATCH), IMAGE, scan_layers=True)
  params = nn.unbox(jax.jit(encoder.init)(jax.random.key(0), _images(batch=1))['params'])
  for path in ('attn/qkv/kernel', 'attn/proj/kernel', 'mlp/fc1/kernel', 'mlp/fc2/kernel'):
    w = np.asarray(_flat(params['blocks'])[path])  # [layers, ...]
    assert w.shape[0] == 3, path
    for i in range(3):
      for j in range(i):
        assert np.abs(w[i] - w[j]).max() > 0.1 * np.abs(w).max(), (path, i, j)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_drop_path_draws_each_layer_independently(scan_layers):
  """Depth 3 at drop_path 0.5: blocks 1 and 2 (rates 0.25, 0.5) drop their two branches each
  independently, so identical examples come out in all 2**4 combinations. Layers sharing one
  dropout rng (nn.scan without split_rngs) would nest the drops: only 3 x 3 combinations."""
  convert = vit.scan_params if scan_layers else (lambda t: t)
  params = convert(_encoder_params(vit.Encoder(vit.VitSpec(SPEC.width, 3, SPEC.heads, PATCH),
                                               IMAGE), seed=27))
  images = jnp.broadcast_to(_images(seed=28, batch=1), (1024, IMAGE, IMAGE, 3))
  _, fn = _encoder_fn(0.5, 'none', scan_layers, train=True, pool='gap', depth=3)
  outs = np.asarray(fn(params, images, jax.random.key(2)))  # [1024, D]
  assert len(np.unique(np.round(outs, 4), axis=0)) == 16


def test_relayout_of_abstract_leaves_keeps_each_axis_sharding():
  """scan_params on ShapeDtypeStructs (a restore target) prepends an unsharded layer axis and
  keeps the other axes' sharding; unscan_params drops it again."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  spec = jax.sharding.PartitionSpec('data', None)
  leaf = jax.ShapeDtypeStruct((8, 32), jnp.float32,
                              sharding=jax.sharding.NamedSharding(mesh, spec))
  tree = {'norm': {'scale': leaf}, 'block0': {'w': leaf}, 'block1': {'w': leaf}}
  scanned = vit.scan_params(tree)
  assert scanned['blocks']['w'].shape == (2, 8, 32)
  assert scanned['blocks']['w'].sharding.spec == jax.sharding.PartitionSpec(None, 'data', None)
  assert scanned['norm']['scale'].sharding.spec == spec
  unscanned = vit.unscan_params(scanned)
  assert sorted(unscanned) == ['block0', 'block1', 'norm']
  for name in ('block0', 'block1'):
    assert unscanned[name]['w'].shape == (8, 32)
    assert unscanned[name]['w'].sharding.spec == spec


def test_drop_path_rate_rises_with_depth():
  """The first block runs at rate 0 and the last at drop_path: with block 1's branches zeroed
  (dropping them changes nothing), training outputs of identical examples never vary; with
  block 0's branches zeroed they take block 1's 4 drop combinations."""
  params = _encoder_params(vit.Encoder(SPEC, IMAGE), seed=29)
  images = jnp.broadcast_to(_images(seed=30, batch=1), (256, IMAGE, IMAGE, 3))
  _, fn = _encoder_fn(0.5, 'none', False, train=True, pool='gap')

  def silenced(block):  # the block's attention and MLP branches output exactly zero
    p = params[block]
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    blk = dict(p, attn=dict(p['attn'], proj=zero(p['attn']['proj'])),
               mlp=dict(p['mlp'], fc2=zero(p['mlp']['fc2'])))
    return dict(params, **{block: blk})

  for block, combos in (('block1', 1), ('block0', 4)):
    outs = np.asarray(fn(silenced(block), images, jax.random.key(3)))  # [256, D]
    assert len(np.unique(np.round(outs, 4), axis=0)) == combos, block


def test_bf16_attention_weights_sum_to_one():
  # The softmax runs in float32 even under bf16 compute: averaging a constant value over 197
  # keys gives it back exactly in bf16 (a bf16 softmax is off by up to one bf16 step).
  q, k, _ = (a.astype(jnp.bfloat16) for a in _qkv(197, 197, heads=2, hd=16, seed=3))
  out = np.asarray(jax.jit(vit.attend)(q, k, jnp.ones_like(q)).astype(jnp.float32))
  np.testing.assert_array_equal(out, 1.0)


@pytest.mark.parametrize('n,multiple', [(5, 8), (50, 64), (16, 8), (197, 64)])
def test_pad_tokens_reaches_the_next_multiple(n, multiple):
  # cuDNN only takes the padded lengths: they must be the smallest multiple >= n.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, n, 3, 4)), jnp.float32)
  padded = np.asarray(vit._pad_tokens(x, multiple))
  assert padded.shape == (2, -(-n // multiple) * multiple, 3, 4)
  np.testing.assert_array_equal(padded[:, :n], x)
  np.testing.assert_array_equal(padded[:, n:], 0.0)


def test_remat_policies_keep_what_they_name(capsys):
  # What each model.remat keeps for the backward pass (beyond the block's own arguments):
  # 'full' nothing, 'dots_saveable' only the matmul outputs (not the [B, H, N, N] softmax),
  # 'none' everything, the attention probabilities included.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)), jnp.float32)
  kept = {}
  for remat in ('none', 'full', 'dots_saveable'):
    block = vit.block_class(remat)(heads=2)
    params = _np_params(block, x)
    ad_checkpoint.print_saved_residuals(
        lambda p, x, block=block: block.apply({'params': p}, x).sum(), params, x)
    kept[remat] = [line for line in capsys.readouterr().out.splitlines()
                   if line.strip() and 'from the argument' not in line]
  shapes = {remat: {line.split()[0] for line in lines} for remat, lines in kept.items()}
  assert kept['full'] == []
  # qkv [B, N, 3, H, hd], the attention output projection [B, N, D], fc1 [B, N, 4D]
  assert shapes['dots_saveable'] == {'f32[2,5,3,2,8]', 'f32[2,5,16]', 'f32[2,5,64]'}
  assert 'f32[2,2,5,5]' in shapes['none']  # the softmax [B, H, N, N]


def test_decoder_init_distributions_match_mae():
  """MAE's decoder init: mask token N(0, 0.02), xavier-uniform embed/pred, zero biases."""
  dw = 256
  model = mae.MaskedAutoencoder(SPEC, IMAGE, decoder_width=dw, decoder_depth=1, decoder_heads=2)
  ids_vis, ids_dec = _masks()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), _images(), ids_vis, ids_dec)['params'])
  token = np.asarray(params['mask_token'])
  assert token.shape == (1, 1, dw)
  assert abs(token.std() / 0.02 - 1) < 0.15 and abs(token.mean()) < 0.005, token.std()
  for name, fan_in, fan_out in (('decoder_embed', SPEC.width, dw),
                                ('decoder_pred', dw, PATCH * PATCH * 3)):
    w = np.asarray(params[name]['kernel'])
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(w).max() <= limit * (1 + 1e-6) and np.abs(w).max() > 0.95 * limit, name
    np.testing.assert_array_equal(np.asarray(params[name]['bias']), 0.0, err_msg=name)


def test_scan_params_keeps_the_layer_order_past_ten_blocks():
  # ViT-B has 12 blocks: layer i of the scanned tree is block{i} (numeric order, so block10
  # does not land between block1 and block2), and unscan_params gives every block back.
  tree = {f'block{i}': {'w': np.full((2,), i, np.float32)} for i in range(12)}
  tree['norm'] = {'scale': np.ones(2, np.float32)}
  scanned = vit.scan_params(tree)
  assert sorted(scanned) == ['blocks', 'norm']
  np.testing.assert_array_equal(np.asarray(scanned['blocks']['w'])[:, 0], np.arange(12))
  back = vit.unscan_params(scanned)
  assert sorted(back) == sorted(tree)
  for i in range(12):
    np.testing.assert_array_equal(np.asarray(back[f'block{i}']['w']), i)


def test_mlp_ratio_sets_every_hidden_width():
  """mlp_ratio reaches the block's MLP, the encoder's blocks and the MAE decoder's."""
  x = jnp.zeros((1, 3, 16), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(vit.Block(heads=2, mlp_ratio=2.0).init, jax.random.key(0),
                                   x)['params'])
  assert shapes['mlp']['fc1']['kernel'].shape == (16, 32)
  model = mae.MaskedAutoencoder(SPEC, IMAGE, decoder_width=8, decoder_depth=1, decoder_heads=2,
                                mlp_ratio=3.0)
  ids_vis, ids_dec = _masks()
  shapes = _flat(nn.unbox(jax.eval_shape(model.init, jax.random.key(0), _images(), ids_vis,
                                         ids_dec)['params']))
  assert shapes['encoder/block1/mlp/fc1/kernel'].shape == (16, 48)
  assert shapes['decoder_block0/mlp/fc2/kernel'].shape == (24, 8)


def test_scanned_drop_path_rate_rises_with_depth():
  """As test_drop_path_rate_rises_with_depth, through nn.scan: layer 0 runs at rate 0, so with
  layer 1's branches zeroed identical examples never vary; with layer 0's zeroed they take
  layer 1's 4 drop combinations."""
  params = _encoder_params(vit.Encoder(SPEC, IMAGE), seed=31)
  images = jnp.broadcast_to(_images(seed=32, batch=1), (256, IMAGE, IMAGE, 3))
  _, fn = _encoder_fn(0.5, 'none', True, train=True, pool='gap')
  for block, combos in (('block1', 1), ('block0', 4)):
    p = params[block]
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    silenced = dict(params, **{block: dict(p, attn=dict(p['attn'], proj=zero(p['attn']['proj'])),
                                           mlp=dict(p['mlp'], fc2=zero(p['mlp']['fc2'])))})
    outs = np.asarray(fn(vit.scan_params(silenced), images, jax.random.key(4)))  # [256, D]
    assert len(np.unique(np.round(outs, 4), axis=0)) == combos, block


@pytest.mark.parametrize('scan_layers', [False, True])
def test_training_without_drop_path_needs_no_dropout_rng(scan_layers):
  # drop_path 0 (the pre-training default): train=True is the eval forward, no rng needed.
  encoder = vit.Encoder(SPEC, IMAGE, scan_layers=scan_layers)
  params = _encoder_params(vit.Encoder(SPEC, IMAGE), seed=33)
  params = vit.scan_params(params) if scan_layers else params
  run = jax.jit(lambda p, x, train: encoder.apply({'params': p}, x, train=train, pool='gap'),
                static_argnums=2)
  images = _images(seed=34)
  np.testing.assert_array_equal(np.asarray(run(params, images, True)),
                                np.asarray(run(params, images, False)))


def test_build_passes_the_reconstruction_fields():
  cfg = ml_collections.ConfigDict(dict(
      variant='Ti/4', image_size=16, width=32, depth=1, heads=4, decoder_width=8,
      decoder_depth=1, decoder_heads=2, posemb='sincos', compute_dtype='float32'))
  rec = ml_collections.ConfigDict(dict(
      thrown_reconstruction='progressive', aggregator='interpolate', num_stages=3, window=5,
      key_width=16, heads=2))
  model = mae.build(cfg, rec, pred_dim=7)
  assert (model.thrown_reconstruction, model.aggregator, model.num_stages) == (
      'progressive', 'interpolate', 3)
  assert (model.window, model.key_width, model.aggregator_heads, model.pred_dim) == (5, 16, 2, 7)
