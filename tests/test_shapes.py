"""Tests for the embedded shapes dataset and its TFDS builder."""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from pr_mim_jax import errors
from pr_mim_jax.data import shapes


def test_import_does_not_pull_in_tf_or_jax():
  code = ('import sys, pr_mim_jax.data.shapes; '
          'bad = [m for m in ("tensorflow", "jax", "tensorflow_datasets") '
          'if m in sys.modules]; assert not bad, bad')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  subprocess.run([sys.executable, '-c', code], check=True, env=env)


def test_shapes_and_dtypes():
  images, labels = shapes.generate(12, image_size=32)
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < shapes.NUM_CLASSES
  empty, empty_labels = shapes.generate(0, image_size=16)
  assert empty.shape == (0, 16, 16, 3) and empty_labels.shape == (0,)


@pytest.mark.parametrize('size', [16, 23, 256])
def test_any_image_size(size):
  images, labels = shapes.generate(3, image_size=size, start=7)
  assert images.shape == (3, size, size, 3)
  # Labels come first from each example's RNG, so they do not depend on size.
  np.testing.assert_array_equal(labels,
                                shapes.generate(3, image_size=64, start=7)[1])
  # Not blank: the shape and background make every image vary spatially.
  assert all(im.std() > 5 for im in images)


def test_bad_arguments_are_user_errors():
  with pytest.raises(errors.UserError):
    shapes.generate(2, image_size=8)
  with pytest.raises(errors.UserError):
    shapes.generate(2, image_size=1024)
  with pytest.raises(errors.UserError):
    shapes.generate(2, seed=-1)


def test_deterministic_and_chunkable():
  images, labels = shapes.generate(15, image_size=24, seed=3)
  again, again_labels = shapes.generate(15, image_size=24, seed=3)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, again_labels)
  # Any chunk is generated independently of the others.
  head = shapes.generate(5, image_size=24, seed=3)
  tail = shapes.generate(10, image_size=24, seed=3, start=5)
  np.testing.assert_array_equal(np.concatenate([head[0], tail[0]]), images)
  np.testing.assert_array_equal(np.concatenate([head[1], tail[1]]), labels)


def test_seeds_and_splits_differ():
  def get(**kw):
    return shapes.generate(20, image_size=24, **kw)[0]
  base = get(seed=0, split='train')
  others = [get(seed=1, split='train'), get(seed=0, split='test'),
            get(seed=0, split='validation')]
  for other in others:
    # Per example, not just somewhere: no image is shared with the base.
    assert all(not np.array_equal(a, b) for a, b in zip(base, other))
  np.testing.assert_array_equal(get(seed=0, split='validation'), others[2])


def test_easy_variant_is_a_centred_white_shape_with_the_same_labels():
  hard_images, hard_labels = shapes.generate(48, image_size=32, seed=3)
  images, labels = shapes.generate(48, image_size=32, seed=3, difficulty='easy')
  np.testing.assert_array_equal(labels, hard_labels)  # the label is drawn first in both
  assert not np.array_equal(images, hard_images)
  assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
  assert (images[:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0).all()  # black corners
  area = (images[..., 0] > 127).mean(axis=(1, 2))  # [N] share of white pixels
  assert (area > 0.05).all()
  np.testing.assert_array_equal(shapes.generate(5, 32, 3, difficulty='easy', start=2)[0],
                                images[2:7])
  with pytest.raises(errors.UserError, match='difficulty'):
    shapes.generate(1, difficulty='medium')


def test_labels_cover_all_classes_evenly():
  _, labels = shapes.generate(600, image_size=16)
  counts = np.bincount(labels, minlength=shapes.NUM_CLASSES)
  expected = 600 / shapes.NUM_CLASSES
  # Multinomial std per class is ~sqrt(50) ~ 7; 0.5x..1.5x is > 3 sigma.
  assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected


@pytest.mark.parametrize('name', shapes.CLASS_NAMES)
def test_sdf_zero_set_is_only_the_outline(name):
  """Shapes built as unions must not leave zero-distance seams inside them.

  A seam renders as a half-transparent line across a filled shape (and as an
  extra stroke in outline style). On a fine grid, every point on the zero set
  must have an outside point within two grid steps (two, not one, for points
  deep in the narrow notches of the star).
  """
  n = 301
  t = np.linspace(-1.3, 1.3, n, dtype=np.float32)
  u, v = np.meshgrid(t, t)  # [n, n]
  sdf = shapes._shape_sdf(name, u, v)
  assert sdf.min() < -0.2 and sdf[0].min() > 0  # Solid, and fits the frame.
  pad = np.pad(sdf, 2, mode='edge')
  max_neighbour = np.max([pad[2 + dy:n + 2 + dy, 2 + dx:n + 2 + dx]
                          for dy in range(-2, 3)
                          for dx in range(-2, 3)], axis=0)
  on_zero_set = np.abs(sdf) < 0.5 * (t[1] - t[0])
  assert on_zero_set.any() and np.all(max_neighbour[on_zero_set] > 0)


def _rotation_scale_signature(name, angle=0.0, n=241, bins=20):
  """Histogram of boundary-to-centroid distances, in units of sqrt(area).

  Invariant to rotation and scale, so two classes with (nearly) equal
  signatures could be confused by pose alone.
  """
  t = np.linspace(-1.3, 1.3, n, dtype=np.float32)
  u, v = np.meshgrid(t, t)  # [n, n]
  c, s = np.cos(angle), np.sin(angle)
  sdf = shapes._shape_sdf(name, c * u + s * v, c * v - s * u)
  inside, boundary = sdf < 0, np.abs(sdf) < 0.03
  cu, cv = u[inside].mean(), v[inside].mean()
  area = inside.mean() * (2 * 1.3)**2
  r = np.hypot(u[boundary] - cu, v[boundary] - cv) / np.sqrt(area)
  hist, _ = np.histogram(r, bins=bins, range=(0, 1.5))
  return hist / hist.sum()


def test_signature_is_pose_invariant():
  """Calibrates the test below: rotating a shape barely moves its signature."""
  for name in shapes.CLASS_NAMES:
    for angle in (1.0, 2.2):
      diff = np.abs(_rotation_scale_signature(name)
                    - _rotation_scale_signature(name, angle)).sum()
      assert diff < 0.09, (name, angle, diff)


def test_classes_differ_under_rotation_and_scale():
  sigs = {c: _rotation_scale_signature(c) for c in shapes.CLASS_NAMES}
  for i, a in enumerate(shapes.CLASS_NAMES):
    for b in shapes.CLASS_NAMES[i + 1:]:
      # L1 distance between histograms, above the rotation noise bound (0.09)
      # of the test above: no pose maps one class onto another.
      assert np.abs(sigs[a] - sigs[b]).sum() > 0.12, (a, b)


@pytest.mark.slow
def test_class_not_given_by_colour_or_position():
  images, labels = shapes.generate(2000, image_size=24, split='train')
  test_images, test_labels = shapes.generate(600, image_size=24, split='test')
  x = images.astype(np.float32) / 255.0

  # Same-class images differ a lot pixel-wise (random colour, pose, background):
  # the per-pixel std across one class is over half that of uniform noise
  # (0.29); a fixed colour or position per class would pull it far lower.
  for c in range(shapes.NUM_CLASSES):
    assert x[labels == c].std(axis=0).mean() > 0.15

  # Nearest class mean on the mean RGB colour is near chance (1/12 = 0.083).
  # With 600 test examples the std of a chance-level accuracy is ~0.011, so the
  # bound 1.6/NUM_CLASSES = 0.133 is > 4 sigma above chance yet far below what
  # any real colour cue would give.
  feats = x.mean(axis=(1, 2))  # [N, 3]
  means = np.stack([feats[labels == c].mean(0)
                    for c in range(shapes.NUM_CLASSES)])
  test_feats = test_images.astype(np.float32).mean(axis=(1, 2)) / 255.0
  dists = np.linalg.norm(test_feats[:, None] - means[None], axis=-1)
  accuracy = np.mean(dists.argmin(1) == test_labels)
  assert accuracy < 1.6 / shapes.NUM_CLASSES


# ---------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  tfds = pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = shapes_tfds.prepare(data_dir, image_size=16, train_size=40,
                                test_size=10, seed=5)
  return tfds, shapes_tfds, data_dir, builder


def test_builder_metadata(prepared):
  _, _, _, builder = prepared
  assert builder.name == 'shapes'
  assert builder.builder_config.name == 's16_tr40_te10_seed5'
  assert builder.info.splits['train'].num_examples == 40
  assert builder.info.splits['test'].num_examples == 10
  assert builder.info.features['image'].shape == (16, 16, 3)
  assert tuple(builder.info.features['label'].names) == shapes.CLASS_NAMES


def test_data_source_matches_generator(prepared):
  tfds, _, data_dir, builder = prepared
  source = builder.as_data_source()
  by_name = tfds.data_source('shapes/s16_tr40_te10_seed5', data_dir=data_dir,
                             download=False)
  for split, n in (('train', 40), ('test', 10)):
    images, labels = shapes.generate(n, image_size=16, seed=5, split=split)
    assert len(source[split]) == n
    # PNG is lossless and records are stored in index order.
    got = [source[split][i] for i in range(n)]
    np.testing.assert_array_equal(np.stack([g['image'] for g in got]), images)
    np.testing.assert_array_equal([g['label'] for g in got], labels)
    np.testing.assert_array_equal(by_name[split][n - 1]['image'], images[-1])


def test_prepare_reuses_cache(prepared, monkeypatch):
  _, shapes_tfds, data_dir, builder = prepared
  files = sorted(p for p in builder.data_path.iterdir())
  mtimes = [os.path.getmtime(p) for p in files]

  def fail(*args, **kwargs):
    raise AssertionError('download_and_prepare called on a prepared dataset')

  monkeypatch.setattr(shapes_tfds.Shapes, 'download_and_prepare', fail)
  again = shapes_tfds.prepare(data_dir, image_size=16, train_size=40,
                              test_size=10, seed=5)
  assert again.is_prepared()
  assert [os.path.getmtime(p) for p in files] == mtimes
  # Other settings are a different, not yet prepared, config side by side.
  other = shapes_tfds.builder(data_dir, image_size=16, train_size=40,
                              test_size=10, seed=6)
  assert not other.is_prepared()
  assert other.data_dir != builder.data_dir


def test_builder_rejects_bad_settings(prepared):
  _, shapes_tfds, data_dir, _ = prepared
  with pytest.raises(errors.UserError):
    shapes_tfds.builder(data_dir, image_size=4)
  with pytest.raises(errors.UserError):
    shapes_tfds.builder(data_dir, train_size=0)


def test_easy_variant_has_its_own_builder_config(prepared):
  _, shapes_tfds, _, _ = prepared
  config = shapes_tfds.Shapes.get_builder_config('s16_tr40_te10_seed5_easy')
  assert (config.difficulty, config.image_size, config.seed) == ('easy', 16, 5)
  assert shapes_tfds.Shapes.get_builder_config('s16_tr40_te10_seed5').difficulty == 'hard'
  assert shapes_tfds.config_name(16, 40, 10, 5, 'easy') == 's16_tr40_te10_seed5_easy'


def test_prepare_survives_a_concurrent_writer(tmp_path, monkeypatch):
  """Two runs sharing a data_dir generate the same config at once: the one renaming its
  folder second used to die with FileExistsError. Here a second builder finishes the
  config while the first is still generating; the first must then read that copy."""
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  data_dir = str(tmp_path)
  settings = dict(image_size=16, train_size=6, test_size=3, seed=2)
  real_generate = shapes.generate
  other_done = []

  def generate_racing(*args, **kwargs):
    if not other_done:  # first call, inside the first run's generation
      other_done.append(True)
      shapes_tfds.builder(data_dir, **settings).download_and_prepare()
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(shapes_tfds.shapes, 'generate', generate_racing)
  b = shapes_tfds.prepare(data_dir, **settings)
  assert other_done and b.is_prepared()
  images, labels = real_generate(6, image_size=16, seed=2, split='train')
  source = b.as_data_source()['train']
  np.testing.assert_array_equal(np.stack([source[i]['image'] for i in range(6)]), images)
  np.testing.assert_array_equal([source[i]['label'] for i in range(6)], labels)
  leftovers = [p.name for p in (tmp_path / 'shapes' / 's16_tr6_te3_seed2').iterdir()]
  assert leftovers == ['1.1.0'], leftovers


def test_prepare_removes_what_a_killed_generation_left(tmp_path, capsys):
  """A generation killed mid-way leaves tfds's incomplete.* folder (renamed into place only
  at the end). The next prepare holds the lock, so no live process writes it: it goes."""
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  config_dir = tmp_path / 'shapes' / 's16_tr6_te3_seed2'
  stale = config_dir / 'incomplete.AB12CD_1.1.0'
  (stale / 'shapes-train.array_record-00000-of-00001').parent.mkdir(parents=True)
  (stale / 'shapes-train.array_record-00000-of-00001').write_bytes(b'partial')
  b = shapes_tfds.prepare(str(tmp_path), image_size=16, train_size=6, test_size=3, seed=2)
  assert b.is_prepared()
  assert sorted(p.name for p in config_dir.iterdir()) == ['1.1.0']
  assert f'removed {stale}' in capsys.readouterr().out


def test_prepare_waits_for_a_live_generation_and_leaves_its_files_alone(tmp_path):
  """While another process holds the generation lock, its incomplete.* folder is live:
  prepare waits instead of deleting it, and reads that process's copy once it is done."""
  pytest.importorskip('tensorflow_datasets')
  import fcntl
  import threading
  from pr_mim_jax.data import shapes_tfds
  settings = dict(image_size=16, train_size=6, test_size=3, seed=2)
  config_dir = tmp_path / 'shapes' / 's16_tr6_te3_seed2'
  live = config_dir / 'incomplete.LIVE00_1.1.0'
  live.mkdir(parents=True)
  lock = os.open(tmp_path / 'shapes' / '.s16_tr6_te3_seed2.lock', os.O_CREAT | os.O_RDWR)
  fcntl.flock(lock, fcntl.LOCK_EX)  # "the other process"
  result = {}
  waiter = threading.Thread(
      target=lambda: result.update(b=shapes_tfds.prepare(str(tmp_path), **settings)))
  waiter.start()
  waiter.join(timeout=3)
  assert waiter.is_alive() and live.exists()  # waiting, the live folder untouched
  live.rmdir()  # the other process finishes: its folder renamed into place
  shapes_tfds.builder(str(tmp_path), **settings).download_and_prepare()
  os.close(lock)
  waiter.join(timeout=60)
  assert not waiter.is_alive() and result['b'].is_prepared()
  assert sorted(p.name for p in config_dir.iterdir()) == ['1.1.0']


# Shares of a 'easy' image the shape covers, by hand from the SDF definitions and the easy
# radius 0.36 S: circle pi (0.92 r)^2, ring pi (0.95^2 - 0.52^2) r^2, square (circumradius
# 0.95 r) 2 (0.95 r)^2.
_EASY_AREAS = {'circle': np.pi * (0.92 * 0.36)**2,
               'ring': np.pi * (0.95**2 - 0.52**2) * 0.36**2,
               'square': 2 * (0.95 * 0.36)**2}


def test_easy_shapes_have_their_size_and_sit_at_the_centre():
  """At 64 x 64 the anti-aliased coverage is the exact area to ~1e-3, and these point-
  symmetric shapes have their centroid at the image centre (32, 32)."""
  images, labels = shapes.generate(120, image_size=64, seed=1, difficulty='easy')
  ys, xs = np.mgrid[0:64, 0:64] + 0.5
  for name, area in _EASY_AREAS.items():
    cover = images[labels == shapes.CLASS_NAMES.index(name)][..., 0] / 255.0  # [n, 64, 64]
    assert len(cover) >= 3, name
    np.testing.assert_allclose(cover.mean((1, 2)), area, atol=2e-3, err_msg=name)
    mass = cover.sum((1, 2))
    np.testing.assert_allclose((cover * ys).sum((1, 2)) / mass, 32, atol=0.05, err_msg=name)
    np.testing.assert_allclose((cover * xs).sum((1, 2)) / mass, 32, atol=0.05, err_msg=name)


def _drawn_shapes(size=32, n=300):
  """(colour distance from the background, largest side, centroid / size) of the main shape
  drawn n times on a plain grey background."""
  ys, xs = np.mgrid[0:size, 0:size] + 0.5
  out = []
  for i in range(n):
    img = np.full((size, size, 3), 0.5, np.float32)
    shapes._draw_shape(np.random.default_rng(i), img, size, shapes.CLASS_NAMES[i % 12])
    d = np.linalg.norm(img - 0.5, axis=-1)
    drawn = d > 0.05
    rows, cols = np.nonzero(drawn)
    out.append((d.max(), max(np.ptp(rows), np.ptp(cols)) + 1,
                (ys[drawn].mean() / size, xs[drawn].mean() / size)))
  return out


def test_main_shape_is_large_contrasting_and_mostly_inside():
  """The documented nuisance ranges: the shape's bounding radius is 26-42% of the side (it
  spans well over a third of the image), its colour is the most distinct of up to 8 draws
  (over 0.45 from the background in nearly every image; a single uniform draw is within 0.45
  of mid-grey 38% of the time), and its centre keeps 0.8 radius from the border (measured
  centroids: 0.22-0.78 of the side)."""
  drawn = _drawn_shapes()
  contrast = np.array([d[0] for d in drawn])
  extent = np.array([d[1] for d in drawn]) / 32
  centroid = np.array([d[2] for d in drawn])
  assert (contrast > 0.45).mean() > 0.97 and contrast.min() > 0.3
  assert extent.min() > 0.38 and extent.max() <= 1.0
  assert centroid.min() > 0.15 and centroid.max() < 0.85


@pytest.mark.parametrize('difficulty', ['hard', 'easy'])
def test_records_span_generation_chunks_in_index_order(tmp_path, monkeypatch, difficulty):
  """Generated in chunks (4 here, 500 in use): record i of each split is still example i of
  `shapes.generate` for that split and difficulty, across chunk edges and a last chunk of 1."""
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  monkeypatch.setattr(shapes_tfds, '_CHUNK', 4)
  b = shapes_tfds.prepare(str(tmp_path), image_size=16, train_size=9, test_size=3, seed=1,
                          difficulty=difficulty)
  for split, n in (('train', 9), ('test', 3)):
    source = b.as_data_source()[split]
    assert len(source) == n
    images, labels = shapes.generate(n, image_size=16, seed=1, split=split, difficulty=difficulty)
    np.testing.assert_array_equal(np.stack([source[i]['image'] for i in range(n)]), images)
    np.testing.assert_array_equal([source[i]['label'] for i in range(n)], labels)


def test_builder_settings_bounds():
  """Seed 0 and one example per split are valid; empty splits, a negative seed and an unknown
  difficulty are UserErrors before tfds sees them."""
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  ok = shapes_tfds.builder(None, image_size=16, train_size=1, test_size=1, seed=0)
  assert ok.builder_config.name == 's16_tr1_te1_seed0'
  for bad in (dict(train_size=0), dict(test_size=0), dict(seed=-1), dict(difficulty='medium')):
    with pytest.raises(errors.UserError):
      shapes_tfds.builder(None, **{**dict(image_size=16, train_size=1, test_size=1), **bad})


def test_prepare_reraises_a_file_exists_error_that_left_nothing_prepared(tmp_path, monkeypatch):
  """FileExistsError is taken as another process's finished copy only if one is there."""
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds

  def clash(self, *args, **kwargs):
    raise FileExistsError('something else is in the way')

  monkeypatch.setattr(shapes_tfds.Shapes, 'download_and_prepare', clash)
  with pytest.raises(FileExistsError):
    shapes_tfds.prepare(str(tmp_path), image_size=16, train_size=2, test_size=1, seed=3)


def test_without_file_locks_prepare_leaves_incomplete_folders_alone(tmp_path, monkeypatch):
  """Where the file system has no locks, another process may be writing an incomplete.*
  folder right now: prepare must not delete it (it may generate a copy of its own)."""
  pytest.importorskip('tensorflow_datasets')
  import fcntl
  from pr_mim_jax.data import shapes_tfds

  def no_locks(fd, op):
    raise OSError(37, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  live = tmp_path / 'shapes' / 's16_tr2_te1_seed3' / 'incomplete.LIVE00_1.1.0'
  live.mkdir(parents=True)
  b = shapes_tfds.prepare(str(tmp_path), image_size=16, train_size=2, test_size=1, seed=3)
  assert b.is_prepared() and live.exists()


# The first examples at seed 0 as version 1.1.0 generates them: (label, mean pixel value) at 64
# px. Prepared datasets are cached by version, and the README's numbers were measured on
# these images: a change to the generator's output must bump Shapes.VERSION and update these.
_V110_TRAIN = ((10, 181.66), (10, 83.43), (2, 132.86), (8, 168.07), (2, 135.27), (10, 127.85))
_V110_TEST = ((6, 110.55), (8, 160.88), (6, 73.18), (1, 81.75), (2, 117.91), (9, 148.22))
_V110_EASY_WHITE_PIXELS = (137, 137, 240, 218, 232, 136)  # > 127 in red, 32 px, same labels


def test_first_examples_are_those_of_the_current_version():
  for split, pinned in (('train', _V110_TRAIN), ('test', _V110_TEST)):
    images, labels = shapes.generate(6, image_size=64, seed=0, split=split)
    assert labels.tolist() == [label for label, _ in pinned], split
    # Tolerance for float rounding on other CPUs and NumPy builds, far below any real change.
    np.testing.assert_allclose(images.reshape(6, -1).mean(1), [m for _, m in pinned], atol=0.05)
  images, labels = shapes.generate(6, image_size=32, seed=0, difficulty='easy')
  assert labels.tolist() == [label for label, _ in _V110_TRAIN]
  white = (images[..., 0] > 127).sum((1, 2))
  np.testing.assert_allclose(white, _V110_EASY_WHITE_PIXELS, atol=2)


def test_other_split_names_get_their_own_stable_examples():
  """train and test are 0 and 1; any other name is 2 + its CRC32 (the same in every process,
  unlike hash()), so two other names never share their examples."""
  assert (shapes.split_id('train'), shapes.split_id('test')) == (0, 1)
  assert shapes.split_id('validation') == 2 + zlib.crc32(b'validation')
  assert shapes.split_id('extra') == 2 + zlib.crc32(b'extra')
  val, _ = shapes.generate(2, image_size=16, split='validation')
  extra, _ = shapes.generate(2, image_size=16, split='extra')
  assert not np.array_equal(val, extra)


@pytest.mark.parametrize('difficulty', shapes.DIFFICULTIES)
def test_each_label_names_the_shape_drawn(monkeypatch, difficulty):
  """The one shape rendered from an SDF in example i (clutter is drawn otherwise) is the class
  that label i names."""
  drawn = []
  real_sdf = shapes._shape_sdf  # pylint: disable=protected-access

  def recording_sdf(name, u, v):
    drawn.append(name)
    return real_sdf(name, u, v)

  monkeypatch.setattr(shapes, '_shape_sdf', recording_sdf)
  _, labels = shapes.generate(24, image_size=16, seed=3, difficulty=difficulty)
  assert len(set(labels.tolist())) > 6
  assert drawn == [shapes.CLASS_NAMES[k] for k in labels]


def test_prepare_removes_only_unfinished_folders(tmp_path):
  """Beside a killed generation's incomplete.* folder, a copy prepared at an older version (a
  user's cache from before an upgrade) is kept."""
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  config_dir = tmp_path / 'shapes' / 's16_tr6_te3_seed2'
  for folder in ('incomplete.AB12CD_1.1.0', '1.0.0'):
    (config_dir / folder).mkdir(parents=True)
    (config_dir / folder / 'dataset_info.json').write_text('{}')
  assert shapes_tfds.prepare(str(tmp_path), image_size=16, train_size=6, test_size=3,
                             seed=2).is_prepared()
  assert sorted(p.name for p in config_dir.iterdir()) == ['1.0.0', '1.1.0']
  assert (config_dir / '1.0.0' / 'dataset_info.json').read_text() == '{}'


def test_a_config_name_with_anything_after_it_is_not_a_shapes_config():
  pytest.importorskip('tensorflow_datasets')
  from pr_mim_jax.data import shapes_tfds
  for name in ('s16_tr40_te10_seed5_easier', 's16_tr40_te10_seed5x', 's16_tr40_te10_seed5_hard'):
    assert shapes_tfds.Shapes.get_builder_config(name) is None, name
  assert shapes_tfds.Shapes.get_builder_config('s16_tr40_te10_seed5_easy').difficulty == 'easy'
