"""The input pipeline the trainer calls: deterministic, resumable, multi-process.

Datasets (`data.dataset`): 'shapes' (embedded, generated locally), any tfds name
('imagenet2012', 'cifar10:3.0.2') prepared as array_record in `data.data_dir`, or
'folder:/path' (recursive jpg/jpeg/png, local or gs://, unlabeled; a folder has one
unnamed split, so split names are ignored for it).

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
def _shapes_arrays(image_size: int, train_size: int, test_size: int, seed: int, split: str):
  """(uint8 [N, S, S, 3], int32 [N]) of a shapes split, generated once per process."""
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  n = train_size if split == "train" else test_size
  return shapes.generate(n, image_size=image_size, seed=seed, split=split)


@functools.lru_cache(maxsize=4)
def _shapes_builder(data_dir: str | None, image_size: int, train_size: int, test_size: int,
                    seed: int):
  """The shapes tfds builder, prepared in data_dir on first use (then read from there)."""
  from pr_mim_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  return shapes_tfds.prepare(data_dir, image_size, train_size, test_size, seed)


@functools.lru_cache(maxsize=8)
def _tfds_builder(name: str, data_dir: str | None):
  return sources.tfds_builder(name, data_dir)


def _check_shapes_split(split: str) -> None:
  if split not in SHAPES_SPLITS:
    raise UserError(f"dataset shapes has no split {split!r}; use 'train' or 'test'")


def _open_source(data, split: str, backend: str):
  """The random-access source of a split for a resolved backend."""
  kind, arg = sources.parse_dataset(data.dataset)
  data_dir = _get(data, "data_dir", None)
  if kind == "folder":
    return sources.FolderSource(arg)
  if kind == "shapes":
    _check_shapes_split(split)
    size, n_train, n_test, shapes_seed = _shapes_cfg(data)
    if backend == "numpy":
      return sources.ArraySource(*_shapes_arrays(size, n_train, n_test, shapes_seed, split))
    _tf()  # hide GPUs before tfds touches TF
    builder = _shapes_builder(data_dir, size, n_train, n_test, shapes_seed)
    return sources.TfdsSource(builder, split, "shapes")
  if backend == "numpy":
    raise sources.needs_tf_error(arg)
  _tf()
  return sources.TfdsSource(_tfds_builder(arg, data_dir), split, arg)


# -------------------------------------------------------------------- public: info


def check_dataset(data) -> None:
  """Cheap validation of `data`: UserError naming what is wrong. TF-free for shapes/folder."""
  kind, arg = sources.parse_dataset(_get(data, "dataset", None))
  if kind == "shapes":
    from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
    shapes.check_image_size(_shapes_cfg(data)[0])
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


def num_examples(data, split: str) -> int:
  """Number of examples in a split (for 'folder:', of the whole folder)."""
  kind, arg = sources.parse_dataset(data.dataset)
  if kind == "shapes":
    _check_shapes_split(split)
    _, n_train, n_test, _ = _shapes_cfg(data)
    return n_train if split == "train" else n_test
  if kind == "folder":
    return len(sources.list_image_files(arg))
  _require_tf(data, arg)
  return sources.check_split(arg, _tfds_builder(arg, _get(data, "data_dir", None)), split)


# ------------------------------------------------------------ host-local batches


def _tf_train_batches(source, *, seed, global_batch, image_size, start_step, positions, threads,
                      min_scale):
  """tf.data: schedule -> keys (Python) -> parse/decode/augment (parallel TF) -> batches."""
  tf, augment = _tf()
  local = len(positions)
  n = len(source)
  npc = tf.data.AUTOTUNE if threads <= 0 else threads

  def schedule():
    for s in sampler.schedule(seed, n, global_batch, start_step, positions):
      yield s.step, s.indices, s.positions

  spec = (tf.TensorSpec([], tf.int64),  # step
          tf.TensorSpec([local], tf.int64),  # example indices
          tf.TensorSpec([local], tf.int64))  # positions in the global batch
  ds = tf.data.Dataset.from_generator(schedule, output_signature=spec)

  def read(step, idx, pos):  # one step: [local] keys read in Python
    keys = tf.numpy_function(source.keys, [idx], tf.string)
    keys.set_shape([local])
    return tf.fill([local], step), idx, pos, keys

  def load(step, idx, pos, key):  # one example, in TF ops
    ex = source.tf_parse(key)
    image = augment.train_augment(ex["image"], seed, step, pos, image_size,
                                  min_scale=min_scale)  # [S, S, 3]
    return {"image": image, "index": idx, "step": step}

  ds = ds.map(read, num_parallel_calls=2, deterministic=True).unbatch()
  ds = ds.map(load, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  def batches():
    step = start_step
    for b in ds.as_numpy_iterator():
      if not (b["step"] == step).all():
        raise RuntimeError(f"tf.data batch mixes steps {np.unique(b['step'])} (expected {step})")
      yield {"image": b["image"], "index": b["index"]}
      step += 1

  return batches()


def _np_train_batches(source, *, seed, global_batch, image_size, start_step, positions, threads,
                      min_scale):
  """NumPy + Pillow in a thread pool (Pillow releases the GIL while decoding/resizing)."""
  n = len(source)

  def batches():
    pool = concurrent.futures.ThreadPoolExecutor(_pool_size(threads), "augment_np")
    try:
      for s in sampler.schedule(seed, n, global_batch, start_step, positions):
        def one(k, s=s):
          rng = augment_np.example_rng(seed, s.step, int(s.positions[k]))
          return augment_np.train_augment(source.image(int(s.indices[k])), rng, image_size,
                                          min_scale)
        images = np.stack(list(pool.map(one, range(len(positions)))))  # [local, S, S, 3]
        yield {"image": images, "index": s.indices}
    finally:
      pool.shutdown(wait=False, cancel_futures=True)

  return batches()


def _host_batches(data, *, seed, global_batch, image_size, start_step, positions, backend):
  backend = _backend(data, backend)
  source = _open_source(data, _get(data, "train_split", "train"), backend)
  sampler.steps_per_epoch(len(source), global_batch)  # UserError if the split is too small
  make = _tf_train_batches if backend == "tf" else _np_train_batches
  return make(source, seed=seed, global_batch=global_batch, image_size=image_size,
              start_step=start_step, positions=np.asarray(positions, np.int64),
              threads=_threads(data),
              min_scale=float(_get(data, "crop_min_scale", augment_np.MIN_SCALE)))


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


def train_batches(data, *, seed: int, global_batch: int, image_size: int, start_step: int,
                  sharding: jax.sharding.NamedSharding,
                  backend: str | None = None) -> Iterator[dict]:
  """Global training batches from start_step on, forever: {'image': float32 [B, S, S, 3]}.

  Each process loads only the rows its devices hold and the global array is built
  with jax.make_array_from_process_local_data; `data.prefetch` device batches are
  prepared ahead in a background thread. Raises UserError for a bad dataset or a
  global_batch not divisible by the process count.
  """
  n_proc = jax.process_count()
  if global_batch % n_proc:
    raise UserError(f"global batch size {global_batch} is not divisible by the {n_proc} "
                    f"processes; use a multiple of {n_proc}")
  global_shape = (global_batch, image_size, image_size, 3)
  positions = _sharding_positions(sharding, global_shape)
  host = _host_batches(data, seed=seed, global_batch=global_batch, image_size=image_size,
                       start_step=start_step, positions=positions, backend=backend)

  def device_batches():
    try:
      for b in host:
        yield {"image": jax.make_array_from_process_local_data(sharding, b["image"], global_shape)}
    finally:
      host.close()

  return prefetch.DevicePrefetcher(device_batches(), int(_get(data, "prefetch", 2) or 1))


# ----------------------------------------------------------------- labeled arrays


def _tf_labeled(source, n: int, image_size: int, threads: int):
  tf, augment = _tf()
  npc = tf.data.AUTOTUNE if threads <= 0 else threads

  def read(idx):  # [chunk] keys
    keys = tf.numpy_function(source.keys, [idx], tf.string)
    keys.set_shape(idx.shape)
    return keys

  def load(key):
    ex = source.tf_parse(key)
    image = augment.eval_transform(augment.decode(ex["image"]), image_size)  # [S, S, 3]
    return image, tf.cast(ex["label"], tf.int32)

  ds = tf.data.Dataset.range(n).batch(_LABELED_CHUNK).map(read).unbatch()
  ds = ds.map(load, num_parallel_calls=npc, deterministic=True).batch(_LABELED_CHUNK)
  images, labels = [], []
  for x, y in ds.as_numpy_iterator():
    images.append(x)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


def _np_labeled(source, n: int, image_size: int, threads: int):
  with concurrent.futures.ThreadPoolExecutor(_pool_size(threads)) as pool:
    images = list(pool.map(lambda i: augment_np.eval_transform(source.image(i), image_size),
                           range(n)))
  labels = np.array([source.label(i) for i in range(n)], np.int32)
  return np.stack(images), labels


def labeled_arrays(data, split: str, *, num_examples: int, image_size: int,
                   backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first num_examples of a labeled split, un-augmented (for k-NN).

  Returns float32 normalised [N, S, S, 3] and int32 [N] with N = min(num_examples,
  split size). Images: shorter side resized to S / 0.875 (bicubic), centre crop S
  (images already S x S are only normalised). UserError for unlabeled datasets.
  """
  kind, arg = sources.parse_dataset(data.dataset)
  if kind == "folder":
    raise UserError(f"dataset folder:{arg} has no labels; use a labeled dataset (shapes or a "
                    "tfds name) for k-NN evaluation, or turn the k-NN monitor off")
  backend = _backend(data, backend)
  source = _open_source(data, split, backend)
  if not source.labeled:
    raise UserError(f"dataset {data.dataset} has no 'label' feature; "
                    "use a labeled dataset for k-NN evaluation")
  n = min(int(num_examples), len(source))
  if n <= 0:
    raise UserError(f"labeled_arrays needs num_examples > 0, got {num_examples}")
  make = _tf_labeled if backend == "tf" else _np_labeled
  return make(source, n, image_size, _threads(data))
