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
