"""MAE augmentation, TF (stateless) and NumPy: shapes, values, flip rate, crop boxes."""

import io

import numpy as np
import pytest
from PIL import Image

from pr_mim_jax.data import augment_np

SIZE = 16
COLOUR = np.array([200, 30, 90], np.uint8)


def _gradient(h=40, w=48):
  """uint8 [h, w, 3]: red rises left to right, so a flip is visible."""
  x = np.linspace(0, 255, w).astype(np.uint8)
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = x[None, :]
  return img


def _flipped(out):
  """Whether an augmented gradient image runs right-to-left."""
  red = out[..., 0]
  return red[:, 0].mean() > red[:, -1].mean()


def _png(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  return buf.getvalue()


# ------------------------------------------------------------------------ NumPy


def test_np_shape_and_constant_colour():
  img = np.broadcast_to(COLOUR, (30, 50, 3)).copy()
  out = augment_np.train_augment(img, augment_np.example_rng(0, 1, 2), SIZE)
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(augment_np.normalize(COLOUR), out.shape), atol=1e-5)


def test_np_flip_rate_and_determinism():
  img = _gradient()
  flips = [_flipped(augment_np.train_augment(img, augment_np.example_rng(0, s, 0), SIZE))
           for s in range(200)]
  assert 0.35 < np.mean(flips) < 0.65
  a = augment_np.train_augment(img, augment_np.example_rng(3, 4, 5), SIZE)
  b = augment_np.train_augment(img, augment_np.example_rng(3, 4, 5), SIZE)
  np.testing.assert_array_equal(a, b)


def test_np_crop_boxes():
  h, w = 60, 80
  areas = []
  for s in range(500):
    top, left, ch, cw = augment_np.sample_crop_box(h, w, np.random.default_rng(s))
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    areas.append(ch * cw / (h * w))
  areas = np.array(areas)
  assert areas.min() >= 0.2 and areas.max() <= 1.0
  assert areas.max() - areas.min() > 0.5  # actually spread over the range


def test_np_eval_transform():
  native = np.broadcast_to(COLOUR, (SIZE, SIZE, 3)).copy()
  np.testing.assert_array_equal(augment_np.eval_transform(native, SIZE), augment_np.normalize(native))
  out = augment_np.eval_transform(np.broadcast_to(COLOUR, (30, 50, 3)).copy(), SIZE)
  assert out.shape == (SIZE, SIZE, 3)
  np.testing.assert_allclose(out, np.broadcast_to(augment_np.normalize(COLOUR), out.shape), atol=1e-5)


# --------------------------------------------------------------------------- TF


@pytest.fixture(scope="module")
def tfa():
  pytest.importorskip("tensorflow")
  from pr_mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  return augment


def test_tf_hides_gpus(tfa):
  assert tfa.tf.config.get_visible_devices("GPU") == []


def test_tf_shape_and_constant_colour(tfa):
  img = np.broadcast_to(COLOUR, (30, 50, 3)).copy()
  want = np.broadcast_to(augment_np.normalize(COLOUR), (SIZE, SIZE, 3))
  for encoded, x in ((False, img), (True, _png(img))):
    out = tfa.train_augment(x, 0, 7, 3, SIZE, encoded=encoded).numpy()
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_tf_flip_rate_and_seeding(tfa):
  img = _gradient()
  aug = tfa.tf.function(lambda step, pos: tfa.train_augment(img, 0, step, pos, SIZE, encoded=False))
  i64 = lambda v: tfa.tf.constant(v, tfa.tf.int64)
  fn = lambda step, pos: aug(i64(step), i64(pos)).numpy()
  outs = [fn(s, 0) for s in range(100)]
  assert 0.3 < np.mean([_flipped(o) for o in outs]) < 0.7
  np.testing.assert_array_equal(fn(3, 0), outs[3])  # same (seed, step, position)
  assert not np.array_equal(fn(3, 1), outs[3])  # another position


@pytest.mark.parametrize("min_scale", [0.2, 0.7])
def test_tf_crop_boxes_match_np_distribution(tfa, min_scale):
  h, w = 60, 80
  fn = tfa.tf.function(lambda s: tfa.sample_crop_box([h, w, 3], tfa.tf.stack([s, 0]), min_scale))
  tf_areas = []
  for s in range(300):
    begin, size = (t.numpy() for t in fn(tfa.tf.constant(s, tfa.tf.int64)))
    assert begin[0] + size[0] <= h and begin[1] + size[1] <= w
    tf_areas.append(size[0] * size[1] / (h * w))
  np_areas = [np.prod(augment_np.sample_crop_box(h, w, np.random.default_rng(s), min_scale)[2:])
              / (h * w) for s in range(300)]
  tf_areas = np.array(tf_areas)
  assert tf_areas.min() >= min_scale and tf_areas.max() <= 1.0
  assert min(np_areas) >= min_scale
  assert abs(tf_areas.mean() - np.mean(np_areas)) < 0.05


def test_tf_eval_transform(tfa):
  native = np.broadcast_to(COLOUR, (SIZE, SIZE, 3)).copy()
  np.testing.assert_allclose(tfa.eval_transform(native, SIZE).numpy(), augment_np.normalize(native),
                             atol=1e-6)
  out = tfa.eval_transform(np.broadcast_to(COLOUR, (30, 50, 3)).copy(), SIZE).numpy()
  assert out.shape == (SIZE, SIZE, 3)
  np.testing.assert_allclose(out, np.broadcast_to(augment_np.normalize(COLOUR), out.shape), atol=1e-4)


def test_crop_flip_is_train_augment_before_normalising(tfa):
  img = _gradient()
  np.testing.assert_array_equal(
      augment_np.normalize(augment_np.crop_flip(img, augment_np.example_rng(1, 2, 3), SIZE)),
      augment_np.train_augment(img, augment_np.example_rng(1, 2, 3), SIZE))
  raw = tfa.crop_flip(img, 1, 2, 3, SIZE, encoded=False)
  assert raw.dtype == tfa.tf.float32 and float(tfa.tf.reduce_max(raw)) > 10  # [0, 255] pixels
  np.testing.assert_array_equal(tfa.normalize(raw).numpy(),
                                tfa.train_augment(img, 1, 2, 3, SIZE, encoded=False).numpy())
