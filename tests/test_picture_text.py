"""Tests for pr_mim_jax.training.picture_text: where titles and legend items land."""

import numpy as np
from PIL import ImageFont
import pytest

from pr_mim_jax.training import picture_text as pt


def _ink_columns(band, x0, x1):
  """Columns in [x0, x1) holding dark (text) pixels."""
  dark = (band[:, x0:x1].astype(int).sum(-1) < 3 * 128).any(0)
  return np.nonzero(dark)[0] + x0


def test_each_title_fits_inside_its_column_centred_and_whole():
  widths = {pt._text_width("reconstruction", pt.font(px)) for px in (8, 16)}  # pylint: disable=protected-access
  if len(widths) == 1:
    pytest.skip("Pillow < 10.1: one built-in font size, so a long title cannot shrink to fit")
  tile, gap = 60, 6
  titles = ["original", "tokens", "reconstruction"]  # the last fits 60 px only when shrunk
  width = len(titles) * (tile + gap) - gap
  band = pt.title_band(titles, tile, gap, width)
  assert band.shape[1] == width and band.dtype == np.uint8
  assert (band[0] == 255).all() and (band[-1] == 255).all()  # no glyph cut at the edges
  for j in range(len(titles)):
    left = j * (tile + gap)
    ink = _ink_columns(band, left - (gap if j else 0), left + tile + (gap if j + 1 < len(titles) else 0))
    assert ink.size, titles[j]
    assert ink.min() >= left + pt.PAD - 1 and ink.max() <= left + tile - pt.PAD, titles[j]
    assert abs((ink.min() - left) - (left + tile - 1 - ink.max())) <= 2, titles[j]  # centred
  gaps = [band[:, j * (tile + gap) - gap:j * (tile + gap)] for j in range(1, len(titles))]
  assert all((g == 255).all() for g in gaps)  # nothing spills between columns


def _swatch(rgb, h=10, w=14):
  return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def _find(band, block):
  h, w = block.shape[:2]
  for y in range(band.shape[0] - h + 1):
    for x in range(band.shape[1] - w + 1):
      if np.array_equal(band[y:y + h, x:x + w], block):
        return y, x
  return None


def test_legend_swatches_are_whole_centred_on_their_line_and_apart_from_their_text():
  red, blue = _swatch((255, 0, 0)), _swatch((0, 0, 255), h=6)
  items = [(red, "red"), (blue, "blue"), (None, "plain text")]
  band = pt.legend_band(items, 600)
  height = pt._legend_layout(items, 600, pt.font(pt.LEGEND_PX))[2]  # pylint: disable=protected-access
  assert band.shape == (height, 600, 3) and (band[-1] == 255).all() and (band[0] == 255).all()
  y_red, x_red = _find(band, red)
  y_blue, x_blue = _find(band, blue)
  assert y_red == y_blue - (red.shape[0] - blue.shape[0]) // 2  # both centred on one line
  # Text starts after its swatch, never over it; items keep 4 PAD apart.
  red_text = _ink_columns(band, x_red + red.shape[1], x_blue)
  assert red_text.size and red_text.min() >= x_red + red.shape[1] + pt.PAD - 1
  assert x_blue - red_text.max() >= 4 * pt.PAD
  after_blue = _ink_columns(band, x_blue + blue.shape[1], 600)
  assert after_blue.size and after_blue.min() >= x_blue + blue.shape[1] + pt.PAD - 1


def test_legend_wraps_at_the_width_and_a_wide_first_item_stays_on_the_first_line():
  items = [(_swatch((255, 0, 0)), "a rather long legend entry"), (_swatch((0, 0, 255)), "next")]
  fnt = pt.font(pt.LEGEND_PX)
  spots, line, height = pt._legend_layout(items, 120, fnt)  # pylint: disable=protected-access
  assert spots[0] == (pt.PAD, pt.PAD)  # too wide for 120 px, but nothing to wrap away from
  assert spots[1] == (pt.PAD, pt.PAD + line + pt.PAD)  # the next item opens a new line
  assert height == spots[1][1] + line + pt.PAD
  band = pt.legend_band(items, 120)
  assert _find(band, _swatch((0, 0, 255))) is not None and (band[-1] == 255).all()
  wide = pt._legend_layout(items, 1000, fnt)[0]  # pylint: disable=protected-access
  assert wide[1][1] == pt.PAD and wide[1][0] > pt.PAD  # room enough: one line


def test_a_title_that_fits_only_without_its_margins_is_shrunk_to_keep_them():
  try:
    left, _, right, _ = ImageFont.load_default(size=pt.TITLE_PX).getbbox("reconstruction")
  except TypeError:
    pytest.skip("Pillow < 10.1: one built-in font size, so a long title cannot shrink to fit")
  tile = right - left + 2  # room at full size edge to edge, but not for PAD on each side
  band = pt.title_band(["reconstruction"], tile, 2, tile)
  ink = _ink_columns(band, 0, tile)
  assert ink.size and ink.min() >= pt.PAD - 1 and ink.max() <= tile - pt.PAD
