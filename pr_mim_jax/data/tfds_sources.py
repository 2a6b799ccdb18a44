"""tfds datasets as random-access sources (array_record), and the checks around them.

Finding the builder (a tfds name, or a dataset of one's own prepared in data.data_dir),
whether it is prepared and how to prepare it, its splits, its 'image' and 'label'
features, with one-line errors that say what to do. TensorFlow and tfds are imported
inside the functions that need them, never at import time.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Any

import numpy as np
from etils import epath

from pr_mim_jax.data import augment_np
from pr_mim_jax.data import sources
from pr_mim_jax.errors import UserError


def needs_tf_error(name: str) -> UserError:
  """The error for a dataset that only the TF backend can read."""
  return UserError(f"dataset {name!r} needs tensorflow and tensorflow-datasets: {sources.TF_INSTALL}")


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
  ours = difflib.get_close_matches(base, sources.OWN_DATASETS, n=3)
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
      held = sources.listing(prepared)
      where = f"; data.data_dir {data_dir} holds {held or 'no prepared dataset'}"
    raise UserError(f"unknown dataset {name!r}:{hint} use a tfds name, 'shapes' "
                    f"or 'folder:/path/to/images'{where}") from e
  except AssertionError as e:  # tfds's way to say "no such version"
    reason = str(e).splitlines()[-1]
    known = re.search(r"cannot be loaded at version .*, only: (.+?)\.?$", reason)
    if known:  # tfds's line repeats its own arguments; keep what the user needs
      reason = (f"tfds knows it at {known.group(1)} only; ask for one of those in data.dataset "
                "(or no version: the newest)")
    raise UserError(f"cannot load dataset {name!r}: {reason}") from e
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
    """Decoded uint8 [H, W, 3] (for tests and tools: the numpy backend refuses tfds datasets,
    the tf backend uses tf_parse, the dali backend raw)."""
    return augment_np.decode(self.raw(i))

  def raw(self, i: int) -> bytes:
    """The encoded image, not yet decoded."""
    return self._numpy_source()[int(i)]["image"]

  def label(self, i: int) -> int:
    return int(self._numpy_source()[int(i)]["label"])

  def where(self, i: int) -> str:
    """Where example i is, for error messages."""
    return f"example {int(i)} of split {self.split!r} of dataset {self.name}"
