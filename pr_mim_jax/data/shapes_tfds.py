"""TFDS builder for the embedded 'shapes' dataset (see `shapes.py`).

Nothing is downloaded: examples come from `shapes.generate`. Image size, split
sizes and seed are part of the builder config, whose name encodes them (e.g.
`s64_tr20000_te2000_seed0`), so different settings are cached side by side in
one TFDS data_dir. Any name of that form is accepted, so
`tfds.data_source('shapes/s32_tr1000_te100_seed3', data_dir=...)` works too once
this module is imported. The default file format is ArrayRecord, which gives
random access through `builder.as_data_source()`.
"""

import contextlib
import dataclasses
import functools
import os
import re
import time

from etils import epath
import tensorflow_datasets as tfds

from pr_mim_jax import errors
from pr_mim_jax.data import shapes
from pr_mim_jax.data import tfds_sources

_CHUNK = 500  # Examples generated per `shapes.generate` call.
# Generation cost per image, measured on 2 shared CPU cores (2026-11-28): a fixed part (PNG
# encoding, records) and a part per pixel. TensorFlow's start-up (~5 s when not yet imported)
# comes on top.
_SECONDS_PER_IMAGE = 2e-3
_SECONDS_PER_PIXEL = 6e-7
_NAME_RE = re.compile(r'^s(\d+)_tr(\d+)_te(\d+)_seed(\d+)(?:_(easy))?$')


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Resolution, split sizes and seed of a generated shapes dataset."""
  image_size: int = 64
  train_size: int = 20000
  test_size: int = 2000
  seed: int = 0
  difficulty: str = 'hard'


def config_name(image_size: int, train_size: int, test_size: int,
                seed: int, difficulty: str = 'hard') -> str:
  suffix = '' if difficulty == 'hard' else f'_{difficulty}'
  return f's{image_size}_tr{train_size}_te{test_size}_seed{seed}{suffix}'


@functools.lru_cache(maxsize=None)
def _config(image_size: int, train_size: int, test_size: int,
            seed: int, difficulty: str = 'hard') -> ShapesConfig:
  """The one ShapesConfig object for these settings (TFDS compares identity)."""
  return ShapesConfig(
      name=config_name(image_size, train_size, test_size, seed, difficulty),
      description=(f'{image_size}x{image_size} images, {train_size} train / '
                   f'{test_size} test examples, seed {seed}, {difficulty}.'),
      image_size=image_size, train_size=train_size, test_size=test_size,
      seed=seed, difficulty=difficulty)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes: the class is the outline of one large shape."""

  # Bump on every change to the generator's output: caches are keyed by version.
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Larger shapes, calmer backgrounds, less clutter.'}
  BUILDER_CONFIGS = [_config(64, 20000, 2000, 0)]
  # Overrides TFDS's lookup of this file, which in tfds 4.9.10 goes through the
  # `importlib_resources` backport for any builder defined inside a package.
  code_path = epath.Path(__file__)

  @classmethod
  def get_builder_config(cls, name, version=None):
    """Also accepts any name of the form `s{S}_tr{N}_te{M}_seed{K}[_easy]`."""
    config = super().get_builder_config(name, version=version)
    if config is None:
      m = _NAME_RE.match(name)
      if m:
        config = _config(*(int(g) for g in m.groups()[:4]), m.group(5) or 'hard')
    return config

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=('Procedurally generated shapes on cluttered, textured '
                     'backgrounds; the label is the shape class.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3),
                                         encoding_format='png'),
            'label': tfds.features.ClassLabel(names=list(shapes.CLASS_NAMES)),
        }),
        supervised_keys=('image', 'label'),
        # Store examples in index order (no TFDS key hashing), so that record
        # i of a split is `shapes.generate(..., start=i)`; readers shuffle.
        disable_shuffling=True,
    )

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared" around generation; nothing is downloaded here, so say what happens instead.
  # These are tfds's private hooks: if a tfds release renames them, its lines come back.
  def _log_download_bytes(self) -> None:
    self._generate_start = time.perf_counter()
    print(generating_line(self.builder_config, self.data_dir), flush=True)

  def _log_download_done(self) -> None:
    took = time.perf_counter() - getattr(self, '_generate_start', time.perf_counter())
    cfg = self.builder_config
    print(f'shapes: generated {cfg.train_size + cfg.test_size:,} images in {took:.0f} s',
          flush=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        'train': self._generate_examples('train', cfg.train_size),
        'test': self._generate_examples('test', cfg.test_size),
    }

  def _generate_examples(self, split, num_examples):
    """Yields (index, example) in index order, generating chunk by chunk."""
    cfg = self.builder_config
    for start in range(0, num_examples, _CHUNK):
      images, labels = shapes.generate(
          min(_CHUNK, num_examples - start), image_size=cfg.image_size,
          seed=cfg.seed, split=split, start=start, difficulty=cfg.difficulty)
      for j in range(len(labels)):
        yield start + j, {'image': images[j], 'label': int(labels[j])}


def estimate_seconds(num_images: int, image_size: int) -> float:
  """Rough wall time to generate and write `num_images` of `image_size`^2 pixels."""
  return num_images * (_SECONDS_PER_IMAGE + _SECONDS_PER_PIXEL * image_size ** 2)


def rough_duration(seconds: float) -> str:
  """'a few seconds', 'about 100 s', 'about 27 min' (2 significant digits)."""
  if seconds < 10:
    return 'a few seconds'
  if seconds > 180:
    return f'about {round(float(f"{seconds / 60:.2g}"))} min'
  return f'about {round(float(f"{seconds:.2g}"))} s'


def generating_line(cfg: ShapesConfig, data_dir) -> str:
  """The one line printed before generating: what, how long, where."""
  n = cfg.train_size + cfg.test_size
  return (f'shapes: generating the shapes dataset ({n:,} images of {cfg.image_size}x'
          f'{cfg.image_size}, {rough_duration(estimate_seconds(n, cfg.image_size))}, once; '
          f'later runs reuse it) in {data_dir}')


def _check(image_size, train_size, test_size, seed):
  shapes.check_image_size(image_size)
  if train_size < 1 or test_size < 1 or seed < 0:
    raise errors.UserError(
        f'shapes: train_size ({train_size}) and test_size ({test_size}) must '
        f'be positive and seed ({seed}) non-negative.')


def builder(data_dir: str | None, image_size: int = 64,
            train_size: int = 20000, test_size: int = 2000, seed: int = 0,
            file_format: str = 'array_record',
            difficulty: str = 'hard') -> tfds.core.DatasetBuilder:
  """The (maybe not yet prepared) builder for these settings."""
  _check(image_size, train_size, test_size, seed)
  if difficulty not in shapes.DIFFICULTIES:
    raise errors.UserError(f'data.shapes.difficulty={difficulty!r}: use one of '
                           f'{shapes.DIFFICULTIES}')
  return Shapes(
      data_dir=data_dir,
      config=config_name(image_size, train_size, test_size, seed, difficulty),
      file_format=file_format)


@contextlib.contextmanager
def _generation_lock(config_dir: epath.Path):
  """Holds an exclusive lock (flock on `.<config>.lock` beside config_dir) while this process
  generates, waiting for another process that holds it; yields whether it locked. Not on
  gs:// or a file system without locks: two runs may then both generate (see prepare)."""
  lock_path = config_dir.parent / f'.{config_dir.name}.lock'
  try:
    import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only
    if '://' in os.fspath(lock_path):
      raise OSError('remote file system')
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(os.fspath(lock_path), os.O_CREAT | os.O_RDWR, 0o644)
  except (ImportError, OSError):
    yield False
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'shapes: another process is generating {config_dir}; waiting for it', flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no lock support here
      yield False
      return
    yield True
  finally:
    os.close(fd)  # releases the lock


def _remove_unfinished(config_dir: epath.Path) -> None:
  """Deletes the `incomplete.*` folders a killed generation left in config_dir (tfds writes
  there, then renames): called only under the lock, when no live process is writing them."""
  if not config_dir.exists():
    return
  for folder in config_dir.glob('incomplete.*'):
    folder.rmtree()
    print(f'shapes: removed {folder}, left by a generation that did not finish', flush=True)


def prepare(data_dir: str | None, image_size: int = 64,
            train_size: int = 20000, test_size: int = 2000, seed: int = 0,
            file_format: str = 'array_record',
            difficulty: str = 'hard') -> tfds.core.DatasetBuilder:
  """Returns a prepared builder, generating the dataset on first use only."""
  make = functools.partial(builder, data_dir, image_size=image_size, train_size=train_size,
                           test_size=test_size, seed=seed, file_format=file_format,
                           difficulty=difficulty)
  b = make()
  if tfds_sources.is_prepared(b):
    return b
  config_dir = epath.Path(b.data_dir).parent  # [data_dir]/shapes/<config>
  with _generation_lock(config_dir) as locked:
    b = make()  # another process may have finished it while this one waited
    if tfds_sources.is_prepared(b):
      return b
    if locked:
      _remove_unfinished(config_dir)
    try:  # the builder prints one line before and one after
      b.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except FileExistsError:
      # Another process sharing data_dir (a second run, another host) generated the same
      # config meanwhile and renamed its folder into place first. Generation is
      # deterministic, so its copy is the one this run would have written: read that.
      b = make()
      if not tfds_sources.is_prepared(b):
        raise
      print(f'shapes: another process prepared {b.data_dir} first; using it', flush=True)
  return b
