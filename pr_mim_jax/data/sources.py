"""Random-access example sources: in-memory arrays, image folders, tfds datasets.

A source has a length and gives example `i` on demand, so each process reads only
the examples its part of the batch needs. Two access styles, one per backend:

* NumPy (`raw(i)`, `image(i)`, `label(i)`): the image as stored (encoded bytes, or
  uint8 [H, W, 3] for arrays) and decoded, for the TF-free path.
* TF (`keys(indices)` then `tf_parse(key)`): `keys` runs in Python (inside a
  `tf.numpy_function`) and returns cheap per-example keys (a file path, a raw
  serialized record); `tf_parse` runs in TF ops and turns one key into
  {'image': encoded bytes, 'label'?}, so file reads and image decoding run in
  tf.data's parallel threads, not under the GIL.

This module never imports TensorFlow at import time: tfds and TF are imported
inside the functions that need them.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import os
from typing import Any

import numpy as np
from etils import epath

from pr_mim_jax.data import augment_np
from pr_mim_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_PREFIX = "folder:"
SHAPES = "shapes"
OWN_DATASETS = (SHAPES,)  # dataset names of this project (besides folder:PATH and tfds names)
TF_INSTALL = "pip install tensorflow-cpu tensorflow-datasets array-record"


def parse_dataset(name: str) -> tuple[str, str]:
  """'shapes' | 'folder:PATH' | tfds name -> (kind, arg), kind in {'shapes', 'folder', 'tfds'}."""
  if not isinstance(name, str) or not name.strip():
    raise UserError(f"data.dataset must be a non-empty string, got {name!r}; "
                    "use 'shapes', a tfds name or 'folder:/path'")
  name = name.strip()
  if name == SHAPES:
    return "shapes", ""
  if name.startswith(FOLDER_PREFIX):
    path = name[len(FOLDER_PREFIX):]
    if not path:
      raise UserError("data.dataset='folder:' has no path; write folder:/path/to/images")
    return "folder", os.path.expanduser(path)
  return "tfds", name


class ArraySource:
  """Examples held in memory: uint8 [N, H, W, 3] images and optional int labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = images  # [N, H, W, 3] uint8
    self.labels = labels  # [N] int32 or None
    self.labeled = labels is not None

  def __len__(self) -> int:
    return len(self.images)

  def image(self, i: int) -> np.ndarray:
    return self.images[i]

  def raw(self, i: int) -> np.ndarray:
    return self.images[i]  # [H, W, 3] uint8

  def label(self, i: int) -> int:
    return int(self.labels[i])

  def where(self, i: int) -> str:
    """Where example i is, for error messages."""
    return f"example {int(i)} of the in-memory dataset"


# ----------------------------------------------------------------- image folders


def _walk(path: epath.Path):
  """(dirpath, filenames) of every folder under `path`, top-down. Symlinked folders are followed,
  each real folder once (no loops, same order on every machine); hidden folders (.git,
  .ipynb_checkpoints) are skipped, so they never become classes or add images."""
  local = "://" not in os.fspath(path)  # gs:// has no symlinks
  real = os.path.realpath if local else str
  seen = {real(os.fspath(path))}
  for dirpath, dirnames, filenames in (os.walk(path, followlinks=True) if local else path.walk()):
    keep = []
    for d in sorted(dirnames):
      target = real(os.path.join(os.fspath(dirpath), d))
      if not d.startswith(".") and target not in seen:
        seen.add(target)
        keep.append(d)
    dirnames[:] = keep  # prunes the walk
    yield dirpath, filenames


@functools.lru_cache(maxsize=8)
def list_image_files(root: str) -> tuple[str, ...]:
  """Image files under `root`, sorted by relative path.

  Recursive, following symlinked folders; .jpg/.jpeg/.png in any case; hidden files and
  folders (like macOS ._x.jpg, .ipynb_checkpoints/) skipped.

  Cached per process: listing a large folder (or a gs:// bucket) is slow.
  """
  path = epath.Path(root)
  if not path.exists():
    raise UserError(f"image folder {root} does not exist; "
                    "fix the path in data.dataset='folder:...'")
  if not path.is_dir():
    raise UserError(f"image folder {root} is not a directory; "
                    "point data.dataset='folder:...' at a directory")
  rel, skipped = [], []
  for dirpath, filenames in _walk(path):
    prefix = os.path.relpath(os.fspath(dirpath), os.fspath(path))
    for f in filenames:
      if f.startswith("."):
        continue
      (rel if f.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(
          f if prefix == "." else f"{prefix}/{f}")
  if not rel:
    raise UserError(f"image folder {root} has no .jpg/.jpeg/.png files"
                    f"{_skipped_note(skipped)}; add images or fix the path")
  if skipped:
    logging.warning("image folder %s: %d of its files are not .jpg/.jpeg/.png and are not read "
                    "(%s); convert any images among them to JPEG or PNG to use them", root,
                    len(skipped), _listing(sorted(skipped), 3))
  rel.sort()
  base = os.fspath(path)
  return tuple(f"{base}/{r}" for r in rel)


def _skipped_note(skipped: list[str]) -> str:
  """' (it holds N other files: a.webp, b.txt)' for the error of a folder without images."""
  if not skipped:
    return ""
  return f" (it holds {len(skipped)} other files: {_listing(sorted(skipped), 3)})"


def _listing(names: list[str], most: int = 10) -> str:
  """The first `most` names, comma-separated, then ', ...' if there are more."""
  return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _subfolders(root: str) -> list[str]:
  """The sorted names of root's visible sub-folders."""
  path = epath.Path(root)
  return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


# Other names of a train split folder: beside one of them, the default 'train' is a mistake.
# (A class folder such as 'trains' or 'trainers' is none: that tree is read whole.)
TRAIN_FOLDER_NAMES = ("train", "training", "trainset", "train_set")


def _check_missing_train_split(root: str, train_split: str) -> None:
  """UserError when root/<train_split> is not a folder but a split was meant: a tfds slice, a
  split other than the default 'train' (a typo, 'trian'), or the default next to a folder
  named as a train split ('Train', 'training'). Reading the whole tree instead would
  pre-train on the validation images too; data.train_split='.' asks for the whole tree."""
  if any(c in train_split for c in "[+"):
    raise UserError(f"data.train_split={train_split!r} is a tfds slice, but a folder dataset's "
                    f"splits are its sub-folders ({root}/<split>); name one, e.g. train")
  if not epath.Path(root).is_dir():
    return  # list_image_files says what is wrong with root
  folders = _subfolders(root)
  if train_split == "train":
    close = [f for f in folders if f.lower() in TRAIN_FOLDER_NAMES][:1]
    if not close:
      return  # no train split: the whole tree
  else:
    close = difflib.get_close_matches(train_split, folders, n=1, cutoff=0.6)
  hint = f"did you mean {close[0]}? " if close else ""
  listing = _listing(folders)
  raise UserError(f"data.train_split={train_split!r}: {root}/{train_split} is not a folder; "
                  f"{hint}its sub-folders are {listing or 'none'}. Set data.train_split to the "
                  "folder to pre-train on, or to . for the whole tree")


def pretrain_folder(root: str, train_split: str) -> str:
  """The folder pre-training reads: root/<train_split> when it is a directory (so an
  ImageNet-style root/train, root/validation never trains on validation images); root for
  '.', or for the default 'train' with no folder named as a train split; else a UserError
  (_check_missing_train_split)."""
  split = epath.Path(root) / train_split
  is_dir = bool(train_split) and split.is_dir()
  if not is_dir and train_split:
    _check_missing_train_split(root, train_split)
  folder = os.fspath(split) if is_dir else root
  logging.info("pre-training reads the images under %s%s", folder,
               "" if folder == root else f" (the train split data.train_split={train_split!r})")
  return folder


class FolderSource:
  """Unlabeled images in a folder tree (local or gs://), in sorted relative-path order."""

  labeled = False

  def __init__(self, root: str, paths: tuple[str, ...] | None = None):
    self.root = root
    self.name = f"folder:{root}"
    self.paths = list_image_files(root) if paths is None else paths
    # os.fsencode: a name that is not UTF-8 (a Latin-1 zip) is listed with surrogate escapes,
    # which str.encode rejects; fsencode gives back the bytes the file system has.
    self._paths_np = np.array([os.fsencode(p) for p in self.paths], dtype=object)

  def __len__(self) -> int:
    return len(self.paths)

  def image(self, i: int) -> np.ndarray:
    """Decoded uint8 [H, W, 3] (grayscale, palette and RGBA become RGB)."""
    return augment_np.decode(self.raw(i))

  def raw(self, i: int) -> bytes:
    """The file's bytes, not yet decoded (a JPEG may still decode at a smaller scale)."""
    return epath.Path(self.paths[i]).read_bytes()

  def label(self, i: int) -> int:
    raise UserError(f"image folder {self.root} has no labels; "
                    "use a labeled dataset for k-NN evaluation")

  def where(self, i: int) -> str:
    """Where example i is, for error messages: its file (a name that is not UTF-8 printable)."""
    return self.paths[int(i)].encode("utf-8", "surrogateescape").decode("utf-8", "replace")

  def keys(self, indices: np.ndarray) -> np.ndarray:
    """File paths (object array of bytes) of the examples."""
    return self._paths_np[np.asarray(indices, np.int64)]

  def tf_parse(self, key):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return {"image": tf.io.read_file(key)}


# --------------------------------------------------------- labeled image folders


def split_folder(root: str, split: str) -> str:
  """The folder of a labeled split: root/split."""
  return os.fspath(epath.Path(root) / split)


def _labeled_split_files(root: str, split: str) -> tuple[str, ...]:
  folder = split_folder(root, split)
  if not epath.Path(folder).is_dir():
    folders = _subfolders(root) if epath.Path(root).is_dir() else []
    close = difflib.get_close_matches(split, folders, n=1, cutoff=0.5)
    has = ""
    if folders:
      hint = f" did you mean {close[0]}?" if close else ""
      has = f";{hint} its sub-folders are {_listing(folders)}"
    raise UserError(f"dataset folder:{root} has no labeled split {split!r}: {folder} is not a "
                    f"directory{has}; labeled use needs {root}/<split>/<class>/*.jpg|png (set "
                    "data.train_split / data.eval_split to its sub-folders)")
  return list_image_files(folder)


def _class_names(root: str, split: str, paths: tuple[str, ...]) -> list[str]:
  """The class folder of every image: its first path component under root/split."""
  base = os.fspath(epath.Path(split_folder(root, split)))
  names = []
  for p in paths:
    rel = p[len(base) + 1:]
    if "/" not in rel:
      raise UserError(f"{p} is not inside a class folder; a labeled folder dataset needs "
                      f"{root}/{split}/<class>/*.jpg|png (move loose images into class folders)")
    names.append(rel.split("/", 1)[0])
  return names


@functools.lru_cache(maxsize=8)
def folder_classes(root: str, train_split: str) -> tuple[str, ...]:
  """Sorted class names of a labeled folder: the class sub-folders of its train split."""
  paths = _labeled_split_files(root, train_split)
  return tuple(sorted(set(_class_names(root, train_split, paths))))


class LabeledFolderSource(FolderSource):
  """Images in root/split/<class>/ (nested below is fine); label = index of <class> in `classes`.

  `classes` come from the train split (folder_classes) so every split's labels agree.
  """

  labeled = True

  def __init__(self, root: str, split: str, classes: tuple[str, ...]):
    paths = _labeled_split_files(root, split)
    names = _class_names(root, split, paths)
    unknown = sorted(set(names) - set(classes))
    if unknown:
      raise UserError(f"split {split!r} of folder:{root} has class folders {', '.join(unknown)} "
                      "that the train split lacks; remove them or add them to the train split")
    super().__init__(split_folder(root, split), paths)
    index = {c: i for i, c in enumerate(classes)}
    self.classes = tuple(classes)
    self.labels = np.array([index[n] for n in names], np.int32)  # [N]
    self._class_bytes = [os.fsencode(c) for c in self.classes]
    self._depth = len(os.fspath(epath.Path(self.root)).split("/"))  # class component of a path

  def label(self, i: int) -> int:
    return int(self.labels[i])

  def tf_parse(self, key):
    """Path -> {'image': file bytes, 'label': int32}: the label from the class folder name."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    name = tf.strings.split(key, "/")[self._depth]
    # Bytes as in `key`, listed outside the traced function: AutoGraph would try to convert
    # os.fsencode and log a multi-line warning on every run.
    classes = tf.constant(self._class_bytes)  # [C]
    hit = tf.cast(tf.equal(classes, name), tf.int32)  # [C], one 1
    return {"image": tf.io.read_file(key), "label": tf.argmax(hit, output_type=tf.int32)}


# ------------------------------------------------------------------------- tfds


def needs_tf_error(name: str) -> UserError:
  """The error for a dataset that only the TF backend can read."""
  return UserError(f"dataset {name!r} needs tensorflow and tensorflow-datasets: {TF_INSTALL}")


def import_tfds(name: str):
  """Imports tensorflow_datasets, or says how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise needs_tf_error(name) from e
  return tfds


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares tfds dataset `name` ('name[/config][:version]') as
  array_record in data_dir: the README's Python one-liner, since every `tfds` command of
  tensorflow-datasets 4.9.10 imports apache-beam, which requirements.txt leaves out."""
  return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")


def _run_prepare(name: str, data_dir: str) -> str:
  """'run `CMD`', preceded by the install of the importlib_resources backport that tfds 4.9.10
  imports to prepare any dataset, where a venv made before requirements.txt listed it lacks it."""
  run = f"`{prepare_command(name, data_dir)}`"
  if importlib.util.find_spec("importlib_resources") is None:
    return f"run `pip install importlib_resources`, then {run}"
  return f"run {run}"


def _not_prepared_message(name: str, builder: Any, data_dir: str | None) -> str:
  root = getattr(builder, "_data_dir_root", None)  # tfds's default data_dir when data_dir is None
  where = data_dir or (os.fspath(root) if root else "~/tensorflow_datasets")
  manual = f"{where}/downloads/manual"
  if name.split(":")[0] == "imagenet2012":
    return (f"dataset imagenet2012 is not prepared in {where}: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in {manual}/, then {_run_prepare(name, where)}")
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):  # imagenet2012_subset, _real, ...
    return (f"dataset {name} is not prepared in {where}: put the files of its manual download "
            f"(see its tfds catalog page) in {manual}/, then {_run_prepare(name, where)} "
            "(or set data.data_dir to where it is)")
  return (f"dataset {name} is not prepared in {where}: {_run_prepare(name, where)} "
          "(or set data.data_dir to where it is)")


def is_prepared(builder: Any) -> bool:
  """builder.is_prepared(), without tfds's warning "Variant folder ... has no dataset_info.json"
  for a folder that does not exist yet (the usual state before a first build)."""
  return builder.data_path.exists() and builder.is_prepared()


def close_dataset_names(name: str, tfds_names) -> list[str]:
  """Up to 3 dataset names close to `name`: this project's own (`shapes`) first, then tfds's.

  Ours rank first because the built-in dataset is the likelier intent of 'shapez' than
  tfds's 'shapes3d'."""
  base = name.split(":")[0]
  ours = difflib.get_close_matches(base, OWN_DATASETS, n=3)
  others = [n for n in dict.fromkeys(tfds_names) if n not in ours]  # first mention kept
  theirs = difflib.get_close_matches(base, others, n=3)
  return (ours + theirs)[:3]


def prepared_names(data_dir: str | None) -> list[str]:
  """Names of the datasets prepared in data_dir (DIR/NAME/[CONFIG/]VERSION/dataset_info.json),
  sorted: the likeliest meaning of a dataset name tfds does not know."""
  if data_dir is None or not epath.Path(data_dir).is_dir():
    return []
  names = []
  for folder in epath.Path(data_dir).iterdir():
    if folder.name.startswith(".") or folder.name == "downloads" or not folder.is_dir():
      continue
    infos = [*folder.glob("*/dataset_info.json"), *folder.glob("*/*/dataset_info.json")]
    if infos:
      names.append(folder.name)
  return sorted(names)


def _prepared_versions(tfds, name: str, data_dir: str | None) -> list[str]:
  """The versions prepared in data_dir of a 'name:version' that tfds did not find (a dataset
  of the user's own that exists only in data_dir); [] if its name is unknown too."""
  if ":" not in name:
    return []
  try:
    builder = tfds.builder(name.split(":")[0], data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return []
  parent = epath.Path(builder.data_dir).parent
  if not parent.is_dir():  # nothing of that name prepared in data_dir
    return []
  folders = parent.iterdir()
  return sorted(p.name for p in folders if (p / "dataset_info.json").exists())


def _prepared_above(tfds, name: str, data_dir: str | None) -> str | None:
  """The folder above data_dir where `name` is prepared, if data_dir points inside a tfds data_dir
  (at DIR/name, DIR/name/config or DIR/name/version, a common slip); else None."""
  if data_dir is None:
    return None
  path = epath.Path(data_dir)
  folder = name.split(":")[0].split("/")[0]  # DIR/<folder>/[config/]version
  for parent in list(path.parents)[:3]:
    if path != parent / folder and parent / folder not in path.parents:
      continue  # data_dir is not inside DIR/<folder>
    try:
      if is_prepared(tfds.builder(name, data_dir=os.fspath(parent))):
        return os.fspath(parent)
    except (AssertionError, ValueError, OSError):  # tfds found something else there
      continue
  return None


def check_data_dir(data_dir: str | None) -> None:
  """UserError when data_dir is a file or lies under one (tfds can neither read nor prepare
  a dataset there); a data_dir that does not exist yet passes."""
  if data_dir is None:
    return
  path = epath.Path(data_dir)
  nearest = path if "://" in data_dir else next(
      (p for p in (path, *path.parents) if p.exists()), None)
  if nearest is not None and nearest.exists() and not nearest.is_dir():
    where = "is a file" if nearest == path else f"lies under the file {nearest}"
    raise UserError(f"data.data_dir {data_dir} {where}, not a directory; set it to the folder "
                    "that holds the tfds datasets (DIR, with DIR/NAME/VERSION inside)")


def tfds_builder(name: str, data_dir: str | None, *, require_prepared: bool = True):
  """The tfds builder of `name` ('name' or 'name:version'), with UserErrors for every mistake."""
  tfds = import_tfds(name)
  check_data_dir(data_dir)
  if data_dir is not None and not epath.Path(data_dir).exists():
    raise UserError(f"data_dir {data_dir} does not exist; create it or fix data.data_dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    versions = _prepared_versions(tfds, name, data_dir)
    if versions:
      raise UserError(f"cannot load dataset {name!r}: it is prepared only at versions "
                      f"{', '.join(versions)}; ask for one of those (or none: the newest)") from e
    above = _prepared_above(tfds, name, data_dir)  # a dataset of the user's own, one level up
    if above is not None:
      raise UserError(f"dataset {name} is not prepared in {data_dir}, but it is in {above}: "
                      f"set data.data_dir={above} (the folder that holds the dataset's folder)"
                      ) from e
    prepared = prepared_names(data_dir)
    close = close_dataset_names(name, prepared + tfds.list_builders(with_community_datasets=False))
    hint = f" did you mean {', '.join(close)}?" if close else ""
    if os.path.isdir(name):
      hint = f" {name} is a folder: write folder:{name} to read its images;"
    base = name.split(":")[0]
    if data_dir is None:
      where = (f"; a dataset of your own needs data.data_dir, the folder that holds "
               f"{base}/VERSION")
    else:
      held = _listing(prepared)
      where = f"; data.data_dir {data_dir} holds {held or 'no prepared dataset'}"
    raise UserError(f"unknown dataset {name!r}:{hint} use a tfds name, 'shapes' "
                    f"or 'folder:/path/to/images'{where}") from e
  except AssertionError as e:  # tfds's way to say "no such version"
    raise UserError(f"cannot load dataset {name!r}: {str(e).splitlines()[-1]}") from e
  except ValueError as e:  # an unknown config, or a name tfds cannot parse ("/data/imgs")
    if "BuilderConfig" in str(e):
      base, _, config = name.split(":")[0].partition("/")
      known = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS or ()]
      raise UserError(f"dataset {base!r} has no config {config!r}; "
                      + (f"its configs: {', '.join(known)}" if known else
                         f"it has none: write {base}") + " (data.dataset)") from e
    hint = (f"; for a folder of images write folder:{name}"
            if name.startswith(("/", "~", ".")) or os.path.isdir(name) else "")
    raise UserError(f"data.dataset {name!r} is not a tfds name (name[/config][:version], "
                    f"version x.y.z){hint}") from e
  if require_prepared:
    if not is_prepared(builder):
      above = _prepared_above(tfds, name, data_dir)
      if above is not None:
        raise UserError(f"dataset {name} is not prepared in {data_dir}, but it is in {above}: "
                        f"set data.data_dir={above} (the folder that holds the dataset's folder)")
      raise UserError(_not_prepared_message(name, builder, data_dir))
    formats = {f.value for f in builder.info.available_file_formats()}
    if not formats & {"array_record", "parquet"}:
      stored = ", ".join(sorted(formats)) or "unknown"
      where = os.fspath(builder.data_dir)  # [data_dir/]name/[config/]version
      root = data_dir or os.fspath(getattr(builder, "_data_dir_root", "~/tensorflow_datasets"))
      raise UserError(
          f"dataset {name} in {where} is stored as {stored}, without random access; move {where} "
          f"aside (or delete it), then prepare it again: {_run_prepare(name, root)}")
  return builder


def check_split(name: str, builder: Any, split: str) -> int:
  """Examples in `split` (tfds slices like 'train[:10%]' work); UserError for unknown or empty
  splits (tfds cannot open an empty one: "Paths sequence can not be of 0 length")."""
  try:
    n = int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError) as e:
    splits = ", ".join(sorted(builder.info.splits))
    if {part.split("[")[0].strip() for part in split.split("+")} <= set(builder.info.splits):
      raise UserError(f"dataset {name}: split {split!r} has a malformed or out-of-range slice "
                      f"({str(e).splitlines()[-1]}); fix it, e.g. train[:10%] or train[100:200]"
                      ) from e
    raise UserError(f"dataset {name} has no split {split!r}; its splits are {splits}") from e
  if n == 0:
    raise UserError(f"dataset {name}: split {split!r} has no examples; widen the slice or "
                    "choose another split")
  return n


def check_image_feature(name: str, features: Any) -> None:
  """UserError unless `features` has the tfds.features.Image named 'image' that the pipeline
  reads; a dataset that keeps its images under another name is told which feature to rename."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if "image" not in features:
    images = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Image))
    fix = (f"it keeps its images in {', '.join(repr(k) for k in images)}: rename that feature "
           "to 'image' in the builder (_info and _generate_examples) and prepare it again"
           if images else "use an image dataset")
    has = ", ".join(sorted(features))
    raise UserError(f"dataset {name} has no 'image' feature (it has {has}); "
                    f"this pipeline reads the tfds.features.Image named 'image'; {fix}")
  if not isinstance(features["image"], tfds.features.Image):
    raise UserError(f"dataset {name}'s 'image' feature is a "
                    f"{type(features['image']).__name__}, not the tfds.features.Image (encoded "
                    "JPEG/PNG) this pipeline reads; prepare the dataset with "
                    "'image': tfds.features.Image()")


def label_classes(name: str, features: Any) -> int:
  """The classes of a dataset's 'label' feature; UserError unless it is a ClassLabel (labels
  0..K-1, the classifier's outputs and k-NN's votes)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  label = features["label"] if "label" in features else None
  if isinstance(label, tfds.features.ClassLabel):
    return int(label.num_classes)
  if label is None:
    raise UserError(f"dataset {name} has no 'label' class feature (it has "
                    f"{', '.join(sorted(features))}); use a labeled dataset")
  raise UserError(f"dataset {name}'s 'label' feature is a {type(label).__name__}, not a "
                  "tfds.features.ClassLabel: classes must be numbered 0..K-1; prepare it with "
                  "'label': tfds.features.ClassLabel(names=[...]), each value mapped to its index")


class TfdsSource:
  """A split of a tfds dataset prepared in a random-access format (array_record)."""

  def __init__(self, builder: Any, split: str, name: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = name or builder.name
    check_split(self.name, builder, split)
    features = builder.info.features
    check_image_feature(self.name, features)
    self.builder, self.split, self.features = builder, split, features
    self.labeled = "label" in features
    self._raw = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self._decoded = None

  def __len__(self) -> int:
    return len(self._raw)

  def keys(self, indices: np.ndarray) -> np.ndarray:
    """Raw serialized records (object array of bytes) of the examples."""
    records = self._raw.__getitems__([int(i) for i in np.asarray(indices).reshape(-1)])
    out = np.empty(len(records), dtype=object)
    out[:] = records
    return out

  def tf_parse(self, key):
    """Serialized record -> {'image': encoded bytes, 'label'?: int64}, in TF ops."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    ex = self.features.deserialize_example(key, decoders={"image": tfds.decode.SkipDecoding()})
    out = {"image": ex["image"]}
    if self.labeled:
      out["label"] = ex["label"]
    return out

  def _numpy_source(self):
    if self._decoded is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._decoded = self.builder.as_data_source(
          self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._decoded

  def image(self, i: int) -> np.ndarray:
    """Decoded uint8 [H, W, 3] (for tools and the numpy backend; the tf backend uses tf_parse)."""
    return augment_np.decode(self.raw(i))

  def raw(self, i: int) -> bytes:
    """The encoded image, not yet decoded."""
    return self._numpy_source()[int(i)]["image"]

  def label(self, i: int) -> int:
    return int(self._numpy_source()[int(i)]["label"])

  def where(self, i: int) -> str:
    """Where example i is, for error messages."""
    return f"example {int(i)} of split {self.split!r} of dataset {self.name}"
