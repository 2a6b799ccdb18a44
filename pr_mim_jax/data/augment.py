"""MAE's training augmentation in TensorFlow ops, stateless-seeded.

RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) + RandomHorizontalFlip,
as MAE's pre-training, to uint8 pixels: the ImageNet normalisation runs on the device
(pixels.model_input). The box is drawn as torchvision's (`sample_crop_box`: area
uniform, aspect ratio log-uniform, a clamped centre crop after 10 misses), the resize
is bicubic with antialiasing (as Pillow's, which MAE uses; this matters when
shrinking large crops). All randomness of one example comes from a
seed derived from (seed, step, position in the global batch), so it does not
depend on the process or on tf.data's scheduling.

Importing this module imports TensorFlow and hides every GPU from it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pr_mim_jax.data import tensorflow_devices
from pr_mim_jax.data.augment_np import MIN_SCALE, ASPECT_RANGE, EVAL_CROP_FRACTION, MAX_ATTEMPTS
from pr_mim_jax.data.pixels import MEAN255, STD255

DCT_RATIOS = (1, 2, 4, 8)  # the scales libjpeg decodes to without a full-size pass

tensorflow_devices.hide_gpus()  # TensorFlow must never take GPU memory from JAX


def example_key(seed, step, position):
  """The stateless seed of one example, int64 [2]: a function of (seed, step, position)."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))


def example_seeds(seed, step, position):
  """Two independent stateless seeds (crop, flip) for one example, each int64 [2]."""
  key = example_key(seed, step, position)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  return crop_seed, flip_seed


def sample_crop_box(image_shape, seed, min_scale: float = MIN_SCALE):
  """(begin [3], size [3]) int32 of a random crop box of an image with shape [H, W, C],
  for tf.slice (size[2] = -1).

  torchvision's RandomResizedCrop, as augment_np.sample_crop_box: MAX_ATTEMPTS draws of
  (area share uniform in [min_scale, 1], aspect ratio log-uniform in ASPECT_RANGE), sides
  rounded half to even (as Python's round); the first box that fits wins, at uniform
  offsets; if none fits, the centred whole image with its ratio clamped to ASPECT_RANGE.
  """
  shape = tf.cast(image_shape, tf.int32)
  height, width = shape[0], shape[1]
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  u = tf.random.stateless_uniform([MAX_ATTEMPTS + 1, 2], seed, dtype=tf.float64)
  log_lo, log_hi = np.log(ASPECT_RANGE)
  area = h_f * w_f * (min_scale + u[:-1, 0] * (1.0 - min_scale))  # [attempts]
  ratio = tf.exp(log_lo + u[:-1, 1] * (log_hi - log_lo))  # [attempts] w / h
  w = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [attempts]
  k = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # the first that fits

  in_ratio = w_f / h_f  # the fallback: centred, ratio clamped
  fall_h = tf.where(in_ratio < ASPECT_RANGE[0],
                    tf.cast(tf.round(w_f / ASPECT_RANGE[0]), tf.int32), height)
  fall_w = tf.where(in_ratio > ASPECT_RANGE[1],
                    tf.cast(tf.round(h_f * ASPECT_RANGE[1]), tf.int32), width)
  found = tf.reduce_any(fits)
  box_h = tf.where(found, h[k], fall_h)
  box_w = tf.where(found, w[k], fall_w)
  spare = tf.stack([height - box_h, width - box_w])  # [2]
  offset = tf.cast(tf.floor(u[-1] * tf.cast(spare + 1, tf.float64)), tf.int32)  # uniform
  offset = tf.where(found, tf.minimum(offset, spare), spare // 2)
  begin = tf.concat([offset, [0]], 0)
  size = tf.stack([box_h, box_w, -1])
  return begin, size


def _resize(image, size: int):
  """uint8 or float [h, w, 3] -> float32 [size, size, 3] bicubic, clamped to [0, 255].

  Antialiased when shrinking (as Pillow). When enlarging, the antialiased kernel gives
  the same pixels to within 0.2 levels but ran 3.3x slower (2-core CPU dev machine,
  2026-12-07), so the plain bicubic op is used.
  """
  shape = tf.shape(image)
  shrink = tf.reduce_any(shape[:2] > size)
  out = tf.cond(shrink,
                lambda: tf.image.resize(image, (size, size), method="bicubic", antialias=True),
                lambda: tf.image.resize(image, (size, size), method="bicubic"))
  return tf.clip_by_value(out, 0.0, 255.0)


def random_resized_crop(image, seed, size: int, min_scale: float = MIN_SCALE):
  """Decoded uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 255]."""
  begin, box = sample_crop_box(tf.shape(image), seed, min_scale)
  return _resize(tf.slice(image, begin, box), size)


def dct_ratio(crop_height, crop_width, size: int):
  """The JPEG decoder's downscale (1, 2, 4 or 8) for a crop resized to `size`: the largest
  that still leaves at least `size` pixels on the crop's shorter side."""
  short = tf.minimum(crop_height, crop_width)
  return tf.reduce_max(tf.where(short >= tf.constant(DCT_RATIOS) * size, DCT_RATIOS, 1))


def decode_random_resized_crop(encoded, seed, size: int, min_scale: float = MIN_SCALE):
  """Encoded JPEG/PNG/... bytes -> float32 [size, size, 3] in [0, 255].

  JPEGs decode only the crop window (`decode_and_crop_jpeg`: much faster on large
  photos; pixels near the window edge may differ from decode-then-crop by a few
  levels through chroma upsampling, deterministically), and in the DCT domain at 1/r
  scale when the crop keeps r * size pixels on its shorter side (`dct_ratio`). The 1/r
  window covers the box, and the resize samples the box's exact fractional edges, so the
  crop is the same box; only the decoder's downscale differs. Other formats decode fully.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    begin, box = sample_crop_box(shape, seed, min_scale)

    def full_scale():
      window = tf.stack([begin[0], begin[1], box[0], box[1]])
      return _resize(tf.image.decode_and_crop_jpeg(encoded, window, channels=3), size)

    def scaled(r):
      def run():
        start = begin[:2] // r  # [2] the 1/r window, in the 1/r image's pixels
        stop = tf.minimum(-(-(begin[:2] + box[:2]) // r), -(-shape[:2] // r))
        window = tf.concat([start, stop - start], 0)
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, ratio=r)  # uint8
        scale = size / (tf.cast(box[:2], tf.float32) / r)  # [2] output px per 1/r px
        offset = tf.cast(begin[:2], tf.float32) / r - tf.cast(start, tf.float32)  # [2]
        out = tf.raw_ops.ScaleAndTranslate(
            images=tf.cast(crop, tf.float32)[None], size=[size, size], scale=scale,
            translation=-offset * scale, kernel_type="keyscubic", antialias=True)[0]
        return tf.clip_by_value(out, 0.0, 255.0)
      return run

    index = tf.argmax(tf.equal(DCT_RATIOS, dct_ratio(box[0], box[1], size)), output_type=tf.int32)
    return tf.switch_case(index, [full_scale] + [scaled(r) for r in DCT_RATIOS[1:]])

  def other():
    image = decode(encoded)
    begin, box = sample_crop_box(tf.shape(image), seed, min_scale)
    return _resize(tf.slice(image, begin, box), size)

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)  # [size, size, 3]


def decode(encoded):
  """Encoded image bytes -> uint8 [H, W, 3] (grayscale and RGBA become RGB)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def normalize(image):
  """[..., 3] pixels in [0, 255] -> float32 normalised with MEAN / STD."""
  return (tf.cast(image, tf.float32) - MEAN255) / STD255


def to_pixels(image):
  """Float [..., 3] in [0, 255] -> uint8, rounded to nearest."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def random_flip(image, seed):
  """Horizontal flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def train_augment(image, seed, step, position, size: int, encoded: bool = True,
                  min_scale: float = MIN_SCALE):
  """One training example -> uint8 [size, size, 3] pixels: random resized crop, then flip.

  `image` is encoded bytes (encoded=True) or uint8 [H, W, 3]; (seed, step, position)
  key all randomness. The resize rounds to uint8 before the flip, which then moves bytes.
  """
  crop_seed, flip_seed = example_seeds(seed, step, position)
  if encoded:
    out = decode_random_resized_crop(image, crop_seed, size, min_scale)
  else:
    out = random_resized_crop(image, crop_seed, size, min_scale)
  return random_flip(to_pixels(out), flip_seed)


def eval_transform(image, size: int):
  """uint8 [H, W, 3] -> uint8 [size, size, 3] pixels, as MAE's eval.

  Resize the shorter side to size / 0.875 (bicubic) and centre-crop; images already
  size x size pass unchanged.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]

  def resize_and_crop():
    short = int(size / EVAL_CROP_FRACTION)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    new_h = tf.where(height <= width, short, tf.maximum(short, tf.cast(short * h / w, tf.int32)))
    new_w = tf.where(height <= width, tf.maximum(short, tf.cast(short * w / h, tf.int32)), short)
    out = tf.image.resize(image, tf.stack([new_h, new_w]), method="bicubic", antialias=True)
    # torchvision's CenterCrop offset: round half to even, as Python's round and tf.round.
    top, left = (tf.cast(tf.round((x - size) / 2), tf.int32) for x in (new_h, new_w))
    return to_pixels(out[top:top + size, left:left + size])

  native = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
  out = tf.cond(native, lambda: tf.cast(image, tf.uint8), resize_and_crop)
  return tf.ensure_shape(out, [size, size, 3])
