"""augment_np's header reading and decode errors (test_augment.py covers the augmentation)."""

import struct
import zlib

import numpy as np
import pytest

from pr_mim_jax.data import augment_np


def _png_header(width, height):
  """The first bytes of an RGB PNG of width x height: signature and IHDR chunk, no pixels."""
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_header_of_a_huge_image():
  """200 M pixels: over PIL's decompression-bomb limit, which must not apply to a header."""
  assert augment_np.header(_png_header(20000, 10000)) == (10000, 20000, False)


@pytest.mark.parametrize("raw", [b"", b"not an image", _png_header(8, 8)[:20]])
def test_unreadable_bytes_raise_decode_error(raw):
  rng = augment_np.example_rng(0, 0, 0)
  for fn in (augment_np.decode, lambda r: augment_np.train_augment(r, rng, 8),
             lambda r: augment_np.eval_transform(r, 8)):
    with pytest.raises(augment_np.DecodeError, match=f"from {len(raw)} bytes"):
      fn(raw)
  assert issubclass(augment_np.DecodeError, ValueError)
  with pytest.raises(ValueError, match="expected uint8"):  # in-memory pixels: not a decode error
    augment_np.decode(np.zeros((4, 4), np.uint8))


def _coordinates(height, width, scale_x, scale_y):
  """uint8 [height, width, 3]: red = scale_x * column, green = scale_y * row (linear ramps,
  which resampling keeps, so each output pixel shows where it came from)."""
  img = np.zeros((height, width, 3), np.uint8)
  img[..., 0] = (scale_x * np.arange(width))[None, :]
  img[..., 1] = (scale_y * np.arange(height))[:, None]
  return img


@pytest.mark.parametrize("transpose", [False, True])
def test_eval_transform_is_the_centre_of_an_aspect_preserving_resize(transpose):
  """MAE's eval: Resize(int(16 / 0.875) = 18) on the shorter side, then CenterCrop(16).
  A 60 x 120 image becomes 18 x 36 (scale 10/3 source pixels per output pixel), whose centre
  crop starts at row 1, column 10; output (i, j) therefore shows source row (1 + i + 0.5) * 10/3
  - 0.5 and column (10 + j + 0.5) * 10/3 - 0.5 (by hand). Portrait: the same, transposed."""
  img = _coordinates(60, 120, 2, 4)
  if transpose:
    img = img.transpose(1, 0, 2)[..., ::-1].copy()  # rows <-> columns, red <-> green
  out = augment_np.eval_transform(img, 16)
  if transpose:
    out = out.transpose(1, 0, 2)[..., ::-1]
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  rows = (1 + np.arange(16) + 0.5) * 10 / 3 - 0.5
  cols = (10 + np.arange(16) + 0.5) * 10 / 3 - 0.5
  np.testing.assert_allclose(out[2:-2, 2:-2, 0], np.broadcast_to(2 * cols, (16, 16))[2:-2, 2:-2],
                             atol=3)
  np.testing.assert_allclose(out[2:-2, 2:-2, 1],
                             np.broadcast_to(4 * rows[:, None], (16, 16))[2:-2, 2:-2], atol=3)


def test_eval_transform_resizes_when_only_one_side_is_native():
  """16 x 40 at size 16 is not native: 18 x 45, centre columns 14..29 (by hand)."""
  out = augment_np.eval_transform(_coordinates(16, 40, 5, 10), 16)
  assert out.shape == (16, 16, 3)
  cols = (14 + np.arange(16) + 0.5) * 40 / 45 - 0.5
  np.testing.assert_allclose(out[2:-2, 2:-2, 0], np.broadcast_to(5 * cols, (16, 16))[2:-2, 2:-2],
                             atol=3)


def test_flip_rate_is_one_half():
  """2000 draws: the flip share within 4.5 binomial standard deviations of 1/2."""
  img = _coordinates(8, 8, 30, 0)
  flips = [augment_np.train_augment(img, augment_np.example_rng(0, s, 1), 8, 1.0)[:, 0, 0].mean()
           > 100 for s in range(2000)]  # a whole-image crop: unflipped, column 0 is dark
  assert abs(np.mean(flips) - 0.5) < 4.5 * np.sqrt(0.25 / 2000)


def test_crop_boxes_may_span_a_whole_side():
  """torchvision keeps a drawn box with w == width or h == height (0 < w <= width). On a
  40 x 10 image the fallback is 13 x 10 (the ratio clamped to 3/4); a drawn 10-wide box has
  w / h >= 3/4, so h <= 13, and h < 13 for most. Likewise transposed."""
  boxes = np.array([augment_np.sample_crop_box(h, w, np.random.default_rng(s))
                    for h, w in ((40, 10), (10, 40)) for s in range(300)])
  tall, wide = boxes[:300], boxes[300:]
  assert ((tall[:, 3] == 10) & (tall[:, 2] < 13)).any() and (tall[:, 3] <= 10).all()
  assert ((wide[:, 2] == 10) & (wide[:, 3] < 13)).any() and (wide[:, 2] <= 10).all()
