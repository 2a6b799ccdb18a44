"""Which dataset, read how: config access, backends, opening sources, dataset facts.

Everything the batch builders in pipeline.py need to know about a dataset before the
first batch: the resolved backend ('tf', 'numpy' or 'dali'), the random-access source of a split
(sources.py), and cheap checks and counts (check_dataset, num_examples, num_classes)
that raise UserErrors naming what is wrong. TensorFlow is imported only for the 'tf'
backend (or 'auto' where it is installed) and for tfds datasets.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from pr_mim_jax.data import folder_sources, sources, tfds_sources
from pr_mim_jax.errors import UserError

BACKENDS = ("auto", "tf", "numpy", "dali")
SHAPES_SPLITS = ("train", "test")


# ------------------------------------------------------------------ config access


def get(cfg: Any, key: str, default: Any = None) -> Any:
  """cfg.key for ConfigDicts and plain objects, cfg[key] for dicts; else default."""
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  try:
    return getattr(cfg, key)
  except (AttributeError, KeyError):
    return default


def _shapes_cfg(data) -> tuple[int, int, int, int]:
  """(image_size, train_size, test_size, seed) of data.shapes."""
  cfg = get(data, "shapes", None) or {}
  vals = (get(cfg, "image_size", 64), get(cfg, "train_size", 20000), get(cfg, "test_size", 2000),
          get(cfg, "seed", 0))
  for name, v, least in zip(("image_size", "train_size", "test_size", "seed"), vals, (1, 1, 0, 0)):
    if not isinstance(v, (int, np.integer)) or v < least:
      raise UserError(f"data.shapes.{name} must be an integer >= {least}, got {v!r}")
  return tuple(int(v) for v in vals)


def _shapes_difficulty(data) -> str:
  """data.shapes.difficulty: 'hard' (default) or 'easy' (see shapes.DIFFICULTIES)."""
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  value = get(get(data, "shapes", None) or {}, "difficulty", "hard")
  if value not in shapes.DIFFICULTIES:
    raise UserError(f"data.shapes.difficulty={value!r}: use one of {shapes.DIFFICULTIES}")
  return value


def threads(data) -> int:
  """data.num_parallel_calls; <= 0 means AUTOTUNE (TF) or one thread per core (NumPy)."""
  return int(get(data, "num_parallel_calls", -1) or -1)


def pool_size(threads: int) -> int:
  return threads if threads > 0 else (os.cpu_count() or 1)


# ----------------------------------------------------------------------- backends


@functools.lru_cache(maxsize=1)
def tf_importable() -> bool:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def tf_modules():
  """(tensorflow, augment); importing augment hides all GPUs from TF."""
  from pr_mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  return augment.tf, augment


def resolve_backend(data, backend: str | None) -> str:
  """Resolves 'auto' | 'tf' | 'numpy' | 'dali' to 'tf', 'numpy' or 'dali' ('auto' never picks
  'dali')."""
  b = backend if backend is not None else (get(data, "backend", None) or "auto")
  if b not in BACKENDS:
    raise UserError(f"unknown data backend {b!r}; use one of {', '.join(BACKENDS)}")
  if b == "auto":
    return "tf" if tf_importable() else "numpy"
  if b == "tf" and not tf_importable():
    raise UserError("data backend 'tf' needs tensorflow and tensorflow-datasets: "
                    f"{sources.TF_INSTALL}")
  if b == "dali":
    from pr_mim_jax.data import dali_batches  # pylint: disable=g-import-not-at-top
    if not dali_batches.importable():
      raise UserError(f"data backend 'dali' needs NVIDIA DALI: {dali_batches.INSTALL}")
  return b


def _tfds_backend_error(name: str) -> UserError:
  """The error for a tfds dataset on the numpy backend: install TF, or (TF there) switch backend."""
  if not tf_importable():
    return tfds_sources.needs_tf_error(name)
  return UserError(f"dataset {name!r} is a tfds dataset, but data.backend=numpy reads only "
                   "'shapes' and 'folder:' datasets; use data.backend=tf or auto")


def _require_tf(data, name: str) -> None:
  """UserError unless tfds datasets are readable (TF importable, not data.backend='numpy')."""
  if resolve_backend(data, None) == "numpy" or not tf_importable():
    raise _tfds_backend_error(name)
  tf_modules()


def _data_dir(data) -> str | None:
  """data.data_dir with '~' expanded (None: tfds's default)."""
  data_dir = get(data, "data_dir", None)
  return None if data_dir is None else os.path.expanduser(data_dir)


# ------------------------------------------------------------------------ sources


@functools.lru_cache(maxsize=4)
def _shapes_arrays(image_size: int, train_size: int, test_size: int, seed: int, split: str,
                   difficulty: str = "hard"):
  """(uint8 [N, S, S, 3], int32 [N]) of a shapes split, generated once per process."""
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  n = train_size if split == "train" else test_size
  return shapes.generate(n, image_size=image_size, seed=seed, split=split, difficulty=difficulty)


@functools.lru_cache(maxsize=4)
def _shapes_builder(data_dir: str | None, image_size: int, train_size: int, test_size: int,
                    seed: int, difficulty: str = "hard"):
  """The shapes tfds builder, prepared in data_dir on first use (then read from there)."""
  from pr_mim_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  return shapes_tfds.prepare(data_dir, image_size, train_size, test_size, seed,
                             difficulty=difficulty)


@functools.lru_cache(maxsize=8)
def _tfds_builder(name: str, data_dir: str | None):
  return tfds_sources.tfds_builder(name, data_dir)


def _check_shapes_split(split: str) -> None:
  if split not in SHAPES_SPLITS:
    raise UserError(f"dataset shapes has no split {split!r}; use 'train' or 'test'")


def open_source(data, split: str, backend: str, labeled: bool = False):
  """The random-access source of a split for a resolved backend.

  labeled=True: 'folder:' reads root/split/<class>/ (LabeledFolderSource) instead of the
  whole tree, and sources without labels raise a UserError.
  """
  kind, arg = sources.parse_dataset(data.dataset)
  data_dir = _data_dir(data)
  if kind == "folder":
    if not labeled:
      return folder_sources.FolderSource(folder_sources.pretrain_folder(arg, split))
    return folder_sources.LabeledFolderSource(arg, split, _folder_classes(data))
  if kind == "shapes":
    _check_shapes_split(split)
    if backend == "dali":
      raise UserError("data.backend='dali' decodes image files; the in-memory 'shapes' dataset "
                      "has none: use data.backend=numpy or tf for it")
    size, n_train, n_test, shapes_seed = _shapes_cfg(data)
    difficulty = _shapes_difficulty(data)
    if backend == "numpy":
      return sources.ArraySource(*_shapes_arrays(size, n_train, n_test, shapes_seed, split,
                                                 difficulty))
    tf_modules()  # hide GPUs before tfds touches TF
    builder = _shapes_builder(data_dir, size, n_train, n_test, shapes_seed, difficulty)
    return tfds_sources.TfdsSource(builder, split, "shapes")
  if backend == "numpy" or not tf_importable():
    raise _tfds_backend_error(arg)
  tf_modules()
  source = tfds_sources.TfdsSource(_tfds_builder(arg, data_dir), split, arg)
  if labeled and not source.labeled:
    raise UserError(f"dataset {arg} has no 'label' feature; use a labeled dataset")
  return source


def _folder_classes(data) -> tuple[str, ...]:
  _, root = sources.parse_dataset(data.dataset)
  return folder_sources.folder_classes(root, get(data, "train_split", "train"))


# -------------------------------------------------------------------- public: info


def check_dataset(data, eval_split: bool = True) -> None:
  """Cheap validation of `data`: UserError naming what is wrong. TF-free for shapes/folder.

  eval_split=False leaves data.eval_split unchecked, for a run that never reads it
  (pre-training without the k-NN monitor, on a dataset that may have one split only).
  """
  kind, arg = sources.parse_dataset(get(data, "dataset", None))
  fields = ("train_split", "eval_split") if eval_split else ("train_split",)
  if kind == "shapes":
    from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
    shapes.check_image_size(_shapes_cfg(data)[0])
    _shapes_difficulty(data)
    tfds_sources.check_data_dir(_data_dir(data))
    for field in fields:
      _named(field, _check_shapes_split, get(data, field, "train"))
  elif kind == "folder":
    folder_sources.list_image_files(
        folder_sources.pretrain_folder(arg, get(data, "train_split", "train")))
  else:
    _require_tf(data, arg)
    builder = _tfds_builder(arg, _data_dir(data))
    tfds_sources.check_image_feature(arg, builder.info.features)
    for field in fields:
      split = get(data, field, None)
      if split is not None:
        _named(field, tfds_sources.check_split, arg, builder, split)


def check_workdir_outside_images(data, workdir: str) -> None:
  """UserError when pre-training's workdir lies in the image folder it reads: the folder is
  read recursively, so the run's reconstruction PNGs would become training images (and a
  resume would see another dataset than the steps before it)."""
  kind, root = sources.parse_dataset(get(data, "dataset", None))
  if kind != "folder" or not workdir:
    return
  folder = folder_sources.pretrain_folder(root, get(data, "train_split", "train"))
  real = lambda p: os.path.realpath(os.path.expanduser(p)) if "://" not in p else p.rstrip("/")
  inside, images = real(workdir), real(folder).rstrip("/")
  below = inside[len(images) + 1:].split("/") if inside.startswith(images + "/") else []
  hidden = any(part.startswith(".") for part in below)  # never listed as images
  if inside == images or below and not hidden:
    raise UserError(f"--workdir={workdir} is inside {folder}, the image folder pre-training reads "
                    "(recursively): the run's reconstruction PNGs would become training images; "
                    "choose a workdir outside it")


def _named(field: str, check, *args) -> None:
  """check(*args), its UserError prefixed with the config field: a default split (eval_split
  'validation') is one the user never typed, so the error says what to set."""
  try:
    check(*args)
  except UserError as e:
    raise UserError(f"data.{field}: {e}") from e


def check_labeled_dataset(data) -> None:
  """check_dataset for labeled use (fine-tuning, linear probe): both splits exist and are labeled.

  'folder:ROOT' needs ROOT/<data.train_split>/<class>/ and ROOT/<data.eval_split>/<class>/.
  """
  kind, arg = sources.parse_dataset(get(data, "dataset", None))
  if kind == "folder":
    for field in ("train_split", "eval_split"):
      folder_sources.LabeledFolderSource(arg, get(data, field, "train"), _folder_classes(data))
    return
  check_dataset(data)
  num_classes(data)  # UserError without labels


def num_examples(data, split: str, labeled: bool = False) -> int:
  """Examples in a split; 'folder:' unlabeled: root/split if a folder, else the whole tree
  (folder_sources.pretrain_folder), labeled: root/split."""
  kind, arg = sources.parse_dataset(data.dataset)
  if kind == "shapes":
    _check_shapes_split(split)
    _, n_train, n_test, _ = _shapes_cfg(data)
    return n_train if split == "train" else n_test
  if kind == "folder":
    if labeled:
      return len(folder_sources.LabeledFolderSource(arg, split, _folder_classes(data)))
    return len(folder_sources.list_image_files(folder_sources.pretrain_folder(arg, split)))
  _require_tf(data, arg)
  return tfds_sources.check_split(arg, _tfds_builder(arg, _data_dir(data)), split)


def num_classes(data) -> int:
  """Classes: shapes 12, tfds its 'label' feature, 'folder:' the train split's class folders."""
  kind, arg = sources.parse_dataset(data.dataset)
  if kind == "shapes":
    from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.NUM_CLASSES
  if kind == "folder":
    return len(_folder_classes(data))
  _require_tf(data, arg)
  return tfds_sources.label_classes(arg, _tfds_builder(arg, _data_dir(data)).info.features)


def num_eval_batches(n: int, global_batch: int) -> int:
  """Batches of one eval pass over n examples: ceil(n / global_batch), the last one padded."""
  return -(-int(n) // int(global_batch))
