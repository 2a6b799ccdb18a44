"""Example sources: folder listing (symlinks, hidden folders, '~'), tfds datasets of one's own."""

import importlib.util
import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from pr_mim_jax.data import datasets, sources
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
  got = sources.list_image_files(str(root))
  assert got == (f"{root}/train/cat/a.png", f"{root}/train/dog/b.png")
  assert sources.folder_classes(str(root), "train") == ("cat", "dog")


def test_folder_path_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  _png(tmp_path / "imgs" / "a.png")
  kind, root = sources.parse_dataset("folder:~/imgs")
  assert (kind, root) == ("folder", f"{tmp_path}/imgs")
  assert sources.list_image_files(root) == (f"{tmp_path}/imgs/a.png",)


@pytest.fixture(scope="module")
def own_tfds(tmp_path_factory):
  """data_dir holding two datasets of one's own, prepared but not registered in this process
  (as when a separate script built them): pr_mim_own (Image) and pr_mim_raw (a uint8 Tensor)."""
  if not datasets.tf_importable():
    pytest.skip("tensorflow / tensorflow_datasets not installed")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("own_tfds"))

  def build(name, image_feature):
    with tfds.core.registered.skip_registration():
      class Own(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
          return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
              {"image": image_feature, "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
          return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

        def _generate_examples(self, n):
          for i in range(n):
            yield i, {"image": np.full((8, 8, 3), 20 * i, np.uint8), "label": i % 2}
      Own.name = name
    Own(data_dir=data_dir, file_format="array_record").download_and_prepare()

  build("pr_mim_own", tfds.features.Image(shape=(None, None, 3)))
  build("pr_mim_raw", tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8))
  return data_dir


@needs_tf
def test_missing_version_of_own_dataset_lists_its_versions(own_tfds):
  assert sources.tfds_builder("pr_mim_own:1.0.0", own_tfds).name == "pr_mim_own"
  with pytest.raises(UserError, match="'pr_mim_own:9.9.9'.* only at versions 1.0.0;"):
    sources.tfds_builder("pr_mim_own:9.9.9", own_tfds)
  with pytest.raises(UserError, match="unknown dataset 'pr_mim_nope:1.0.0'"):
    sources.tfds_builder("pr_mim_nope:1.0.0", own_tfds)


@needs_tf
def test_bad_split_slice_is_not_called_a_missing_split(own_tfds):
  builder = sources.tfds_builder("pr_mim_own", own_tfds)
  assert sources.check_split("pr_mim_own", builder, "train[:50%]") == 3
  for split in ("train[:200%]", "train[:abc]", "train[2:99]", "train+validation[:abc]"):
    with pytest.raises(UserError, match=r"malformed or out-of-range slice") as e:
      sources.check_split("pr_mim_own", builder, split)
    assert "has no split" not in str(e.value)
  with pytest.raises(UserError, match=r"no split 'test\[:10%\]'; its splits are train, valid"):
    sources.check_split("pr_mim_own", builder, "test[:10%]")


@needs_tf
def test_empty_split_slice_is_a_user_error(own_tfds):
  """train[:5%] of 6 examples is empty: tfds cannot open it, so say so before it tries."""
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  builder = sources.tfds_builder("pr_mim_own", own_tfds)
  for split in ("train[:5%]", "validation[2:]"):
    with pytest.raises(UserError, match=rf"split '{re.escape(split)}' has no examples"):
      sources.TfdsSource(builder, split)
  assert len(sources.TfdsSource(builder, "train[:20%]")) == 1  # 6 * 20% rounds to 1


@needs_tf
def test_image_feature_must_be_an_encoded_image(own_tfds):
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  assert len(sources.TfdsSource(sources.tfds_builder("pr_mim_own", own_tfds), "train")) == 6
  with pytest.raises(UserError, match=r"'image' feature is a Tensor, not the tfds.features.Image"):
    sources.TfdsSource(sources.tfds_builder("pr_mim_raw", own_tfds), "train")


def _readme_recipe(name: str, data_dir: str) -> str:
  """The README's command that prepares a tfds dataset, for NAME and DIR."""
  readme = (ROOT / "README.md").read_text()
  (recipe,) = set(re.findall(r"`(python -c \"import tensorflow_datasets as tfds;[^`]*)`", readme))
  return recipe.replace("'NAME'", f"'{name}'").replace("'DIR'", f"'{data_dir}'")


def _recipe_in(message: str) -> str:
  """The `python -c "..."` command that an error message tells to run."""
  (cmd,) = re.findall(r"`(python -c [^`]*)`", message)
  return cmd


@needs_tf
@pytest.mark.parametrize("name", ["cifar10:3.0.2", "imagenet2012", "imagenet2012_subset/10pct"])
def test_unprepared_dataset_error_gives_the_readme_recipe(tmp_path, name):
  """The `tfds` CLI does not start without apache-beam: the error gives the README's command."""
  with pytest.raises(UserError) as e:
    sources.tfds_builder(name, str(tmp_path))
  msg = str(e.value)
  assert _recipe_in(msg) == _readme_recipe(name, str(tmp_path))
  assert "tfds build" not in msg and "\n" not in msg
  if name.startswith("imagenet2012"):  # manual downloads go to DIR/downloads/manual
    assert f"{tmp_path}/downloads/manual/" in msg


@needs_tf
def test_recipe_says_to_install_importlib_resources_where_it_is_missing(tmp_path, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "importlib_resources" else real(n, *a))
  with pytest.raises(UserError, match=r"run `pip install importlib_resources`, then `python -c "):
    sources.tfds_builder("cifar10", str(tmp_path))


@pytest.fixture(scope="module")
def registered_tfds():
  """The name of a tiny tfds builder registered in this process (as catalog datasets are), so
  that tfds.builder(name) finds it like the README's command finds a catalog dataset."""
  if not datasets.tf_importable():
    pytest.skip("tensorflow / tensorflow_datasets not installed")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class PrMimRecipeCheck(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3)),
           "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 3), 50 * i, np.uint8), "label": i % 2}

  return "pr_mim_recipe_check"


@needs_tf
def test_tfrecord_dataset_error_gives_a_recipe_that_works(tmp_path, registered_tfds):
  """A dataset prepared as TFRecord: doing what the error says makes it readable."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  data_dir = str(tmp_path)
  tfds.builder(registered_tfds, data_dir=data_dir, file_format="tfrecord").download_and_prepare()
  with pytest.raises(UserError, match=r"stored as tfrecord, without random access") as e:
    sources.tfds_builder(registered_tfds, data_dir)
  msg = str(e.value)
  version_dir = tmp_path / registered_tfds / "1.0.0"
  assert f"move {version_dir} aside" in msg and "tfds build" not in msg
  cmd = _recipe_in(msg)
  assert cmd == _readme_recipe(registered_tfds, data_dir)
  version_dir.rename(tmp_path / "old")  # "move it aside"
  exec(cmd.removeprefix('python -c "').removesuffix('"'), {})  # pylint: disable=exec-used
  source = sources.TfdsSource(sources.tfds_builder(registered_tfds, data_dir), "train")
  assert len(source) == 3 and source.label(2) == 0


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
  source = sources.FolderSource(str(tmp_path))
  where = source.where(source.paths.index(os.fsdecode(os.fsencode(tmp_path) +
                                                      b"/train/plain/bad\xe9.png")))
  assert where == f"{tmp_path}/train/plain/bad\ufffd.png"
  where.encode("utf-8")  # printable: an error line naming it does not raise


@needs_tf
def test_missing_tfds_split_error_names_the_config_field(own_tfds):
  data = ml_collections.ConfigDict({"dataset": "pr_mim_own", "data_dir": own_tfds,
                                    "train_split": "train", "eval_split": "test"})
  with pytest.raises(UserError, match=r"^data.eval_split: dataset pr_mim_own has no split 'test'; "
                                      r"its splits are train, validation$"):
    datasets.check_dataset(data)


@needs_tf
def test_data_dir_pointing_at_the_dataset_folder_names_the_right_one(tmp_path, registered_tfds):
  """data_dir=DIR/name (or DIR/name/version) by mistake: say DIR, not "prepare it again"."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  tfds.builder(registered_tfds, data_dir=str(tmp_path),
               file_format="array_record").download_and_prepare()
  for inside in (tmp_path / registered_tfds, tmp_path / registered_tfds / "1.0.0"):
    with pytest.raises(UserError, match=rf"not prepared in {inside}, but it is in {tmp_path}: "
                                        rf"set data.data_dir={tmp_path} \("):
      sources.tfds_builder(registered_tfds, str(inside))
  (tmp_path / "elsewhere").mkdir()
  with pytest.raises(UserError, match=r"not prepared in .*elsewhere: run `python -c "):
    sources.tfds_builder(registered_tfds, str(tmp_path / "elsewhere"))
