"""Image folders as random-access sources: unlabeled for pre-training, labeled by layout.

`folder:/root` pre-trains on root/<train_split> (or the whole tree: asked for with '.', or
with the default 'train' where no sub-folder is named as a train split);
labeled use reads root/<split>/<class>/*. Files are listed once, recursively and sorted;
only .jpg/.jpeg/.png are read, and what is left out is named. Access styles as in
sources.py (NumPy `image(i)`, TF `keys` + `tf_parse`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os

import numpy as np
from etils import epath

from pr_mim_jax.data import augment_np
from pr_mim_jax.data import sources
from pr_mim_jax.errors import UserError


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
      (rel if f.lower().endswith(sources.IMAGE_EXTENSIONS) else skipped).append(
          f if prefix == "." else f"{prefix}/{f}")
  if not rel:
    raise UserError(f"image folder {root} has no .jpg/.jpeg/.png files"
                    f"{_skipped_note(skipped)}; add images or fix the path")
  if skipped:
    logging.warning("image folder %s: %d of its files are not .jpg/.jpeg/.png and are not read "
                    "(%s); convert any images among them to JPEG or PNG to use them", root,
                    len(skipped), sources.listing(sorted(skipped), 3))
  rel.sort()
  base = os.fspath(path)
  return tuple(f"{base}/{r}" for r in rel)


def _skipped_note(skipped: list[str]) -> str:
  """' (it holds N other files: a.webp, b.txt)' for the error of a folder without images."""
  if not skipped:
    return ""
  return f" (it holds {len(skipped)} other files: {sources.listing(sorted(skipped), 3)})"


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
  listing = sources.listing(folders)
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
      has = f";{hint} its sub-folders are {sources.listing(folders)}"
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
