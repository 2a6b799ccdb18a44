"""MAE's training augmentation in NumPy + OpenCV, for machines without TensorFlow.

The same recipe as `augment.py` (random resized crop with area in [0.2, 1] and aspect
ratio in [3/4, 4/3], resize, horizontal flip with p=0.5, uint8 pixels out) and the same
box-sampling algorithm (torchvision's RandomResizedCrop, `sample_crop_box`), but a
*distribution* match only: the random numbers come from NumPy, and the resize filter differs
in detail (a Gaussian blur then bicubic along an axis that shrinks, plain bicubic where the
crop grows, against TF's antialiased bicubic).
Never bit-identical to the TF path; it is deterministic on its own, keyed by
(seed, step, position in the global batch).

OpenCV decodes and resizes: the pipeline makes 1.5x the images per core it made with Pillow
(docs/performance.md, "Input pipeline", v3). Its own threads are off in the pipeline, which
parallelises over images instead. Images arrive `raw`: the encoded file bytes, or uint8
[H, W, 3] RGB for datasets held in memory.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

MIN_SCALE = 0.2  # MAE: RandomResizedCrop(scale=(0.2, 1.0)); data.crop_min_scale overrides
ASPECT_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, centre crop size
# PIL only reads headers here (OpenCV decodes, up to 2^30 pixels); its decompression-bomb limit
# (an error above 179 M pixels) would reject images that OpenCV and the tf backend read.
Image.MAX_IMAGE_PIXELS = None

# cv2.imdecode flags per JPEG DCT-domain downscale; EXIF orientation is ignored, as TF does.
_DECODE_FLAGS = {r: flag | cv2.IMREAD_IGNORE_ORIENTATION for r, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}


class DecodeError(ValueError):
  """Bytes that are not a readable image (empty, truncated, not JPEG/PNG)."""


def _decode_error(raw) -> DecodeError:
  return DecodeError(f"could not decode an image from {len(raw)} bytes "
                     f"(starting {bytes(raw[:8])!r}): empty, truncated, or not a JPEG or PNG")


def example_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """The random stream of one example: a pure function of (seed, step, position)."""
  return np.random.default_rng([seed, step, position])


def no_opencv_threads() -> None:
  """Run each OpenCV call on its calling thread: the pipeline's pool parallelises over
  images, and OpenCV's own threads on top would oversubscribe the cores."""
  cv2.setNumThreads(0)


def header(raw) -> tuple[int, int, bool]:
  """(height, width, is_jpeg) of a raw image without decoding its pixels."""
  if isinstance(raw, np.ndarray):
    return raw.shape[0], raw.shape[1], False
  try:
    with Image.open(io.BytesIO(raw)) as img:  # reads the header only
      width, height = img.size
      return height, width, img.format == "JPEG"
  except OSError as e:  # PIL.UnidentifiedImageError, a truncated header
    raise _decode_error(raw) from e


def _pixels(raw, reduce: int = 1) -> tuple[np.ndarray, bool]:
  """(uint8 [H/reduce, W/reduce, 3], whether its channels are BGR). `reduce` > 1 only for a
  JPEG: the decoder's DCT-domain 1/reduce scale, ceil(H / reduce) rows."""
  if isinstance(raw, np.ndarray):
    if raw.ndim != 3 or raw.shape[2] != 3:
      raise ValueError(f"expected uint8 [H, W, 3] pixels, got shape {raw.shape}")
    return raw, False
  img = cv2.imdecode(np.frombuffer(raw, np.uint8), _DECODE_FLAGS[reduce]) if len(raw) else None
  if img is None:
    raise _decode_error(raw)
  return img, True  # OpenCV decodes to BGR; the channels swap on the small output instead


def _rgb(img: np.ndarray, bgr: bool, flip: bool = False) -> np.ndarray:
  """Contiguous uint8 [H, W, 3] RGB, mirrored left-right if `flip` (OpenCV's vectorised
  copies: a NumPy copy of reversed strides took 5-70x as long on a 224 px image, on the
  2-core CPU dev machine under load, 2026-12-07)."""
  img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img
  return cv2.flip(img, 1) if flip else np.ascontiguousarray(img)


def decode(raw) -> np.ndarray:
  """A raw image -> uint8 [H, W, 3] RGB (grayscale, palette and alpha images become RGB)."""
  return _rgb(*_pixels(raw))


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [h, w, 3] -> [height, width, 3], bicubic. Along an axis that shrinks by s, a
  Gaussian of sigma 0.5 * sqrt(s^2 - 1) pixels first removes what the smaller grid cannot
  hold (antialiasing, as Pillow's widened bicubic does; OpenCV's own pixel-area filter was
  3-4x slower at fractional scales on 2026-11-29: docs/performance.md, "Input pipeline", v3)."""
  h, w = img.shape[:2]
  sigma_y, sigma_x = (0.5 * np.sqrt(max((n / m) ** 2 - 1, 0.0))
                      for n, m in ((h, height), (w, width)))
  if sigma_x > 0.05 or sigma_y > 0.05:  # ksize (0, 0): OpenCV sizes the kernel from sigma
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(sigma_x, 1e-3), sigmaY=max(sigma_y, 1e-3))
  return cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    min_scale: float = MIN_SCALE) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w) as torchvision's RandomResizedCrop draws it (MAE's recipe).

  Per attempt: area share uniform in [min_scale, 1], aspect ratio w/h log-uniform in
  ASPECT_RANGE, sides rounded to whole pixels; the first box that fits the image wins, at
  uniform offsets. After MAX_ATTEMPTS misses, the centre crop of the whole image with its
  aspect ratio clamped to ASPECT_RANGE (`fallback_box`).
  """
  log_lo, log_hi = np.log(ASPECT_RANGE)
  for _ in range(MAX_ATTEMPTS):
    area = height * width * rng.uniform(min_scale, 1.0)
    ratio = np.exp(rng.uniform(log_lo, log_hi))
    w, h = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return fallback_box(height, width)


def fallback_box(height: int, width: int) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w): the centred box of the whole image, narrowed along its
  long side where the image's aspect ratio is outside ASPECT_RANGE."""
  lo, hi = ASPECT_RANGE
  h, w = height, width
  if width / height < lo:  # too tall
    h = int(round(width / lo))
  elif width / height > hi:  # too wide
    w = int(round(height * hi))
  return (height - h) // 2, (width - w) // 2, h, w


def dct_ratio(crop_height: int, crop_width: int, size: int) -> int:
  """The JPEG decoder's downscale (1, 2, 4 or 8) for a crop resized to `size`: the largest
  that still leaves at least `size` pixels on the crop's shorter side (as augment.py)."""
  short = min(crop_height, crop_width)
  return max(r for r in (1, 2, 4, 8) if short >= r * size or r == 1)


def crop_resize(raw, box: tuple[int, int, int, int], size: int, reduce: int = 1
                ) -> tuple[np.ndarray, bool]:
  """(uint8 [size, size, 3], whether BGR): the box (top, left, h, w) of a raw image,
  decoded at 1/`reduce` scale (a JPEG's DCT-domain downscale) and resized. The box's edges
  round to the 1/reduce pixel grid: at most reduce/2 pixels of the full image, under half an
  output pixel when the box keeps reduce * size pixels (`dct_ratio`)."""
  top, left, h, w = box
  img, bgr = _pixels(raw, reduce)
  y0, x0, y1, x1 = (round(v / reduce) for v in (top, left, top + h, left + w))
  return resize(img[y0:y1, x0:x1], size, size), bgr  # [h / r, w / r, 3] -> [size, size, 3]


def _resized_crop(raw, rng, size, min_scale) -> tuple[np.ndarray, bool]:
  """crop_resize of the random box, at the DCT-domain scale `dct_ratio` picks for a JPEG."""
  height, width, jpeg = header(raw)
  top, left, h, w = sample_crop_box(height, width, rng, min_scale)
  return crop_resize(raw, (top, left, h, w), size, dct_ratio(h, w, size) if jpeg else 1)


def random_resized_crop(raw, rng: np.random.Generator, size: int,
                        min_scale: float = MIN_SCALE) -> np.ndarray:
  """A raw image -> uint8 [size, size, 3] RGB: random box, resize. A JPEG whose box keeps
  r * size pixels decodes at 1/r scale in the DCT domain (`dct_ratio`)."""
  return _rgb(*_resized_crop(raw, rng, size, min_scale))


def train_augment(raw, rng: np.random.Generator, size: int,
                  min_scale: float = MIN_SCALE) -> np.ndarray:
  """A raw image -> uint8 [size, size, 3] RGB pixels: random resized crop, then flip."""
  out, bgr = _resized_crop(raw, rng, size, min_scale)
  return _rgb(out, bgr, flip=rng.uniform() < 0.5)


def eval_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
  """(resized height, resized width, top, left) of MAE's eval crop of a height x width image:
  the shorter side to size / 0.875, the centre size x size kept. A size x size image is kept
  as it is: (size, size, 0, 0). The numpy and DALI backends share it."""
  if (height, width) == (size, size):
    return size, size, 0, 0
  short = int(size / EVAL_CROP_FRACTION)
  if height <= width:
    new_h, new_w = short, max(short, int(short * width / height))
  else:
    new_h, new_w = max(short, int(short * height / width)), short
  return new_h, new_w, round((new_h - size) / 2), round((new_w - size) / 2)  # torchvision's


def eval_transform(raw, size: int) -> np.ndarray:
  """A raw image -> uint8 [size, size, 3] RGB pixels as MAE eval (eval_geometry)."""
  image, bgr = _pixels(raw)
  if image.shape[:2] != (size, size):
    new_h, new_w, top, left = eval_geometry(*image.shape[:2], size)
    image = resize(image, new_h, new_w)[top:top + size, left:left + size]
  return _rgb(image, bgr)
