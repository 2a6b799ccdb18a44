"""Text for pictures: column titles and legends, drawn with Pillow's built-in font.

Bands are uint8 [h, width, 3] arrays on a white background, stacked above or below a grid
of tiles by visualize.grid.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TITLE_PX = 16  # font size of column titles (shrunk to fit narrow tiles)
LEGEND_PX = 14  # font size of the legend
TEXT_RGB = (0, 0, 0)
BACKGROUND = 255  # white text bands
PAD = 4  # px around text


def font(px: int):
  """Pillow's built-in font at `px` px (Pillow >= 10.1); older Pillow has one small size."""
  try:
    return ImageFont.load_default(size=px)
  except TypeError:  # Pillow < 10.1: load_default() takes no size
    return ImageFont.load_default()


def _text_width(text: str, fnt) -> int:
  left, _, right, _ = fnt.getbbox(text)
  return right - left


def _text_rows(fnt) -> tuple[int, int]:
  """(top, bottom) of a line's ink below the point it is drawn at."""
  _, top, _, bottom = fnt.getbbox("Agjy")
  return top, bottom


def _title_font(titles, tile_w: int):
  """The largest font, up to TITLE_PX, in which every title fits its column."""
  for px in range(TITLE_PX, 7, -1):
    fnt = font(px)
    if max(_text_width(t, fnt) for t in titles) <= tile_w - 2 * PAD:
      return fnt
  return fnt


def title_band(titles, tile_w: int, gap: int, width: int) -> np.ndarray:
  """uint8 [h, width, 3]: each title centred over its column of tile_w px (gap px apart)."""
  fnt = _title_font(titles, tile_w)
  top, bottom = _text_rows(fnt)
  band = Image.new("RGB", (width, bottom - top + 2 * PAD), (BACKGROUND,) * 3)
  draw = ImageDraw.Draw(band)
  for j, text in enumerate(titles):
    left = fnt.getbbox(text)[0]
    x = j * (tile_w + gap) + (tile_w - _text_width(text, fnt)) // 2 - left
    draw.text((x, PAD - top), text, fill=TEXT_RGB, font=fnt)
  return np.asarray(band)


def _legend_layout(items, width: int, fnt) -> tuple[list, int, int]:
  """Left-to-right flow of the items, wrapped at `width`: ([(x, y)], line height, height)."""
  top, bottom = _text_rows(fnt)
  line = max([bottom - top] + [sw.shape[0] for sw, _ in items if sw is not None])
  x, y, spots = PAD, PAD, []
  for sw, text in items:
    w = (0 if sw is None else sw.shape[1] + PAD) + _text_width(text, fnt)
    if x > PAD and x + w > width - PAD:
      x, y = PAD, y + line + PAD
    spots.append((x, y))
    x += w + 4 * PAD
  return spots, line, y + line + PAD


def legend_band(items, width: int) -> np.ndarray:
  """uint8 [h, width, 3]: the legend items (legend_items), wrapped to the picture's width."""
  fnt = font(LEGEND_PX)
  spots, line, height = _legend_layout(items, width, fnt)
  top, bottom = _text_rows(fnt)
  band = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
  draw = ImageDraw.Draw(band)
  for (sw, text), (x, y) in zip(items, spots):
    if sw is not None:
      band.paste(Image.fromarray(sw), (x, y + (line - sw.shape[0]) // 2))
      x += sw.shape[1] + PAD
    draw.text((x - fnt.getbbox(text)[0], y + (line - bottom - top) // 2), text, fill=TEXT_RGB,
              font=fnt)
  return np.asarray(band)
