"""Tests for resizing learned position embeddings to another grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pr_mim_jax.models import posemb


def keys_cubic(t, a=-0.5):
  """Keys' cubic convolution kernel."""
  t = np.abs(t)
  return np.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                  np.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, 0.0))


def np_resize_matrix(n_in, n_out):
  """[n_out, n_in] bicubic weights on half-pixel centres, out-of-range taps dropped and the
  rest renormalized (no antialiasing)."""
  w = np.zeros((n_out, n_in))
  for j in range(n_out):
    centre = (j + 0.5) * n_in / n_out - 0.5
    for i in range(n_in):
      w[j, i] = keys_cubic(centre - i)
  return w / w.sum(axis=1, keepdims=True)


def np_resize_table(table, new_grid):
  grid = int(np.sqrt(table.shape[0] - 1))
  m = np_resize_matrix(grid, new_grid)
  patches = table[1:].reshape(grid, grid, -1)
  out = np.einsum('ai,bj,ijd->abd', m, m, patches)
  return np.concatenate([table[:1], out.reshape(new_grid ** 2, -1)])


def _table(grid, dim, seed=0):
  return np.random.default_rng(seed).normal(size=(1 + grid * grid, dim)).astype(np.float32)


def test_hand_weights():
  # Halving: output j sits at input 2j + 0.5, taps at distances 0.5 (9/16) and 1.5 (-1/16).
  m = np_resize_matrix(4, 2)
  np.testing.assert_allclose(m[0], [9 / 16, 9 / 16, -1 / 16, 0] / np.float64(17 / 16))
  np.testing.assert_allclose(keys_cubic(np.array([0.0, 0.5, 1.0, 1.5, 2.0])),
                             [1, 9 / 16, 0, -1 / 16, 0])


def test_same_grid_is_identity():
  table = _table(4, 8)
  np.testing.assert_array_equal(np.asarray(posemb.resize_learned(table, 4)), table)


@pytest.mark.slow
@pytest.mark.parametrize('grid,new_grid', [(4, 7), (4, 6), (6, 4), (3, 8), (14, 16)])
def test_matches_numpy_bicubic(grid, new_grid):
  table = _table(grid, 6, seed=grid + new_grid)
  out = np.asarray(posemb.resize_learned(jnp.asarray(table), new_grid))
  assert out.shape == (1 + new_grid ** 2, 6) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0], table[0])  # cls row kept
  np.testing.assert_allclose(out, np_resize_table(table.astype(np.float64), new_grid),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('grid,new_grid', [(4, 7), (7, 12)])
def test_upsampling_matches_pil_bicubic(grid, new_grid):
  table = _table(grid, 3, seed=1)
  out = np.asarray(posemb.resize_learned(table, new_grid))[1:].reshape(new_grid, new_grid, 3)
  for c in range(3):
    channel = Image.fromarray(table[1:, c].reshape(grid, grid), mode='F')
    ref = np.asarray(channel.resize((new_grid, new_grid), Image.BICUBIC))
    np.testing.assert_allclose(out[..., c], ref, rtol=1e-5, atol=1e-5)


def test_constant_stays_constant_and_ramp_stays_ramp_inside():
  grid, new_grid = 8, 16
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  ramp = (2.0 * cols - 3.0 * rows + 1.0).reshape(-1, 1)
  table = np.concatenate([np.zeros((1, 1)), ramp], axis=0)
  table = np.concatenate([table, np.full_like(table, 5.0)], axis=1).astype(np.float32)
  out = np.asarray(posemb.resize_learned(table, new_grid))[1:].reshape(new_grid, new_grid, 2)
  np.testing.assert_allclose(out[..., 1], 5.0, rtol=1e-6)
  # Output pixel j sits at input coordinate (j + 0.5) / 2 - 0.5; cubic interpolation
  # reproduces a linear function wherever all four taps are inside the grid.
  coord = (np.arange(new_grid) + 0.5) * grid / new_grid - 0.5
  expected = 2.0 * coord[None, :] - 3.0 * coord[:, None] + 1.0
  inside = slice(3, new_grid - 3)
  np.testing.assert_allclose(out[inside, inside, 0], expected[inside, inside], atol=1e-4)


def test_rejects_non_square_table():
  with pytest.raises(ValueError, match='square'):
    posemb.resize_learned(np.zeros((1 + 6, 4), np.float32), 3)


def test_adapt_encoder_params():
  table = _table(4, 8)
  params = {'pos_embedding': jnp.asarray(table), 'cls_token': jnp.ones((1, 1, 8))}
  same = posemb.adapt_encoder_params(params, 4)
  assert same is params
  bigger = posemb.adapt_encoder_params(params, 6)
  assert bigger['pos_embedding'].shape == (37, 8)
  assert bigger['cls_token'] is params['cls_token']
  np.testing.assert_allclose(np.asarray(bigger['pos_embedding']), np_resize_table(table, 6),
                             rtol=1e-5, atol=1e-5)
  sincos = {'cls_token': jnp.ones((1, 1, 8))}  # sin-cos tables are not params
  assert posemb.adapt_encoder_params(sincos, 6) is sincos
  # Works under jit (the grid is static).
  out = jax.jit(posemb.adapt_encoder_params, static_argnums=1)(params, 6)
  np.testing.assert_allclose(np.asarray(out['pos_embedding']),
                             np.asarray(bigger['pos_embedding']), rtol=1e-6)


def test_adapt_encoder_params_shrinks_too():
  # Fine-tuning below the pre-training resolution: a 6x6 table must become 4x4, not stay 6x6.
  table = _table(6, 8, seed=3)
  out = posemb.adapt_encoder_params({'pos_embedding': jnp.asarray(table)}, 4)
  assert out['pos_embedding'].shape == (17, 8)
  np.testing.assert_allclose(np.asarray(out['pos_embedding']), np_resize_table(table, 4),
                             rtol=1e-5, atol=1e-5)
