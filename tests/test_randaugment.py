"""RandAugment + random erasing, TF and NumPy: each op, agreement, seeding, erasing boxes."""

import numpy as np
import pytest
from PIL import Image

from pr_mim_jax.data import augment_np, randaugment_np

SIZE = 24


def _image(lo=0, hi=256, seed=0):
  """uint8 [SIZE, SIZE, 3]: noise in [lo, hi) plus a bright square, so geometry is visible."""
  img = np.random.default_rng(seed).integers(lo, hi, (SIZE, SIZE, 3)).astype(np.uint8)
  img[4:10, 6:14] = hi - 1
  return img


def _np_op(img, name, level, sign=1.0):
  return np.asarray(randaugment_np.apply_op(Image.fromarray(img), name, level, sign))


@pytest.fixture(scope="module")
def ra():
  pytest.importorskip("tensorflow")
  from pr_mim_jax.data import randaugment  # pylint: disable=g-import-not-at-top
  return randaugment


def _tf_op(ra, img, name, level, sign=1.0):
  out = ra.apply_op(img.astype(np.float32), randaugment_np.OPS.index(name), level, sign).numpy()
  assert out.shape == img.shape and out.dtype == np.float32
  assert (out == np.round(out)).all() and out.min() >= 0 and out.max() <= 255
  return out.astype(np.uint8)


@pytest.fixture(scope="module", params=["numpy", "tf"])
def op(request):
  if request.param == "numpy":
    return _np_op
  ra = request.getfixturevalue("ra")
  return lambda *a: _tf_op(ra, *a)


def test_every_op_is_sane(op):
  img = _image()
  for name in randaugment_np.OPS:
    for level in (0.0, 0.5, 1.0):
      for sign in (-1.0, 1.0):
        out = op(img, name, level, sign)
        assert out.shape == img.shape and out.dtype == np.uint8, name


def test_identities(op):
  img = _image()
  np.testing.assert_array_equal(op(op(img, "Invert", 0.9), "Invert", 0.9), img)
  for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast",
               "Brightness", "Sharpness", "Solarize", "SolarizeAdd", "Posterize"):
    out = op(img, name, 0.0)
    if name == "Posterize":  # level 0 keeps 4 bits
      np.testing.assert_array_equal(out, img & 0xF0)
    else:
      np.testing.assert_array_equal(out, img, err_msg=name)
  assert not np.array_equal(op(img, "Rotate", 0.5), img)
  np.testing.assert_array_equal(op(img, "Posterize", 1.0), img & 0x80)  # at least 1 bit


def test_geometry_moves_the_square(op):
  img = np.zeros((SIZE, SIZE, 3), np.uint8)
  img[12:18, 12:18] = 255
  level = 10 / (0.45 * SIZE)  # a whole 10-pixel shift: no interpolation
  for name, axis in (("TranslateX", 1), ("TranslateY", 0)):
    out = op(img, name, level, 1.0)
    np.testing.assert_array_equal(np.roll(img, -10, axis)[2:12, 2:12], out[2:12, 2:12], name)
    edge = out[:, -5:] if axis else out[-5:]  # uncovered: the fill colour
    np.testing.assert_array_equal(edge, np.broadcast_to(randaugment_np.FILL, edge.shape))


def test_equalize_flattens_low_contrast(op):
  img = _image(100, 116, seed=1)
  img[4:10, 6:14] = 100 + np.arange(48).reshape(6, 8, 1) % 16
  out = op(img, "Equalize", 0.0)
  assert out.min() < 20 and out.max() > 235
  counts = np.histogram(out, bins=4, range=(0, 256))[0]
  assert counts.min() > 0.15 * counts.sum()  # each quarter of the range holds ~1/4


def test_tf_matches_pillow(ra):
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  smooth = np.stack([xx * 10, yy * 10, (xx + yy) * 5], -1).astype(np.uint8)
  smooth[4:10, 6:14] = 255
  for name in randaugment_np.OPS:
    for x in (_image(seed=2), _image(90, 140, seed=3), smooth):
      for sign in (-1.0, 1.0):
        a = _tf_op(ra, x, name, 0.7, sign).astype(int)
        b = _np_op(x, name, 0.7, sign).astype(int)
        if name in ("Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd"):
          np.testing.assert_array_equal(a, b, err_msg=name)
        elif name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
          if x is smooth:  # resampling conventions differ by about half a pixel
            assert np.abs(a - b).mean() < 3, name
        else:  # AutoContrast: float32 vs float64 LUT; enhance ops: rounding
          assert np.abs(a - b).max() <= 1, name


# ------------------------------------------------------------- full augmentation


def _np_aug(seed, step, pos, **kw):
  img = _image(seed=5)
  rng = augment_np.example_rng(seed, step, pos)
  return randaugment_np.train_augment(np.tile(img, (2, 1, 1)), rng, 16, **kw)


@pytest.fixture(scope="module")
def tf_aug(ra):
  tf = ra.tf
  enc = tf.io.encode_png(np.tile(_image(seed=5), (2, 1, 1)))
  fn = tf.function(lambda step, pos: ra.train_augment(enc, 0, step, pos, 16))
  return lambda step, pos: fn(tf.constant(step, tf.int64), tf.constant(pos, tf.int64)).numpy()


def test_np_train_augment_seeding():
  a = _np_aug(0, 3, 1)
  assert a.shape == (16, 16, 3) and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(a, _np_aug(0, 3, 1))
  assert not np.array_equal(a, _np_aug(0, 3, 2))


@pytest.mark.slow
def test_tf_train_augment_seeding(tf_aug):
  outs = [tf_aug(3, p) for p in range(8)]
  for a in outs:
    assert a.shape == (16, 16, 3) and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(outs[1], tf_aug(3, 1))
  assert len({a.tobytes() for a in outs}) == 8


def _erased_boxes(erase, n=200):
  """Area shares of the erased region over n draws of erase(x, i) on a constant image."""
  x = np.full((SIZE, SIZE + 8, 3), 7.0, np.float32)
  shares = []
  for i in range(n):
    changed = (erase(x, i) != 7.0).any(-1)
    if changed.any():
      ys, xs = np.nonzero(changed)
      assert changed.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one rectangle
    shares.append(changed.mean())
  return np.array(shares)


def test_random_erase_np():
  s = _erased_boxes(lambda x, i: randaugment_np.random_erase(x, np.random.default_rng(i), 0.5))
  assert 0.35 < (s > 0).mean() < 0.65
  assert s[s > 0].min() >= 0.01 and s.max() <= 0.36
  np.testing.assert_array_equal(
      randaugment_np.random_erase(np.ones((4, 4, 3)), np.random.default_rng(0), 0.0), 1.0)


def test_random_erase_tf(ra):
  erase = ra.tf.function(lambda x, i: ra.random_erase(x, ra.tf.stack([i, 1]), 0.5))
  s = _erased_boxes(lambda x, i: erase(x, ra.tf.constant(i, ra.tf.int64)).numpy())
  assert 0.35 < (s > 0).mean() < 0.65
  assert s[s > 0].min() >= 0.01 and s.max() <= 0.36


def test_rand_augment_draws_ops_signs_and_levels_as_timm(monkeypatch):
  """Each of num_ops slots applies with p = 0.5 an op uniform over all 15, a sign +-1 with
  p = 0.5 each, and level (magnitude + N(0, std)) / 10 clipped to [0, 1] (timm's
  rand-m9-mstd0.5). Bounds: about 5 standard deviations over 1000 images."""
  calls = []
  def record(img, name, level, sign):
    calls.append((name, level, sign))
    return img
  monkeypatch.setattr(randaugment_np, "apply_op", record)
  img = _image()
  n = 1000
  for s in range(n):
    randaugment_np.rand_augment(img, np.random.default_rng(s), num_ops=2, magnitude=9.0,
                                magnitude_std=0.5)
  names, levels, signs = zip(*calls)
  assert abs(len(calls) / (2 * n) - 0.5) < 5 * np.sqrt(0.25 / (2 * n))
  counts = np.array([names.count(op) for op in randaugment_np.OPS])
  expected = len(calls) / len(randaugment_np.OPS)
  assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all(), counts
  assert abs(np.mean(np.array(signs) > 0) - 0.5) < 5 * np.sqrt(0.25 / len(calls))
  assert set(signs) == {-1.0, 1.0}
  levels = np.array(levels)
  assert abs(levels.mean() - 0.9) < 0.01 and abs(levels.std() - 0.05) < 0.01
  calls.clear()
  for s in range(200):  # magnitude 10: half the draws clip at level 1
    randaugment_np.rand_augment(img, np.random.default_rng(s), magnitude=10.0)
  levels = np.array([c[1] for c in calls])
  assert levels.max() == 1.0 and 0.3 < np.mean(levels == 1.0) < 0.7


def test_random_erase_rate_and_noise_np():
  """Erases with probability prob (0.25 here: a polarity error would give 0.75), and fills the
  box with independent N(0, 1) noise per pixel and channel."""
  x = np.full((32, 32, 3), 7.0, np.float32)
  erased, values = 0, []
  for s in range(800):
    out = randaugment_np.random_erase(x, np.random.default_rng(s), 0.25)
    box = out != 7.0
    if box.any():
      erased += 1
      values.append(out[box.any(-1)])  # [pixels, 3]
  assert abs(erased / 800 - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 800)
  values = np.concatenate(values)
  assert abs(values.mean()) < 0.05 and abs(values.std() - 1.0) < 0.05
  assert abs(np.corrcoef(values[:, 0], values[:, 1])[0, 1]) < 0.05  # channels independent


def test_np_train_augment_is_crop_then_normalise_then_erase():
  """num_ops=0: the pixels are augment_np's crop and flip, normalised; with erase_prob 1 one
  box of them (area share in [0.02, 1/3], up to rounding) differs."""
  img = np.tile(_image(seed=6), (2, 1, 1))
  for s in range(5):
    base = randaugment_np.pixels.normalize(
        augment_np.train_augment(img, augment_np.example_rng(0, s, 0), 16))
    same = randaugment_np.train_augment(img, augment_np.example_rng(0, s, 0), 16, num_ops=0,
                                        erase_prob=0.0)
    np.testing.assert_array_equal(same, base)
    out = randaugment_np.train_augment(img, augment_np.example_rng(0, s, 0), 16, num_ops=0,
                                       erase_prob=1.0)
    changed = (out != base).any(-1)
    ys, xs = np.nonzero(changed)
    assert changed.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one rectangle
    assert 0.01 <= changed.mean() <= 0.36
    np.testing.assert_array_equal(out[~changed], base[~changed])
