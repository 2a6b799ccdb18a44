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
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(COLOUR, out.shape))


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
    assert (ch + 0.5) * (cw + 0.5) >= 0.2 * h * w  # sides rounded to whole pixels
    areas.append(ch * cw / (h * w))
  areas = np.array(areas)
  assert areas.max() <= 1.0
  assert areas.max() - areas.min() > 0.5  # actually spread over the range


def _crop_reference_cdfs(height, width, min_scale, n=4001):
  """torchvision's RandomResizedCrop box law, from its definition by numerical integration
  (an independent reference, whole-pixel rounding ignored): area share a ~ U[min_scale, 1],
  t = log(w / h) ~ U[log 3/4, log 4/3], kept when the box fits, i.e. a <= a_max(t).
  Returns (cdf of a, cdf of t) as functions of arrays."""
  t = np.linspace(np.log(3 / 4), np.log(4 / 3), n)  # [n]
  a_max = np.minimum(1.0, np.minimum(width / height * np.exp(-t), height / width * np.exp(t)))
  mass = np.clip(a_max - min_scale, 0, None)  # [n] accepted density along t
  def cdf_area(x):
    x = np.asarray(x, float)[:, None]
    return np.clip(np.minimum(x, a_max) - min_scale, 0, None).mean(1) / mass.mean()
  def cdf_log_ratio(x):
    return np.interp(x, t, np.cumsum(mass) / mass.sum())
  return cdf_area, cdf_log_ratio


def _ks(samples, cdf):
  """Kolmogorov-Smirnov distance between samples and a reference cdf."""
  x = np.sort(samples)
  f = cdf(x)
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def _assert_torchvision_boxes(boxes, height, width, min_scale):
  """boxes [N, 4] (top, left, h, w) follow torchvision's law: in the image, area and
  log-aspect within a KS distance of 0.04 of the reference (p < 1e-3 for N = 2000), and
  offsets uniform (mean centre at the image centre)."""
  top, left, h, w = boxes.T.astype(float)
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all()
  assert (left + w <= width).all()
  cdf_area, cdf_log_ratio = _crop_reference_cdfs(height, width, min_scale)
  assert _ks(h * w / (height * width), cdf_area) < 0.04
  assert _ks(np.log(w / h), cdf_log_ratio) < 0.04
  assert abs(np.mean(top + h / 2) / height - 0.5) < 0.02
  assert abs(np.mean(left + w / 2) / width - 0.5) < 0.02


@pytest.mark.parametrize("height,width,min_scale", [(1000, 1000, 0.08), (600, 1000, 0.2)])
def test_np_crop_boxes_follow_torchvision(height, width, min_scale):
  rng = np.random.default_rng(0)
  boxes = np.array([augment_np.sample_crop_box(height, width, rng, min_scale)
                    for _ in range(2000)])
  _assert_torchvision_boxes(boxes, height, width, min_scale)


# (height, width) -> torchvision's fallback box after 10 misses (no box of area share >= 0.9
# fits): the centred crop with the ratio clamped to [3/4, 4/3], by hand.
FALLBACKS = {(100, 1000): (0, 433, 100, 133), (1000, 100): (433, 0, 133, 100),
             (100, 700): (0, 283, 100, 133)}


def test_np_crop_fallback_is_the_clamped_centre():
  for (h, w), box in FALLBACKS.items():
    assert augment_np.sample_crop_box(h, w, np.random.default_rng(1), 0.9) == box


def test_np_eval_transform():
  native = np.broadcast_to(COLOUR, (SIZE, SIZE, 3)).copy()
  np.testing.assert_array_equal(augment_np.eval_transform(native, SIZE), native)
  out = augment_np.eval_transform(np.broadcast_to(COLOUR, (30, 50, 3)).copy(), SIZE)
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(COLOUR, out.shape))


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
  for encoded, x in ((False, img), (True, _png(img))):
    out = tfa.train_augment(x, 0, 7, 3, SIZE, encoded=encoded).numpy()
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(COLOUR, out.shape))


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
  tf_boxes = _tf_boxes(tfa, h, w, min_scale, 300)
  np_boxes = np.array([augment_np.sample_crop_box(h, w, np.random.default_rng(s), min_scale)
                       for s in range(300)])
  for top, left, ch, cw in np.concatenate([tf_boxes, np_boxes]):
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert (ch + 0.5) * (cw + 0.5) >= min_scale * h * w  # sides rounded to whole pixels
  tf_areas, np_areas = (b[:, 2] * b[:, 3] / (h * w) for b in (tf_boxes, np_boxes))
  assert abs(tf_areas.mean() - np_areas.mean()) < 0.05


def _tf_boxes(tfa, height, width, min_scale, n):
  """[n, 4] (top, left, h, w) boxes of tfa.sample_crop_box over n seeds."""
  tf = tfa.tf
  def one(s):
    begin, size = tfa.sample_crop_box([height, width, 3], tf.stack([s, 5]), min_scale)
    return tf.concat([begin[:2], size[:2]], 0)
  boxes = tf.function(lambda: tf.map_fn(one, tf.range(n, dtype=tf.int64),
                                        fn_output_signature=tf.int32, parallel_iterations=64))
  return boxes().numpy()


@pytest.mark.parametrize("height,width,min_scale", [(1000, 1000, 0.08), (600, 1000, 0.2)])
def test_tf_crop_boxes_follow_torchvision(tfa, height, width, min_scale):
  _assert_torchvision_boxes(_tf_boxes(tfa, height, width, min_scale, 2000), height, width,
                            min_scale)


def test_tf_crop_fallback_is_the_clamped_centre(tfa):
  for (h, w), box in FALLBACKS.items():
    np.testing.assert_array_equal(_tf_boxes(tfa, h, w, 0.9, 3), [box] * 3)
  begin, size = tfa.sample_crop_box([30, 40, 3], tfa.tf.constant([0, 0], tfa.tf.int64))
  assert begin.numpy()[2] == 0 and size.numpy()[2] == -1  # for tf.slice


def test_tf_eval_transform(tfa):
  native = np.broadcast_to(COLOUR, (SIZE, SIZE, 3)).copy()
  np.testing.assert_array_equal(tfa.eval_transform(native, SIZE).numpy(), native)
  out = tfa.eval_transform(np.broadcast_to(COLOUR, (30, 50, 3)).copy(), SIZE).numpy()
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(COLOUR, out.shape))


# ------------------------------------------------ JPEG DCT-domain downscaling


def _photo_jpeg(w=640, h=480, seed=0) -> bytes:
  """A photo-like JPEG (smooth colour fields, mild noise, quality 90)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (h // 40 + 1, w // 40 + 1, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  pixels = np.clip(smooth + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=90)
  return buf.getvalue()


# The bound on what DCT-domain downscaling may change against a full-size decode then the
# same crop and resize, in pixel levels of 255: on average at most 1.5 (JPEG at quality 90
# itself moves pixels by about 2), and 99% of values within 4. Measured: about 1.0 / 3 (TF),
# 0.5-0.7 / 2 (OpenCV, numpy backend).
MEAN_LEVELS, P99_LEVELS = 1.5, 4


def _assert_close_to_full_decode(fast, full):
  d = np.abs(fast.astype(int) - full.astype(int))
  assert d.mean() <= MEAN_LEVELS and np.percentile(d, 99) <= P99_LEVELS, (d.mean(), d.max())


def test_np_dct_downscale_keeps_the_box_and_the_pixels():
  enc, size, ratios = _photo_jpeg(), 96, set()
  for seed in range(12):
    top, left, h, w = augment_np.sample_crop_box(480, 640, np.random.default_rng(seed))
    r = augment_np.dct_ratio(h, w, size)
    ratios.add(r)
    fast = augment_np.random_resized_crop(enc, np.random.default_rng(seed), size)
    # A full-size decode, the same box: the edges rounded to the 1/r grid, as crop_resize does.
    y0, x0, y1, x1 = (r * round(v / r) for v in (top, left, top + h, left + w))
    full, _ = augment_np.crop_resize(enc, (y0, x0, y1 - y0, x1 - x0), size)
    _assert_close_to_full_decode(fast, full[..., ::-1])  # crop_resize's channels are BGR
  assert {2, 4} <= ratios  # both downscales ran


def test_np_resize_is_close_to_pillows_antialiased_bicubic():
  """The crop's resize against Pillow's antialiased bicubic (as MAE's torchvision recipe), an
  independent reference, over shrinking, growing and mixed boxes of a photo-like JPEG; within
  the DCT bound above. Measured: mean 0.3-0.4 levels, p99 1-2."""
  enc, size = _photo_jpeg(), 96
  full = np.asarray(Image.open(io.BytesIO(enc)).convert("RGB"))
  for top, left, h, w in ((10, 20, 300, 400), (50, 60, 60, 80), (0, 0, 150, 60), (5, 5, 70, 200)):
    ours = augment_np.resize(full[top:top + h, left:left + w], size, size)
    pillow = np.asarray(Image.fromarray(full).resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
    _assert_close_to_full_decode(ours, pillow)


def test_np_decodes_like_pillow():
  """JPEG, grayscale and palette PNGs become the RGB pixels Pillow gives; EXIF orientation is
  ignored (as TF), so the crop box fits the stored pixels."""
  enc = _photo_jpeg(64, 48)
  np.testing.assert_allclose(augment_np.decode(enc),
                             np.asarray(Image.open(io.BytesIO(enc)).convert("RGB")), atol=2)
  gray = _gradient()[..., 0]
  for img in (Image.fromarray(gray), Image.fromarray(_gradient()).convert("P")):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    np.testing.assert_array_equal(augment_np.decode(buf.getvalue()),
                                  np.asarray(img.convert("RGB")))
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display"
  buf = io.BytesIO()
  Image.fromarray(_gradient(40, 48)).save(buf, "JPEG", exif=exif)
  assert augment_np.decode(buf.getvalue()).shape == (40, 48, 3)
  assert augment_np.header(buf.getvalue()) == (40, 48, True)
  with pytest.raises(ValueError, match="could not decode"):
    augment_np.decode(b"not an image at all")


def test_dct_ratio_leaves_at_least_the_output_size():
  assert augment_np.dct_ratio(447, 900, 224) == 1
  assert augment_np.dct_ratio(448, 900, 224) == 2
  assert augment_np.dct_ratio(2000, 1800, 224) == 8
  assert augment_np.dct_ratio(100, 100, 224) == 1


def test_tf_dct_downscale_keeps_the_box_and_the_pixels(tfa):
  tf = tfa.tf
  enc, size, ratios = _photo_jpeg(), 96, set()
  full = tf.io.decode_jpeg(enc, channels=3)
  for seed in range(12):
    s = tf.constant([seed, 3], tf.int64)
    begin, box = tfa.sample_crop_box(tf.image.extract_jpeg_shape(enc), s)
    r = int(tfa.dct_ratio(box[0], box[1], size))
    assert r == augment_np.dct_ratio(int(box[0]), int(box[1]), size)  # one rule, both backends
    ratios.add(r)
    fast = tfa.to_pixels(tfa.decode_random_resized_crop(enc, s, size)).numpy()
    crop = tf.slice(full, begin, box)  # full-size decode, the same box
    reference = tfa.to_pixels(tfa._resize(crop, size)).numpy()  # pylint: disable=protected-access
    _assert_close_to_full_decode(fast, reference)
  assert {2, 4} <= ratios
