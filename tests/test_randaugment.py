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
        else:  # AutoContrast: float32 vs float64 LUT; enhance ops: float32 vs Pillow's C
          assert np.abs(a - b).max() <= 1, name
          if name != "AutoContrast":  # Pillow truncates: rounding would differ on ~half
            assert np.mean(a != b) < 0.05, (name, np.mean(a != b))


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


# ------------------------------------------------------ TF ops: exact cases, draws, erasing


def test_tf_autocontrast_is_pillows_stretch(ra):
  """Pillow's autocontrast maps x to int((x - lo) * 255 / (hi - lo)) per channel (truncated,
  not rounded). Float32 against float64 may land a whole number one level lower, in under
  15% of the values here (measured: 0-10%); rounding instead of truncating moves about
  half of them."""
  for x in (_image(seed=2), _image(90, 140, seed=3), _image(30, 200, seed=4)):
    a = _tf_op(ra, x, "AutoContrast", 0.5).astype(int)
    b = _np_op(x, "AutoContrast", 0.5).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.15


def test_tf_contrast_blends_towards_the_rounded_grey_mean(ra):
  """Pillow's Contrast blends towards int(mean grey + 0.5). Grey 0..14 and 20: mean 7.8125,
  so the degenerate is 8; factor 1 - 0.9 * 0.7 = 0.37 (sign -1). Pixel 4 gives
  8 + 0.37 * (4 - 8) = 6.52 with the rounded mean but 6.40 with the raw one."""
  grey = np.r_[np.arange(15), 20].reshape(4, 4).astype(np.uint8)
  x = np.repeat(grey[..., None], 3, -1)
  out = _tf_op(ra, x, "Contrast", 0.7, -1.0)
  want = ra._blend(np.float32(8.0), x.astype(np.float32), np.float32(0.37)).numpy()  # pylint: disable=protected-access
  np.testing.assert_array_equal(out, want)
  assert np.abs(out.astype(int) - _np_op(x, "Contrast", 0.7, -1.0)).max() <= 1  # Pillow


def test_tf_translate_of_a_non_square_image_uses_its_own_axis(ra):
  """TranslateX shifts by 0.45 * level * width, TranslateY by 0.45 * level * height: on a
  16 x 32 image, whole shifts of 8 columns and 4 rows, against np.roll and Pillow."""
  img = np.random.default_rng(7).integers(0, 256, (16, 32, 3)).astype(np.uint8)
  for name, axis, pixels in (("TranslateX", 1, 8), ("TranslateY", 0, 4)):
    level = pixels / (0.45 * img.shape[axis])
    out = _tf_op(ra, img, name, level, 1.0)
    keep = (slice(None), slice(0, 32 - pixels)) if axis else (slice(0, 16 - pixels),)
    np.testing.assert_array_equal(out[keep], np.roll(img, -pixels, axis)[keep], name)
    np.testing.assert_array_equal(out, _np_op(img, name, level, 1.0), name)


def test_tf_rand_augment_draws_ops_signs_and_levels_as_timm(ra, monkeypatch):
  """TF's RandAugment draws as timm's rand-m9-mstd0.5 (the NumPy test above): each slot
  applies with p = 0.5 an op uniform over all 15, sign +-1 with p = 0.5, level (9 + N(0,
  0.5)) / 10 clipped to [0, 1]. Eager tf.cond runs only the branch taken, so a recording
  apply_op sees exactly the applied ops. Bounds about 5 standard deviations."""
  tf = ra.tf
  calls = []
  def record(x, op, level, sign):
    calls.append((int(op), float(level), float(sign)))
    return x
  monkeypatch.setattr(ra, "apply_op", record)
  x = tf.zeros([2, 2, 3])
  n = 1000
  for s in range(n):
    ra.rand_augment(x, tf.constant([s, 11], tf.int64), num_ops=2, magnitude=9.0,
                    magnitude_std=0.5)
  ops, levels, signs = (np.array(v) for v in zip(*calls))
  assert abs(len(calls) / (2 * n) - 0.5) < 5 * np.sqrt(0.25 / (2 * n))
  counts = np.bincount(ops, minlength=len(randaugment_np.OPS))
  assert len(counts) == len(randaugment_np.OPS)
  expected = len(calls) / len(randaugment_np.OPS)
  assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all(), counts
  assert set(signs) == {-1.0, 1.0}
  assert abs(np.mean(signs > 0) - 0.5) < 5 * np.sqrt(0.25 / len(calls))
  assert abs(levels.mean() - 0.9) < 0.01 and abs(levels.std() - 0.05) < 0.01


@pytest.fixture(scope="module")
def tf_erase(ra):
  tf = ra.tf
  fn = tf.function(lambda x, i, p: ra.random_erase(x, tf.stack([i, 3]), p))
  return lambda x, i, p: fn(x, tf.constant(i, tf.int64), p).numpy()


def test_random_erase_rate_tf(ra, tf_erase):
  """TF erases with probability prob (0.25; a polarity error gives 0.75)."""
  x = np.full((16, 16, 3), 7.0, np.float32)
  erased = np.mean([(tf_erase(x, i, 0.25) != 7.0).any() for i in range(600)])
  assert abs(erased - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 600)


@pytest.mark.parametrize("backend", ["numpy", "tf"])
def test_random_erase_box_is_strictly_inside_and_uniformly_placed(backend, tf_erase):
  """timm keeps a box only if h < H and w < W (a box never spans a whole side) and places it
  uniformly over [0, H - h] x [0, W - w] inclusive: on a 4 x 40 image (h is 1-3 rows), the
  box touches the bottom as often as the top, and the right edge as often as the left."""
  x = np.full((4, 40, 3), 7.0, np.float32)
  boxes = []
  for i in range(600):
    out = (randaugment_np.random_erase(x, np.random.default_rng(i), 1.0) if backend == "numpy"
           else tf_erase(x, i, 1.0))
    changed = (out != 7.0).any(-1)
    if changed.any():
      ys, xs = np.nonzero(changed)
      boxes.append((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
  top, bottom, left, right = np.array(boxes).T
  assert len(boxes) > 300
  assert (bottom - top < 4).all() and (right - left < 40).all()
  rates = [(top == 0).mean(), (bottom == 4).mean(), (left == 0).mean(), (right == 40).mean()]
  bound = 5 * np.sqrt(0.5 / len(boxes))
  assert rates[0] > 0.2 and abs(rates[0] - rates[1]) < bound
  assert abs(rates[2] - rates[3]) < bound


def test_tf_train_augment_is_crop_then_randaugment_then_normalise(ra):
  """num_ops=0, erase_prob=0: the output is augment.train_augment's pixels, normalised. With
  RandAugment on and no erasing, un-normalising gives whole pixel values in [0, 255] (the ops
  run on pixels, before the normalisation)."""
  tf = ra.tf
  from pr_mim_jax.data import augment, pixels  # pylint: disable=g-import-not-at-top
  img = np.tile(_image(seed=6), (2, 1, 1))
  plain = tf.function(lambda s: ra.train_augment(img, 0, s, 1, 16, encoded=False, num_ops=0,
                                                 erase_prob=0.0))
  ops = tf.function(lambda s: ra.train_augment(img, 0, s, 1, 16, encoded=False, num_ops=2,
                                               magnitude=9.0, erase_prob=0.0))
  changed = 0
  for s in range(12):
    step = tf.constant(s, tf.int64)
    base = augment.train_augment(img, 0, step, 1, 16, encoded=False).numpy()
    np.testing.assert_allclose(plain(step).numpy(), pixels.normalize(base), atol=1e-6)
    x = ops(step).numpy() * pixels.STD255 + pixels.MEAN255
    np.testing.assert_allclose(x, np.round(x), atol=1e-3)
    assert x.min() > -1e-3 and x.max() < 255 + 1e-3
    changed += not np.allclose(x, base, atol=1e-3)
  assert changed >= 6  # RandAugment did act (each image: p = 3/4 of at least one op)


def _boxes_over_seeds(backend, tf_erase, size, draws=600):
  """[4, N]: top, left, h, w of the box that each of `draws` seeded erasures paints on a flat
  size x size image (draws that erase nothing are left out)."""
  x = np.full((size, size, 3), 7.0, np.float32)
  boxes = []
  for i in range(draws):
    out = (randaugment_np.random_erase(x, np.random.default_rng(i), 1.0) if backend == "numpy"
           else tf_erase(x, i, 1.0))
    ys, xs = np.nonzero((out != 7.0).any(-1))
    if len(ys):
      boxes.append((ys.min(), xs.min(), np.ptp(ys) + 1, np.ptp(xs) + 1))
  return np.array(boxes, float).T


@pytest.mark.parametrize("backend", ["numpy", "tf"])
def test_random_erase_area_share_stays_in_timms_range(backend, tf_erase):
  """Area a ~ U[0.02, 1/3] of the image, sides h = round(sqrt(a r)), w = round(sqrt(a / r)),
  so (h - 1/2)(w - 1/2) <= a <= 1/3 H W and (h + 1/2)(w + 1/2) >= a >= 0.02 H W exactly,
  whatever the ratio; the top ~6% of the range must still be drawn (largest share > 0.3)."""
  _, _, h, w = _boxes_over_seeds(backend, tf_erase, 64)
  assert len(h) > 500
  assert ((h - 0.5) * (w - 0.5) <= 64 * 64 / 3).all()
  assert ((h + 0.5) * (w + 0.5) >= 0.02 * 64 * 64).all()
  assert (h * w).max() > 0.3 * 64 * 64


def test_geometric_fill_is_the_imagenet_mean_pixel():
  """timm fills uncovered pixels with the mean colour, round(255 * (0.485, 0.456, 0.406))."""
  assert tuple(randaugment_np.FILL) == (124, 116, 104)
  img = np.zeros((SIZE, SIZE, 3), np.uint8)
  out = _np_op(img, "TranslateX", 1.0, 1.0)  # shifted by 10.8 columns: the right edge is fill
  np.testing.assert_array_equal(out[:, -10:], np.broadcast_to((124, 116, 104), (SIZE, 10, 3)))


def test_random_erase_aspect_ratio_spans_timms_range():
  """The box's h / w is log-uniform in [0.3, 1 / 0.3] (timm): over 1500 boxes on a 64 x 64
  image both extremes are reached (beyond 2.6 and below 1 / 2.6), and none lies outside the
  range by more than whole-pixel rounding allows."""
  x = np.zeros((64, 64, 3), np.float32)
  ratios = []
  for i in range(1500):
    ys, xs = np.nonzero(randaugment_np.random_erase(x, np.random.default_rng(i), 1.0).any(-1))
    if len(ys):
      h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
      ratios.append(h / w)
      assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3, (h, w)
  ratios = np.array(ratios)
  assert ratios.max() > 2.6 and ratios.min() < 1 / 2.6
  assert abs(np.mean(np.log(ratios))) < 0.1  # symmetric in log space


# ------------------------------------------------- resampling, levels, recipe defaults


def test_half_pixel_translate_is_bilinear(op):
  """TranslateX by half a pixel on a horizontal ramp 10 * column: bilinear resampling averages
  the two neighbours, 10 u + 5 (nearest-neighbour would give 10 u or 10 u + 10)."""
  img = np.repeat(np.repeat((np.arange(SIZE) * 10)[None, :, None], SIZE, 0), 3, 2).astype(np.uint8)
  out = op(img, "TranslateX", 0.5 / (0.45 * SIZE), 1.0).astype(int)
  want = np.arange(SIZE - 2) * 10 + 5
  np.testing.assert_array_equal(out[:, :SIZE - 2, 0], np.broadcast_to(want, (SIZE, SIZE - 2)))


def test_tf_rotate_of_a_non_square_image_turns_about_its_centre(ra):
  """Rotate on a 16 x 32 image turns about the image's own centre, as Pillow's rotate: TF and
  Pillow agree up to resampling (a centre with rows and columns swapped is 8 pixels off)."""
  yy, xx = np.mgrid[0:16, 0:32]
  img = np.stack([xx * 8, yy * 15, (xx + yy) * 5], -1).astype(np.uint8)
  for sign in (-1.0, 1.0):
    a = _tf_op(ra, img, "Rotate", 1.0, sign).astype(int)
    b = _np_op(img, "Rotate", 1.0, sign).astype(int)
    assert np.abs(a - b).mean() < 3, (sign, np.abs(a - b).mean())


def _recorded_draws(monkeypatch, n, **kw):
  """(number of applied ops per image, all their levels) of randaugment_np.train_augment over
  n seeds, with apply_op replaced by a recorder that returns the image unchanged."""
  calls = []
  def record(img, name, level, sign):
    calls.append(level)
    return img
  monkeypatch.setattr(randaugment_np, "apply_op", record)
  img = np.tile(_image(seed=8), (2, 1, 1))
  for s in range(n):
    randaugment_np.train_augment(img, augment_np.example_rng(0, s, 0), 16, erase_prob=0.0, **kw)
  return len(calls) / n, np.array(calls)


def test_train_augment_defaults_are_timms_rand_m9_mstd05(monkeypatch):
  """Without arguments train_augment is MAE's fine-tuning recipe: 2 slots applied with p = 1/2
  each (one op per image on average) at level (9 + N(0, 0.5)) / 10. Bounds about 5 sigma."""
  per_image, levels = _recorded_draws(monkeypatch, 1000)
  assert abs(per_image - 1.0) < 5 * np.sqrt(0.5 / 1000)
  assert abs(levels.mean() - 0.9) < 0.01 and abs(levels.std() - 0.05) < 0.01


def test_train_augment_passes_magnitude_and_its_spread_through(monkeypatch):
  """magnitude 5 with magnitude_std 0: every applied op runs at level exactly 0.5."""
  _, levels = _recorded_draws(monkeypatch, 100, magnitude=5.0, magnitude_std=0.0)
  assert len(levels) > 50 and (levels == 0.5).all()


@pytest.mark.parametrize("backend", ["numpy", "tf"])
def test_levels_are_clipped_at_zero(backend, monkeypatch):
  """A magnitude near 0 with a wide spread: levels are clipped to [0, 1], never negative (a
  negative level would turn each op the other way round); about a third of them sit at 0."""
  levels = []
  if backend == "numpy":
    def record(img, name, level, sign):
      levels.append(level)
      return img
    monkeypatch.setattr(randaugment_np, "apply_op", record)
    for s in range(300):
      randaugment_np.rand_augment(_image(), np.random.default_rng(s), magnitude=1.0,
                                  magnitude_std=2.0)
  else:
    ra = pytest.importorskip("pr_mim_jax.data.randaugment")
    def record_tf(x, op, level, sign):
      levels.append(float(level))
      return x
    monkeypatch.setattr(ra, "apply_op", record_tf)
    for s in range(300):
      ra.rand_augment(ra.tf.zeros([2, 2, 3]), ra.tf.constant([s, 5], ra.tf.int64), magnitude=1.0,
                      magnitude_std=2.0)
  levels = np.array(levels)
  assert levels.min() == 0.0 and levels.max() <= 1.0
  assert 0.2 < np.mean(levels == 0.0) < 0.45  # P(N(1, 2) < 0) = 0.31


def test_np_train_augment_erases_with_unit_noise_after_normalising():
  """The erased box holds N(0, 1) noise in the normalised space the model sees (timm erases
  after Normalize), not noise that went through the normalisation."""
  img = np.tile(_image(seed=6), (2, 1, 1))
  values = []
  for s in range(40):
    base = randaugment_np.pixels.normalize(
        augment_np.train_augment(img, augment_np.example_rng(0, s, 0), 16))
    out = randaugment_np.train_augment(img, augment_np.example_rng(0, s, 0), 16, num_ops=0,
                                       erase_prob=1.0)
    values.append(out[(out != base).any(-1)])  # [pixels, 3]
  values = np.concatenate(values)
  assert len(values) > 500
  assert abs(values.mean()) < 0.1 and abs(values.std() - 1.0) < 0.1


@pytest.mark.parametrize("backend", ["numpy", "tf"])
def test_random_erase_box_draws_are_independent(backend, tf_erase):
  """The box's area, aspect ratio, row and column are independent draws (timm): over 600
  boxes on a 48 x 48 image, top / (H - h) and left / (W - w) are uncorrelated, and so are the
  area and log(h / w) (|r| under 5 / sqrt(600) = 0.2; one draw reused for both gives ~0.9)."""
  top, left, h, w = _boxes_over_seeds(backend, tf_erase, 48)
  top, left = top / np.maximum(48 - h, 1), left / np.maximum(48 - w, 1)
  area, log_ratio = h * w, np.log(h / w)
  assert len(top) > 500
  assert abs(np.corrcoef(top, left)[0, 1]) < 0.2
  assert abs(np.corrcoef(area, log_ratio)[0, 1]) < 0.2


def test_tf_rand_augment_output_is_whole_pixels_even_when_no_op_applies(ra):
  """rand_augment returns integer-valued pixels (Pillow's uint8) whatever it draws: with no
  op slots a fractional input comes back rounded."""
  x = np.full((4, 4, 3), 10.4, np.float32)
  x[0, 0] = 200.6
  out = ra.rand_augment(x, ra.tf.constant([0, 1], ra.tf.int64), num_ops=0).numpy()
  np.testing.assert_array_equal(out, np.round(x))


def test_tf_autocontrast_and_equalize_leave_flat_channels_as_pillow_does(ra):
  """Pillow leaves a constant channel unchanged (nothing to stretch or equalise), and Equalize
  also a channel with too few pixels below its top level (3 here, under 255); TF agrees."""
  x = np.zeros((4, 4, 3), np.uint8)
  x[..., 0] = 77  # constant
  x[..., 1] = np.where(np.arange(16).reshape(4, 4) < 3, 40, 90)  # two levels, 3 px below the top
  x[..., 2] = np.arange(16).reshape(4, 4) * 16
  for name, flat in (("AutoContrast", 1), ("Equalize", 2)):
    want = _np_op(x, name, 0.5)
    np.testing.assert_array_equal(want[..., :flat], x[..., :flat], err_msg=name)  # Pillow
    out = _tf_op(ra, x, name, 0.5)
    np.testing.assert_array_equal(out[..., :flat], x[..., :flat], err_msg=name)
    assert np.abs(out.astype(int) - want).max() <= 1, name  # float32 vs Pillow's float64 LUT
