"""The fine-tuning augmentation in TensorFlow ops: crop + flip + RandAugment + random erasing.

RandAugment as timm's 'rand-m9-mstd0.5-inc1' (the MAE fine-tuning recipe): `num_ops`
ops drawn uniformly with replacement from OPS, each applied with probability 1/2 at
magnitude m ~ N(magnitude, magnitude_std) clipped to [0, 10], 'increasing' levels
(a larger m is always a stronger change), signed ops negated with probability 1/2,
geometric ops filled with the mean colour and resampled bilinearly (a deviation: MAE's
create_transform(interpolation='bicubic') makes timm resample them bicubically, which
TF's transform op lacks; randaugment_np keeps bilinear to match). Ops act on [0, 255]
pixels rounded to integers, as Pillow's uint8. Random erasing (timm 'pixel' mode, one
box of area share [0.02, 1/3] and aspect ratio [0.3, 1/0.3]) replaces a box of the
normalised image by N(0, 1) noise. All randomness is stateless, keyed by (seed, step, position).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pr_mim_jax.data import augment
from pr_mim_jax.data.augment_np import MIN_SCALE
from pr_mim_jax.data.randaugment_np import (ERASE_AREA, ERASE_ATTEMPTS, ERASE_RATIO, FILL,
                                            MAX_MAGNITUDE, OPS)

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as Pillow's convert('L')


def _blend(degenerate, x, factor):
  """Pillow's ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 255] and
  truncated as Pillow's blend truncates (rounding would sit half a level brighter)."""
  return tf.clip_by_value(tf.floor(degenerate + factor * (x - degenerate)), 0.0, 255.0)


def _gray(x):
  return tf.round(tf.reduce_sum(x * _GRAY, -1, keepdims=True))  # [H, W, 1]


def _sharpen_degenerate(x):
  """Pillow's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, border pixels unchanged."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0])
  return x + tf.pad(smooth - x[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])


def _per_channel_lut(x, lut):
  """Applies lut [3, 256] to channel c of x [H, W, 3]."""
  flat = tf.cast(x, tf.int32) + tf.range(3) * 256
  return tf.gather(tf.reshape(tf.cast(lut, tf.float32), [-1]), flat)


def _autocontrast(x):
  """Per channel: stretch [min, max] to [0, 255] (constant channels unchanged)."""
  lo = tf.reduce_min(x, [0, 1])
  hi = tf.reduce_max(x, [0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.where(hi > lo, tf.clip_by_value(tf.floor((x - lo) * scale), 0.0, 255.0), x)


def _equalize(x):
  """Per channel histogram equalisation, as Pillow's ImageOps.equalize."""
  flat = tf.reshape(tf.cast(x, tf.int32) + tf.range(3) * 256, [-1])
  hist = tf.reshape(tf.math.bincount(flat, minlength=768, maxlength=768), [3, 256])  # [3, 256]
  last = 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)
  step = (tf.reduce_sum(hist, 1) - tf.gather(hist, last, batch_dims=1)) // 255  # [3]
  below = tf.cumsum(hist, axis=1, exclusive=True)  # pixels in lower bins, [3, 256]
  safe = tf.maximum(step, 1)[:, None]
  lut = tf.minimum((below + safe // 2) // safe, 255)
  lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])  # too few levels: unchanged
  return _per_channel_lut(x, lut)


def _affine(x, matrix):
  """Output pixel (u, v) <- input (a u + b v + c, d u + e v + f) for matrix (a..f), bilinear,
  outside filled with FILL (as Pillow's Image.transform(AFFINE))."""
  fill = tf.constant(FILL, tf.float32)
  transform = tf.cast(tf.concat([tf.stack(matrix), tf.zeros([2])], 0), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(x - fill)[None], transforms=transform, output_shape=tf.shape(x)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.clip_by_value(tf.round(out + fill), 0.0, 255.0)


def _rotate(x, degrees):
  """Rotation by `degrees` (counter-clockwise) about the image centre."""
  size = tf.cast(tf.shape(x)[:2], tf.float32)
  cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
  t = -degrees * (math.pi / 180.0)  # Pillow: counter-clockwise on screen (y down)
  cos, sin = tf.cos(t), tf.sin(t)
  return _affine(x, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def _ops(x, level, sign):
  """Every op as a thunk on x (float32 [H, W, 3], integer pixels); level in [0, 1], sign +-1."""
  height, width = (tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(x)[:2]))
  factor = 1.0 + sign * 0.9 * level  # enhance ops
  shear = sign * 0.3 * level
  shift = sign * 0.45 * level  # translate, fraction of the image size
  one, zero = tf.constant(1.0), tf.constant(0.0)
  bits = tf.maximum(4.0 - tf.floor(4.0 * level), 1.0)  # Pillow refuses 0 bits
  posterize_div = tf.pow(2.0, 8.0 - bits)
  threshold = 256.0 - tf.floor(256.0 * level)
  return {
      "AutoContrast": lambda: _autocontrast(x),
      "Equalize": lambda: _equalize(x),
      "Invert": lambda: 255.0 - x,
      "Rotate": lambda: _rotate(x, sign * 30.0 * level),
      "Posterize": lambda: tf.floor(x / posterize_div) * posterize_div,
      "Solarize": lambda: tf.where(x >= threshold, 255.0 - x, x),
      "SolarizeAdd": lambda: tf.where(x < 128.0, tf.minimum(x + tf.floor(110.0 * level), 255.0), x),
      "Color": lambda: _blend(_gray(x), x, factor),
      "Contrast": lambda: _blend(tf.round(tf.reduce_mean(_gray(x))), x, factor),
      "Brightness": lambda: _blend(tf.zeros_like(x), x, factor),
      "Sharpness": lambda: _blend(_sharpen_degenerate(x), x, factor),
      "ShearX": lambda: _affine(x, [one, shear, zero, zero, one, zero]),
      "ShearY": lambda: _affine(x, [one, zero, zero, shear, one, zero]),
      "TranslateX": lambda: _affine(x, [one, zero, shift * width, zero, one, zero]),
      "TranslateY": lambda: _affine(x, [one, zero, zero, zero, one, shift * height]),
  }


def apply_op(x, op, level, sign):
  """OPS[op] (op: int32 scalar tensor or Python int) at level in [0, 1] with sign +-1."""
  ops = _ops(tf.convert_to_tensor(x, tf.float32), tf.cast(level, tf.float32),
             tf.cast(sign, tf.float32))
  return tf.switch_case(tf.cast(op, tf.int32), [ops[name] for name in OPS])


def rand_augment(x, seed, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5):
  """float32 [H, W, 3] in [0, 255] -> the same, integer-valued, after RandAugment."""
  x = tf.round(x)
  u = tf.random.stateless_uniform([num_ops, 3], seed)  # op choice, apply?, sign
  noise = tf.random.stateless_normal([num_ops], tf.random.experimental.stateless_fold_in(seed, 1))
  for i in range(num_ops):
    op = tf.minimum(tf.cast(u[i, 0] * len(OPS), tf.int32), len(OPS) - 1)
    m = tf.clip_by_value(magnitude + magnitude_std * noise[i], 0.0, MAX_MAGNITUDE)
    sign = tf.where(u[i, 2] < 0.5, -1.0, 1.0)
    x = tf.cond(u[i, 1] < 0.5,
                lambda x=x, op=op, m=m, sign=sign: apply_op(x, op, m / MAX_MAGNITUDE, sign),
                lambda x=x: x)
  return x


def random_erase(x, seed, prob: float):
  """With probability prob, one box of normalised x [H, W, C] becomes N(0, 1) noise."""
  if prob <= 0:
    return x
  height, width = x.shape[0], x.shape[1]
  s_box, s_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  u = tf.random.stateless_uniform([ERASE_ATTEMPTS, 5], s_box)  # area, ratio, top, left, apply
  area = height * width * (ERASE_AREA[0] + u[:, 0] * (ERASE_AREA[1] - ERASE_AREA[0]))
  log_lo, log_hi = np.log(ERASE_RATIO[0]), np.log(ERASE_RATIO[1])
  ratio = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
  h = tf.round(tf.sqrt(area * ratio))
  w = tf.round(tf.sqrt(area / ratio))
  fits = (h < height) & (w < width)  # [attempts]; the first that fits is used
  k = tf.argmax(tf.cast(fits, tf.int32))
  h, w = h[k], w[k]
  top = tf.floor(u[k, 2] * (height - h + 1))
  left = tf.floor(u[k, 3] * (width - w + 1))
  rows = tf.range(height, dtype=tf.float32)[:, None]
  cols = tf.range(width, dtype=tf.float32)[None, :]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [H, W]
  box &= fits[k] & (u[0, 4] < prob)
  return tf.where(box[..., None], tf.random.stateless_normal(tf.shape(x), s_noise), x)


def train_augment(image, seed, step, position, size: int, *, encoded: bool = True,
                  min_scale: float = MIN_SCALE, num_ops: int = 2, magnitude: float = 9.0,
                  magnitude_std: float = 0.5, erase_prob: float = 0.25):
  """One fine-tuning example -> float32 normalised [size, size, 3]; (seed, step, position)
  key all randomness (the crop and flip are augment.train_augment's)."""
  pixels = augment.train_augment(image, seed, step, position, size, encoded, min_scale)
  x = tf.cast(tf.ensure_shape(pixels, [size, size, 3]), tf.float32)  # uint8 values, as timm's PIL
  key = tf.random.experimental.stateless_fold_in(augment.example_key(seed, step, position), 7)
  s_ra, s_erase = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  x = rand_augment(x, s_ra, num_ops, magnitude, magnitude_std)
  return random_erase(augment.normalize(x), s_erase, erase_prob)
