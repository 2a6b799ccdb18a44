r"""Input-pipeline throughput per host and per CPU core: can this host feed the accelerator?

  python -m pr_mim_jax.tools.input_benchmark --sources=shapes,jpeg --image_size=224 --batch=256 \
      --batches=20 --step_img_per_s=3523 --json=input.json

It times the pre-training pipeline (`pipeline.host_batches`: read, decode, random resized
crop, flip, batch as uint8 pixels) on two sources: the embedded `shapes` dataset (through
tfds on the tf backend, generated in memory on the numpy one), and a folder of JPEGs it writes first (ImageNet-like 500x375 photos-to-be: smooth
colour fields plus noise, quality 90). Per setting it reports images/s on this host, the CPU
cores the process kept busy (CPU time / wall time), images/s per busy core, the bytes per
image and the host-to-device MB/s they make, and, given the accelerator's measured step
rate (--step_img_per_s), the cores and MB/s needed to keep 1, 4, 8 (--accelerators) fed.
"""

import json
import os
import resource
import sys
import tempfile
import time
import types

import ml_collections
import numpy as np
from absl import flags

from pr_mim_jax import cli
from pr_mim_jax.data import datasets
from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError

SOURCES = ("shapes", "jpeg")
WARMUP_BATCHES = 2  # untimed: pipeline start-up, tf.data autotuning
# Required: a run takes minutes and writes a dataset (shapes into the tfds data_dir, JPEGs).
REQUIRED = {"sources": ",".join(SOURCES)}


def _define_flags(flag_values=flags.FLAGS) -> types.SimpleNamespace:
  """The tool's flags, defined in `flag_values` (absl's global FLAGS; tests pass their own)."""
  fv = {"flag_values": flag_values}
  return types.SimpleNamespace(
      sources=flags.DEFINE_list("sources", None, f"Required: sources to time, from "
                                f"{list(SOURCES)}.", **fv),
      backends=flags.DEFINE_list("backends", ["auto"], "From ['auto', 'tf', 'numpy', 'dali']; "
                                 "auto = tf if installed.", **fv),
      dali_device=flags.DEFINE_enum("dali_device", "gpu", ["gpu", "cpu"], "Where the 'dali' "
                                    "backend decodes (data.dali_device).", **fv),
      image_size=flags.DEFINE_integer("image_size", 224, "Output crop side.", **fv),
      batch=flags.DEFINE_integer("batch", 256, "Images per batch.", **fv),
      batches=flags.DEFINE_integer("batches", 20, "Timed batches per setting.", **fv),
      threads=flags.DEFINE_integer("threads", -1, "data.num_parallel_calls; <= 0 = AUTOTUNE "
                                   "(tf) / one per core (numpy).", **fv),
      jpeg_dir=flags.DEFINE_string("jpeg_dir", "", "Folder for the generated JPEGs (reused if "
                                   "it holds them; other images in it are refused); '' = a "
                                   "temporary folder.", **fv),
      jpeg_count=flags.DEFINE_integer("jpeg_count", 1024, "JPEGs to generate.", **fv),
      jpeg_size=flags.DEFINE_string("jpeg_size", "500x375", "WIDTHxHEIGHT of the generated "
                                    "JPEGs (ImageNet's typical photo; larger ones show the "
                                    "DCT-domain downscale).", **fv),
      shapes_size=flags.DEFINE_integer("shapes_size", 4096, "Train images of the shapes "
                                       "dataset.", **fv),
      data_dir=flags.DEFINE_string("data_dir", "", "tfds data_dir for shapes; '' = default.", **fv),
      step_img_per_s=flags.DEFINE_float("step_img_per_s", 0.0, "The accelerator's measured "
                                        "train-step rate, to size the host (0 = skip).", **fv),
      accelerators=flags.DEFINE_list("accelerators", ["1", "4", "8"], "Accelerator counts per "
                                     "host to size for, with --step_img_per_s.", **fv),
      json=flags.DEFINE_string("json", "", "Also write the results to this JSON file.", **fv))


def write_jpegs(directory: str, count: int, size=(500, 375), seed: int = 0) -> str:
  """`count` JPEGs of `size` (w, h) in `directory`; existing ones of that size are kept
  (reruns are cheap), others are rewritten."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  w, h = size
  for i in range(count):
    path = os.path.join(directory, f"img_{i:06d}.jpg")
    if os.path.exists(path):
      with Image.open(path) as old:
        if old.size == tuple(size):
          continue
    coarse = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)  # [h, w, 3]
    Image.fromarray(pixels).save(path, quality=90)
  return directory


def foreign_images(directory: str, count: int) -> list[str]:
  """Image files under `directory` (relative paths, as the folder source finds them: any
  depth, hidden ones skipped) other than the `count` that write_jpegs makes there. The
  pipeline reads the whole folder, so any of them would be timed with the generated ones."""
  from pr_mim_jax.data import sources  # pylint: disable=g-import-not-at-top
  ours = {f"img_{i:06d}.jpg" for i in range(count)}
  found = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      rel = os.path.relpath(os.path.join(dirpath, name), directory)
      if name.lower().endswith(sources.IMAGE_EXTENSIONS) and not name.startswith(".") and (
          rel not in ours):
        found.append(rel)
  return sorted(found)


def check_jpeg_dir(directory: str, count: int) -> None:
  """A UserError when --jpeg_dir holds images the benchmark did not generate for this run."""
  if not os.path.isdir(directory):
    return
  found = foreign_images(directory, count)
  if found:
    raise UserError(f"--jpeg_dir: {directory} holds {len(found)} other image file(s) besides "
                    f"the {count} generated JPEGs (e.g. {found[0]}), and the benchmark would "
                    "read them too; use an empty or new folder (or the --jpeg_count that made "
                    "them)")


def data_config(dataset: str, backend: str, threads: int, shapes_size: int,
                data_dir: str, dali_device: str = "gpu") -> ml_collections.ConfigDict:
  """The `config.data` fields the pre-training pipeline reads (MAE's crop scale 0.2)."""
  return ml_collections.ConfigDict(dict(
      dataset=dataset, train_split="train", data_dir=data_dir or None,
      shapes=dict(image_size=64, train_size=shapes_size, test_size=64, seed=0, difficulty="hard"),
      crop_min_scale=0.2, num_parallel_calls=threads, backend=backend, dali_device=dali_device))


def measure(data, *, batch: int, image_size: int, batches: int) -> dict:
  """Images/s of host_batches, and the CPU cores this process kept busy meanwhile."""
  it = pipeline.host_batches(data, seed=0, global_batch=batch, image_size=image_size)
  try:
    for _ in range(WARMUP_BATCHES):
      next(it)
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
      b = next(it)
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
  finally:
    it.close()  # stop the pipeline's threads before the next setting starts
  cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
  assert b["image"].shape == (batch, image_size, image_size, 3)
  img_per_s = batch * batches / wall
  cores = cpu / wall
  bytes_per_img = b["image"].nbytes // batch  # what crosses to the device
  return {"img_per_s": round(img_per_s, 1), "cpu_cores_busy": round(cores, 2),
          "img_per_s_per_core": round(img_per_s / max(cores, 1e-9), 1),
          "bytes_per_img": bytes_per_img, "image_dtype": str(b["image"].dtype),
          "h2d_mb_per_s": round(img_per_s * bytes_per_img / 1e6, 1)}


def sizing(row: dict, step_img_per_s: float, accelerators) -> dict:
  """Host cores and host-to-device MB/s that keep `n` accelerators stepping at
  `step_img_per_s` each, for each n in `accelerators`, at this row's per-core rate."""
  per_accelerator = step_img_per_s / row["img_per_s_per_core"]
  return {"step_img_per_s": step_img_per_s,
          "cores_per_accelerator": round(per_accelerator, 2),
          "cores_to_feed": {str(n): round(n * per_accelerator, 1) for n in accelerators},
          "h2d_mb_per_s_per_accelerator": round(step_img_per_s * row["bytes_per_img"] / 1e6, 1)}


def check_backends(sources, backends) -> None:
  """A UserError, before anything is timed, for a backend this run could not use: one not
  installed, or DALI on the in-memory shapes (it decodes files). Found in the loop instead,
  it ended the run after the settings before it, their results unsaved."""
  if "shapes" in sources and "dali" in backends:
    raise UserError("--backends: 'dali' decodes image files, and the in-memory shapes source "
                    "has none; time dali with --sources=jpeg alone, or drop it")
  for backend in backends:
    datasets.resolve_backend(None, backend)


def _size(text: str) -> tuple[int, int]:
  """'500x375' -> (500, 375); UserError otherwise."""
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    w = h = 0
  if w < 32 or h < 32:
    raise UserError(f"--jpeg_size: got {text!r}; use WIDTHxHEIGHT of at least 32x32, e.g. 500x375")
  return w, h


def _run(f: types.SimpleNamespace) -> None:
  bad = sorted(set(f.sources.value) - set(SOURCES))
  if bad:
    raise UserError(f"--sources: unknown {bad}; use names from {list(SOURCES)}")
  bad = sorted(set(f.backends.value) - set(datasets.BACKENDS))
  if bad:
    raise UserError(f"--backends: unknown {bad}; use names from {list(datasets.BACKENDS)}")
  for name in ("batch", "batches", "image_size", "jpeg_count", "shapes_size"):
    if getattr(f, name).value <= 0:
      raise UserError(f"--{name}: got {getattr(f, name).value}; use an integer > 0")
  if f.step_img_per_s.value < 0:
    raise UserError(f"--step_img_per_s: got {f.step_img_per_s.value:g}; use the accelerator's "
                    "measured images/s, or 0 for no sizing")
  jpeg_size = _size(f.jpeg_size.value)
  try:
    accelerators = [int(n) for n in f.accelerators.value]
  except ValueError:
    accelerators = [0]
  if not accelerators or min(accelerators) <= 0:
    raise UserError(f"--accelerators: got {','.join(f.accelerators.value)}; use counts > 0, "
                    "e.g. --accelerators=1,8")
  check_backends(f.sources.value, f.backends.value)
  cli.check_output_file(f.json.value, "json")
  if "jpeg" in f.sources.value and f.jpeg_dir.value:
    cli.check_not_a_file(f.jpeg_dir.value, "jpeg_dir")
    check_jpeg_dir(f.jpeg_dir.value, f.jpeg_count.value)  # before anything is timed or written
    cli.output_dir(f.jpeg_dir.value, "jpeg_dir")
  tmp = None
  rows = []
  for source in f.sources.value:
    if source == "jpeg":
      if not f.jpeg_dir.value:
        tmp = tmp or tempfile.TemporaryDirectory(prefix="pr_mim_jpegs_")
      folder = write_jpegs(f.jpeg_dir.value or tmp.name, f.jpeg_count.value, jpeg_size)
      dataset = f"folder:{folder}"
    else:
      dataset = "shapes"
    for backend in f.backends.value:
      data = data_config(dataset, backend, f.threads.value, f.shapes_size.value, f.data_dir.value,
                         f.dali_device.value)
      resolved = datasets.resolve_backend(data, None)
      row = {"source": source, "backend": resolved, "image_size": f.image_size.value,
             "batch": f.batch.value, "threads": f.threads.value, "host_cores": os.cpu_count()}
      row.update(measure(data, batch=f.batch.value, image_size=f.image_size.value,
                         batches=f.batches.value))
      if f.step_img_per_s.value > 0:
        row.update(sizing(row, f.step_img_per_s.value, accelerators))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if tmp:
    tmp.cleanup()
  if f.json.value:
    cli.write_text(f.json.value, json.dumps(rows, indent=1), "json")


def main(argv=None, flag_values=flags.FLAGS) -> int:
  f = _define_flags(flag_values)
  return cli.run(lambda: _run(f), REQUIRED, argv, flag_values)


if __name__ == "__main__":
  sys.exit(main())
