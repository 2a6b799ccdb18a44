"""MAE's training augmentation in TensorFlow ops, stateless-seeded.

RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) + RandomHorizontalFlip
+ ImageNet normalisation, as MAE's pre-training. The box comes from
`tf.image.stateless_sample_distorted_bounding_box` (uniform aspect ratio, not
torchvision's log-uniform; the whole image after 10 failed attempts, not a centre
crop), the resize is bicubic with antialiasing (as Pillow's, which MAE uses; this
matters when shrinking large crops). All randomness of one example comes from a
seed derived from (seed, step, position in the global batch), so it does not
depend on the process or on tf.data's scheduling.

Importing this module imports TensorFlow and hides every GPU from it.
"""

from __future__ import annotations

import tensorflow as tf

from pr_mim_jax.data.augment_np import (MIN_SCALE, ASPECT_RANGE, EVAL_CROP_FRACTION,
                                        MAX_ATTEMPTS, MEAN, STD)

# TensorFlow must never take GPU memory from JAX.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised by someone else; nothing we can change now
  pass

_MEAN255 = tf.constant(MEAN, tf.float32) * 255.0
_STD255 = tf.constant(STD, tf.float32) * 255.0


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
  """(begin [3], size [3]) of a random crop box of an image with shape [H, W, C]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ASPECT_RANGE, area_range=(min_scale, 1.0),
      max_attempts=MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
  return begin, size


def _resize(image, size: int):
  """uint8 or float [h, w, 3] -> float32 [size, size, 3] bicubic, clamped to [0, 255].

  Antialiased when shrinking (as Pillow). When enlarging, the antialiased kernel
  gives the same pixels but runs ~1.6x slower, so the plain bicubic op is used.
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


def decode_random_resized_crop(encoded, seed, size: int, min_scale: float = MIN_SCALE):
  """Encoded JPEG/PNG/... bytes -> float32 [size, size, 3] in [0, 255].

  JPEGs decode only the crop window (`decode_and_crop_jpeg`: much faster on large
  photos; pixels near the window edge may differ from decode-then-crop by a few
  levels through chroma upsampling, deterministically); other formats decode fully.
  """
  def jpeg():
    begin, box = sample_crop_box(tf.image.extract_jpeg_shape(encoded), seed, min_scale)
    window = tf.stack([begin[0], begin[1], box[0], box[1]])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = decode(encoded)
    begin, box = sample_crop_box(tf.shape(image), seed, min_scale)
    return tf.slice(image, begin, box)

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)  # uint8 [h, w, 3]
  return _resize(crop, size)


def decode(encoded):
  """Encoded image bytes -> uint8 [H, W, 3] (grayscale and RGBA become RGB)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def normalize(image):
  """[..., 3] pixels in [0, 255] -> float32 normalised with MEAN / STD."""
  return (tf.cast(image, tf.float32) - _MEAN255) / _STD255


def random_flip(image, seed):
  """Horizontal flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def train_augment(image, seed, step, position, size: int, encoded: bool = True,
                  min_scale: float = MIN_SCALE):
  """One training example -> float32 normalised [size, size, 3].

  `image` is encoded bytes (encoded=True) or uint8 [H, W, 3]; (seed, step, position)
  key all randomness.
  """
  return normalize(crop_flip(image, seed, step, position, size, encoded, min_scale))


def crop_flip(image, seed, step, position, size: int, encoded: bool = True,
              min_scale: float = MIN_SCALE):
  """train_augment before normalisation: float32 [size, size, 3] in [0, 255]."""
  crop_seed, flip_seed = example_seeds(seed, step, position)
  if encoded:
    out = decode_random_resized_crop(image, crop_seed, size, min_scale)
  else:
    out = random_resized_crop(image, crop_seed, size, min_scale)
  return random_flip(out, flip_seed)


def eval_transform(image, size: int):
  """uint8 [H, W, 3] -> float32 normalised [size, size, 3], as MAE's eval.

  Resize the shorter side to size / 0.875 (bicubic) and centre-crop; images already
  size x size are only normalised.
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
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return tf.clip_by_value(out[top:top + size, left:left + size], 0.0, 255.0)

  native = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
  out = tf.cond(native, lambda: tf.cast(image, tf.float32), resize_and_crop)
  out = tf.ensure_shape(out, [size, size, 3])
  return normalize(out)
