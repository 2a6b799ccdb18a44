"""Tests for the token-split pictures and the visualize_masks command."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax import visualize
from pr_mim_jax import visualize_masks
from pr_mim_jax.data import pipeline


def identity_denorm(x):
  """Normalised == display units here: values are already 0..255."""
  return np.clip(np.round(np.asarray(x, np.float32)), 0, 255).astype(np.uint8)


def _hand_case():
  # 1 image, 4x4 px, 2 px patches -> 4 patches; patch 0 visible, 1 decoded, 2 and 3 thrown.
  images = np.full((1, 4, 4, 3), 200.0, np.float32)
  ids = dict(ids_vis=np.array([[0]]), ids_dec=np.array([[1]]), ids_throw=np.array([[2, 3]]))
  return images, ids


def test_token_map_colours_per_patch_class():
  images, ids = _hand_case()
  out = visualize.token_map(images, ids['ids_vis'], ids['ids_dec'], ids['ids_throw'], 2,
                            identity_denorm)
  assert out.dtype == np.uint8 and out.shape == (1, 4, 4, 3)
  np.testing.assert_array_equal(out[0, :2, :2], 200)  # visible: the image
  np.testing.assert_array_equal(out[0, :2, 2:], 128)  # decoded: grey
  a = visualize.THROWN_IMAGE_ALPHA
  thrown = np.round(a * 200 + (1 - a) * np.array(visualize.THROWN_RGB)).astype(np.uint8)
  np.testing.assert_array_equal(out[0, 2:], np.broadcast_to(thrown, (2, 4, 3)))
  # Without ids_throw the complement of visible + decoded is thrown.
  again = visualize.token_map(images, ids['ids_vis'], ids['ids_dec'], None, 2, identity_denorm)
  np.testing.assert_array_equal(again, out)


def test_reconstruction_thrown_with_and_without_predictions():
  images, ids = _hand_case()
  pred_dec = np.full((1, 1, 12), 50.0, np.float32)
  pred_throw = np.full((1, 2, 12), 100.0, np.float32)
  partial = visualize.reconstruction(images, pred_dec, ids['ids_vis'], ids['ids_dec'], 2, 'pixel',
                                     identity_denorm, ids['ids_throw'])
  np.testing.assert_array_equal(partial[0, :2, :2], 200)
  np.testing.assert_array_equal(partial[0, :2, 2:], 50)
  np.testing.assert_array_equal(partial[0, 2:], np.broadcast_to(visualize.THROWN_RGB, (2, 4, 3)))
  full = visualize.reconstruction(images, pred_dec, ids['ids_vis'], ids['ids_dec'], 2, 'pixel',
                                  identity_denorm, ids['ids_throw'], pred_throw)
  t = visualize.PRED_TINT_ALPHA
  tinted = np.round(t * np.array(visualize.PRED_TINT_RGB) + (1 - t) * 100).astype(np.uint8)
  np.testing.assert_array_equal(full[0, 2:], np.broadcast_to(tinted, (2, 4, 3)))
  np.testing.assert_array_equal(full[0, :2], partial[0, :2])


def test_reconstruction_norm_pixel_uses_each_patch_stats():
  rng = np.random.default_rng(0)
  images = rng.uniform(20, 230, size=(1, 4, 4, 3)).astype(np.float32)
  _, ids = _hand_case()
  patches = images.reshape(1, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 12)
  normed = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
      patches.var(-1, keepdims=True, ddof=1) + 1e-6)
  # Perfect predictions of the normalised targets give back the image (before tinting).
  out = visualize.reconstruction(images, normed[:, [1]], ids['ids_vis'], ids['ids_dec'], 2,
                                 'norm_pixel', identity_denorm, ids['ids_throw'], normed[:, [2, 3]])
  np.testing.assert_array_equal(out[0, :2], identity_denorm(images[0, :2]))
  t = visualize.PRED_TINT_ALPHA
  tinted = np.round(t * np.array(visualize.PRED_TINT_RGB, np.float32) +
                    (1 - t) * identity_denorm(images[0, 2:]).astype(np.float32))
  np.testing.assert_allclose(out[0, 2:], tinted, atol=1)


@pytest.mark.parametrize('target,with_throw,ncol', [
    ('norm_pixel', False, 3), ('pixel', True, 3), ('hog', False, 2), ('hog', True, 2)])
def test_reconstruction_grid_shape(target, with_throw, ncol):
  rng = np.random.default_rng(1)
  b, size, p, gap = 3, 16, 4, 2
  images = rng.normal(size=(b, size, size, 3)).astype(np.float32)
  perm = np.stack([rng.permutation(16) for _ in range(b)])
  ids_vis, ids_dec, ids_throw = perm[:, :4], perm[:, 4:8], perm[:, 8:]
  dim = 108 if target == 'hog' else p * p * 3
  pred_dec = rng.normal(size=(b, 4, dim)).astype(np.float32)
  kwargs = {}
  if with_throw:
    kwargs = dict(ids_throw=ids_throw, pred_throw=rng.normal(size=(b, 8, dim)).astype(np.float32))
  out = visualize.reconstruction_grid(images, pred_dec, ids_vis, ids_dec, p, target,
                                      pipeline.denormalize, **kwargs)
  assert out.dtype == np.uint8
  assert out.shape == (b * (size + gap) - gap, ncol * (size + gap) - gap, 3)


def test_reconstruction_grid_old_call_still_works():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  ids_vis, ids_dec = np.array([[0], [3]]), np.array([[1, 2], [0, 1]])
  out = visualize.reconstruction_grid(images, rng.normal(size=(2, 2, 48)), ids_vis, ids_dec, 4,
                                      'pixel', pipeline.denormalize)
  assert out.shape == (2 * 8 + 2, 3 * 8 + 4, 3)


def _tiny_config(tmp_path, **extra):
  config = apply_overrides(load_config(), {**TINY_OVERRIDES, **extra})
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.backend = 'numpy'
  return config


def _png_size(path):
  with open(path, 'rb') as f:
    image = Image.open(io.BytesIO(f.read()))
    image.load()
  return image.size  # (width, height)


def test_visualize_masks_writes_pngs(tmp_path, capsys):
  config = _tiny_config(tmp_path, **{'masking.throw_ratio': 0.0})  # MAE: drawn at 0.5
  paths = visualize_masks.write_pictures(config, str(tmp_path / 'out'), num_images=3, seed=0)
  assert 'throw_ratio=0.5' in capsys.readouterr().out
  names = sorted(p.rsplit('/', 1)[1] for p in paths)
  assert names == ['masks_compare.png', 'masks_furthest.png', 'masks_random.png',
                   'masks_running_cell.png']
  tile, gap = 16 * 12, 2  # 16 px images upscaled x12 to reach 192 px
  height = 3 * (tile + gap) - gap
  for path in paths:
    ncol = 4 if path.endswith('compare.png') else 2
    assert _png_size(path) == (ncol * (tile + gap) - gap, height)
  # The same visible patches in every strategy: a patch (48 px after x12) equal to the
  # original in one column is equal in all of them.
  with open(paths[-1], 'rb') as f:
    compare = np.asarray(Image.open(f).convert('RGB'))
  cols = [compare[:, j * (tile + gap):j * (tile + gap) + tile] for j in range(4)]
  rows = [np.concatenate([c[i * (tile + gap):i * (tile + gap) + tile] for i in range(3)])
          for c in cols]  # [3 * tile, tile, 3] each
  visible = [np.all((r == rows[0]).reshape(12, 48, 4, 48, 3), axis=(1, 3, 4)) for r in rows[1:]]
  np.testing.assert_array_equal(visible[0], visible[1])
  np.testing.assert_array_equal(visible[0], visible[2])
  assert visible[0].sum() == 3 * 4  # 4 of 16 patches visible per image (mask 0.75)


def test_visualize_masks_bad_out_is_one_error_line(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  proc = subprocess.run(
      [sys.executable, '-m', 'pr_mim_jax.visualize_masks',
       '--config=configs/pretrain.py:dataset=shapes', f'--out={blocker}/sub'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --out'), proc.stderr
