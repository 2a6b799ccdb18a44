"""augment_np: header reading, decode errors, eval geometry, where the crop and flip land."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.parametrize("height,width,size,expected", [
    (375, 500, 224, (256, 341, 16, 58)),  # int(341.33); (341 - 224) / 2 = 58.5 rounds to even
    (500, 375, 224, (341, 256, 58, 16)),
    (224, 224, 224, (224, 224, 0, 0)),  # native size: kept as it is
    (224, 300, 224, (256, 342, 16, 59)),  # one native side is not enough
])
def test_eval_geometry_by_hand(height, width, size, expected):
  assert augment_np.eval_geometry(height, width, size) == expected


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


def _box_reference(box, size, scale_x, scale_y):
  """What a crop (top, left, h, w) of a `_coordinates` image resized to size x size shows:
  output pixel (i, j) samples source row top + (i + 0.5) * h / size - 0.5 and column
  left + (j + 0.5) * w / size - 0.5, and a ramp keeps its value there. Float
  [size, size, 2]: (red, green)."""
  top, left, h, w = box
  rows = top + (np.arange(size) + 0.5) * h / size - 0.5
  cols = left + (np.arange(size) + 0.5) * w / size - 0.5
  red = np.broadcast_to(scale_x * cols[None, :], (size, size))
  green = np.broadcast_to(scale_y * rows[:, None], (size, size))
  return np.stack([red, green], -1)


@pytest.mark.parametrize("encoded", [False, True])
def test_random_resized_crop_shows_the_sampled_box(encoded):
  """The output is the box sample_crop_box draws from the same stream, resized: checked on
  coordinate ramps against the box's own geometry (by hand), for in-memory pixels and a PNG
  of a non-square image (height and width must not swap anywhere on the way)."""
  img = _coordinates(48, 80, 3, 5)
  raw = Image.fromarray(img) if encoded else img
  if encoded:
    buf = io.BytesIO()
    raw.save(buf, "PNG")
    raw = buf.getvalue()
  for seed in range(12):
    box = augment_np.sample_crop_box(48, 80, np.random.default_rng(seed), 0.08)
    out = augment_np.random_resized_crop(raw, np.random.default_rng(seed), 16, 0.08)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    want = _box_reference(box, 16, 3, 5)
    np.testing.assert_allclose(out[2:-2, 2:-2, :2], want[2:-2, 2:-2], atol=3, err_msg=str(box))


def test_train_augment_mirrors_left_right():
  """The flip mirrors columns, never rows: each output is the unflipped crop of the same
  stream or that crop reversed left-right, and both occur."""
  img = _coordinates(48, 80, 3, 5)
  flips = []
  for seed in range(20):
    plain = augment_np.random_resized_crop(img, augment_np.example_rng(0, seed, 3), 16)
    out = augment_np.train_augment(img, augment_np.example_rng(0, seed, 3), 16)
    if np.array_equal(out, plain):
      flips.append(False)
    else:
      np.testing.assert_array_equal(out, plain[:, ::-1])
      flips.append(True)
  assert 0 < np.mean(flips) < 1


def test_rows_of_a_step_are_augmented_independently():
  """Each position of the global batch has its own stream: the same image at 8 positions of
  one step gets (almost surely) 8 different crops, and the same position at another step too."""
  img = _coordinates(48, 80, 3, 5)
  outs = [augment_np.train_augment(img, augment_np.example_rng(0, 5, p), 16).tobytes()
          for p in range(8)]
  outs += [augment_np.train_augment(img, augment_np.example_rng(0, 6, 0), 16).tobytes(),
           augment_np.train_augment(img, augment_np.example_rng(1, 5, 0), 16).tobytes()]
  assert len(set(outs)) == len(outs)


def test_resize_that_grows_is_bicubic_not_bilinear():
  """Where the crop grows, the filter is bicubic (MAE's torchvision recipe): on a 4x upscale of
  6 x 6 noise, within a few levels of Pillow's bicubic and far from Pillow's bilinear (the two
  kernels differ by about 10 levels here; OpenCV's and Pillow's cubic by about 4)."""
  img = np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.uint8)
  ours = augment_np.resize(img, 24, 24).astype(int)[4:-4, 4:-4]  # away from the borders
  cubic, linear = (np.asarray(Image.fromarray(img).resize((24, 24), f)).astype(int)[4:-4, 4:-4]
                   for f in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR))
  to_cubic, to_linear = np.abs(ours - cubic).mean(), np.abs(ours - linear).mean()
  assert to_cubic < 6 and to_cubic < 0.5 * to_linear, (to_cubic, to_linear)
