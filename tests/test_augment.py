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



def _column_ramp(height, width):
  """uint8 [height, width, 3]: red = 10 * column, so a resampled pixel shows its source column."""
  img = np.zeros((height, width, 3), np.uint8)
  img[..., 0] = 10 * np.arange(width)[None, :]
  return img


@pytest.mark.parametrize("backend", ["np", "tf"])
def test_eval_centre_crop_offset_rounds_like_torchvision(backend, tfa):
  """16 x 21 at size 16: Resize(18) gives 18 x 23 (int(18 * 21 / 16)); torchvision's CenterCrop
  starts at column round(7 / 2) = 4 (half to even), not 7 // 2 = 3. Output column j shows
  source column (4 + j + 0.5) * 21 / 23 - 0.5 (by hand); one column off is 9 levels of red."""
  img = _column_ramp(16, 21)
  out = (augment_np.eval_transform(img, 16) if backend == "np"
         else tfa.eval_transform(img, 16).numpy())
  cols = (4 + np.arange(16) + 0.5) * 21 / 23 - 0.5
  np.testing.assert_allclose(out[4:-4, 2:-2, 0], np.broadcast_to(10 * cols, (16, 16))[4:-4, 2:-2],
                             atol=3)

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


# --------------------------------------------- crop edges, DCT boundary, eval against Pillow


def _edge_touch_rates(boxes, height, width):
  """Shares of boxes touching the top, bottom, left and right edge."""
  top, left, h, w = boxes.T
  return np.array([(top == 0).mean(), (top + h == height).mean(), (left == 0).mean(),
                   (left + w == width).mean()])


@pytest.mark.parametrize("backend", ["np", "tf"])
def test_crop_boxes_of_a_small_image_reach_every_edge_and_full_size(backend, tfa):
  """torchvision's offsets are uniform over [0, H - h] inclusive, so a box touches the bottom
  edge as often as the top (likewise right and left), and a drawn side may equal the
  image's (torchvision keeps w <= W, h <= H). An 8 x 8 image makes both common (NumPy, 4000
  draws: each edge touched in ~42%; w = 8 with h < 8 in ~10%, and the converse); the
  fallback after 10 misses is the whole image, so boxes with one full side were drawn."""
  height, width, n = 8, 8, 2000
  if backend == "np":
    rng = np.random.default_rng(0)
    boxes = np.array([augment_np.sample_crop_box(height, width, rng) for _ in range(n)])
  else:
    boxes = _tf_boxes(tfa, height, width, augment_np.MIN_SCALE, n)
  top_rate, bottom_rate, left_rate, right_rate = _edge_touch_rates(boxes, height, width)
  assert top_rate > 0.3 and left_rate > 0.3
  bound = 5 * np.sqrt(0.5 / n)  # ~5 sigma of a difference of two rates
  assert abs(top_rate - bottom_rate) < bound and abs(left_rate - right_rate) < bound
  h, w = boxes[:, 2], boxes[:, 3]
  assert ((w == width) & (h < height)).mean() > 0.05
  assert ((h == height) & (w < width)).mean() > 0.05


def test_tf_crop_box_sizes_follow_the_numpy_law_on_a_small_image(tfa):
  """On a 6 x 8 image the box sides take few values: TF's law of (h, w) must match NumPy's
  (itself checked against torchvision's above), total variation under 0.08 for 3000 draws
  each (sampling noise: about 0.04)."""
  height, width, n = 6, 8, 3000
  rng = np.random.default_rng(1)
  np_boxes = np.array([augment_np.sample_crop_box(height, width, rng) for _ in range(n)])
  tf_boxes = _tf_boxes(tfa, height, width, augment_np.MIN_SCALE, n)
  def law(boxes):
    counts = np.zeros((height + 1, width + 1))
    np.add.at(counts, (boxes[:, 2], boxes[:, 3]), 1)
    return counts / len(boxes)
  assert 0.5 * np.abs(law(np_boxes) - law(tf_boxes)).sum() < 0.08


def test_tf_dct_ratio_leaves_at_least_the_output_size(tfa):
  """The TF rule at its boundaries, by hand (the same cases as the NumPy rule's test)."""
  for (h, w, size), want in (((447, 900, 224), 1), ((448, 900, 224), 2), ((900, 448, 224), 2),
                             ((895, 896, 224), 2), ((896, 896, 224), 4), ((1791, 2000, 224), 4),
                             ((2000, 1800, 224), 8), ((100, 100, 224), 1)):
    assert int(tfa.dct_ratio(h, w, size)) == want, (h, w, size)


def test_tf_normalize_uses_the_imagenet_statistics(tfa):
  """(x - 255 mean) / (255 std) with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229,
  0.224, 0.225), typed here by hand."""
  x = np.array([[0, 0, 0], [255, 255, 255], [124, 116, 104]], np.uint8)
  want = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(tfa.normalize(x).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("backend", ["np", "tf"])
def test_eval_transform_is_close_to_pillows_resize_and_centre_crop(backend, tfa):
  """MAE's eval transform as torchvision runs it on a PIL image: Resize(int(96 / 0.875) = 109)
  bicubic with antialiasing, so 480 x 640 -> 109 x 145, then CenterCrop(96) at
  (round(6.5), round(24.5)) = (6, 24). Pillow is the independent reference; within the DCT
  bound above. Shrinking 4.4x a photo with per-pixel noise shows a missing antialias filter
  (aliased noise: about 4 levels on average)."""
  enc, size = _photo_jpeg(), 96
  full = np.asarray(Image.open(io.BytesIO(enc)).convert("RGB"))
  pillow = np.asarray(Image.fromarray(full).resize((145, 109), Image.Resampling.BICUBIC))
  pillow = pillow[6:6 + size, 24:24 + size]
  if backend == "np":
    ours = augment_np.eval_transform(enc, size)
  else:
    ours = tfa.eval_transform(full, size).numpy()
  _assert_close_to_full_decode(ours, pillow)


@pytest.mark.parametrize("backend", ["np", "tf"])
def test_min_scale_one_on_a_square_image_is_the_whole_image(backend, tfa):
  """Area share 1 fits only as the whole square (any other ratio overflows a side), and the
  fallback after 10 misses is the whole image too, its ratio 1 being inside [3/4, 4/3]."""
  if backend == "np":
    rng = np.random.default_rng(0)
    boxes = np.array([augment_np.sample_crop_box(100, 100, rng, 1.0) for _ in range(50)])
  else:
    boxes = _tf_boxes(tfa, 100, 100, 1.0, 50)
  np.testing.assert_array_equal(boxes, [(0, 0, 100, 100)] * 50)


def test_tf_jpeg_crop_honours_min_scale(tfa):
  """decode_random_resized_crop of a square JPEG at min_scale 1.0 resizes the whole photo (in
  the DCT domain at 1/4 here): close to Pillow's antialiased bicubic resize of it."""
  enc, size = _photo_jpeg(128, 128), 32
  full = np.asarray(Image.open(io.BytesIO(enc)).convert("RGB"))
  pillow = np.asarray(Image.fromarray(full).resize((size, size), Image.Resampling.BICUBIC))
  for seed in range(3):
    out = tfa.decode_random_resized_crop(enc, tfa.tf.constant([seed, 1], tfa.tf.int64), size,
                                         min_scale=1.0)
    _assert_close_to_full_decode(tfa.to_pixels(out).numpy(), pillow)


def test_tf_random_resized_crop_stays_in_pixel_range(tfa):
  """Bicubic overshoots at hard edges; the float crop is promised in [0, 255] (enlarging a
  0/255 checkerboard rings past both ends before clipping)."""
  board = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
  img = np.repeat(board[..., None], 3, -1)
  out = tfa.random_resized_crop(img, tfa.tf.constant([0, 1], tfa.tf.int64), 64).numpy()
  assert out.min() >= 0.0 and out.max() <= 255.0 and out.min() < 10 and out.max() > 245


# ------------------------------------- TF crops, DCT path and eval against Pillow


def test_tf_random_resized_crop_is_close_to_pillows_resize_of_its_box(tfa):
  """random_resized_crop of a 120 x 160 noise image to 100 x 100 against Pillow's antialiased
  bicubic resize of the same box (MAE's torchvision recipe, an independent reference), over
  boxes that shrink along both axes, grow along both, or shrink along one only: each within
  1.5 levels on average. Noise shows a missing antialias filter (aliasing: about 4 levels on
  average where one axis shrinks 1.1x, 19 where both shrink 1.5x); measured 0.3-0.6."""
  tf, size = tfa.tf, 100
  img = np.random.default_rng(0).integers(0, 256, (120, 160, 3)).astype(np.uint8)
  kinds = set()
  for s in range(24):
    seed = tf.constant([s, 2], tf.int64)
    begin, box = (x.numpy() for x in tfa.sample_crop_box(img.shape, seed))
    (top, left), (h, w) = begin[:2], box[:2]
    kinds.add((h > size, w > size))
    ours = tfa.to_pixels(tfa.random_resized_crop(img, seed, size)).numpy().astype(int)
    pillow = np.asarray(Image.fromarray(img).resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
    assert np.abs(ours - pillow).mean() <= 1.5, (s, h, w, np.abs(ours - pillow).mean())
  assert {(True, True), (False, False)} <= kinds and kinds & {(True, False), (False, True)}


def _noisy_photo_jpeg(w=640, h=480, seed=0) -> bytes:
  """A photo-like JPEG with strong per-pixel noise (sigma 20, quality 95, chroma not
  subsampled, so decoders agree up to their DCT scaling): fine detail that tells resampling
  filters apart."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (h // 40 + 1, w // 40 + 1, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  pixels = np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=95, subsampling=0)
  return buf.getvalue()


def test_tf_dct_downscaled_crop_is_pillows_draft_decode_and_bicubic_resize(tfa):
  """A JPEG crop decoded at 1/r in the DCT domain: the same as Pillow's draft decode at 1/r
  (libjpeg's DCT scaling) then its antialiased bicubic resize of the box's exact fractional
  edges there, an independent reference for the window, the offset and the filter. Within
  0.5 levels on average (measured 0.15-0.25 at r = 2 and 4; a bilinear filter is 0.8-1.4
  away)."""
  tf, enc = tfa.tf, _noisy_photo_jpeg()
  ratios = set()
  for size in (64, 160):
    for s in range(5):
      seed = tf.constant([s, 3], tf.int64)
      begin, box = (x.numpy() for x in tfa.sample_crop_box(tf.image.extract_jpeg_shape(enc), seed))
      r = int(tfa.dct_ratio(box[0], box[1], size))
      ratios.add(r)
      if r == 1:
        continue
      img = Image.open(io.BytesIO(enc))
      img.draft("RGB", (-(-640 // r), -(-480 // r)))
      assert img.size == (-(-640 // r), -(-480 // r))
      (top, left), (h, w) = begin[:2] / r, box[:2] / r
      pillow = np.asarray(img.convert("RGB").resize(
          (size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
      ours = tfa.to_pixels(tfa.decode_random_resized_crop(enc, seed, size)).numpy()
      assert np.abs(ours.astype(int) - pillow).mean() <= 0.5, (size, s, r)
  assert {2, 4} <= ratios


def _photo(w, h, seed=0):
  """uint8 [h, w, 3]: smooth colour fields with mild noise, photo-like."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (h // 40 + 1, w // 40 + 1, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  return np.clip(smooth + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("form", ["pixels", "png", "jpeg"])
def test_tf_train_augment_honours_min_scale(tfa, form):
  """train_augment(min_scale=1.0) of a square image is the whole image resized, maybe
  mirrored (fine-tuning and probing pass their own crop scale), for pixels, PNG and JPEG
  bytes: within 1.5 levels on average of Pillow's antialiased bicubic resize (a crop at the
  default scale, 0.2, is not)."""
  img, size = _photo(128, 128), 32
  buf = io.BytesIO()
  if form != "pixels":
    Image.fromarray(img).save(buf, "PNG" if form == "png" else "JPEG", quality=95)
    img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  x = img if form == "pixels" else buf.getvalue()
  pillow = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
  for position in range(4):
    out = tfa.train_augment(x, 0, 1, position, size, encoded=form != "pixels",
                            min_scale=1.0).numpy().astype(int)
    d = min(np.abs(out - pillow).mean(), np.abs(out[:, ::-1] - pillow).mean())
    assert d <= 1.5, (position, d)


def test_tf_train_augment_depends_on_the_seed(tfa):
  """Two runs with different seeds see different crops (same step and position)."""
  img = _photo(64, 48)
  outs = [tfa.train_augment(img, seed, 3, 1, 16, encoded=False).numpy() for seed in range(4)]
  assert all(not np.array_equal(outs[0], o) for o in outs[1:])
  np.testing.assert_array_equal(tfa.train_augment(img, 0, 3, 1, 16, encoded=False).numpy(),
                                outs[0])


@pytest.mark.parametrize("backend", ["np", "tf"])
def test_eval_transform_of_a_portrait_image_is_close_to_pillows(backend, tfa):
  """MAE's eval transform of a portrait 500 x 384 photo: Resize(109) makes the width 109 and
  the height int(109 * 500 / 384) = int(141.9) = 141 (torchvision truncates), CenterCrop(96)
  starts at (round(22.5), round(6.5)) = (22, 6). Pillow's antialiased bicubic is the
  reference, within the DCT bound (a height of 142 instead fails it)."""
  img, size = _photo(384, 500), 96
  pillow = np.asarray(Image.fromarray(img).resize((109, 141), Image.Resampling.BICUBIC))
  pillow = pillow[22:22 + size, 6:6 + size].astype(int)
  if backend == "np":
    ours = augment_np.eval_transform(img, size)
  else:
    ours = tfa.eval_transform(img, size).numpy()
  d = np.abs(ours.astype(int) - pillow)
  assert d.mean() <= 1.5 and np.percentile(d, 99) <= 4, (d.mean(), np.percentile(d, 99))


def test_tf_eval_transform_of_noise_is_pillows_bicubic(tfa):
  """The eval resize's filter, on a 120 x 160 noise image at size 100: Resize(114) gives
  114 x 152, CenterCrop(100) starts at (7, 26). Within 1 level on average of Pillow's
  bicubic (measured 0.27; a bilinear filter is 10 levels away)."""
  img = np.random.default_rng(0).integers(0, 256, (120, 160, 3)).astype(np.uint8)
  pillow = np.asarray(Image.fromarray(img).resize((152, 114), Image.Resampling.BICUBIC))
  ours = tfa.eval_transform(img, 100).numpy().astype(int)
  assert np.abs(ours - pillow[7:107, 26:126]).mean() <= 1.0


def test_tf_dct_downscaled_crop_stays_in_pixel_range(tfa):
  """The JPEG path's float crop (decoded at 1/8 here) is promised in [0, 255] too: shrinking
  a 0/255 checkerboard of 64-pixel squares rings past both ends before clipping."""
  board = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
  img = np.repeat(np.repeat(board, 64, 0), 64, 1)
  buf = io.BytesIO()
  Image.fromarray(np.repeat(img[..., None], 3, -1)).save(buf, "JPEG", quality=95)
  for s in range(3):
    out = tfa.decode_random_resized_crop(buf.getvalue(), tfa.tf.constant([s, 1], tfa.tf.int64),
                                         48, min_scale=1.0).numpy()
    assert out.min() >= 0.0 and out.max() <= 255.0 and out.min() < 10 and out.max() > 245
