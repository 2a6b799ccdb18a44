"""Resolving datasets: which folder pre-training reads, '~' in data_dir, backend errors."""

import logging
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from pr_mim_jax.data import datasets, folder_sources, sources, tfds_sources
from pr_mim_jax.errors import UserError

needs_tf = pytest.mark.skipif(not datasets.tf_importable(),
                              reason="tensorflow / tensorflow_datasets not installed")


def _data(dataset, **kw):
  return ml_collections.ConfigDict(
      {"dataset": dataset, "train_split": "train", "eval_split": "validation", "data_dir": None,
       **kw})


def _pngs(folder, n):
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.new("RGB", (8, 8)).save(folder / f"{i}.png")


def test_pretraining_reads_only_the_train_split_folder_when_there_is_one(tmp_path, caplog):
  _pngs(tmp_path / "split" / "train" / "cat", 3)
  _pngs(tmp_path / "split" / "validation" / "cat", 2)
  _pngs(tmp_path / "flat" / "a", 4)
  _pngs(tmp_path / "flat" / "b", 1)
  with caplog.at_level(logging.INFO):
    data = _data(f"folder:{tmp_path}/split")
    datasets.check_dataset(data)
    assert datasets.num_examples(data, "train") == 3
    source = datasets.open_source(data, "train", "numpy")
    assert all("/split/train/" in p for p in source.paths) and len(source) == 3
    assert f"images under {tmp_path}/split/train" in caplog.text
    assert datasets.num_examples(_data(f"folder:{tmp_path}/flat"), "train") == 5  # whole tree
  assert f"images under {tmp_path}/flat" in caplog.text


@needs_tf
def test_data_dir_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "tfds").mkdir()
  with pytest.raises(UserError, match=f"cifar10 is not prepared in {tmp_path}/tfds"):
    datasets.check_dataset(_data("cifar10", data_dir="~/tfds"))


@needs_tf
def test_tfds_name_on_numpy_backend_says_to_switch_backend_when_tf_is_there():
  with pytest.raises(UserError) as e:
    datasets.check_dataset(_data("cifar10", backend="numpy"))
  msg = str(e.value)
  assert "data.backend=numpy reads only 'shapes' and 'folder:'" in msg
  assert "data.backend=tf or auto" in msg and "pip install" not in msg
  with pytest.raises(UserError, match="data.backend=tf or auto"):
    datasets.open_source(_data("cifar10"), "train", "numpy")


def test_tfds_name_without_tf_says_to_install_it(monkeypatch):
  monkeypatch.setattr(datasets, "tf_importable", lambda: False)
  with pytest.raises(UserError, match=f"needs tensorflow.*{sources.TF_INSTALL}"):
    datasets.check_dataset(_data("cifar10", backend="numpy"))
  # Asking for the tf backend by name: the same advice; auto falls back to numpy instead.
  with pytest.raises(UserError, match=f"^data backend 'tf' needs tensorflow and "
                     f"tensorflow-datasets: {sources.TF_INSTALL}$"):
    datasets.resolve_backend(_data("shapes", backend="tf"), None)
  assert datasets.resolve_backend(_data("shapes", backend="auto"), None) == "numpy"


def test_dali_on_the_in_memory_shapes_says_which_backends_read_it():
  """Where DALI is installed, the backend check passes; the shapes source then has no files."""
  with pytest.raises(UserError) as e:
    datasets.open_source(_data("shapes", backend="dali"), "train", "dali")
  assert str(e.value) == ("data.backend='dali' decodes image files; the in-memory 'shapes' "
                          "dataset has none: use data.backend=numpy or tf for it")


@pytest.mark.parametrize("field,value,least", [
    ("train_size", 0, 1),  # was "batch_size 16 exceeds the 0 training examples"
    ("image_size", 0, 1), ("test_size", -4, 0), ("seed", 1.5, 0)])
def test_a_shapes_size_out_of_range_names_the_field_and_its_least_value(field, value, least):
  data = _data("shapes", eval_split="test", shapes={"image_size": 16, "train_size": 32,
                                                    "test_size": 8, "seed": 0, field: value})
  with pytest.raises(UserError) as e:
    datasets.check_dataset(data)
  assert str(e.value) == f"data.shapes.{field} must be an integer >= {least}, got {value!r}"


def test_missing_split_error_names_the_config_field():
  """eval_split's default ('validation') is a split the user never typed: say which field."""
  with pytest.raises(UserError, match=r"^data.eval_split: dataset shapes has no split 'valid"):
    datasets.check_dataset(_data("shapes"))
  with pytest.raises(UserError, match=r"^data.train_split: dataset shapes has no split 'tra"):
    datasets.check_dataset(_data("shapes", train_split="training", eval_split="test"))


def test_tfds_slice_as_folder_train_split_is_an_error_not_the_whole_tree(tmp_path):
  """root/train[:90%] is no folder: reading the whole tree would pre-train on validation too."""
  _pngs(tmp_path / "train" / "cat", 3)
  _pngs(tmp_path / "validation" / "cat", 2)
  for split in ("train[:90%]", "train+validation"):
    data = _data(f"folder:{tmp_path}", train_split=split)
    with pytest.raises(UserError, match=r"is a tfds slice, but a folder dataset's splits are"):
      datasets.check_dataset(data)
    with pytest.raises(UserError, match=r"is a tfds slice"):
      datasets.num_examples(data, split)


def test_folder_train_split_that_is_not_a_folder_is_an_error_not_the_whole_tree(tmp_path):
  """A mistyped train split ('trian', or the default 'train' beside 'Training') read the whole
  tree silently, validation images included; the error names the folder meant."""
  _pngs(tmp_path / "a" / "train" / "cat", 3)
  _pngs(tmp_path / "a" / "val" / "cat", 2)
  with pytest.raises(UserError, match=r"train_split='trian': .*did you mean train\? its sub-f"
                                      r"olders are train, val\."):
    datasets.check_dataset(_data(f"folder:{tmp_path}/a", train_split="trian"))
  with pytest.raises(UserError, match=r"train_split='unlabeled': .* sub-folders are train, val"):
    datasets.num_examples(_data(f"folder:{tmp_path}/a"), "unlabeled")
  _pngs(tmp_path / "b" / "Training" / "cat", 3)
  _pngs(tmp_path / "b" / "val" / "cat", 2)
  with pytest.raises(UserError, match=r"train_split='train': .*did you mean Training\?"):
    datasets.check_dataset(_data(f"folder:{tmp_path}/b"))
  assert datasets.num_examples(_data(f"folder:{tmp_path}/b"), "Training") == 3
  assert datasets.num_examples(_data(f"folder:{tmp_path}/b"), ".") == 5  # the whole tree, asked
  _pngs(tmp_path / "c" / "cat", 3)  # no splits at all: the default reads the whole tree
  _pngs(tmp_path / "c" / "dog", 1)
  assert datasets.num_examples(_data(f"folder:{tmp_path}/c"), "train") == 4
  _pngs(tmp_path / "e" / "trains", 2)  # class folders, not a train split: still the tree
  _pngs(tmp_path / "e" / "trainers", 1)
  assert datasets.num_examples(_data(f"folder:{tmp_path}/e"), "train") == 3
  _pngs(tmp_path / "d" / "TRAIN_SET" / "cat", 1)  # a train split by another name
  with pytest.raises(UserError, match=r"train_split='train': .*did you mean TRAIN_SET\?"):
    datasets.num_examples(_data(f"folder:{tmp_path}/d"), "train")


def test_folder_listing_warns_about_the_files_it_leaves_out(tmp_path, caplog):
  """WebP, GIF or text files in an image folder were dropped without a word."""
  _pngs(tmp_path / "a", 2)
  for rel in ("a/photo.webp", "a/notes.txt", "b/anim.gif", "b/x.bmp"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"x")
  (tmp_path / "a" / ".DS_Store").write_bytes(b"x")  # hidden: skipped without a word
  with caplog.at_level(logging.WARNING):
    assert len(folder_sources.list_image_files(str(tmp_path))) == 2
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and "4 of its files are not .jpg/.jpeg/.png" in warned[0]
  assert "a/notes.txt, a/photo.webp, b/anim.gif, ..." in warned[0]
  only_webp = tmp_path / "webp"
  only_webp.mkdir()
  (only_webp / "p.webp").write_bytes(b"x")
  with pytest.raises(UserError, match=r"no .jpg/.jpeg/.png files \(it holds 1 other files: "
                                      r"p.webp\); add images"):
    folder_sources.list_image_files(str(only_webp))


def test_num_eval_batches_is_the_ceiling():
  """ceil(n / B), by hand: no all-padding batch when B divides n."""
  cases = {(12, 4): 3, (13, 4): 4, (1, 4): 1, (4, 4): 1, (3, 4): 1, (50000, 1024): 49}
  for (n, b), want in cases.items():
    assert datasets.num_eval_batches(n, b) == want, (n, b)


def test_eval_pass_over_a_split_the_batch_divides():
  """12 test examples in batches of 4: three full batches, every row real (mask 1)."""
  from pr_mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = _data("shapes", eval_split="test", shapes=dict(image_size=16, train_size=8,
                                                        test_size=12, seed=0))
  batches = list(pipeline.eval_host_batches(data, "test", global_batch=4, image_size=16,
                                            backend="numpy"))
  assert len(batches) == 3
  assert np.concatenate([b["mask"] for b in batches]).tolist() == [1.0] * 12


def test_shapes_difficulty_reaches_the_numpy_source():
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data = _data("shapes", shapes=dict(image_size=16, train_size=8, test_size=6, seed=2,
                                     difficulty="easy"))
  source = datasets.open_source(data, "test", "numpy", labeled=True)
  images, labels = shapes.generate(6, image_size=16, seed=2, split="test", difficulty="easy")
  assert len(source) == 6
  np.testing.assert_array_equal(np.stack([source.raw(i) for i in range(6)]), images)
  np.testing.assert_array_equal([source.label(i) for i in range(6)], labels)


@needs_tf
def test_labeled_use_of_a_tfds_dataset_without_labels_is_an_error(monkeypatch):
  class Unlabeled:
    labeled = False
    def __init__(self, *args):
      pass
  monkeypatch.setattr(datasets, "_tfds_builder", lambda name, data_dir: object())
  monkeypatch.setattr(tfds_sources, "TfdsSource", Unlabeled)
  assert isinstance(datasets.open_source(_data("my_images"), "train", "tf"), Unlabeled)
  with pytest.raises(UserError, match="dataset my_images has no 'label' feature"):
    datasets.open_source(_data("my_images"), "train", "tf", labeled=True)


def test_parallel_calls_zero_or_negative_means_one_thread_per_core(monkeypatch):
  monkeypatch.setattr(datasets.os, "cpu_count", lambda: 6)
  for value in (0, -1, None):
    assert datasets.pool_size(datasets.threads(_data("shapes", num_parallel_calls=value))) == 6
    assert datasets.pool_size(value or 0) == 6
  assert datasets.pool_size(datasets.threads(_data("shapes", num_parallel_calls=3))) == 3


@needs_tf
def test_shapes_difficulty_reaches_the_tf_source(tmp_path):
  from pr_mim_jax.data import pipeline, shapes  # pylint: disable=g-import-not-at-top
  data = _data("shapes", data_dir=str(tmp_path), eval_split="test",
               shapes=dict(image_size=16, train_size=4, test_size=6, seed=2, difficulty="easy"))
  images, labels = pipeline.labeled_arrays(data, "test", num_examples=6, image_size=16,
                                           backend="tf")
  want_images, want_labels = shapes.generate(6, image_size=16, seed=2, split="test",
                                             difficulty="easy")
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)


def test_pretraining_workdir_inside_the_image_folder_is_an_error(tmp_path):
  """The folder is read recursively: a workdir in it would feed its reconstruction PNGs back
  as training images."""
  flat = tmp_path / "imgs"
  _pngs(flat, 2)
  data = _data(f"folder:{flat}")
  for inside in (flat, flat / "run", flat / "a" / "b"):
    with pytest.raises(UserError, match=rf"--workdir={inside} is inside {flat}, the image folder"):
      datasets.check_workdir_outside_images(data, str(inside))
  (tmp_path / "link").symlink_to(flat)  # the same folder by another name
  with pytest.raises(UserError, match="is inside"):
    datasets.check_workdir_outside_images(data, str(tmp_path / "link" / "run"))
  # A shared name prefix is not inside; a hidden folder inside is never read as images.
  for outside in (tmp_path / "imgs_run", tmp_path / "run", flat / ".runs" / "x"):
    datasets.check_workdir_outside_images(data, str(outside))
  # ImageNet layout: pre-training reads root/train only, so root/run is fine.
  root = tmp_path / "inet"
  _pngs(root / "train" / "a", 1)
  _pngs(root / "validation" / "a", 1)
  datasets.check_workdir_outside_images(_data(f"folder:{root}"), str(root / "run"))
  with pytest.raises(UserError, match="is inside"):
    datasets.check_workdir_outside_images(_data(f"folder:{root}"), str(root / "train" / "run"))
  datasets.check_workdir_outside_images(_data("shapes"), str(tmp_path))  # no folder: no check


def test_pretraining_cli_refuses_a_workdir_in_the_image_folder_before_making_it(tmp_path):
  _pngs(tmp_path / "imgs", 2)
  workdir = tmp_path / "imgs" / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "pr_mim_jax.main",
       f"--config=pr_mim_jax/configs/pretrain.py:dataset=folder:{tmp_path}/imgs",
       f"--workdir={workdir}", "--config.knn.enabled=False", "--config.batch_size=2",
       # tiny, so that code without the check trains one step quickly and fails the asserts
       "--config.model.variant=Ti/8", "--config.model.image_size=16", "--config.model.width=32",
       "--config.model.depth=1", "--config.model.heads=2", "--config.model.decoder_width=32",
       "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
       "--config.train.total_steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and f"--workdir={workdir} is inside {tmp_path}/imgs" in lines[0]
  assert not workdir.exists()


def test_shapes_data_dir_that_is_a_file_is_a_user_error(tmp_path):
  """shapes with data_dir set to a file: a raw NotADirectoryError from tfds's preparation
  (after the workdir was written) before; now check_dataset names the field."""
  not_a_dir = tmp_path / "notes.txt"
  not_a_dir.write_text("x")
  with pytest.raises(UserError, match=rf"data.data_dir {not_a_dir} is a file, not a directory"):
    datasets.check_dataset(_data("shapes", data_dir=str(not_a_dir), eval_split="test"))
  datasets.check_dataset(_data("shapes", data_dir=str(tmp_path / "new"), eval_split="test"))


def _files(folder, names):
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    (folder / name).write_bytes(b"x")


@pytest.mark.parametrize("names,listed", [
    (["c.txt", "a.webp", "b.gif"], "a.webp, b.gif, c.txt"),  # all three, no ellipsis
    (["d.txt", "c.txt", "a.webp", "b.gif"], "a.webp, b.gif, c.txt, ..."),
])
def test_files_left_out_are_listed_up_to_three(tmp_path, caplog, names, listed):
  _pngs(tmp_path / "some", 1)
  _files(tmp_path / "some", names)
  with caplog.at_level(logging.WARNING):
    folder_sources.list_image_files(str(tmp_path / "some"))
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and f"are not read ({listed}); convert" in warned[0]
  _files(tmp_path / "none", names)
  with pytest.raises(UserError, match=rf"it holds {len(names)} other files: {re.escape(listed)}\)"):
    folder_sources.list_image_files(str(tmp_path / "none"))


def test_missing_split_errors_list_only_visible_sub_folders(tmp_path):
  """Hidden folders (.cache) and files (README.txt) are no splits to name."""
  _pngs(tmp_path / "Training" / "cat", 2)
  _pngs(tmp_path / "val" / "cat", 1)
  _files(tmp_path / ".cache", ["x.png"])
  _files(tmp_path, ["README.txt", "labels.csv"])
  with pytest.raises(UserError, match=r"did you mean Training\? its sub-folders are Training, "
                                      r"val\. Set data.train_split"):
    datasets.check_dataset(_data(f"folder:{tmp_path}"))
  with pytest.raises(UserError, match=r"no labeled split 'validation': .* is not a directory; "
                                      r"its sub-folders are Training, val; labeled use"):
    datasets.check_labeled_dataset(_data(f"folder:{tmp_path}", train_split="Training"))
  with pytest.raises(UserError, match=r"no labeled split 'validation': .* is not a directory; "
                                      r"its sub-folders are Training, val; labeled use"):
    datasets.check_labeled_dataset(_data(f"folder:{tmp_path}", train_split="Training"))


@pytest.mark.parametrize("missing", ["nope", "a_file.png"])
def test_a_folder_dataset_that_is_not_a_folder_is_named(tmp_path, missing):
  _pngs(tmp_path, 1)
  (tmp_path / "0.png").rename(tmp_path / "a_file.png")
  with pytest.raises(UserError, match=rf"image folder {tmp_path}/{missing} (does not exist|is "
                                      "not a directory)"):
    datasets.check_dataset(_data(f"folder:{tmp_path}/{missing}"))


def test_missing_split_errors_list_ten_sub_folders_then_an_ellipsis(tmp_path):
  for i in range(11):
    _pngs(tmp_path / f"part{i:02d}" / "cat", 1)
  ten = ", ".join(f"part{i:02d}" for i in range(10))
  with pytest.raises(UserError, match=rf"its sub-folders are {ten}, \.\.\.\. Set"):
    datasets.check_dataset(_data(f"folder:{tmp_path}", train_split="all"))
  with pytest.raises(UserError, match=rf"its sub-folders are {ten}, \.\.\.; labeled use"):
    datasets.check_labeled_dataset(_data(f"folder:{tmp_path}", train_split="part00"))

def test_a_train_split_asked_of_a_folder_without_sub_folders_says_there_are_none(tmp_path):
  _pngs(tmp_path, 2)
  with pytest.raises(UserError, match=r"train_split='trian': .* is not a folder; its sub-folders "
                                      r"are none\. Set data.train_split to the folder to "
                                      r"pre-train on, or to \. for the whole tree"):
    datasets.check_dataset(_data(f"folder:{tmp_path}", train_split="trian"))
  whole = folder_sources.pretrain_folder(str(tmp_path), ".")
  assert len(folder_sources.list_image_files(whole)) == 2


def test_a_missing_labeled_split_lists_the_sub_folders_and_the_one_it_likely_means(tmp_path):
  for root, val in (("a", "val"), ("b", "valid")):
    _pngs(tmp_path / root / "train" / "cat", 2)
    _pngs(tmp_path / root / val / "cat", 1)
  with pytest.raises(UserError, match=r"has no labeled split 'validation': .* is not a directory;"
                                      r" its sub-folders are train, val;"):
    datasets.check_labeled_dataset(_data(f"folder:{tmp_path}/a"))
  with pytest.raises(UserError, match=r"no labeled split 'validation': .*; did you mean valid\? "
                                      r"its sub-folders are train, valid; labeled use"):
    datasets.check_labeled_dataset(_data(f"folder:{tmp_path}/b"))
  assert datasets.num_examples(_data(f"folder:{tmp_path}/b"), "valid") == 1


def test_labeled_use_of_a_folder_that_does_not_exist_is_one_user_error(tmp_path):
  with pytest.raises(UserError, match=rf"folder:{tmp_path}/nope has no labeled split 'train'"):
    datasets.check_labeled_dataset(_data(f"folder:{tmp_path}/nope"))
