"""randaugment.py's fine-tuning augmentation in NumPy + Pillow, for machines without TensorFlow.

Same recipe, op list, levels and random-erasing parameters (defined here, shared with
randaugment.py), with Pillow's own ops, but a *distribution* match only: NumPy random
numbers, Pillow's resampling and pixel conventions. Deterministic on its own, keyed by
(seed, step, position) through the example's rng.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pr_mim_jax.data import augment_np, pixels

# timm's _RAND_INCREASING_TRANSFORMS, in this order (the op index of randaugment.py).
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
       "TranslateY")
MAX_MAGNITUDE = 10.0
FILL = tuple(round(255 * m) for m in pixels.MEAN)  # geometric ops' fill colour, as timm
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


def _affine(img: Image.Image, matrix) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, tuple(matrix), Image.Resampling.BILINEAR,
                       fillcolor=FILL)


def _solarize_add(img: Image.Image, add: int) -> Image.Image:
  x = np.asarray(img, np.int32)
  return Image.fromarray(np.where(x < 128, np.minimum(x + add, 255), x).astype(np.uint8))


def apply_op(img: Image.Image, name: str, level: float, sign: float) -> Image.Image:
  """OPS op `name` on an RGB image at level in [0, 1] with sign +-1."""
  factor = 1.0 + sign * 0.9 * level
  shear, shift = sign * 0.3 * level, sign * 0.45 * level
  width, height = img.size
  ops = {
      "AutoContrast": lambda: ImageOps.autocontrast(img),
      "Equalize": lambda: ImageOps.equalize(img),
      "Invert": lambda: ImageOps.invert(img),
      "Rotate": lambda: img.rotate(sign * 30.0 * level, Image.Resampling.BILINEAR, fillcolor=FILL),
      "Posterize": lambda: ImageOps.posterize(img, max(1, 4 - int(4 * level))),  # Pillow: >= 1 bit
      "Solarize": lambda: ImageOps.solarize(img, 256 - int(256 * level)),
      "SolarizeAdd": lambda: _solarize_add(img, int(110 * level)),
      "Color": lambda: ImageEnhance.Color(img).enhance(factor),
      "Contrast": lambda: ImageEnhance.Contrast(img).enhance(factor),
      "Brightness": lambda: ImageEnhance.Brightness(img).enhance(factor),
      "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(factor),
      "ShearX": lambda: _affine(img, (1, shear, 0, 0, 1, 0)),
      "ShearY": lambda: _affine(img, (1, 0, 0, shear, 1, 0)),
      "TranslateX": lambda: _affine(img, (1, 0, shift * width, 0, 1, 0)),
      "TranslateY": lambda: _affine(img, (1, 0, 0, 0, 1, shift * height)),
  }
  return ops[name]()


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H, W, 3] after RandAugment (see randaugment.py)."""
  img = Image.fromarray(np.ascontiguousarray(image))
  for _ in range(num_ops):
    op, apply, sign = rng.uniform(size=3)
    noise = rng.normal()
    if apply < 0.5:
      level = float(np.clip(magnitude + magnitude_std * noise, 0.0, MAX_MAGNITUDE)) / MAX_MAGNITUDE
      img = apply_op(img, OPS[min(int(op * len(OPS)), len(OPS) - 1)], level,
                     -1.0 if sign < 0.5 else 1.0)
  return np.asarray(img, np.uint8)


def random_erase(x: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
  """With probability prob, one box of normalised x [H, W, C] becomes N(0, 1) noise."""
  if prob <= 0 or rng.uniform() >= prob:
    return x
  height, width = x.shape[:2]
  for _ in range(ERASE_ATTEMPTS):
    area = height * width * rng.uniform(*ERASE_AREA)
    ratio = np.exp(rng.uniform(*np.log(ERASE_RATIO)))
    h, w = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
    if h < height and w < width:
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      x = x.copy()
      x[top:top + h, left:left + w] = rng.normal(size=(h, w, x.shape[2]))
      return x
  return x


def train_augment(image: np.ndarray, rng: np.random.Generator, size: int, *,
                  min_scale: float = augment_np.MIN_SCALE, num_ops: int = 2,
                  magnitude: float = 9.0, magnitude_std: float = 0.5,
                  erase_prob: float = 0.25) -> np.ndarray:
  """A raw image (encoded bytes, or uint8 [H, W, 3]) -> float32 normalised [size, size, 3]:
  crop, flip, RandAugment, erasing."""
  x = augment_np.train_augment(image, rng, size, min_scale)
  x = rand_augment(x, rng, num_ops, magnitude, magnitude_std)
  return random_erase(pixels.normalize(x), rng, erase_prob)
