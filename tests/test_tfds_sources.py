"""tfds datasets as example sources: datasets of one's own, versions, splits and slices, the
feature checks, and the errors and recipes for a dataset that is not prepared."""

import importlib.util
import re

import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from pr_mim_jax.data import datasets, tfds_sources
from pr_mim_jax.errors import UserError

needs_tf = pytest.mark.skipif(not datasets.tf_importable(),
                              reason="tensorflow / tensorflow_datasets not installed")


def _prepare_own_tfds(data_dir, name, features: dict, splits: dict, example) -> None:
  """Prepares NAME in data_dir (array_record) as a builder of one's own would, without
  registering it in this process: `features` its FeaturesDict, `splits` split -> size,
  example(i) the i-th example of a split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.core.registered.skip_registration():
    class Own(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self,
                                     features=tfds.features.FeaturesDict(features))

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(n) for split, n in splits.items()}

      def _generate_examples(self, n):
        for i in range(n):
          yield i, example(i)
    Own.name = name
  Own(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def own_tfds(tmp_path_factory):
  """data_dir holding two datasets of one's own, prepared but not registered in this process
  (as when a separate script built them): pr_mim_own (Image) and pr_mim_raw (a uint8 Tensor)."""
  if not datasets.tf_importable():
    pytest.skip("tensorflow / tensorflow_datasets not installed")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("own_tfds"))
  for name, image in (("pr_mim_own", tfds.features.Image(shape=(None, None, 3))),
                      ("pr_mim_raw", tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8))):
    _prepare_own_tfds(data_dir, name,
                      {"image": image, "label": tfds.features.ClassLabel(num_classes=2)},
                      {"train": 6, "validation": 2},
                      lambda i: {"image": np.full((8, 8, 3), 20 * i, np.uint8), "label": i % 2})
  return data_dir


@needs_tf
def test_missing_version_of_own_dataset_lists_its_versions(own_tfds):
  assert tfds_sources.tfds_builder("pr_mim_own:1.0.0", own_tfds).name == "pr_mim_own"
  with pytest.raises(UserError, match="'pr_mim_own:9.9.9'.* only at versions 1.0.0;"):
    tfds_sources.tfds_builder("pr_mim_own:9.9.9", own_tfds)
  with pytest.raises(UserError, match="unknown dataset 'pr_mim_nope:1.0.0'"):
    tfds_sources.tfds_builder("pr_mim_nope:1.0.0", own_tfds)


@needs_tf
def test_a_version_tfds_does_not_have_names_the_ones_it_has(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  known = ", ".join(str(v) for v in tfds.builder("mnist", data_dir=str(tmp_path)).versions)
  with pytest.raises(UserError) as e:
    tfds_sources.tfds_builder("mnist:9.9.9", str(tmp_path))
  assert str(e.value) == (f"cannot load dataset 'mnist:9.9.9': tfds knows it at {known} only; "
                          "ask for one of those in data.dataset (or no version: the newest)")


@needs_tf
def test_bad_split_slice_is_not_called_a_missing_split(own_tfds):
  builder = tfds_sources.tfds_builder("pr_mim_own", own_tfds)
  assert tfds_sources.check_split("pr_mim_own", builder, "train[:50%]") == 3
  for split in ("train[:200%]", "train[:abc]", "train[2:99]", "train+validation[:abc]"):
    with pytest.raises(UserError, match=r"malformed or out-of-range slice") as e:
      tfds_sources.check_split("pr_mim_own", builder, split)
    assert "has no split" not in str(e.value)
  with pytest.raises(UserError, match=r"no split 'test\[:10%\]'; its splits are train, valid"):
    tfds_sources.check_split("pr_mim_own", builder, "test[:10%]")


@needs_tf
def test_empty_split_slice_is_a_user_error(own_tfds):
  """train[:5%] of 6 examples is empty: tfds cannot open it, so say so before it tries."""
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  builder = tfds_sources.tfds_builder("pr_mim_own", own_tfds)
  for split in ("train[:5%]", "validation[2:]"):
    with pytest.raises(UserError, match=rf"split '{re.escape(split)}' has no examples"):
      tfds_sources.TfdsSource(builder, split)
  assert len(tfds_sources.TfdsSource(builder, "train[:20%]")) == 1  # 6 * 20% rounds to 1


@needs_tf
def test_image_feature_must_be_an_encoded_image(own_tfds):
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  builder = tfds_sources.tfds_builder("pr_mim_own", own_tfds)
  assert len(tfds_sources.TfdsSource(builder, "train")) == 6
  with pytest.raises(UserError, match=r"'image' feature is a Tensor, not the tfds.features.Image"):
    tfds_sources.TfdsSource(tfds_sources.tfds_builder("pr_mim_raw", own_tfds), "train")


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
    tfds_sources.tfds_builder(name, str(tmp_path))
  msg = str(e.value)
  assert _recipe_in(msg) == _readme_recipe(name, str(tmp_path))
  assert "tfds build" not in msg and "\n" not in msg
  if name.startswith("imagenet2012"):  # manual downloads go to DIR/downloads/manual
    assert f"{tmp_path}/downloads/manual/" in msg


@needs_tf
@pytest.mark.parametrize("name", ["imagenet2012", "imagenet2012:5.1.0"])
def test_unprepared_imagenet_error_names_its_two_archives(tmp_path, name):
  """With or without a version, imagenet2012 asks for the two ILSVRC2012 tars by name."""
  with pytest.raises(UserError) as e:
    tfds_sources.tfds_builder(name, str(tmp_path))
  assert ("put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
          f"{tmp_path}/downloads/manual/") in str(e.value)


@needs_tf
def test_recipe_says_to_install_importlib_resources_where_it_is_missing(tmp_path, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "importlib_resources" else real(n, *a))
  with pytest.raises(UserError, match=r"run `pip install importlib_resources`, then `python -c "):
    tfds_sources.tfds_builder("cifar10", str(tmp_path))


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
    tfds_sources.tfds_builder(registered_tfds, data_dir)
  msg = str(e.value)
  version_dir = tmp_path / registered_tfds / "1.0.0"
  assert f"move {version_dir} aside" in msg and "tfds build" not in msg
  cmd = _recipe_in(msg)
  assert cmd == _readme_recipe(registered_tfds, data_dir)
  version_dir.rename(tmp_path / "old")  # "move it aside"
  exec(cmd.removeprefix('python -c "').removesuffix('"'), {})  # pylint: disable=exec-used
  source = tfds_sources.TfdsSource(tfds_sources.tfds_builder(registered_tfds, data_dir), "train")
  assert len(source) == 3 and source.label(2) == 0


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
      tfds_sources.tfds_builder(registered_tfds, str(inside))
  (tmp_path / "elsewhere").mkdir()
  with pytest.raises(UserError, match=r"not prepared in .*elsewhere: run `python -c "):
    tfds_sources.tfds_builder(registered_tfds, str(tmp_path / "elsewhere"))


@needs_tf
def test_tfds_keys_parse_to_the_asked_examples_in_order(own_tfds):
  """keys(indices) -> tf_parse, and image(i) / label(i): record i of the split as tfds's own
  data_source reads it, in the order asked (a sampler's shuffled indices)."""
  tf, _ = datasets.tf_modules()
  builder = tfds_sources.tfds_builder("pr_mim_own", own_tfds)
  source = tfds_sources.TfdsSource(builder, "train")
  ref = builder.as_data_source("train")  # decoded by tfds: {'image': [8, 8, 3], 'label'}
  assert source.labeled
  order = [4, 1, 5, 0, 1]
  assert len({int(ref[i]["image"][0, 0, 0]) for i in order}) == 4  # distinct examples
  for i, key in zip(order, source.keys(np.array(order))):
    ex = source.tf_parse(tf.constant(key))
    np.testing.assert_array_equal(tf.io.decode_image(ex["image"]).numpy(), ref[i]["image"])
    assert int(ex["label"]) == ref[i]["label"]
    np.testing.assert_array_equal(source.image(i), ref[i]["image"])
    assert source.label(i) == ref[i]["label"]


@needs_tf
def test_a_sliced_split_reads_the_examples_of_its_slice(own_tfds):
  """Split 'train[2:5]': example i is record 2 + i of train as tfds's own data_source reads it,
  through every access: keys + tf_parse for the tf backend, image / raw / label for the numpy
  and DALI backends."""
  tf, _ = datasets.tf_modules()
  builder = tfds_sources.tfds_builder("pr_mim_own", own_tfds)
  source = tfds_sources.TfdsSource(builder, "train[2:5]")
  ref = builder.as_data_source("train")  # decoded by tfds: {'image': [8, 8, 3], 'label'}
  assert len(source) == 3
  assert len({int(ref[i]["image"][0, 0, 0]) for i in range(6)}) == 6  # distinct examples
  for i, key in enumerate(source.keys(np.arange(3))):
    want = ref[2 + i]
    ex = source.tf_parse(tf.constant(key))
    np.testing.assert_array_equal(tf.io.decode_image(ex["image"]).numpy(), want["image"])
    np.testing.assert_array_equal(source.image(i), want["image"])
    np.testing.assert_array_equal(tf.io.decode_image(source.raw(i)).numpy(), want["image"])
    assert int(ex["label"]) == source.label(i) == want["label"]


@pytest.fixture(scope="module")
def unlabeled_tfds(tmp_path_factory):
  """data_dir holding pr_mim_nolabel: images only (3 train examples)."""
  if not datasets.tf_importable():
    pytest.skip("tensorflow / tensorflow_datasets not installed")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("nolabel_tfds"))
  _prepare_own_tfds(data_dir, "pr_mim_nolabel",
                    {"image": tfds.features.Image(shape=(None, None, 3))}, {"train": 3},
                    lambda i: {"image": np.full((8, 8, 3), 30 * i, np.uint8)})
  return data_dir


@needs_tf
def test_tfds_dataset_without_labels_is_unlabeled(unlabeled_tfds):
  tf, _ = datasets.tf_modules()
  source = tfds_sources.TfdsSource(tfds_sources.tfds_builder("pr_mim_nolabel", unlabeled_tfds),
                                   "train")
  assert not source.labeled and len(source) == 3
  ex = source.tf_parse(tf.constant(source.keys(np.array([2]))[0]))
  assert set(ex) == {"image"} and (tf.io.decode_image(ex["image"]).numpy() == 60).all()


@needs_tf
def test_split_sum_with_an_unknown_part_is_a_missing_split(own_tfds):
  builder = tfds_sources.tfds_builder("pr_mim_own", own_tfds)
  assert tfds_sources.check_split("pr_mim_own", builder, "train+validation") == 8
  with pytest.raises(UserError, match=r"has no split 'train\+test\[:1\]'; its splits are"):
    tfds_sources.check_split("pr_mim_own", builder, "train+test[:1]")


@needs_tf
def test_data_dir_inside_a_config_folder_names_the_right_one(tmp_path):
  """data_dir=DIR/name/config/version (a dataset with configs, as shapes): still say DIR."""
  from pr_mim_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  datasets.tf_modules()  # hide GPUs before tfds touches TF
  b = shapes_tfds.prepare(str(tmp_path), image_size=16, train_size=2, test_size=1, seed=0)
  name = f"shapes/{b.builder_config.name}"
  inside = tmp_path / "shapes" / b.builder_config.name / str(b.version)
  assert inside.is_dir()
  for d in (inside, inside.parent, inside.parent.parent):
    with pytest.raises(UserError, match=rf"not prepared in {d}, but it is in {tmp_path}: "):
      tfds_sources.tfds_builder(name, str(d))


@needs_tf
def test_is_prepared_of_a_first_build_warns_nothing(tmp_path, registered_tfds, caplog):
  """Before the first build the version folder does not exist: False, without tfds's warning
  'Variant folder ... has no dataset_info.json' (an alarming line on every first run)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(registered_tfds, data_dir=str(tmp_path))
  with caplog.at_level("INFO"):
    assert tfds_sources.is_prepared(builder) is False
  assert "dataset_info" not in caplog.text


@needs_tf
@pytest.mark.parametrize("name,hint", [
    ("my data", None),  # tfds cannot parse it: a ValueError with a multi-line usage text
    ("/data/my_images", "folder:/data/my_images"),  # a path without the 'folder:' prefix
])
def test_unparsable_dataset_name_is_one_line(tmp_path, name, hint):
  with pytest.raises(UserError) as e:
    tfds_sources.tfds_builder(name, str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg and repr(name) in msg and "not a tfds name" in msg
  assert (hint in msg) if hint else ("folder:" not in msg)


@needs_tf
def test_an_unknown_config_of_a_known_dataset_lists_its_configs(tmp_path):
  """imagenette's configs are named by image size (tfds's catalogue); mnist has none."""
  with pytest.raises(UserError, match=r"^dataset 'imagenette' has no config 'bad'; its configs: "
                                      r"full-size-v2, 320px-v2, 160px-v2, "):
    tfds_sources.tfds_builder("imagenette/bad", str(tmp_path))
  with pytest.raises(UserError, match=r"^dataset 'mnist' has no config 'x'; it has none: "
                                      r"write mnist \(data.dataset\)$"):
    tfds_sources.tfds_builder("mnist/x:3.0.1", str(tmp_path))


@needs_tf
def test_existing_folder_given_as_dataset_name_points_to_folder_prefix(tmp_path, monkeypatch):
  (tmp_path / "imgs").mkdir()
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match=r"imgs is a folder: write folder:imgs"):
    tfds_sources.tfds_builder("imgs", str(tmp_path))


@needs_tf
def test_unknown_namespace_name_with_nothing_prepared_is_unknown_dataset(tmp_path):
  # tfds reads 'cifar10:x' as dataset 'x' of namespace 'cifar10'; nothing is in data_dir/cifar10.
  with pytest.raises(UserError, match=r"unknown dataset 'cifar10:x': did you mean cifar10"):
    tfds_sources.tfds_builder("cifar10:x", str(tmp_path))


@needs_tf
def test_data_dir_that_is_a_file_is_named_as_such(own_tfds, tmp_path):
  """data_dir set to a file (a builder script, say) was reported as an unknown dataset."""
  script = tmp_path / "my_dataset.py"
  script.write_text("# a builder script\n")
  for data_dir, where in ((script, "is a file"), (script / "sub", f"lies under the file {script}")):
    with pytest.raises(UserError, match=rf"data.data_dir {data_dir} {where}, not a directory"):
      tfds_sources.tfds_builder("pr_mim_own", str(data_dir))


@needs_tf
def test_data_dir_at_the_folder_of_an_own_dataset_names_the_right_one(own_tfds):
  """A dataset of one's own (not registered in this process) with data_dir=DIR/name or
  DIR/name/version: say DIR, as for registered datasets, not "unknown dataset"."""
  for inside in (f"{own_tfds}/pr_mim_own", f"{own_tfds}/pr_mim_own/1.0.0"):
    with pytest.raises(UserError, match=rf"not prepared in {inside}, but it is in {own_tfds}: "
                                        rf"set data.data_dir={own_tfds} \("):
      tfds_sources.tfds_builder("pr_mim_own", inside)


@pytest.fixture(scope="module")
def renamed_tfds(tmp_path_factory):
  """data_dir holding pr_mim_renamed: images under 'img', a Scalar 'label' of 5 and 7 (one
  'train' split), as a builder of one's own might write them."""
  if not datasets.tf_importable():
    pytest.skip("tensorflow / tensorflow_datasets not installed")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("renamed_tfds"))
  _prepare_own_tfds(data_dir, "pr_mim_renamed",
                    {"img": tfds.features.Image(shape=(None, None, 3)),
                     "label": tfds.features.Scalar(dtype=np.int64)}, {"train": 4},
                    lambda i: {"img": np.full((8, 8, 3), 30 * i, np.uint8),
                               "label": (5, 7)[i % 2]})
  return data_dir


def _tfds_data(name, data_dir, **kw):
  return ml_collections.ConfigDict({"dataset": name, "train_split": "train",
                                    "eval_split": "validation", "data_dir": data_dir,
                                    "backend": "tf", **kw})


@needs_tf
def test_image_feature_under_another_name_is_named_before_training(renamed_tfds):
  """check_dataset (run before the workdir is made) passed, and the run stopped later with
  'use an image dataset' for a dataset whose images are a tfds Image named otherwise."""
  with pytest.raises(UserError, match=r"no 'image' feature \(it has img, label\); .*it keeps "
                                      r"its images in 'img': rename that feature to 'image'"):
    datasets.check_dataset(_tfds_data("pr_mim_renamed", renamed_tfds, eval_split="train"))


@needs_tf
def test_label_that_is_not_a_class_label_says_what_to_prepare(renamed_tfds):
  """Labels 5 and 7 in a Scalar feature: 'has no label class feature; use a labeled dataset'
  said the dataset had no labels; it has, but not numbered 0..K-1."""
  with pytest.raises(UserError, match=r"'label' feature is a Scalar, not a tfds.features.ClassLab"
                                      r"el: classes must be numbered 0..K-1"):
    datasets.num_classes(_tfds_data("pr_mim_renamed", renamed_tfds))


@needs_tf
def test_unknown_name_suggests_the_datasets_prepared_in_data_dir(own_tfds, unlabeled_tfds):
  """A typo of one's own dataset got no 'did you mean', and a name without data_dir did not
  say that data_dir is where datasets of one's own are read from."""
  held = rf"; data.data_dir {own_tfds} holds pr_mim_own, pr_mim_raw$"
  with pytest.raises(UserError, match=r"unknown dataset 'pr_mim_onw': did you mean pr_mim_own\b.*"
                     + held):
    tfds_sources.tfds_builder("pr_mim_onw", own_tfds)
  assert tfds_sources.prepared_names(unlabeled_tfds) == ["pr_mim_nolabel"]
  with pytest.raises(UserError, match=r"unknown dataset 'pr_mim_own': .*a dataset of your own "
                                      r"needs data.data_dir, the folder that holds pr_mim_own/"):
    tfds_sources.tfds_builder("pr_mim_own", None)


@needs_tf
def test_pretraining_without_the_knn_monitor_needs_no_eval_split(unlabeled_tfds):
  """An unlabeled dataset with a 'train' split only: the eval split that nothing reads was
  checked, and the run refused its default 'validation'."""
  data = _tfds_data("pr_mim_nolabel", unlabeled_tfds)
  datasets.check_dataset(data, eval_split=False)
  with pytest.raises(UserError, match=r"data.eval_split: .* no split 'validation'"):
    datasets.check_dataset(data)


@needs_tf
def test_a_prepared_dataset_that_tfds_also_knows_is_suggested_once(tmp_path):
  """'mnist' prepared in data_dir and registered in tfds: the typo 'mnsit' gets it once. The
  data_dir listing counts datasets with configs, not tfds's downloads or hidden folders."""
  for info in ("mnist/3.0.1", "my_set/small/1.0.0", "downloads/extracted/x", ".old/1.0.0"):
    (tmp_path / info).mkdir(parents=True)
    (tmp_path / info / "dataset_info.json").write_text("{}")
  with pytest.raises(UserError, match=r"did you mean mnist, kmnist, emnist\? .* data.data_dir "
                                      rf"{tmp_path} holds mnist, my_set$"):
    tfds_sources.tfds_builder("mnsit", str(tmp_path))


@needs_tf
def test_an_unknown_name_with_an_empty_data_dir_says_it_holds_nothing(tmp_path):
  with pytest.raises(UserError, match=rf"unknown dataset 'pr_mim_typo': .*; data.data_dir "
                                      rf"{tmp_path} holds no prepared dataset$"):
    tfds_sources.tfds_builder("pr_mim_typo", str(tmp_path))


@needs_tf
def test_an_unlabeled_dataset_used_with_labels_names_the_features_it_has(unlabeled_tfds):
  with pytest.raises(UserError, match=r"dataset pr_mim_nolabel has no 'label' class feature "
                                      r"\(it has image\); use a labeled dataset"):
    datasets.num_classes(_tfds_data("pr_mim_nolabel", unlabeled_tfds))


@needs_tf
def test_pretraining_without_the_knn_monitor_still_checks_the_train_split(unlabeled_tfds):
  data = _tfds_data("pr_mim_nolabel", unlabeled_tfds, train_split="trian")
  with pytest.raises(UserError, match=r"data.train_split: .* no split 'trian'"):
    datasets.check_dataset(data, eval_split=False)
