"""The 'dali' backend: NVIDIA DALI decodes, crops, resizes and flips; we choose the boxes.

Per example, the crop box and the flip are the numpy backend's own draws (augment_np, keyed
by (seed, step, position)), passed to DALI as inputs. So a batch is a pure function of
(seed, step), resumes exactly, and shares the numpy backend's boxes and flips; only the
pixels' decoder and resize filter differ (DALI: libjpeg-turbo or nvJPEG with region-of-
interest decoding, antialiased bicubic). `data.dali_device`: 'gpu' decodes with nvJPEG on
the process's first local GPU (the hardware JPEG engines where the GPU has them), 'cpu' with
DALI's CPU operators. Batches come back to the host as uint8 and then go to the devices like
any other backend's.

Only this module imports nvidia.dali (`pip install nvidia-dali-cuda120`, Linux x86_64 and
aarch64). It serves encoded images: image folders and tfds datasets, not the in-memory
`shapes`; and the crop-flip and eval transforms, not RandAugment.
"""

from __future__ import annotations

import numpy as np

from pr_mim_jax.data import augment_np
from pr_mim_jax.errors import UserError

INSTALL = "pip install nvidia-dali-cuda120 (or -cuda130, to match the CUDA on the machine)"
DEVICES = ("gpu", "cpu")


def importable() -> bool:
  try:
    import nvidia.dali  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _device_id(device: str) -> int | None:
  """DALI's device_id: the first local JAX GPU's (dali_device='gpu'), None for CPU-only."""
  if device not in DEVICES:
    raise UserError(f"data.dali_device={device!r}; use one of {', '.join(DEVICES)}")
  if device == "cpu":
    return None
  import jax  # pylint: disable=g-import-not-at-top
  gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
  if not gpus:
    raise UserError("data.dali_device='gpu' needs a local GPU, and JAX sees none; "
                    "use data.dali_device=cpu, or another data.backend")
  return gpus[0].local_hardware_id


def _pipeline(kind: str, *, local: int, size: int, threads: int, device: str):
  """A built DALI pipeline for batches of `local` encoded images -> uint8 [size, size, 3]."""
  from nvidia.dali import fn, pipeline_def, types  # pylint: disable=g-import-not-at-top
  device_id = _device_id(device)
  decoder = "mixed" if device_id is not None else "cpu"

  @pipeline_def(batch_size=local, num_threads=threads, device_id=device_id,
                prefetch_queue_depth=1, exec_dynamic=True)
  def train():
    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    anchor = fn.external_source(name="anchor", dtype=types.FLOAT)  # [2]: top, left
    shape = fn.external_source(name="shape", dtype=types.FLOAT)  # [2]: height, width
    flip = fn.external_source(name="flip", dtype=types.INT32)  # []
    image = fn.decoders.image_slice(  # decodes only the box's region
        encoded, anchor, shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False,
        adjust_orientation=False, output_type=types.RGB, jpeg_fancy_upsampling=True,
        device=decoder)
    image = fn.resize(image, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.flip(image, horizontal=flip)

  @pipeline_def(batch_size=local, num_threads=threads, device_id=device_id,
                prefetch_queue_depth=1, exec_dynamic=True)
  def evaluate():  # augment_np.eval_geometry's resize, then its size x size crop
    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    resized = fn.external_source(name="resized", dtype=types.FLOAT)  # [2]: height, width
    anchor = fn.external_source(name="anchor", dtype=types.FLOAT)  # [2]: top, left
    image = fn.decoders.image(encoded, adjust_orientation=False, output_type=types.RGB,
                              jpeg_fancy_upsampling=True, device=decoder)
    # A size x size image is resized to its own size: DALI passes it unchanged.
    image = fn.resize(image, size=resized, interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.slice(image, anchor, types.Constant(np.array([size, size], np.float32)),
                    axes=[0, 1], normalized_anchor=False, normalized_shape=False)

  pipe = (train if kind == "train" else evaluate)()
  pipe.build()
  return pipe


def _raw(source, i: int) -> bytes:
  raw = source.raw(i)
  if isinstance(raw, np.ndarray):
    raise UserError("data.backend='dali' decodes image files; the in-memory 'shapes' dataset "
                    "has none: use data.backend=numpy or tf for it")
  return raw


def _box_and_flip(raw: bytes, seed: int, step: int, position: int, min_scale: float):
  """(top, left, height, width, flip): augment_np.train_augment's draws for this example."""
  rng = augment_np.example_rng(seed, step, position)
  height, width, _ = augment_np.header(raw)
  top, left, h, w = augment_np.sample_crop_box(height, width, rng, min_scale)
  return top, left, h, w, int(rng.uniform() < 0.5)


def batches(source, steps, *, kind: str, seed: int, size: int, min_scale: float, local: int,
            labeled: bool, threads: int, device: str):
  """Host batches {'image': uint8 [local, size, size, 3], 'index', 'label'?} per step of
  `steps` (sampler.StepIndices). kind: 'train' (random crop and flip) or 'eval'."""
  pipe = _pipeline(kind, local=local, size=size, threads=threads, device=device)
  for s in steps:
    raws = [_raw(source, int(i)) for i in s.indices]
    pipe.feed_input("encoded", [np.frombuffer(r, np.uint8) for r in raws])
    if kind == "train":
      draws = np.array([_box_and_flip(r, seed, s.step, int(p), min_scale)
                        for r, p in zip(raws, s.positions)])  # [local, 5]
      pipe.feed_input("anchor", list(draws[:, 0:2].astype(np.float32)))
      pipe.feed_input("shape", list(draws[:, 2:4].astype(np.float32)))
      pipe.feed_input("flip", list(draws[:, 4].astype(np.int32)))
    else:
      crops = np.array([augment_np.eval_geometry(*augment_np.header(r)[:2], size)
                        for r in raws], np.float32)  # [local, 4]
      pipe.feed_input("resized", list(crops[:, 0:2]))
      pipe.feed_input("anchor", list(crops[:, 2:4]))
    (images,) = pipe.run()
    b = {"image": np.asarray(images.as_cpu().as_tensor()), "index": s.indices}  # [local, S, S, 3]
    if labeled:
      b["label"] = np.array([source.label(int(i)) for i in s.indices], np.int32)
    yield b
