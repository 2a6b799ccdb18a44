"""Image folders as example sources: listing (symlinks, hidden folders, '~', order), names that
are not UTF-8, keys, and the TF parse of a labeled folder."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pr_mim_jax.data import datasets, folder_sources, sources
from pr_mim_jax.errors import UserError

needs_tf = pytest.mark.skipif(not datasets.tf_importable(),
                              reason="tensorflow / tensorflow_datasets not installed")


def _png(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (8, 8)).save(path)


def test_folder_listing_follows_symlinked_folders_and_skips_hidden_ones(tmp_path):
  root = tmp_path / "root"
  _png(root / "train" / "cat" / "a.png")
  _png(tmp_path / "elsewhere" / "dog" / "b.png")
  (root / "train" / "dog").symlink_to(tmp_path / "elsewhere" / "dog")  # a linked class folder
  (root / "train" / "cat" / "loop").symlink_to(root)  # a cycle: must not loop or repeat
  _png(root / "train" / ".ipynb_checkpoints" / "c.png")
  _png(root / "train" / "cat" / ".cache" / "d.png")
  got = folder_sources.list_image_files(str(root))
  assert got == (f"{root}/train/cat/a.png", f"{root}/train/dog/b.png")
  assert folder_sources.folder_classes(str(root), "train") == ("cat", "dog")


def test_folder_path_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  _png(tmp_path / "imgs" / "a.png")
  kind, root = sources.parse_dataset("folder:~/imgs")
  assert (kind, root) == ("folder", f"{tmp_path}/imgs")
  assert folder_sources.list_image_files(root) == (f"{tmp_path}/imgs/a.png",)


def _latin1_folder(root) -> None:
  """root/train/<class>/ with file and class names that are Latin-1, not UTF-8 (as unzipped from
  an old Windows archive): pixel value = 40 * class + 10 * file."""
  root = os.fsencode(root)
  for c, cls in enumerate((b"caf\xe9", b"plain")):
    os.makedirs(root + b"/train/" + cls)
    for f, name in enumerate((b"a.png", b"r\xe9sum\xe9.png")):
      with open(root + b"/train/" + cls + b"/" + name, "wb") as out:
        Image.new("RGB", (8, 8), (40 * c + 10 * f,) * 3).save(out, format="PNG")


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_folder_reads_file_names_that_are_not_utf8(tmp_path, backend):
  from pr_mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _latin1_folder(tmp_path)
  data = ml_collections.ConfigDict({"dataset": f"folder:{tmp_path}", "train_split": "train",
                                    "backend": backend})
  images, labels = pipeline.labeled_arrays(data, "train", num_examples=8, image_size=8)
  assert labels.tolist() == [0, 0, 1, 1]  # sorted: caf\xe9/{a, r\xe9sum\xe9}, plain/{...}
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 10, 40, 50])
  batch = next(pipeline.host_batches(data, seed=0, global_batch=4, image_size=8))
  assert sorted(batch["index"].tolist()) == [0, 1, 2, 3]


def test_undecodable_file_with_a_non_utf8_name_is_named_printably(tmp_path):
  _latin1_folder(tmp_path)
  with open(os.fsencode(tmp_path) + b"/train/plain/bad\xe9.png", "wb") as out:
    out.write(b"not a png")
  source = folder_sources.FolderSource(str(tmp_path))
  where = source.where(source.paths.index(os.fsdecode(os.fsencode(tmp_path) +
                                                      b"/train/plain/bad\xe9.png")))
  assert where == f"{tmp_path}/train/plain/bad\ufffd.png"
  where.encode("utf-8")  # printable: an error line naming it does not raise


def test_folder_listing_order_extensions_and_hidden_files(tmp_path):
  """Sorted by relative path (so example i is the same file on every host), whatever order the
  file system lists; .JPG/.Png count, ._x.jpg (macOS metadata) and .txt do not."""
  for rel in ("b.png", "a/x.png", "a.png", "a/B.JPG", "c.Jpeg", "a/._x.jpg", ".hid.png",
              "notes.txt", "a/y.gif"):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(("png", "PNG", "JPG", "jpg", "Jpeg")):
      Image.new("RGB", (4, 4)).save(path, format="PNG")
    else:
      path.write_bytes(b"x")
  got = folder_sources.list_image_files(str(tmp_path))
  assert got == tuple(f"{tmp_path}/{r}" for r in ("a.png", "a/B.JPG", "a/x.png", "b.png",
                                                  "c.Jpeg"))


def test_folder_keys_are_the_paths_of_the_asked_examples_in_order(tmp_path):
  for name in ("a", "b", "c", "d"):
    _png(tmp_path / f"{name}.png")
  source = folder_sources.FolderSource(str(tmp_path))
  keys = source.keys(np.array([3, 0, 2, 0]))
  assert [os.fsdecode(k) for k in keys] == [f"{tmp_path}/{n}.png" for n in "daca"]


@needs_tf
def test_labeled_folder_tf_parse_in_a_dataset_map_labels_without_autograph_warning(tmp_path,
                                                                                 caplog):
  """tf.data traces tf_parse with AutoGraph: a Python call it cannot convert inside it
  (os.fsencode) logged a multi-line 'AutoGraph could not transform' warning on every run."""
  import logging  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for cls in ("bird", "cat"):  # sorted: bird = 0, cat = 1
    (tmp_path / "train" / cls).mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / cls / "a.png")
  source = folder_sources.LabeledFolderSource(str(tmp_path), "train", ("bird", "cat"))
  keys = [k for k in source.keys(np.arange(len(source)))]
  with caplog.at_level(logging.WARNING):
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(keys)).map(source.tf_parse)
    labels = {os.path.basename(os.path.dirname(os.fsdecode(k))): int(ex["label"])
              for k, ex in zip(keys, ds.as_numpy_iterator())}
  assert labels == {"bird": 0, "cat": 1}
  assert not [r for r in caplog.records if "AutoGraph" in r.getMessage()]


def test_a_folder_linked_twice_is_read_under_the_same_name_whatever_the_listing_order(
    tmp_path, monkeypatch):
  """root/train/kitty links to root/train/cat: the images are read once, under 'cat' (the
  first in sorted order), also where the file system lists 'kitty' first, so every host
  reads the same files and the same classes."""
  _png(tmp_path / "train" / "cat" / "a.png")
  _png(tmp_path / "train" / "dog" / "b.png")
  (tmp_path / "train" / "kitty").symlink_to(tmp_path / "train" / "cat")
  real_walk = os.walk

  def reverse_sorted_walk(*args, **kwargs):
    for dirpath, dirnames, filenames in real_walk(*args, **kwargs):
      dirnames.sort(reverse=True)  # in place: the caller's pruning still steers the walk
      yield dirpath, dirnames, filenames

  monkeypatch.setattr(folder_sources.os, "walk", reverse_sorted_walk)
  assert folder_sources.list_image_files(str(tmp_path / "train")) == (
      f"{tmp_path}/train/cat/a.png", f"{tmp_path}/train/dog/b.png")
  assert folder_sources.folder_classes(str(tmp_path), "train") == ("cat", "dog")


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_labels_are_indices_in_the_sorted_class_names(tmp_path, backend):
  """Classes 'sea' < 'sea lion' < 'seal' by name, although paths sort 'sea lion/' before
  'sea/' (' ' < '/'): the label is the index in the sorted names, on both backends; a
  validation split without 'sea lion' keeps the train split's numbering."""
  from pr_mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  for split, classes in (("train", ("sea", "sea lion", "seal")), ("val", ("sea", "seal"))):
    for c, cls in enumerate(("sea", "sea lion", "seal")):
      if cls in classes:
        path = tmp_path / split / cls / "x.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * c,) * 3).save(path)
  data = ml_collections.ConfigDict({"dataset": f"folder:{tmp_path}", "train_split": "train",
                                    "backend": backend})
  assert folder_sources.folder_classes(str(tmp_path), "train") == ("sea", "sea lion", "seal")
  for split in ("train", "val"):
    images, labels = pipeline.labeled_arrays(data, split, num_examples=3, image_size=8)
    np.testing.assert_array_equal(images[:, 0, 0, 0], 60 * labels)  # pixel value = 60 * class
    assert sorted(labels.tolist()) == ([0, 1, 2] if split == "train" else [0, 2])


def test_an_unlabeled_folder_has_no_labels_to_give(tmp_path):
  """An unlabeled folder source never makes up a label (0 would look like class 0)."""
  _png(tmp_path / "a.png")
  with pytest.raises(UserError, match="has no labels"):
    folder_sources.FolderSource(str(tmp_path)).label(0)
