"""Tests for the token-split pictures and the visualize_masks command."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFont

from conftest import ROOT, TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax import patch_tokens
from pr_mim_jax.data import pipeline, pixels
from pr_mim_jax.tools import visualize_masks
from pr_mim_jax.training import visualize


def identity_denorm(x):
  """Normalised == display units here: values are already 0..255."""
  return np.clip(np.round(np.asarray(x, np.float32)), 0, 255).astype(np.uint8)


def _hand_case(patch=2):
  # 1 image, 2x2 patches of `patch` px; patch 0 visible, 1 decoded, 2 and 3 (bottom row) thrown.
  images = np.full((1, 2 * patch, 2 * patch, 3), 200.0, np.float32)
  ids = dict(ids_vis=np.array([[0]]), ids_dec=np.array([[1]]), ids_throw=np.array([[2, 3]]))
  return images, ids


def _marks_only(pixels):
  """True if the pixels are the thrown marking: both mark colours and nothing else."""
  flat = pixels.reshape(-1, 3)
  dark = np.all(flat == visualize.MARK_DARK, -1)
  light = np.all(flat == visualize.MARK_LIGHT, -1)
  return bool(np.all(dark | light) and dark.any() and light.any())


def test_token_map_colours_per_patch_class():
  images, ids = _hand_case()
  out = visualize.token_map(images, ids['ids_vis'], ids['ids_dec'], ids['ids_throw'], 2,
                            identity_denorm)
  assert out.dtype == np.uint8 and out.shape == (1, 4, 4, 3)
  np.testing.assert_array_equal(out[0, :2, :2], 200)  # visible: the image
  np.testing.assert_array_equal(out[0, :2, 2:], 128)  # decoded: grey
  assert _marks_only(out[0, 2:])  # thrown: opaque stripes of the two mark colours
  # Without ids_throw the complement of visible + decoded is thrown.
  again = visualize.token_map(images, ids['ids_vis'], ids['ids_dec'], None, 2, identity_denorm)
  np.testing.assert_array_equal(again, out)


def test_reconstruction_thrown_with_and_without_predictions():
  images, ids = _hand_case(patch=8)
  pred_dec = np.full((1, 1, 192), 50.0, np.float32)
  pred_throw = np.full((1, 2, 192), 100.0, np.float32)
  partial = visualize.reconstruction(images, pred_dec, ids['ids_vis'], ids['ids_dec'], 8, 'pixel',
                                     identity_denorm, ids['ids_throw'])
  np.testing.assert_array_equal(partial[0, :8, :8], 200)
  np.testing.assert_array_equal(partial[0, :8, 8:], 50)
  assert _marks_only(partial[0, 8:])  # not predicted: striped like the token map
  full = visualize.reconstruction(images, pred_dec, ids['ids_vis'], ids['ids_dec'], 8, 'pixel',
                                  identity_denorm, ids['ids_throw'], pred_throw)
  np.testing.assert_array_equal(full[0, :8], partial[0, :8])
  for x in (0, 8):  # each predicted thrown patch: the prediction inside a striped 1-px frame
    tile = full[0, 8:, x:x + 8]
    np.testing.assert_array_equal(tile[1:-1, 1:-1], 100)
    frame = np.concatenate([tile[0], tile[-1], tile[1:-1, 0], tile[1:-1, -1]])
    assert _marks_only(frame)


def test_reconstruction_norm_pixel_uses_each_patch_stats():
  rng = np.random.default_rng(0)
  images = rng.uniform(20, 230, size=(1, 16, 16, 3)).astype(np.float32)
  _, ids = _hand_case(patch=8)
  patches = images.reshape(1, 2, 8, 2, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 192)
  normed = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
      patches.var(-1, keepdims=True, ddof=1) + 1e-6)
  # Perfect predictions of the normalised targets give back the image (inside the frames).
  out = visualize.reconstruction(images, normed[:, [1]], ids['ids_vis'], ids['ids_dec'], 8,
                                 'norm_pixel', identity_denorm, ids['ids_throw'], normed[:, [2, 3]])
  expected = identity_denorm(images[0]).astype(np.int16)
  np.testing.assert_allclose(out[0, :8], expected[:8], atol=1)
  for x in (0, 8):
    np.testing.assert_allclose(out[0, 9:15, x + 1:x + 7], expected[9:15, x + 1:x + 7], atol=1)


RED = (200, 20, 20)


def _luma(pixels):
  return np.asarray(pixels, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _red_case(seed=3):
  """Two all-red 64 px images, 8 px patches: 16 visible, 16 decoded, 32 thrown each."""
  rng = np.random.default_rng(seed)
  images = np.broadcast_to(np.array(RED, np.float32), (2, 64, 64, 3)).copy()
  perm = np.stack([rng.permutation(64) for _ in range(2)])
  return images, perm[:, :16], perm[:, 16:32], perm[:, 32:]


def _patch(picture, k, patch=8, grid=8):
  r, c = divmod(int(k), grid)
  return picture[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]


def _stands_out(tile):
  """Very dark and very light pixels both: no solid red (or any solid colour) looks like it."""
  luma = _luma(tile)
  return luma.min() < 40 and luma.max() > 170


def test_thrown_patches_stand_out_on_a_red_image():
  images, ids_vis, ids_dec, ids_throw = _red_case()
  red_patches = np.asarray(patch_tokens.patchify(images, 8))  # [B, L, 192]
  take = lambda ids: np.take_along_axis(red_patches, ids[..., None], axis=1)  # perfect predictions
  pictures = {
      'token map': visualize.token_map(images, ids_vis, ids_dec, ids_throw, 8, identity_denorm),
      'partial': visualize.reconstruction(images, take(ids_dec), ids_vis, ids_dec, 8, 'pixel',
                                          identity_denorm, ids_throw),
      'pr_mim': visualize.reconstruction(images, take(ids_dec), ids_vis, ids_dec, 8, 'pixel',
                                         identity_denorm, ids_throw, take(ids_throw)),
  }
  for name, out in pictures.items():
    for b in range(2):
      for k in ids_throw[b]:
        assert _stands_out(_patch(out[b], k)), (name, b, k)
      for k in ids_vis[b]:
        np.testing.assert_array_equal(_patch(out[b], k), np.broadcast_to(RED, (8, 8, 3)))
  # PR-MIM: the predicted red still shows inside the marking frame; decoded patches unmarked.
  for k in ids_throw[0]:
    np.testing.assert_array_equal(_patch(pictures['pr_mim'][0], k)[1:-1, 1:-1],
                                  np.broadcast_to(RED, (6, 6, 3)))
  for k in ids_dec[0]:
    np.testing.assert_array_equal(_patch(pictures['pr_mim'][0], k), np.broadcast_to(RED, (8, 8, 3)))


def _find_rows(picture, block):
  """First row offset where `block` [h, w, 3] sits at the picture's left edge; None if nowhere."""
  h, w = block.shape[:2]
  for top in range(picture.shape[0] - h + 1):
    if np.array_equal(picture[top:top + h, :w], block):
      return top
  return None


def _has_text(band):
  return bool((_luma(band) < 100).any())


def _check_titles_and_legend(picture, top, grid_h, tile, gap, ncol):
  """Title band above the tiles with a distinct title per column; legend below the tiles."""
  assert top > 0
  titles = [picture[:top, j * (tile + gap):j * (tile + gap) + tile] for j in range(ncol)]
  assert all(_has_text(t) for t in titles)
  assert len({t.tobytes() for t in titles}) == ncol  # each column has its own title
  legend = picture[top + grid_h:]
  assert legend.shape[0] > 10 and _has_text(legend)
  flat = legend.reshape(-1, 3)
  assert np.all(flat == visualize.MARK_LIGHT, -1).any()  # the thrown stripes, as a swatch
  assert np.all(flat == 128, -1).any()  # the decoded grey, as a swatch
  return legend


@pytest.mark.parametrize('target,with_throw,ncol', [
    ('norm_pixel', False, 3), ('pixel', True, 3), ('hog', False, 2), ('hog', True, 2)])
def test_reconstruction_grid_titles_legend_and_tiles(target, with_throw, ncol):
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
                                      pixels.denormalize, **kwargs)
  tile = 128  # 16 px upscaled x8: room for a title over each column
  grid_h = b * (tile + gap) - gap
  assert out.dtype == np.uint8
  assert out.shape[1] == ncol * (tile + gap) - gap and out.shape[0] > grid_h + 20
  # The original column is the images, upscaled and otherwise unchanged, below the titles.
  originals = np.repeat(np.repeat(pixels.denormalize(images), 8, 1), 8, 2)  # [b, 128, 128, 3]
  top = _find_rows(out, originals[0])
  assert top is not None
  for i in range(b):
    np.testing.assert_array_equal(out[top + i * (tile + gap):top + i * (tile + gap) + tile, :tile],
                                  originals[i])
  legend = _check_titles_and_legend(out, top, grid_h, tile, gap, ncol)
  framed = with_throw and target != 'hog'  # only then is there a predicted-thrown entry
  plain = visualize.reconstruction_grid(images, pred_dec, ids_vis, ids_dec, p, target,
                                        pixels.denormalize)
  assert (legend.shape[0] > plain.shape[0] - top - grid_h) == framed


def test_mae_picture_has_no_thrown_legend_entry():
  """MAE throws nothing (visible + decoded = every patch): no patch is striped, so the legend
  must not list the thrown stripes either; with a thrown patch it does."""
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
  perm = np.stack([rng.permutation(16) for _ in range(2)])
  pred = rng.normal(size=(2, 12, 48)).astype(np.float32)
  mae = visualize.reconstruction_grid(images, pred, perm[:, :4], perm[:, 4:], 4, 'norm_pixel',
                                      pixels.denormalize, ids_throw=perm[:, 16:])
  stripes = lambda picture: np.all(picture == visualize.MARK_LIGHT, -1).sum()
  assert stripes(mae) == 0  # neither tiles nor legend carry the thrown marking
  partial = visualize.reconstruction_grid(images, pred[:, :11], perm[:, :4], perm[:, 4:15], 4,
                                          'norm_pixel', pixels.denormalize, ids_throw=perm[:, 15:])
  assert stripes(partial) > 2 * stripes(visualize.token_map(
      images, perm[:, :4], perm[:, 4:15], None, 4, pixels.denormalize).repeat(8, 1).repeat(8, 2))
  assert [text for _, text in visualize.legend_items(thrown=False)] == [
      'visible: the image', 'decoded: masked, reconstructed']


def test_reconstruction_grid_scale_and_old_call():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  ids_vis, ids_dec = np.array([[0], [3]]), np.array([[1, 2], [0, 1]])
  out = visualize.reconstruction_grid(images, rng.normal(size=(2, 2, 48)), ids_vis, ids_dec, 4,
                                      'pixel', pixels.denormalize)  # the pre-training call
  assert out.shape[1] == 3 * 128 + 4  # 8 px tiles upscaled x16
  small = visualize.reconstruction_grid(images, rng.normal(size=(2, 2, 48)), ids_vis, ids_dec, 4,
                                        'pixel', pixels.denormalize, scale=3)
  assert small.shape[1] == 3 * 24 + 4


def test_grid_without_titles_is_the_bare_tiles():
  tiles = [[np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)]]
  out = visualize.grid(tiles)
  assert out.shape == (4, 10, 3)
  np.testing.assert_array_equal(out[:, 4:6], 255)  # white gap


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


@pytest.mark.slow
def test_visualize_masks_writes_pngs(tmp_path, capsys):
  config = _tiny_config(tmp_path, **{'masking.throw_ratio': 0.0})  # MAE: drawn at 0.5
  paths = visualize_masks.write_pictures(config, str(tmp_path / 'out'), num_images=3, seed=0)
  assert 'throw_ratio=0.5' in capsys.readouterr().out
  names = sorted(p.rsplit('/', 1)[1] for p in paths)
  assert names == ['masks_compare.png', 'masks_furthest.png', 'masks_random.png',
                   'masks_running_cell.png']
  tile, gap = 16 * 12, 2  # 16 px images upscaled x12 to reach 192 px
  grid_h = 3 * (tile + gap) - gap
  images, _ = pipeline.labeled_arrays(config.data, config.data.eval_split, num_examples=3,
                                      image_size=16)
  originals = np.repeat(np.repeat(pixels.denormalize(images), 12, 1), 12, 2)  # [3, 192, 192, 3]
  for path in paths:
    ncol = 4 if path.endswith('compare.png') else 2
    width, height = _png_size(path)
    assert width == ncol * (tile + gap) - gap and height > grid_h + 20
  with open(paths[-1], 'rb') as f:
    compare = np.asarray(Image.open(f).convert('RGB'))
  top = _find_rows(compare, originals[0])  # the tiles sit below a title band
  assert top is not None
  _check_titles_and_legend(compare, top, grid_h, tile, gap, 4)
  # The same visible patches in every strategy: a patch (48 px after x12) equal to the
  # original in one column is equal in all of them; the other patches are grey or striped.
  cols = [compare[top:top + grid_h, j * (tile + gap):j * (tile + gap) + tile] for j in range(4)]
  rows = [np.concatenate([c[i * (tile + gap):i * (tile + gap) + tile] for i in range(3)])
          for c in cols]  # [3 * tile, tile, 3] each
  np.testing.assert_array_equal(rows[0], np.concatenate(originals))
  visible = [np.all((r == rows[0]).reshape(12, 48, 4, 48, 3), axis=(1, 3, 4)) for r in rows[1:]]
  np.testing.assert_array_equal(visible[0], visible[1])
  np.testing.assert_array_equal(visible[0], visible[2])
  assert visible[0].sum() == 3 * 4  # 4 of 16 patches visible per image (mask 0.75)
  masked = rows[1].reshape(12, 48, 4, 48, 3).transpose(0, 2, 1, 3, 4)[~visible[0]]
  grey = [bool(np.all(t == 128)) for t in masked]
  assert sum(grey) == 3 * 4  # decoded: 4 of 16 (throw 0.5 of 16 = 8 thrown)
  assert all(_marks_only(t) for t, g in zip(masked, grey) if not g)


def test_visualize_masks_bad_out_is_one_error_line(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  proc = subprocess.run(
      [sys.executable, '-m', 'pr_mim_jax.tools.visualize_masks',
       '--config=pr_mim_jax/configs/pretrain.py:dataset=shapes', f'--out={blocker}/sub'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --out'), proc.stderr


def test_visualize_masks_says_when_the_split_has_fewer_images(tmp_path, capsys):
  config = _tiny_config(tmp_path, **{'data.shapes.test_size': 4})
  paths = visualize_masks.write_pictures(config, str(tmp_path / 'out'), num_images=6, seed=0)
  assert "--num_images=6: split 'test' has 4 images; drawing those" in capsys.readouterr().out
  width, height = _png_size(paths[0])
  assert height > 4 * (16 * 12 + 2) - 2 and height < 5 * (16 * 12 + 2)  # 4 rows, not 6


@pytest.mark.parametrize('layout', ['flat', 'train_only'])
def test_visualize_masks_reads_an_unlabeled_image_folder(tmp_path, capsys, layout):
  """Masks need no labels: a folder of images laid out for pre-training (flat, or root/train
  with no eval split) is drawn from the images pre-training reads, in sorted order."""
  colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # a.png, b.png, c.png
  root = tmp_path / 'imgs'
  folder = root if layout == 'flat' else root / 'train'
  folder.mkdir(parents=True)
  for name, colour in zip('abc', colours):
    Image.new('RGB', (16, 16), colour).save(folder / f'{name}.png')  # 16 px: passed unchanged
  config = _tiny_config(tmp_path, **{'data.dataset': f'folder:{root}'})
  paths = visualize_masks.write_pictures(config, str(tmp_path / 'out'), num_images=5, seed=0)
  out = capsys.readouterr().out
  assert f'--num_images=5: folder:{folder} has 3 images; drawing those' in out
  assert (f"{root} has no folder 'test' (data.eval_split): drawing the images pre-training "
          f"reads, from folder:{folder}") in out
  with open(paths[-1], 'rb') as f:
    compare = np.asarray(Image.open(f).convert('RGB'))
  tile, gap = 16 * 12, 2
  top = _find_rows(compare, np.full((tile, tile, 3), colours[0], np.uint8))
  assert top is not None
  for i, colour in enumerate(colours):  # the 'original' column, one row per image
    row = top + i * (tile + gap)
    assert (compare[row:row + tile, :tile] == colour).all()


def _norm_pixel_targets(patches):
  """NumPy reference of MAE's norm_pix targets (DESIGN.md): per-patch mean, unbiased (ddof=1)
  variance, eps 1e-6 inside the square root."""
  patches = np.asarray(patches, np.float64)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True, ddof=1)
  return ((patches - mean) / np.sqrt(var + 1e-6)).astype(np.float32)


def test_norm_pixel_perfect_predictions_give_back_the_image_exactly_with_small_patches():
  """2 px patches (12 values each): the per-patch std must be the unbiased one the targets use
  (ddof=0 would be off by sqrt(12/11), several pixel levels here)."""
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(2, 4, 4, 3)).astype(np.float32)  # integer pixel values
  patches = images.reshape(2, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 12)
  targets = _norm_pixel_targets(patches)
  ids_vis = np.array([[0], [3]])
  ids_dec = np.array([[1, 2, 3], [2, 0, 1]])  # MAE: every masked patch decoded
  pred = np.take_along_axis(targets, ids_dec[..., None], axis=1)
  out = visualize.reconstruction(images, pred, ids_vis, ids_dec, 2, 'norm_pixel', identity_denorm)
  np.testing.assert_array_equal(out, images.astype(np.uint8))


def test_norm_pixel_low_contrast_uint8_patches_come_back_exactly():
  """uint8 input is normalised first (as the model saw it); a nearly flat patch has a tiny
  variance, where only the small eps (1e-6) keeps its one-level detail."""
  rng = np.random.default_rng(6)
  base = np.round(pixels.MEAN255).astype(np.int64)  # normalised values near 0
  images = (base + rng.integers(0, 2, size=(1, 8, 8, 3))).astype(np.uint8)
  normed = pixels.normalized(images)
  patches = np.asarray(patch_tokens.patchify(normed, 4))  # [1, 4, 48]
  ids_vis, ids_dec = np.array([[2]]), np.array([[0, 1, 3]])
  pred = _norm_pixel_targets(patches)[:, [0, 1, 3]]
  out = visualize.reconstruction(images, pred, ids_vis, ids_dec, 4, 'norm_pixel',
                                 pixels.denormalize)
  np.testing.assert_array_equal(out, images)
  assert len(np.unique(out[..., 0])) == 2  # the detail is there to lose


def test_fit_factor_is_the_smallest_factor_reaching_the_minimum():
  for size in range(1, 300):
    f = visualize.fit_factor(size)
    assert f * size >= visualize.MIN_TILE and (f == 1 or (f - 1) * size < visualize.MIN_TILE)
  assert visualize.fit_factor(24, 100) == 5 and visualize.fit_factor(200) == 1


def _pred_for_pixel(rgb):
  """The normalised-space prediction that ImageNet denormalisation draws as pixel `rgb`."""
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  return ((np.asarray(rgb, np.float64) / 255 - mean) / std).astype(np.float32)


def _ink_span(band):
  """Width in px from the first to the last column holding dark (text) pixels."""
  cols = np.nonzero((_luma(band) < 100).any(0))[0]
  return int(cols.max() - cols.min() + 1) if cols.size else 0


def test_reconstruction_grid_png_shows_each_patch_in_its_column_under_its_title():
  """A hand-made 8 px image of four 4 px patches of known colours, read back from the PNG:
  top-right visible, bottom-left decoded, the diagonal thrown (and predicted, PR-MIM)."""
  colours = {0: (10, 20, 30), 1: (40, 50, 60), 2: (70, 80, 90), 3: (100, 110, 120)}
  image = np.zeros((1, 8, 8, 3), np.uint8)
  for k, rgb in colours.items():
    r, c = divmod(k, 2)
    image[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = rgb
  dec_rgb, throw_rgb = (250, 5, 128), (0, 255, 0)
  pred_dec = np.tile(_pred_for_pixel(dec_rgb), 16)[None, None]  # [1, 1, 48]
  pred_throw = np.tile(_pred_for_pixel(throw_rgb), (1, 2, 16))  # [1, 2, 48]
  out = visualize.reconstruction_grid(image, pred_dec, np.array([[1]]), np.array([[2]]), 4,
                                      'pixel', pixels.denormalize, ids_throw=np.array([[0, 3]]),
                                      pred_throw=pred_throw)
  picture = np.asarray(Image.open(io.BytesIO(visualize.encode_png(out))).convert('RGB'))
  tile, gap, p = 128, 2, 64  # x16: 8 px tiles become 128 px, 4 px patches 64 px
  top = _find_rows(picture, np.full((p, p, 3), colours[0], np.uint8))
  assert top is not None
  cols = [picture[top:top + tile, j * (tile + gap):j * (tile + gap) + tile] for j in range(3)]
  at = lambda col, k: cols[col][p * (k // 2):p * (k // 2) + p, p * (k % 2):p * (k % 2) + p]
  for k, rgb in colours.items():  # original
    assert (at(0, k) == rgb).all(), k
  assert (at(1, 1) == colours[1]).all() and (at(1, 2) == 128).all()  # token map
  assert _marks_only(at(1, 0)) and _marks_only(at(1, 3))
  assert (at(2, 1) == colours[1]).all() and (at(2, 2) == dec_rgb).all()  # reconstruction
  frame = 16  # the 1 px frame of a 4 px patch, upscaled x16
  for k in (0, 3):
    assert (at(2, k)[frame:-frame, frame:-frame] == throw_rgb).all(), k
    assert _marks_only(np.concatenate([at(2, k)[:frame].reshape(-1, 3),
                                       at(2, k)[:, :frame].reshape(-1, 3)])), k
  try:
    fnt = ImageFont.load_default(size=16)  # titles of 128 px columns need no shrinking
  except TypeError:  # Pillow < 10.1: one small built-in font, titles not checked
    return
  for j, title in enumerate(['original', 'token map', 'reconstruction']):
    left, _, right, _ = fnt.getbbox(title)
    band = picture[:top, j * (tile + gap):j * (tile + gap) + tile]
    assert abs(_ink_span(band) - (right - left)) <= 2, title
    ink = np.nonzero((_luma(band) < 100).any(0))[0]
    assert abs((ink.min() + ink.max()) / 2 - (tile - 1) / 2) <= 2, title  # centred on its column


def test_legend_items_pair_each_swatch_with_its_meaning():
  items = visualize.legend_items(reconstructed=True, predicted_thrown=True, swatch=16)
  assert [text.split(':')[0].split(',')[0] for _, text in items] == [
      'visible', 'decoded', 'thrown', 'thrown']
  (visible, _), (decoded, _), (thrown, _), (framed, text) = items
  assert visible is None and 'predicted' in text
  assert decoded.shape == (16, 16, 3) and (decoded == 128).all()  # the token map's grey
  assert _marks_only(thrown)  # the token map's stripes
  edge = np.concatenate([framed[0], framed[-1], framed[:, 0], framed[:, -1]])
  assert _marks_only(edge) and (framed[4:-4, 4:-4] == 255).all()  # a striped frame, open inside


def test_thrown_stripes_run_diagonally_and_cross_every_row_and_column():
  marks = visualize.stripes(12, 12, 3)
  np.testing.assert_array_equal(marks[1:, :-1], marks[:-1, 1:])  # constant along x + y
  for i in range(12):
    assert _marks_only(marks[i]) and _marks_only(marks[:, i]), i
  images, ids = _hand_case(patch=16)
  out = visualize.token_map(images, ids['ids_vis'], ids['ids_dec'], None, 16, identity_denorm)
  row = out[0, 20, :16]  # a row of thrown patch 2
  assert np.any(row[1:] != row[:-1], -1).sum() >= 3  # two dark-light periods per patch


def test_thrown_predictions_without_their_ids_are_refused():
  images, ids = _hand_case()
  with pytest.raises(ValueError, match='pred_throw needs ids_throw'):
    visualize.reconstruction(images, np.zeros((1, 1, 12)), ids['ids_vis'], ids['ids_dec'], 2,
                             'pixel', identity_denorm, pred_throw=np.zeros((1, 2, 12)))
