"""Example sources: folder listing (symlinks, hidden folders, '~'), tfds datasets of one's own."""

import numpy as np
import pytest
from PIL import Image

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
def test_image_feature_must_be_an_encoded_image(own_tfds):
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  assert len(sources.TfdsSource(sources.tfds_builder("pr_mim_own", own_tfds), "train")) == 6
  with pytest.raises(UserError, match=r"'image' feature is a Tensor, not the tfds.features.Image"):
    sources.TfdsSource(sources.tfds_builder("pr_mim_raw", own_tfds), "train")
