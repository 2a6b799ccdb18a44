"""Tests for the HOG target against an explicit-loop NumPy reference and hand cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr_mim_jax.method import targets


def hog_reference(images, patch, bins=9, eps=1e-6):
  """Loops over every pixel: [B, H, W, 3] -> [B, L, 108] in float64."""
  b, h, w, c = images.shape
  x = images.astype(np.float64)

  def px(n, y, xx, ch):  # zero outside the image
    return x[n, y, xx, ch] if 0 <= y < h and 0 <= xx < w else 0.0

  cell = patch // 2
  gh, gw = h // patch, w // patch
  out = np.zeros((b, gh * gw, 2, 2, c, bins))
  for n in range(b):
    for y in range(h):
      for xx in range(w):
        for ch in range(c):
          gx = px(n, y, xx + 1, ch) - px(n, y, xx - 1, ch)
          gy = px(n, y + 1, xx, ch) - px(n, y - 1, xx, ch)
          mag = math.hypot(gx, gy)
          angle = math.atan2(gy, gx) % math.pi  # unsigned, [0, pi)
          k = min(int(angle / (math.pi / bins)), bins - 1)
          token = (y // patch) * gw + xx // patch
          out[n, token, (y % patch) // cell, (xx % patch) // cell, ch, k] += mag
  out = out.reshape(b, gh * gw, -1)
  for n in range(b):
    for t in range(gh * gw):
      out[n, t] /= math.sqrt(sum(v * v for v in out[n, t]) + eps)
  return out


@pytest.mark.parametrize('seed', [0, 1])
def test_hog_matches_loop_reference(seed):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda x: targets.patch_targets(x, 4, 'hog'))(jnp.asarray(images)))
  np.testing.assert_allclose(ours, hog_reference(images, 4), atol=1e-5)


def test_hog_shape_dim_and_unit_norm():
  images = jnp.asarray(np.random.default_rng(2).normal(size=(3, 16, 16, 3)), jnp.float32)
  out = targets.patch_targets(images, 8, 'hog')
  assert out.dtype == jnp.float32 and out.shape == (3, 4, 108)
  assert targets.target_dim('hog', 8) == 108 == targets.target_dim('hog', 16)
  assert targets.target_dim('pixel', 4) == 48 == targets.target_dim('norm_pixel', 4)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(out) >= 0)


def test_hog_vertical_edge_fills_horizontal_gradient_bin():
  # One 16 px patch of cells 8 px; the image border is 0 like the padding, so no border edges.
  img = np.zeros((1, 16, 16, 3), np.float32)
  img[0, 4:12, 8:12] = 1.0  # a bright block; its left side is a vertical edge
  out = np.asarray(targets.patch_targets(jnp.asarray(img), 16, 'hog')).reshape(2, 2, 3, 9)
  # Cell (0, 0) (rows 0-7, cols 0-7): only the block's left edge at col 7 (gx = +1,
  # rows 4-7) and nothing else -> all its mass in bin 0, equal across channels.
  cell = out[0, 0]
  assert np.all(cell[:, 1:] == 0) and np.all(cell[:, 0] > 0)
  np.testing.assert_allclose(cell[:, 0], cell[0, 0])
  # The block's top edge (gy only) lands in bin 4 (90 degrees) of cell (0, 1).
  assert np.all(out[0, 1][:, 4] > 0)


def test_hog_horizontal_edge_bin_and_hand_values():
  # 4x4 image, patch 4 (cells of 2 px), one channel set: rows 0-1 = 0, rows 2-3 = 2.
  img = np.zeros((1, 4, 4, 3), np.float32)
  img[0, 2:, :, 0] = 2.0
  raw = np.zeros((2, 2, 3, 9))
  # Channel 0: gy = 2 at rows 1 and 2 (angle 90 -> bin 4); the padding adds gy = -2 at
  # row 3 (angle -90 -> unsigned 90, bin 4) and gx = +-2 at cols 0 and 3 of rows 2-3.
  # Row 3, col 0: gx = 2, gy = -2 -> 135 degrees (bin 6), magnitude 2 sqrt 2; same at col 3
  # with gx = -2 -> 45 degrees (bin 2). Row 2, col 0: gx = 2, gy = 2 -> 45 (bin 2); col 3:
  # gx = -2, gy = 2 -> 135 (bin 6).
  d = 2 * math.sqrt(2)
  raw[0, 0, 0, 4] = raw[0, 1, 0, 4] = 2 * 2  # row 1, two pixels per top cell
  raw[1, 0, 0, 4] = raw[1, 1, 0, 4] = 2 + 2  # row 2 col 1/2 (gy = 2) + row 3 col 1/2 (gy = -2)
  raw[1, 0, 0, 2] += d  # row 2, col 0
  raw[1, 0, 0, 6] += d  # row 3, col 0
  raw[1, 1, 0, 6] += d  # row 2, col 3
  raw[1, 1, 0, 2] += d  # row 3, col 3
  expected = raw.ravel() / math.sqrt((raw ** 2).sum() + 1e-6)
  out = np.asarray(targets.patch_targets(jnp.asarray(img), 4, 'hog'))[0, 0]
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_hog_single_pixel_left_and_right_gradients_share_bin_0():
  # A bright pixel at (3, 2) of channel 0; 8x8 image, patch 4, cells of 2 px. Its left
  # neighbour (3, 1) has gx = +1 (0 deg), its right neighbour (3, 3) gx = -1 (180 deg =
  # unsigned 0), the one above (2, 2) gy = +1 and the one below (4, 2) gy = -1 (bin 4).
  img = np.zeros((1, 8, 8, 3), np.float32)
  img[0, 3, 2, 0] = 1.0
  out = np.asarray(targets.patch_targets(jnp.asarray(img), 4, 'hog')).reshape(4, 2, 2, 3, 9)
  raw = np.zeros((2, 2, 3, 9))
  raw[1, 0, 0, 0] = 1.0  # (3, 1)
  raw[1, 1, 0, 0] = 1.0  # (3, 3)
  raw[1, 1, 0, 4] = 1.0  # (2, 2)
  np.testing.assert_allclose(out[0], raw / np.sqrt(3 + 1e-6), atol=1e-6)
  below = np.zeros((2, 2, 3, 9))
  below[0, 1, 0, 4] = 1.0  # (4, 2) is in patch 2 (second patch row), cell (0, 1)
  np.testing.assert_allclose(out[2], below / np.sqrt(1 + 1e-6), atol=1e-6)
  assert np.all(out[[1, 3]] == 0)


def test_hog_constant_image():
  # Mean colour (0 in normalised units) everywhere: no gradient, finite zeros.
  out = np.asarray(targets.patch_targets(jnp.zeros((1, 24, 24, 3)), 8, 'hog'))
  assert np.all(np.isfinite(out)) and np.all(out == 0)
  # Any other constant: interior patches are zero; border patches see the zero padding.
  out = np.asarray(targets.patch_targets(jnp.full((1, 24, 24, 3), 0.7), 8, 'hog'))
  assert np.all(out[0, 4] == 0)  # the centre patch of the 3x3 grid
  np.testing.assert_allclose(np.linalg.norm(out[0, [0, 1, 3, 8]], axis=-1), 1.0, atol=1e-5)


def test_hog_odd_patch_raises():
  assert not targets.hog_supported(3) and targets.hog_supported(16)
  with pytest.raises(ValueError, match='even patch'):
    targets.patch_targets(jnp.zeros((1, 9, 9, 3)), 3, 'hog')
  with pytest.raises(ValueError, match='bogus'):
    targets.target_dim('bogus', 4)


def test_norm_pixel_eps_inside_the_square_root():
  # Patches with a per-patch variance about MAE's eps (1e-6) make its placement visible:
  # MAE divides by (var + 1e-6) ** 0.5, var unbiased (ddof=1).
  rng = np.random.default_rng(7)
  images = (1e-3 * rng.normal(size=(2, 8, 8, 3))).astype(np.float32)
  images[1, :4, :4] *= 10.0  # one patch well above eps
  out = np.asarray(targets.patch_targets(jnp.asarray(images), 4, 'norm_pixel'))
  x = images.astype(np.float64).reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).sum(-1, keepdims=True) / 47
  assert 0.3e-6 < np.median(var) < 3e-6
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-4)
