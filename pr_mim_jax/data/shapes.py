"""The embedded 'shapes' dataset: labelled images generated locally in NumPy.

Each image holds one large shape whose *outline geometry alone* defines the
class. Everything else is nuisance, drawn at random per image, so that the
class cannot be read off colour, position or local texture statistics:

* shape: colour, scale (bounding circle 52%-84% of the image side), position, full rotation,
  slight anisotropic stretch, fill style (solid, two-tone stripes or outline);
* background: mixtures of colour gradients, sinusoidal stripes / plaid,
  blotchy low-frequency colour noise and per-pixel Gaussian noise;
* clutter: 0-2 small dots, line segments and polygon fragments drawn under or
  over the shape;
* finish: optional slight blur and pixel noise.

Shapes are rendered from signed distance functions (SDFs) evaluated on the pixel
grid, with analytic one-pixel soft edges as anti-aliasing. Example `i` is a pure
function of `(seed, split, i, image_size)`: each example has its own RNG seeded
with `[seed, split_id, i]`, so any chunk can be generated on its own. The label
is that RNG's first draw, hence the label of example `i` does not depend on
`image_size` (the shape and clutter need not match: their draws follow the background's
[S, S, 3] noise).

Pure NumPy on purpose: importing this module imports neither TF nor JAX.
"""

import functools
import zlib

import numpy as np

from pr_mim_jax import errors

CLASS_NAMES = (
    'circle', 'triangle', 'square', 'pentagon', 'star', 'cross', 'ring',
    'crescent', 'heart', 'ellipse', 'arrow', 'semicircle')
NUM_CLASSES = len(CLASS_NAMES)

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 256

_SPLIT_IDS = {'train': 0, 'test': 1}

# 'hard' (the default) is the dataset described above. 'easy' is a sanity-check variant:
# one white shape of fixed size, centred on black, only its rotation random. Its classes
# are linearly separable from almost any features, so it tests evaluation plumbing (a
# linear probe must learn it) where 'hard' needs far more pre-training than a test has.
DIFFICULTIES = ('hard', 'easy')


def split_id(split: str) -> int:
  """Stable integer for a split name (train=0, test=1, others via CRC32)."""
  if split in _SPLIT_IDS:
    return _SPLIT_IDS[split]
  # Offset keeps other names clear of 0 and 1; CRC32 is stable across runs,
  # unlike Python's salted hash().
  return 2 + zlib.crc32(split.encode('utf-8'))


# ---------------------------------------------------------------------------
# Shape geometry. Shapes live in a normalised frame (u, v) where they fit in a
# circle of radius ~1. Each SDF returns a signed distance in those units
# (negative inside), exact or a close approximation near the boundary, which
# is all the anti-aliasing needs.
# ---------------------------------------------------------------------------


def _convex_planes(verts):
  """Outward unit normals [K, 2] and offsets [K] of a CCW convex polygon."""
  verts = np.asarray(verts, np.float64)  # [K, 2]
  edges = np.roll(verts, -1, axis=0) - verts  # [K, 2]
  normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
  normals /= np.linalg.norm(normals, axis=1, keepdims=True)
  offsets = np.sum(normals * verts, axis=1)
  return normals, offsets


def _union_planes(polys):
  """Stacks convex polygons into arrays for a vectorised union of them.

  Returns (nx, ny, off), each [P, K]; a polygon with fewer than K edges repeats
  its first edge, which does not change the max over its half-planes.
  """
  planes = [_convex_planes(p) for p in polys]
  k = max(len(o) for _, o in planes)
  nx, ny, off = [], [], []
  for n, o in planes:
    idx = np.arange(k) % len(o)
    nx.append(n[idx, 0])
    ny.append(n[idx, 1])
    off.append(o[idx])
  as32 = lambda a: np.asarray(a, np.float32)
  return as32(nx), as32(ny), as32(off)


def _regular_polygon(n, radius):
  """CCW vertices of a regular n-gon with a vertex pointing up."""
  a = np.pi / 2 + 2 * np.pi * np.arange(n) / n
  return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star_kites(n=5, r_out=1.0, r_in=0.42, back=0.3):
  """A star as the union of n convex kites, one per tip.

  Each kite is (inner vertex, tip, inner vertex, a point `back` beyond the
  centre), so neighbouring kites overlap instead of sharing an edge, which
  would leave a visible zero-distance seam inside the star.
  """
  kites = []
  for k in range(n):
    a = np.pi / 2 + 2 * np.pi * k / n
    b0, b1 = a - np.pi / n, a + np.pi / n
    kites.append([(-back * np.cos(a), -back * np.sin(a)),
                  (r_in * np.cos(b0), r_in * np.sin(b0)),
                  (r_out * np.cos(a), r_out * np.sin(a)),
                  (r_in * np.cos(b1), r_in * np.sin(b1))])
  return kites


def _box(x0, y0, x1, y1):
  return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


_HEART_SQUARE = [(0.0, -1.0), (0.68, -0.32), (0.0, 0.36), (-0.68, -0.32)]
_HEART_R = 0.48  # Half the side of the rotated square above.

_PLANES = {
    'triangle': _union_planes([_regular_polygon(3, 1.0)]),
    'square': _union_planes([_regular_polygon(4, 0.95)]),
    'pentagon': _union_planes([_regular_polygon(5, 0.95)]),
    'star': _union_planes(_star_kites()),
    'cross': _union_planes([_box(-0.92, -0.3, 0.92, 0.3),
                            _box(-0.3, -0.92, 0.3, 0.92)]),
    'arrow': _union_planes([_box(-1.0, -0.2, 0.1, 0.2),
                            [(0.0, -0.62), (1.0, 0.0), (0.0, 0.62)]]),
    'heart': _union_planes([_HEART_SQUARE]),
}


def _planes_sdf(u, v, planes):
  """SDF of a union of convex polygons: min over pieces of max over edges."""
  nx, ny, off = planes  # [P, K] each
  d = u[..., None, None] * nx + v[..., None, None] * ny - off  # [h, w, P, K]
  return d.max(-1).min(-1)


def _disk(u, v, cx, cy, r):
  return np.sqrt(np.square(u - cx) + np.square(v - cy)) - r


def _shape_sdf(name, u, v):
  """Signed distance [h, w] to shape `name` at normalised coordinates (u, v)."""
  if name in ('triangle', 'square', 'pentagon', 'star', 'cross', 'arrow'):
    return _planes_sdf(u, v, _PLANES[name])
  if name == 'circle':
    return _disk(u, v, 0.0, 0.0, 0.92)
  if name == 'ring':  # Thick annulus: the hole is 55% of the radius.
    r = np.sqrt(np.square(u) + np.square(v))
    return np.maximum(r - 0.95, 0.52 - r)
  if name == 'crescent':  # Disk minus a shifted disk; shifted to be centred.
    u = u - 0.3
    return np.maximum(_disk(u, v, 0.0, 0.0, 0.95), -_disk(u, v, 0.42, 0.0, 0.8))
  if name == 'heart':  # Rotated square plus two disks on its upper sides.
    v = v - 0.25
    sq = _planes_sdf(u, v, _PLANES['heart'])
    lobes = np.minimum(_disk(u, v, -0.34, 0.02, _HEART_R),
                       _disk(u, v, 0.34, 0.02, _HEART_R))
    return np.minimum(sq, lobes)
  if name == 'ellipse':  # Fixed 2:1 aspect; approximate SDF (exact on it).
    a, b = 1.0, 0.5
    k0 = np.sqrt(np.square(u / a) + np.square(v / b))
    k1 = np.sqrt(np.square(u / (a * a)) + np.square(v / (b * b)))
    sdf = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
    # That formula is 0 again at the centre; deep inside, use a cruder bound.
    return np.where(k0 < 0.5, (k0 - 1.0) * b, sdf)
  if name == 'semicircle':  # Half disk, shifted so its bounding box is centred.
    v = v + 0.5
    return np.maximum(_disk(u, v, 0.0, 0.0, 1.0), -v)
  raise ValueError(f'unknown shape {name!r}')


# ---------------------------------------------------------------------------
# Rendering helpers. Images are float32 [S, S, 3] in [0, 1] until the end.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _pixel_centres(size):
  """Pixel-centre coordinates [S] in pixels, and in [-0.5, 0.5]."""
  px = np.arange(size, dtype=np.float32) + 0.5
  return px, px / size - 0.5


@functools.lru_cache(maxsize=None)
def _upsample_index(grid, size):
  """Bilinear lookup from a coarse grid to S pixels: low index [S], frac [S, 1].

  Elementwise gathers rather than a matmul, so results never depend on BLAS.
  """
  pos = (np.arange(size) + 0.5) / size * (grid - 1)  # In grid index units.
  lo = np.clip(np.floor(pos).astype(np.int64), 0, grid - 2)
  frac = (pos - lo).astype(np.float32)[:, None]
  return lo, frac


def _upsample(coarse, size):
  """Bilinearly upsamples [g, g, C] to [S, S, C]."""
  lo, frac = _upsample_index(coarse.shape[0], size)
  # [S, g, C]
  rows = coarse[lo] + frac[..., None] * (coarse[lo + 1] - coarse[lo])
  return rows[:, lo] + frac * (rows[:, lo + 1] - rows[:, lo])  # [S, S, C]


def _composite(img, y0, x0, alpha, colour):
  """Alpha-blends `colour` ([3] or [h, w, 3]) into img[y0:, x0:] in place."""
  h, w = alpha.shape
  region = img[y0:y0 + h, x0:x0 + w]  # [h, w, 3] view
  region += alpha[..., None] * (colour - region)


def _window(centre_x, centre_y, half, size):
  """Integer pixel window [y0, y1) x [x0, x1) covering a disc, clipped."""
  x0 = max(0, int(np.floor(centre_x - half)))
  x1 = min(size, int(np.ceil(centre_x + half)))
  y0 = max(0, int(np.floor(centre_y - half)))
  y1 = min(size, int(np.ceil(centre_y + half)))
  return y0, y1, x0, x1


def _random_colour(rng):
  return rng.random(3).astype(np.float32)


def _background(rng, size):
  """Random textured background [S, S, 3]."""
  px, xn = _pixel_centres(size)
  # Scalar draws first, arrays last (keeps the scene similar across sizes).
  c0, c1, c2 = _random_colour(rng), _random_colour(rng), _random_colour(rng)
  grad_angle = rng.uniform(0, 2 * np.pi)
  grad_amount = rng.uniform(0.0, 0.5)
  stripes = rng.random() < 0.45
  stripe_freq = rng.uniform(1.5, 9.0)  # Cycles per image side.
  stripe_angle = rng.uniform(0, np.pi)
  stripe_phase = rng.uniform(0, 2 * np.pi)
  stripe_hard = rng.random() < 0.4
  plaid = rng.random() < 0.35
  plaid_angle = stripe_angle + rng.uniform(np.pi / 4, 3 * np.pi / 4)
  stripe_amount = rng.uniform(0.05, 0.2)
  blotches = rng.random() < 0.45
  blotch_grid = int(rng.integers(3, 9))
  blotch_amount = rng.uniform(0.1, 0.25)
  noise_std = rng.uniform(0.0, 0.1) if rng.random() < 0.7 else 0.0

  # Linear gradient between two colours.
  t = (np.cos(grad_angle) * xn[None, :] + np.sin(grad_angle) * xn[:, None])
  t = np.clip(t * grad_amount + 0.5, 0.0, 1.0)  # [S, S]
  img = c0 + t[..., None] * (c1 - c0)  # [S, S, 3]

  if stripes:
    two_pi_f = np.float32(2 * np.pi * stripe_freq)
    def wave(angle):
      ph = np.cos(angle) * xn[None, :] + np.sin(angle) * xn[:, None]
      return np.sin(two_pi_f * ph + stripe_phase)  # [S, S]
    s = wave(stripe_angle)
    if plaid:
      s = 0.5 * (s + wave(plaid_angle))
    if stripe_hard:
      s = np.clip(4.0 * s, -1.0, 1.0)
    s = (0.5 * stripe_amount) * (s + 1.0)
    img += s[..., None] * (c2 - img)

  if blotches:
    coarse = rng.random((blotch_grid, blotch_grid, 3), dtype=np.float32)
    smooth = _upsample(coarse, size)  # [S, S, 3]
    img += np.float32(blotch_amount) * (smooth - img)

  if noise_std > 0:
    img += np.float32(noise_std) * rng.standard_normal(
        (size, size, 3), dtype=np.float32)
  return img.astype(np.float32, copy=False)


def _draw_clutter(rng, img, size):
  """Draws one small distractor: a dot, line segment or polygon fragment."""
  px, _ = _pixel_centres(size)
  kind = int(rng.integers(3))
  colour = _random_colour(rng)
  cx, cy = rng.uniform(0, size, 2)
  if kind == 0:  # Dot / blob.
    r = max(0.7, rng.uniform(0.015, 0.05) * size)
    y0, y1, x0, x1 = _window(cx, cy, r + 1, size)
    dx, dy = px[x0:x1] - cx, px[y0:y1] - cy
    sdf = np.sqrt(np.square(dx)[None, :] + np.square(dy)[:, None]) - r
  elif kind == 1:  # Line segment (a capsule).
    half_len = rng.uniform(0.04, 0.11) * size
    angle = rng.uniform(0, np.pi)
    half_w = max(0.4, rng.uniform(0.005, 0.013) * size)
    y0, y1, x0, x1 = _window(cx, cy, half_len + half_w + 1, size)
    dx, dy = px[x0:x1][None, :] - cx, px[y0:y1][:, None] - cy
    along = np.clip(dx * np.cos(angle) + dy * np.sin(angle), -half_len,
                    half_len)
    sdf = np.sqrt(np.square(dx - along * np.cos(angle))
                  + np.square(dy - along * np.sin(angle))) - half_w
  else:  # Random triangle fragment.
    angles = np.sort(rng.uniform(0, 2 * np.pi, 3))
    radii = rng.uniform(0.03, 0.08, 3) * size
    verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    normals, offsets = _convex_planes(verts)
    y0, y1, x0, x1 = _window(cx, cy, radii.max() + 1, size)
    dx, dy = px[x0:x1] - cx, px[y0:y1] - cy
    d = (dx[None, :, None] * normals[:, 0].astype(np.float32)
         + dy[:, None, None] * normals[:, 1].astype(np.float32)
         - offsets.astype(np.float32))  # [h, w, 3]
    sdf = d.max(-1)
  if sdf.size:
    _composite(img, y0, x0, np.clip(0.5 - sdf, 0.0, 1.0), colour)


def _draw_shape(rng, img, size, name):
  """Draws the main shape of class `name` with random pose and style."""
  px, _ = _pixel_centres(size)
  radius = rng.uniform(0.26, 0.42) * size  # Bounding radius, in pixels.
  margin = 0.8 * radius  # Shape stays mostly inside the image.
  cx, cy = rng.uniform(margin, size - margin, 2)
  angle = rng.uniform(0, 2 * np.pi)
  stretch = rng.uniform(0.88, 1.12)  # Mild anisotropy along the shape's u.
  style = rng.choice(3, p=[0.75, 0.05, 0.2])  # Solid, stripes, outline.
  stroke = max(1.0, rng.uniform(0.09, 0.17) * radius)  # Outline width, px.
  stripe_freq = rng.uniform(2.0, 4.0)  # Stripe cycles per unit of radius.
  stripe_angle = rng.uniform(0, np.pi)

  y0, y1, x0, x1 = _window(cx, cy, 1.15 * radius * max(stretch, 1.0) + stroke,
                           size)
  if y1 <= y0 or x1 <= x0:
    return
  dx, dy = px[x0:x1][None, :] - cx, px[y0:y1][:, None] - cy  # [1, w], [h, 1]
  c, s = np.float32(np.cos(angle) / radius), np.float32(np.sin(angle) / radius)
  u = (dx * c + dy * s) / np.float32(stretch)  # [h, w]
  v = dy * c - dx * s  # [h, w]
  sdf = _shape_sdf(name, u, v) * np.float32(radius)  # In pixels.
  if style == 2:
    sdf = np.abs(sdf) - 0.5 * stroke
  alpha = np.clip(0.5 - sdf, 0.0, 1.0)  # [h, w]

  # Colour contrasting with the background under the shape: retry a few draws
  # and keep the most distinct, so the shape is always visible.
  bg_mean = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
  best, best_dist = None, -1.0
  for _ in range(8):
    colour = _random_colour(rng)
    dist = float(np.linalg.norm(colour - bg_mean))
    if dist > best_dist:
      best, best_dist = colour, dist
    if dist > 0.45:
      break
  colour = best
  if style == 1:  # Two-tone stripes in the shape's own frame.
    other = np.clip(colour + rng.uniform(-0.45, 0.45, 3), 0, 1)
    t = np.sin(np.float32(2 * np.pi * stripe_freq)
               * (u * np.cos(stripe_angle) + v * np.sin(stripe_angle)))
    t = np.clip(2.0 * t + 0.5, 0.0, 1.0)  # [h, w]
    colour = colour + t[..., None] * (other - colour).astype(np.float32)
  _composite(img, y0, x0, alpha, colour)


def _blur(img):
  """3x3 binomial blur with edge padding."""
  p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
  p = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
  return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]


def _render(rng, size):
  """One example: (image uint8 [S, S, 3], label)."""
  label = int(rng.integers(NUM_CLASSES))
  n_clutter = int(rng.integers(0, 3))
  n_under = int(rng.integers(0, n_clutter + 1))
  blur = rng.random() < 0.35
  final_noise = rng.uniform(0.0, 0.03)
  img = _background(rng, size)  # [S, S, 3]
  for _ in range(n_under):
    _draw_clutter(rng, img, size)
  _draw_shape(rng, img, size, CLASS_NAMES[label])
  for _ in range(n_clutter - n_under):
    _draw_clutter(rng, img, size)
  if blur:
    img = _blur(img)
  img += np.float32(final_noise) * rng.standard_normal(img.shape,
                                                       dtype=np.float32)
  img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
  return img, label


def _render_easy(rng, size):
  """One 'easy' example: (white shape, centred, radius 0.36 * size, random rotation, on black)."""
  label = int(rng.integers(NUM_CLASSES))
  angle = rng.uniform(0, 2 * np.pi)
  px, _ = _pixel_centres(size)
  radius = np.float32(0.36 * size)
  dx, dy = px[None, :] - size / 2, px[:, None] - size / 2  # [1, S], [S, 1]
  c, s = np.float32(np.cos(angle)) / radius, np.float32(np.sin(angle)) / radius
  sdf = _shape_sdf(CLASS_NAMES[label], dx * c + dy * s, dy * c - dx * s) * radius  # [S, S]
  alpha = np.clip(0.5 - sdf, 0.0, 1.0)
  img = np.round(np.repeat(alpha[..., None], 3, axis=-1) * 255.0)
  return img.astype(np.uint8), label


def check_image_size(image_size: int) -> None:
  """UserError unless the generator supports this resolution."""
  if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
    raise errors.UserError(
        f'data.shapes.image_size={image_size} is out of range; use a value from '
        f'{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}.')


def generate(num_examples: int, image_size: int = 64, seed: int = 0,
             split: str = 'train', start: int = 0, difficulty: str = 'hard'
             ) -> tuple[np.ndarray, np.ndarray]:
  """Generates examples `start .. start + num_examples - 1` of a split.

  Returns (images uint8 [N, S, S, 3], labels int32 [N]). Deterministic: the
  same (seed, split, index, image_size) always gives the same example, so
  `generate(10, start=5)` equals `generate(15)[5:]`.
  """
  check_image_size(image_size)
  if difficulty not in DIFFICULTIES:
    raise errors.UserError(f'data.shapes.difficulty={difficulty!r}: use one of {DIFFICULTIES}')
  render = _render if difficulty == 'hard' else _render_easy
  if num_examples < 0 or start < 0 or seed < 0:
    raise errors.UserError(
        f'shapes: num_examples ({num_examples}), start ({start}) and seed '
        f'({seed}) must be non-negative.')
  sid = split_id(split)
  images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  labels = np.empty((num_examples,), np.int32)
  for n in range(num_examples):
    rng = np.random.default_rng([seed, sid, start + n])
    images[n], labels[n] = render(rng, image_size)
  return images, labels
