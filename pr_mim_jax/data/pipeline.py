"""The input pipeline the trainer calls: deterministic, resumable, multi-process.

This module builds batches (transforms, host-local and device batches, labeled arrays);
datasets.py resolves the backend, opens sources and answers dataset checks and counts,
which are re-exported here.

Datasets (`data.dataset`): 'shapes' (embedded, generated locally), any tfds name
('imagenet2012', 'cifar10:3.0.2') prepared as array_record in `data.data_dir`, or
'folder:/path' (recursive jpg/jpeg/png, local or gs://). For pre-training a folder is
unlabeled: /path/<data.train_split> if that is a folder, the whole tree for '.' or for the
default 'train' with no such folder, else an error (folder_sources.pretrain_folder); for
labeled use (labeled_train_batches, eval_batches, labeled_arrays) a split is the sub-folder
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
NumPy on the 2-core Intel Xeon dev machine (2026-11-26), plus one more per epoch boundary.

Backends. 'tf' (tf.data, parallel decode in TF ops, never on a GPU), 'numpy'
(NumPy + OpenCV in a thread pool, for machines without TensorFlow; 'shapes' and
'folder:' only) or 'dali' (NVIDIA DALI; encoded images, so not 'shapes'; no RandAugment:
dali_batches.py). Choose with the `backend` argument, else `data.backend` if the
config has it, else 'auto' = 'tf' if tensorflow and tensorflow_datasets import.
The numpy backend reads the same examples per batch as 'tf', but its augmentation
is only a distribution match (see augment_np.py). With TF, 'shapes' is prepared
once as a tfds dataset in data_dir (shapes_tfds.py); without TF it is generated
into memory once per process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import sys
import traceback
from typing import Iterator, Sequence

import jax
import numpy as np

from pr_mim_jax.data import augment_np, dali_batches, datasets, host_memory, prefetch, sampler
# Dataset checks and counts, re-exported: callers need only this module.
from pr_mim_jax.data.datasets import (  # noqa: F401  # pylint: disable=unused-import
    check_dataset, check_labeled_dataset, num_classes, num_eval_batches, num_examples)
from pr_mim_jax.errors import UserError

_LABELED_CHUNK = 256


# -------------------------------------------------------------------- transforms

AUGMENTS = ("crop_flip", "randaugment")


def _randaugment_cfg(data) -> dict:
  """RandAugment + random erasing settings (timm rand-m9-mstd0.5-inc1, erasing 0.25 as MAE)."""
  cfg = datasets.get(data, "randaugment", None) or {}
  return dict(num_ops=int(datasets.get(cfg, "num_ops", 2)), magnitude=float(datasets.get(cfg, "magnitude", 9.0)),
              magnitude_std=float(datasets.get(cfg, "magnitude_std", 0.5)),
              erase_prob=float(datasets.get(data, "random_erase", 0.25)))


def _train_transform(data, backend: str, augment: str, seed: int, image_size: int):
  """fn(image, step, position) -> [S, S, 3]: uint8 pixels ('crop_flip'), float32 normalised
  ('randaugment', whose erasing writes noise no pixel has); image: TF encoded bytes ('tf') or
  a source's raw image ('numpy'). For 'dali', the whole batch builder instead:
  fn(source, steps, local=, labeled=, threads=) (dali_batches.batches)."""
  if augment not in AUGMENTS:
    raise UserError(f"unknown augmentation {augment!r}; use one of {', '.join(AUGMENTS)}")
  min_scale = float(datasets.get(data, "crop_min_scale", augment_np.MIN_SCALE))
  ra = _randaugment_cfg(data) if augment == "randaugment" else None
  if backend == "tf":
    _, aug = datasets.tf_modules()
    if ra is None:
      return lambda x, step, pos: aug.train_augment(x, seed, step, pos, image_size,
                                                    min_scale=min_scale)
    from pr_mim_jax.data import randaugment  # pylint: disable=g-import-not-at-top
    return lambda x, step, pos: randaugment.train_augment(x, seed, step, pos, image_size,
                                                          min_scale=min_scale, **ra)
  if backend == "dali":
    if ra is not None:
      raise UserError("data.backend='dali' has no RandAugment; use data.backend=tf or numpy "
                      "for fine-tuning's recipe")
    return functools.partial(dali_batches.batches, kind="train", seed=seed, size=image_size,
                             min_scale=min_scale, device=datasets.get(data, "dali_device", "gpu"))
  if ra is None:
    return lambda x, step, pos: augment_np.train_augment(
        x, augment_np.example_rng(seed, step, pos), image_size, min_scale)
  from pr_mim_jax.data import randaugment_np  # pylint: disable=g-import-not-at-top
  return lambda x, step, pos: randaugment_np.train_augment(
      x, augment_np.example_rng(seed, step, pos), image_size, min_scale=min_scale, **ra)


def _eval_transform(data, backend: str, image_size: int):
  if backend == "dali":
    return functools.partial(dali_batches.batches, kind="eval", seed=0, size=image_size,
                             min_scale=1.0, device=datasets.get(data, "dali_device", "gpu"))
  if backend == "tf":
    _, aug = datasets.tf_modules()
    return lambda x, step, pos: aug.eval_transform(aug.decode(x), image_size)
  return lambda x, step, pos: augment_np.eval_transform(x, image_size)


# ------------------------------------------------------------ host-local batches


def _undecodable(where: list[str], why: str) -> UserError:
  """The error for images that do not decode: a rerun would resume into the same batch."""
  many = len(where) > 1
  return UserError(f"image{'s' * many} {', '.join(where)} {'do' if many else 'does'} not decode "
                   f"({why}); remove or replace {'them' if many else 'it'}, then rerun")


def _tf_culprits(source, s, load) -> list[str]:
  """The examples of step `s` whose `load` fails, run eagerly one by one (tf.data's decode
  error names no file)."""
  tf, _ = datasets.tf_modules()
  bad = []
  for i, pos, key in zip(s.indices, s.positions, source.keys(s.indices)):
    try:
      load(*(tf.constant(v, tf.int64) for v in (s.step, i, pos)), tf.constant(key))
    except tf.errors.InvalidArgumentError:
      bad.append(source.where(i))
  return bad


def _tf_batches(source, steps, *, local, transform, labeled, threads):
  """tf.data: steps (Python) -> keys (Python) -> parse/decode/transform (parallel TF) -> batches.

  `steps` yields sampler.StepIndices with `local` rows, consecutive steps.
  """
  tf, _ = datasets.tf_modules()
  npc = tf.data.AUTOTUNE if threads <= 0 else threads
  spec = (tf.TensorSpec([], tf.int64),  # step
          tf.TensorSpec([local], tf.int64),  # example indices
          tf.TensorSpec([local], tf.int64))  # positions in the global batch
  pending = collections.deque()  # StepIndices that tf.data took and has not delivered, in order

  def generate():
    for s in steps:
      pending.append(s)
      yield s.step, s.indices, s.positions

  ds = tf.data.Dataset.from_generator(generate, output_signature=spec)

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

  # Both are plain TF ops with Python control flow on Python values only, so autograph is off:
  # converting them (and every function they call) cost about 2.6 s per pipeline.
  plain = tf.autograph.experimental.do_not_convert
  ds = ds.map(plain(read), num_parallel_calls=2, deterministic=True).unbatch()
  ds = ds.map(plain(load), num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  def batches():
    it = ds.as_numpy_iterator()
    while True:
      try:
        b = next(it)
      except StopIteration:
        return
      except tf.errors.InvalidArgumentError as e:  # an image that does not decode
        why = e.message.splitlines()[0].split("}}")[-1].strip()  # tf's message, no op names
        bad = _tf_culprits(source, pending[0], load)
        # Free the iterator now (the frames of tf's error hold it too): kept alive, it is
        # finalized after Python shuts down, and tf.data logs an error after ours.
        del it
        traceback.clear_frames(e.__traceback__)
        if bad:
          raise _undecodable(bad, why) from e
        raise UserError(f"an image of dataset {source.name} failed to decode ({why}) in the batch "
                        f"of step {pending[0].step}; find and remove or replace it") from e
      step = pending.popleft().step
      if not (b.pop("step") == step).all():
        raise RuntimeError(f"tf.data batch mixes steps (expected {step})")
      yield b

  return batches()


def _np_batches(source, steps, *, local, transform, labeled, threads):
  """NumPy + OpenCV in a thread pool (OpenCV releases the GIL while decoding/resizing)."""
  del local

  def batches():
    augment_np.no_opencv_threads()  # the pool parallelises over images instead
    pool = concurrent.futures.ThreadPoolExecutor(datasets.pool_size(threads), "augment_np")
    finalizing = sys.is_finalizing  # kept here: at exit, module globals may already be None
    try:
      for s in steps:
        def one(k, s=s):
          i = int(s.indices[k])
          try:
            return transform(source.raw(i), s.step, int(s.positions[k]))
          except augment_np.DecodeError as e:
            raise _undecodable([source.where(i)], str(e)) from e
        b = {"image": np.stack(list(pool.map(one, range(len(s.indices))))),  # [local, S, S, 3]
             "index": s.indices}
        if labeled:
          b["label"] = np.array([source.label(int(i)) for i in s.indices], np.int32)
        yield b
    finally:  # an iterator left open until exit: Python has joined the pool's threads by then
      if not finalizing():
        pool.shutdown(wait=False, cancel_futures=True)

  return batches()


def _load(data, source, backend, steps, *, local, transform, labeled):
  if datasets.get(data, "tune_malloc", True):
    host_memory.tune_malloc()
  if backend == "dali":  # the transform is the whole batch builder
    batches = transform(source, steps, local=local, labeled=labeled,
                        threads=datasets.pool_size(datasets.threads(data)))
  else:
    make = _tf_batches if backend == "tf" else _np_batches
    batches = make(source, steps, local=local, transform=transform, labeled=labeled,
                   threads=datasets.threads(data))
  return _labels_checked(batches, source) if labeled else batches


def _labels_checked(batches, source):
  """`batches`, stopping at the first negative label with a UserError: tfds stores -1 for
  an example without a label (imagenet2012's test split), which would silently train on
  or score against nothing."""
  try:
    for b in batches:
      bad = np.flatnonzero(b["label"] < 0)  # [local] -> positions of unlabeled rows
      if bad.size:
        k = bad[0]
        raise UserError(f"{source.where(b['index'][k])} has label {b['label'][k]}: the split has "
                        "no labels (tfds writes -1 for those); set data.train_split / "
                        "data.eval_split to a labeled split")
      yield b
  finally:
    if hasattr(batches, "close"):
      batches.close()


def _host_batches(data, *, seed, global_batch, image_size, start_step, positions, backend,
                  labeled=False, augment="crop_flip"):
  """Training batches of the rows at `positions`: {'image', 'index', 'label' if labeled}."""
  backend = datasets.resolve_backend(data, backend)
  source = datasets.open_source(data, datasets.get(data, "train_split", "train"), backend, labeled=labeled)
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

  Yields {'image': uint8 [B/P, S, S, 3] pixels, 'index': int64 [B/P]}: the part of
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
  backend = datasets.resolve_backend(data, backend)
  source = datasets.open_source(data, split, backend, labeled=True)
  n = len(source) if limit is None else min(int(limit), len(source))
  if n <= 0:
    raise UserError(f"nothing to evaluate in split {split!r} of {data.dataset} "
                    f"({len(source)} examples, num_examples={limit}); use num_examples > 0")
  return source, backend, n


def _eval_host(data, source, backend, n, *, global_batch, image_size, positions):
  """num_eval_batches(n, B) batches of the rows at `positions`, in order; rows >= n are
  padding: image 0 (black pixels), label 0, mask 0."""
  positions = np.asarray(positions, np.int64)

  def steps():
    for b in range(num_eval_batches(n, global_batch)):
      yield sampler.StepIndices(b, np.minimum(b * global_batch + positions, n - 1), positions)

  host = _load(data, source, backend, steps(), local=len(positions),
               transform=_eval_transform(data, backend, image_size), labeled=True)

  def batches():
    try:
      for b, batch in enumerate(host):
        mask = b * global_batch + positions < n  # [local]
        image = batch["image"]  # uint8 pixels
        yield {"image": np.where(mask[:, None, None, None], image, np.zeros_like(image)),
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

  return prefetch.DevicePrefetcher(device_batches(), int(datasets.get(data, "prefetch", 2) or 1))


def train_batches(data, *, seed: int, global_batch: int, image_size: int, start_step: int,
                  sharding: jax.sharding.NamedSharding,
                  backend: str | None = None) -> Iterator[dict]:
  """Global training batches from start_step on, forever: {'image': uint8 [B, S, S, 3]}.

  Pixels travel as uint8; the step normalises them on the device (pixels.model_input).

  Each process loads only the rows its devices hold and the global array is built
  with jax.make_array_from_process_local_data; `data.prefetch` device batches are
  prepared ahead in a background thread. Raises UserError for a bad dataset or a
  global_batch not divisible by the process count.
  """
  positions = _process_positions(sharding, global_batch, image_size)
  host = _host_batches(data, seed=seed, global_batch=global_batch, image_size=image_size,
                       start_step=start_step, positions=positions, backend=backend)
  return _device_batches(data, host, sharding, global_batch)


def image_dtype(augment: str = "crop_flip") -> np.dtype:
  """The dtype of batch['image'] that an augmentation yields (pixels.py says why)."""
  return np.dtype(np.float32 if augment == "randaugment" else np.uint8)


def abstract_batch(global_batch: int, image_size: int, sharding, labeled: bool = False,
                   augment: str = "crop_flip") -> dict:
  """ShapeDtypeStructs of one global batch as train_batches (labeled: labeled_train_batches
  with `augment`) yields it, for compiling a step without data."""
  batch = {"image": jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3),
                                         image_dtype(augment), sharding=sharding)}
  if labeled:
    batch["label"] = jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=sharding)
  return batch


def labeled_train_batches(data, *, seed: int, global_batch: int, image_size: int, start_step: int,
                          sharding: jax.sharding.NamedSharding, augment: str,
                          backend: str | None = None) -> Iterator[dict]:
  """train_batches of a labeled split: {'image': [B, S, S, 3], 'label': int32 [B]}: uint8
  pixels for 'crop_flip', float32 normalised for 'randaugment' (pixels.py says why).

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

  Yields num_eval_batches(N, global_batch) batches {'image': uint8 [B, S, S, 3], 'label':
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

  Returns uint8 pixels [N, S, S, 3] and int32 [N] with N = min(num_examples,
  split size). Images: shorter side resized to S / 0.875 (bicubic), centre crop S
  (images already S x S pass unchanged). UserError for unlabeled datasets.
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
