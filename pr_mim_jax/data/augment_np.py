"""MAE's training augmentation in NumPy + Pillow, for machines without TensorFlow.

The same recipe as `augment.py` (random resized crop with area in [0.2, 1] and aspect
ratio in [3/4, 4/3], bicubic resize, horizontal flip with p=0.5, uint8 pixels out) and
the same box-sampling algorithm as TF's `sample_distorted_bounding_box`, but a
*distribution* match only: the random numbers come from NumPy and Pillow's bicubic resize
differs in detail from TF's. Never bit-identical to the TF path; it is deterministic on its
own, keyed by (seed, step, position in the global batch).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MIN_SCALE = 0.2  # MAE: RandomResizedCrop(scale=(0.2, 1.0)); data.crop_min_scale overrides
ASPECT_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, centre crop size


def example_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """The random stream of one example: a pure function of (seed, step, position)."""
  return np.random.default_rng([seed, step, position])


def to_rgb_array(img: Image.Image) -> np.ndarray:
  """Any Pillow image (grayscale, palette, RGBA, ...) -> uint8 [H, W, 3]."""
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, np.uint8)


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    min_scale: float = MIN_SCALE) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w) as TF's sample_distorted_bounding_box draws it.

  Per attempt: aspect ratio w/h uniform in ASPECT_RANGE, crop height uniform among
  the integers whose area share fits [min_scale, 1], offsets uniform. After MAX_ATTEMPTS
  failures, the whole image (as TF).
  """
  lo, hi = min_scale * height * width, height * width
  for _ in range(MAX_ATTEMPTS):
    ratio = rng.uniform(*ASPECT_RANGE)
    h_min = int(round(np.sqrt(lo / ratio)))
    h_max = int(round(np.sqrt(hi / ratio)))
    h_max = min(h_max, height, int((width + 0.5) / ratio))
    h = h_max if h_min >= h_max else int(rng.integers(h_min, h_max + 1))
    w = int(round(h * ratio))
    if w * h < lo:
      h += 1
      w = int(round(h * ratio))
    if w * h > hi:
      h -= 1
      w = int(round(h * ratio))
    if lo <= w * h <= hi and 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return 0, 0, height, width


def dct_ratio(crop_height: int, crop_width: int, size: int) -> int:
  """The JPEG decoder's downscale (1, 2, 4 or 8) for a crop resized to `size`: the largest
  that still leaves at least `size` pixels on the crop's shorter side (as augment.py)."""
  short = min(crop_height, crop_width)
  return max(r for r in (1, 2, 4, 8) if short >= r * size or r == 1)


def random_resized_crop(image, rng: np.random.Generator, size: int,
                        min_scale: float = MIN_SCALE) -> np.ndarray:
  """uint8 [H, W, 3] or a Pillow image -> uint8 [size, size, 3]: random box, bicubic resize.

  A JPEG opened but not yet decoded (`Image.open`) decodes in the DCT domain at 1/r scale
  when the box keeps r * size pixels (`dct_ratio`); the box is then scaled exactly
  (Pillow's resize takes fractional boxes), so only the decoder's downscale differs.
  """
  return np.asarray(_resized_crop(image, rng, size, min_scale), np.uint8)


def _resized_crop(image, rng, size, min_scale) -> Image.Image:
  img = image if isinstance(image, Image.Image) else Image.fromarray(image)
  width, height = img.size
  top, left, h, w = sample_crop_box(height, width, rng, min_scale)
  box = (left, top, left + w, top + h)
  r = dct_ratio(h, w, size)
  if r > 1 and img.format == "JPEG":
    img.draft("RGB", (-(-width // r), -(-height // r)))  # the decoder's 1/r scale
    sx, sy = img.size[0] / width, img.size[1] / height
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
  if img.mode != "RGB":
    img = img.convert("RGB")
  return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def train_augment(image, rng: np.random.Generator, size: int,
                  min_scale: float = MIN_SCALE) -> np.ndarray:
  """uint8 [H, W, 3] or a Pillow image -> uint8 [size, size, 3] pixels: random resized crop,
  then flip (in Pillow, so the array comes out contiguous and batches copy fast)."""
  out = _resized_crop(image, rng, size, min_scale)
  if rng.uniform() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


def eval_transform(image, size: int) -> np.ndarray:
  """uint8 [H, W, 3] or a Pillow image -> uint8 [size, size, 3] pixels as MAE eval (native
  size passes)."""
  if isinstance(image, Image.Image):
    image = to_rgb_array(image)
  height, width = image.shape[:2]
  if (height, width) != (size, size):
    short = int(size / EVAL_CROP_FRACTION)
    if height <= width:
      new_h, new_w = short, max(short, int(short * width / height))
    else:
      new_h, new_w = max(short, int(short * height / width)), short
    img = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)
  return image
