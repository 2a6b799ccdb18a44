"""The input pipeline the trainer calls: deterministic, resumable, multi-process.

Datasets (`data.dataset`): 'shapes' (embedded, generated locally), any tfds name
('imagenet2012', 'cifar10:3.0.2') prepared as array_record in `data.data_dir`, or
'folder:/path' (recursive jpg/jpeg/png, local or gs://). For pre-training a folder is
unlabeled with one unnamed split (split names are ignored); for labeled use
(labeled_train_batches, eval_batches, labeled_arrays) a split is the sub-folder
/path/<split>/<class>/..., classes being the sorted class folders of data.train_split.

Evaluation (eval_batches) reads each example of a split once, in order, un-augmented;
every process yields ceil(N / B) batches, the last padded with rows of mask 0.

Determinism. The global batch at step s is a pure function of (seed, s), whatever
the number of processes: `sampler.py` draws one permutation per epoch seeded by
(seed, epoch) and cuts it into N // global_batch batches; process p of P reads only
positions [p*B/P, (p+1)*B/P) of each batch (in general: the rows its devices hold in
the batch sharding). Augmentation randomness is keyed by (seed, step, position in
the global batch). tf.data runs with deterministic ordering, so batches are exact.

Resume. Nothing is saved: a run restarted at `start_step` recomputes the
permutation of start_step's epoch and continues from there. Skipping ahead costs
one permutation, about 14 ms (13-50 ms) for N = 1,281,167 (ImageNet-1k train) in
NumPy on the 2-core Intel Xeon dev machine, plus one more per epoch boundary.

Backends. 'tf' (tf.data, parallel decode in TF ops, never on a GPU) or 'numpy'
(NumPy + Pillow in a thread pool, for machines without TensorFlow; 'shapes' and
'folder:' only). Choose with the `backend` argument, else `data.backend` if the
config has it, else 'auto' = 'tf' if tensorflow and tensorflow_datasets import.
The numpy backend reads the same examples per batch as 'tf', but its augmentation
is only a distribution match (see augment_np.py). With TF, 'shapes' is prepared
once as a tfds dataset in data_dir (shapes_tfds.py); without TF it is generated
into memory once per process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from pr_mim_jax.data import augment_np, prefetch, sampler, sources
from pr_mim_jax.errors import UserError

MEAN = augment_np.MEAN  # ImageNet normalisation, as MAE
STD = augment_np.STD
BACKENDS = ("auto", "tf", "numpy")
SHAPES_SPLITS = ("train", "test")
_LABELED_CHUNK = 256


def denormalize(images: np.ndarray) -> np.ndarray:
  """Float normalised [..., 3] -> uint8 [..., 3] pixels (for PNGs)."""
  x = np.asarray(images, np.float32) * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ config access


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """cfg.key for ConfigDicts and plain objects, cfg[key] for dicts; else default."""
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  try:
    return getattr(cfg, key)
  except (AttributeError, KeyError):
    return default


def _shapes_cfg(data) -> tuple[int, int, int, int]:
  """(image_size, train_size, test_size, seed) of data.shapes."""
  cfg = _get(data, "shapes", None) or {}
  vals = (_get(cfg, "image_size", 64), _get(cfg, "train_size", 20000), _get(cfg, "test_size", 2000),
          _get(cfg, "seed", 0))
  for name, v in zip(("image_size", "train_size", "test_size", "seed"), vals):
    if not isinstance(v, (int, np.integer)) or v < 0:
      raise UserError(f"data.shapes.{name} must be a non-negative integer, got {v!r}")
  return tuple(int(v) for v in vals)


def _shapes_difficulty(data) -> str:
  """data.shapes.difficulty: 'hard' (default) or 'easy' (see shapes.DIFFICULTIES)."""
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  value = _get(_get(data, "shapes", None) or {}, "difficulty", "hard")
  if value not in shapes.DIFFICULTIES:
    raise UserError(f"data.shapes.difficulty={value!r}: use one of {shapes.DIFFICULTIES}")
  return value


def _threads(data) -> int:
  """data.num_parallel_calls; <= 0 means AUTOTUNE (TF) or one thread per core (NumPy)."""
  return int(_get(data, "num_parallel_calls", -1) or -1)


def _pool_size(threads: int) -> int:
  return threads if threads > 0 else (os.cpu_count() or 1)


# ----------------------------------------------------------------------- backends


@functools.lru_cache(maxsize=1)
def _tf_importable() -> bool:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _tf():
  """(tensorflow, augment); importing augment hides all GPUs from TF."""
  from pr_mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  return augment.tf, augment


def _backend(data, backend: str | None) -> str:
  """Resolves 'auto' | 'tf' | 'numpy' to 'tf' or 'numpy'."""
  b = backend if backend is not None else (_get(data, "backend", None) or "auto")
  if b not in BACKENDS:
    raise UserError(f"unknown data backend {b!r}; use one of {', '.join(BACKENDS)}")
  if b == "auto":
    return "tf" if _tf_importable() else "numpy"
  if b == "tf" and not _tf_importable():
    raise UserError("data backend 'tf' needs tensorflow and tensorflow-datasets: "
                    f"{sources.TF_INSTALL}")
  return b


def _require_tf(data, name: str) -> None:
  """UserError unless the TF backend is usable (TF importable, not data.backend='numpy')."""
  if _backend(data, None) == "numpy":
    raise sources.needs_tf_error(name)
  _tf()


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
  return sources.tfds_builder(name, data_dir)


def _check_shapes_split(split: str) -> None:
  if split not in SHAPES_SPLITS:
    raise UserError(f"dataset shapes has no split {split!r}; use 'train' or 'test'")


def _open_source(data, split: str, backend: str, labeled: bool = False):
  """The random-access source of a split for a resolved backend.

  labeled=True: 'folder:' reads root/split/<class>/ (LabeledFolderSource) instead of the
  whole tree, and sources without labels raise a UserError.
  """
  kind, arg = sources.parse_dataset(data.dataset)
  data_dir = _get(data, "data_dir", None)
  if kind == "folder":
    if not labeled:
      return sources.FolderSource(arg)
    return sources.LabeledFolderSource(arg, split, _folder_classes(data))
  if kind == "shapes":
    _check_shapes_split(split)
    size, n_train, n_test, shapes_seed = _shapes_cfg(data)
    difficulty = _shapes_difficulty(data)
    if backend == "numpy":
      return sources.ArraySource(*_shapes_arrays(size, n_train, n_test, shapes_seed, split,
                                                 difficulty))
    _tf()  # hide GPUs before tfds touches TF
    builder = _shapes_builder(data_dir, size, n_train, n_test, shapes_seed, difficulty)
    return sources.TfdsSource(builder, split, "shapes")
  if backend == "numpy":
    raise sources.needs_tf_error(arg)
  _tf()
  source = sources.TfdsSource(_tfds_builder(arg, data_dir), split, arg)
  if labeled and not source.labeled:
    raise UserError(f"dataset {arg} has no 'label' feature; use a labeled dataset")
  return source


def _folder_classes(data) -> tuple[str, ...]:
  _, root = sources.parse_dataset(data.dataset)
  return sources.folder_classes(root, _get(data, "train_split", "train"))


# -------------------------------------------------------------------- public: info


def check_dataset(data) -> None:
  """Cheap validation of `data`: UserError naming what is wrong. TF-free for shapes/folder."""
  kind, arg = sources.parse_dataset(_get(data, "dataset", None))
  if kind == "shapes":
    from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
    shapes.check_image_size(_shapes_cfg(data)[0])
    _shapes_difficulty(data)
    for field in ("train_split", "eval_split"):
      _check_shapes_split(_get(data, field, "train"))
  elif kind == "folder":
    sources.list_image_files(arg)
  else:
    _require_tf(data, arg)
    builder = _tfds_builder(arg, _get(data, "data_dir", None))
    for field in ("train_split", "eval_split"):
      split = _get(data, field, None)
      if split is not None:
        sources.check_split(arg, builder, split)


def check_labeled_dataset(data) -> None:
  """check_dataset for labeled use (fine-tuning, linear probe): both splits exist and are labeled.

  'folder:ROOT' needs ROOT/<data.train_split>/<class>/ and ROOT/<data.eval_split>/<class>/.
  """
  kind, arg = sources.parse_dataset(_get(data, "dataset", None))
  if kind == "folder":
    for field in ("train_split", "eval_split"):
      sources.LabeledFolderSource(arg, _get(data, field, "train"), _folder_classes(data))
    return
  check_dataset(data)
  num_classes(data)  # UserError without labels


def num_examples(data, split: str, labeled: bool = False) -> int:
  """Examples in a split; 'folder:' unlabeled: the whole tree, labeled: root/split."""
  kind, arg = sources.parse_dataset(data.dataset)
  if kind == "shapes":
    _check_shapes_split(split)
    _, n_train, n_test, _ = _shapes_cfg(data)
    return n_train if split == "train" else n_test
  if kind == "folder":
    if labeled:
      return len(sources.LabeledFolderSource(arg, split, _folder_classes(data)))
    return len(sources.list_image_files(arg))
  _require_tf(data, arg)
  return sources.check_split(arg, _tfds_builder(arg, _get(data, "data_dir", None)), split)


def num_classes(data) -> int:
  """Classes: shapes 12, tfds its 'label' feature, 'folder:' the train split's class folders."""
  kind, arg = sources.parse_dataset(data.dataset)
  if kind == "shapes":
    from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.NUM_CLASSES
  if kind == "folder":
    return len(_folder_classes(data))
  _require_tf(data, arg)
  features = _tfds_builder(arg, _get(data, "data_dir", None)).info.features
  if "label" not in features or not hasattr(features["label"], "num_classes"):
    raise UserError(f"dataset {arg} has no 'label' class feature; use a labeled dataset")
  return int(features["label"].num_classes)


def num_eval_batches(n: int, global_batch: int) -> int:
  """Batches of one eval pass over n examples: ceil(n / global_batch), the last one padded."""
  return -(-int(n) // int(global_batch))


# -------------------------------------------------------------------- transforms

AUGMENTS = ("crop_flip", "randaugment")


def _randaugment_cfg(data) -> dict:
  """RandAugment + random erasing settings (timm rand-m9-mstd0.5-inc1, erasing 0.25 as MAE)."""
  cfg = _get(data, "randaugment", None) or {}
  return dict(num_ops=int(_get(cfg, "num_ops", 2)), magnitude=float(_get(cfg, "magnitude", 9.0)),
              magnitude_std=float(_get(cfg, "magnitude_std", 0.5)),
              erase_prob=float(_get(data, "random_erase", 0.25)))


def _train_transform(data, backend: str, augment: str, seed: int, image_size: int):
  """fn(image, step, position) -> float32 normalised [S, S, 3]; image: TF encoded bytes or NumPy
  uint8 [H, W, 3] per backend."""
  if augment not in AUGMENTS:
    raise UserError(f"unknown augmentation {augment!r}; use one of {', '.join(AUGMENTS)}")
  min_scale = float(_get(data, "crop_min_scale", augment_np.MIN_SCALE))
  ra = _randaugment_cfg(data) if augment == "randaugment" else None
  if backend == "tf":
    _, aug = _tf()
    if ra is None:
      return lambda x, step, pos: aug.train_augment(x, seed, step, pos, image_size,
                                                    min_scale=min_scale)
    from pr_mim_jax.data import randaugment  # pylint: disable=g-import-not-at-top
    return lambda x, step, pos: randaugment.train_augment(x, seed, step, pos, image_size,
                                                          min_scale=min_scale, **ra)
  if ra is None:
    return lambda x, step, pos: augment_np.train_augment(
        x, augment_np.example_rng(seed, step, pos), image_size, min_scale)
  from pr_mim_jax.data import randaugment_np  # pylint: disable=g-import-not-at-top
  return lambda x, step, pos: randaugment_np.train_augment(
      x, augment_np.example_rng(seed, step, pos), image_size, min_scale=min_scale, **ra)


def _eval_transform(backend: str, image_size: int):
  if backend == "tf":
    _, aug = _tf()
    return lambda x, step, pos: aug.eval_transform(aug.decode(x), image_size)
  return lambda x, step, pos: augment_np.eval_transform(x, image_size)


# ------------------------------------------------------------ host-local batches


def _tf_batches(source, steps, *, local, transform, labeled, threads):
  """tf.data: steps (Python) -> keys (Python) -> parse/decode/transform (parallel TF) -> batches.

  `steps` yields sampler.StepIndices with `local` rows, consecutive steps.
  """
  tf, _ = _tf()
  npc = tf.data.AUTOTUNE if threads <= 0 else threads
  spec = (tf.TensorSpec([], tf.int64),  # step
          tf.TensorSpec([local], tf.int64),  # example indices
          tf.TensorSpec([local], tf.int64))  # positions in the global batch
  ds = tf.data.Dataset.from_generator(lambda: ((s.step, s.indices, s.positions) for s in steps),
                                      output_signature=spec)

  def read(step, idx, pos):  # one step: [local] keys read in Python
    keys = tf.numpy_function(source.keys, [idx], tf.string)
    keys.set_shape([local])
    return tf.fill([local], step), idx, pos, keys

  def load(step, idx, pos, key):  # one example, in TF ops
    ex = source.tf_parse(key)
    out = {"image": transform(ex["image"], step, pos), "index": idx, "step": step}  # [S, S, 3]
    if labeled:
      out["label"] = tf.cast(ex["label"], tf.int32)
    return out

  ds = ds.map(read, num_parallel_calls=2, deterministic=True).unbatch()
  ds = ds.map(load, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  def batches():
    step = None
    for b in ds.as_numpy_iterator():
      step = b["step"][0] if step is None else step + 1
      if not (b.pop("step") == step).all():
        raise RuntimeError(f"tf.data batch mixes steps (expected {step})")
      yield b

  return batches()


def _np_batches(source, steps, *, local, transform, labeled, threads):
  """NumPy + Pillow in a thread pool (Pillow releases the GIL while decoding/resizing)."""
  del local

  def batches():
    pool = concurrent.futures.ThreadPoolExecutor(_pool_size(threads), "augment_np")
    try:
      for s in steps:
        def one(k, s=s):
          return transform(source.image(int(s.indices[k])), s.step, int(s.positions[k]))
        b = {"image": np.stack(list(pool.map(one, range(len(s.indices))))),  # [local, S, S, 3]
             "index": s.indices}
        if labeled:
          b["label"] = np.array([source.label(int(i)) for i in s.indices], np.int32)
        yield b
    finally:
      pool.shutdown(wait=False, cancel_futures=True)

  return batches()


def _load(data, source, backend, steps, *, local, transform, labeled):
  make = _tf_batches if backend == "tf" else _np_batches
  return make(source, steps, local=local, transform=transform, labeled=labeled,
              threads=_threads(data))


def _host_batches(data, *, seed, global_batch, image_size, start_step, positions, backend,
                  labeled=False, augment="crop_flip"):
  """Training batches of the rows at `positions`: {'image', 'index', 'label' if labeled}."""
  backend = _backend(data, backend)
  source = _open_source(data, _get(data, "train_split", "train"), backend, labeled=labeled)
  sampler.steps_per_epoch(len(source), global_batch)  # UserError if the split is too small
  transform = _train_transform(data, backend, augment, seed, image_size)
  positions = np.asarray(positions, np.int64)
  steps = sampler.schedule(seed, len(source), global_batch, start_step, positions)
  return _load(data, source, backend, steps, local=len(positions), transform=transform,
               labeled=labeled)


def host_batches(data, *, seed: int, global_batch: int, image_size: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 backend: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Process-local batches from start_step on, forever, as NumPy.

  Yields {'image': float32 [B/P, S, S, 3], 'index': int64 [B/P]}: the part of
  each global batch that process `process_index` of `process_count` owns;
  concatenating all processes' parts gives the global batch. Testable without
  multi-process JAX. Opens the dataset now (so mistakes raise here), yields lazily.
  """
  positions = sampler.process_positions(global_batch, process_index, process_count)
  return _host_batches(data, seed=seed, global_batch=global_batch, image_size=image_size,
                       start_step=start_step, positions=positions, backend=backend)


def labeled_host_batches(data, *, seed: int, global_batch: int, image_size: int,
                         start_step: int = 0, process_index: int = 0, process_count: int = 1,
                         augment: str = "crop_flip",
                         backend: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """host_batches of labeled data: adds 'label': int32 [B/P]; `augment` as labeled_train_batches."""
  positions = sampler.process_positions(global_batch, process_index, process_count)
  return _host_batches(data, seed=seed, global_batch=global_batch, image_size=image_size,
                       start_step=start_step, positions=positions, backend=backend, labeled=True,
                       augment=augment)


def _eval_source(data, split: str, backend: str | None, limit: int | None):
  """(labeled source, resolved backend, number of examples to evaluate)."""
  backend = _backend(data, backend)
  source = _open_source(data, split, backend, labeled=True)
  n = len(source) if limit is None else min(int(limit), len(source))
  if n <= 0:
    raise UserError(f"nothing to evaluate in split {split!r} of {data.dataset} "
                    f"({len(source)} examples, num_examples={limit}); use num_examples > 0")
  return source, backend, n


def _eval_host(data, source, backend, n, *, global_batch, image_size, positions):
  """num_eval_batches(n, B) batches of the rows at `positions`, in order; rows >= n are
  padding: image 0, label 0, mask 0."""
  positions = np.asarray(positions, np.int64)

  def steps():
    for b in range(num_eval_batches(n, global_batch)):
      yield sampler.StepIndices(b, np.minimum(b * global_batch + positions, n - 1), positions)

  host = _load(data, source, backend, steps(), local=len(positions),
               transform=_eval_transform(backend, image_size), labeled=True)

  def batches():
    try:
      for b, batch in enumerate(host):
        mask = b * global_batch + positions < n  # [local]
        yield {"image": np.where(mask[:, None, None, None], batch["image"], 0).astype(np.float32),
               "label": np.where(mask, batch["label"], 0).astype(np.int32),
               "mask": mask.astype(np.float32), "index": batch["index"]}
    finally:
      host.close()

  return batches()


def eval_host_batches(data, split: str, *, global_batch: int, image_size: int,
                      process_index: int = 0, process_count: int = 1, backend: str | None = None,
                      num_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Process-local eval batches as NumPy: eval_batches's rows of process `process_index`."""
  positions = sampler.process_positions(global_batch, process_index, process_count)
  source, backend, n = _eval_source(data, split, backend, num_examples)
  return _eval_host(data, source, backend, n, global_batch=global_batch, image_size=image_size,
                    positions=positions)


# ---------------------------------------------------------------- device batches


def _sharding_positions(sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> np.ndarray:
  """Sorted batch rows this process's devices hold: the local data that
  jax.make_array_from_process_local_data expects, in its order."""
  try:
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  except ValueError as e:
    raise UserError(f"global batch size {global_shape[0]} does not split evenly over the devices "
                    "of the batch sharding; use a multiple of the device count") from e
  rows = [np.arange(global_shape[0])[idx[0]] for idx in index_map.values()]
  return np.unique(np.concatenate(rows)).astype(np.int64)


def _process_positions(sharding, global_batch: int, image_size: int) -> np.ndarray:
  """This process's rows of the global batch; UserError unless the batch splits evenly."""
  n_proc = jax.process_count()
  if global_batch % n_proc:
    raise UserError(f"global batch size {global_batch} is not divisible by the {n_proc} "
                    f"processes; use a multiple of {n_proc}")
  return _sharding_positions(sharding, (global_batch, image_size, image_size, 3))


def _leading_axis(sharding, ndim: int):
  """The batch sharding for a rank-`ndim` array (labels, mask): drops trailing spec entries."""
  spec = getattr(sharding, "spec", None)
  if spec is None or len(spec) <= ndim:
    return sharding
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:ndim]))


def _device_batches(data, host, sharding, global_batch: int) -> Iterator[dict]:
  """Host batches -> global jax arrays (all keys but 'index'), prefetched in a thread."""
  def device_batches():
    try:
      for b in host:
        yield {k: jax.make_array_from_process_local_data(
                   _leading_axis(sharding, v.ndim), v, (global_batch,) + v.shape[1:])
               for k, v in b.items() if k != "index"}
    finally:
      host.close()

  return prefetch.DevicePrefetcher(device_batches(), int(_get(data, "prefetch", 2) or 1))


def train_batches(data, *, seed: int, global_batch: int, image_size: int, start_step: int,
                  sharding: jax.sharding.NamedSharding,
                  backend: str | None = None) -> Iterator[dict]:
  """Global training batches from start_step on, forever: {'image': float32 [B, S, S, 3]}.

  Each process loads only the rows its devices hold and the global array is built
  with jax.make_array_from_process_local_data; `data.prefetch` device batches are
  prepared ahead in a background thread. Raises UserError for a bad dataset or a
  global_batch not divisible by the process count.
  """
  positions = _process_positions(sharding, global_batch, image_size)
  host = _host_batches(data, seed=seed, global_batch=global_batch, image_size=image_size,
                       start_step=start_step, positions=positions, backend=backend)
  return _device_batches(data, host, sharding, global_batch)


def labeled_train_batches(data, *, seed: int, global_batch: int, image_size: int, start_step: int,
                          sharding: jax.sharding.NamedSharding, augment: str,
                          backend: str | None = None) -> Iterator[dict]:
  """train_batches of a labeled split: {'image': float32 [B, S, S, 3], 'label': int32 [B]}.

  augment: 'crop_flip' (random resized crop, scale [data.crop_min_scale, 1], + flip: the
  linear-probe recipe) or 'randaugment' (crop + flip + RandAugment data.randaugment.{num_ops=2,
  magnitude=9, magnitude_std=0.5} + random erasing with probability data.random_erase=0.25:
  the fine-tuning recipe). UserError if the dataset has no labels.
  """
  positions = _process_positions(sharding, global_batch, image_size)
  host = _host_batches(data, seed=seed, global_batch=global_batch, image_size=image_size,
                       start_step=start_step, positions=positions, backend=backend, labeled=True,
                       augment=augment)
  return _device_batches(data, host, sharding, global_batch)


def eval_batches(data, split: str, *, global_batch: int, image_size: int, sharding,
                 backend: str | None = None, num_examples: int | None = None) -> Iterator[dict]:
  """One in-order, un-augmented pass over the first num_examples (None: all) of `split`.

  Yields num_eval_batches(N, global_batch) batches {'image': float32 [B, S, S, 3], 'label':
  int32 [B], 'mask': float32 [B]} on every process; the last batch is padded with rows of
  mask 0 (image 0, label 0), so mask-weighted sums over all batches count each example once.
  """
  positions = _process_positions(sharding, global_batch, image_size)
  source, backend, n = _eval_source(data, split, backend, num_examples)
  host = _eval_host(data, source, backend, n, global_batch=global_batch, image_size=image_size,
                    positions=positions)
  return _device_batches(data, host, sharding, global_batch)


# ----------------------------------------------------------------- labeled arrays


def labeled_arrays(data, split: str, *, num_examples: int, image_size: int,
                   backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first num_examples of a labeled split, un-augmented (for k-NN).

  Returns float32 normalised [N, S, S, 3] and int32 [N] with N = min(num_examples,
  split size). Images: shorter side resized to S / 0.875 (bicubic), centre crop S
  (images already S x S are only normalised). UserError for unlabeled datasets.
  """
  if int(num_examples) <= 0:
    raise UserError(f"labeled_arrays needs num_examples > 0, got {num_examples}")
  source, backend, n = _eval_source(data, split, backend, num_examples)
  chunk = min(_LABELED_CHUNK, n)
  images, labels = [], []
  for b in _eval_host(data, source, backend, n, global_batch=chunk, image_size=image_size,
                      positions=np.arange(chunk)):
    keep = b["mask"] > 0
    images.append(b["image"][keep])
    labels.append(b["label"][keep])
  return np.concatenate(images), np.concatenate(labels)
