"""Metric output: log lines and a JSONL file always, TensorBoard through clu when present.

`clu.metric_writers` imports TensorFlow when loaded, so it is imported lazily, after
data/tensorflow_devices.py has hidden the GPUs from TF; where TensorFlow is absent (typical
GPU machines) training still logs. Only process 0 writes.
"""

import json
import logging
import os
import time

import jax
import numpy as np
from etils import epath

from pr_mim_jax.errors import naming
from pr_mim_jax.errors import storage_errors_as_os_errors


class MetricWriter:
  """Scalars to logs + `metrics.jsonl` (+ TensorBoard); images to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True, start_step: int | None = None):
    """start_step: the step a resumed run starts from; TensorBoard events an earlier run
    logged past it (for states that were never saved) are dropped, as in metrics.jsonl."""
    self.active = jax.process_index() == 0
    self._jsonl = epath.Path(workdir) / "metrics.jsonl"
    self._clu = None
    self._logdir = os.fspath(epath.Path(workdir) / "tensorboard")
    if self.active and tensorboard:
      try:
        from pr_mim_jax.data import tensorflow_devices  # pylint: disable=g-import-not-at-top
        tensorflow_devices.hide_gpus()  # before clu loads TF: TF must never take GPU memory
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        with storage_errors_as_os_errors(self._logdir):
          if start_step is not None:
            drop_events_after(self._logdir, start_step)
          self._clu = metric_writers.SummaryWriter(self._logdir)
      except ImportError:
        logging.info("clu/tensorflow not installed: no TensorBoard, metrics go to %s", self._jsonl)

  def write_scalars(self, step: int, scalars: dict):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
    with naming(self._jsonl), self._jsonl.open("a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    if self._clu is not None:
      with storage_errors_as_os_errors(self._logdir):
        self._clu.write_scalars(step, scalars)

  def write_images(self, step: int, images: dict):
    """images: name -> uint8 [H, W, 3]."""
    if self.active and self._clu is not None:
      with storage_errors_as_os_errors(self._logdir):
        self._clu.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})

  def close(self):
    if self._clu is not None:
      with storage_errors_as_os_errors(self._logdir):
        self._clu.close()


def drop_events_after(logdir: str, step: int) -> None:
  """Rewrites the TensorBoard event files in `logdir` without their events past `step`.

  A resumed run logs those steps again; TensorBoard would show both copies as one zig-zag
  curve. Each changed file is written aside and then renamed over the old one, so a kill
  leaves it whole. A record torn by an earlier kill ends a file's reading (TensorBoard stops
  there too)."""
  from pr_mim_jax.data import tensorflow_devices  # pylint: disable=g-import-not-at-top
  tf = tensorflow_devices.tf  # TF is imported in data/ only; the GPUs are hidden by now
  dropped = 0
  # listdir, not glob: a workdir whose name holds [ or * is taken literally.
  names = tf.io.gfile.listdir(logdir) if tf.io.gfile.isdir(logdir) else []
  for path in sorted(os.path.join(logdir, n) for n in names if "tfevents" in n):
    kept, past = [], 0
    try:
      for record in tf.data.TFRecordDataset(path):
        raw = record.numpy()
        if tf.compat.v1.Event.FromString(raw).step > step:
          past += 1
        else:
          kept.append(raw)
    except tf.errors.DataLossError:
      pass
    if not past:
      continue
    tmp = os.path.join(os.path.dirname(logdir), "tensorboard_rewrite.tmp")  # not read by TB
    with tf.io.TFRecordWriter(tmp) as out:
      for raw in kept:
        out.write(raw)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    dropped += past
  if dropped:
    logging.warning("tensorboard: dropped %d events logged past step %d, the step this run "
                    "resumes from (their states were never saved); those steps are logged "
                    "again", dropped, step)


def last_recorded(workdir: str, keys) -> dict:
  """{key: (step, value)} of the last row of workdir/metrics.jsonl holding each key.

  A finished run reports these instead of recomputing them (and appending duplicates)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  found = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line torn by a kill
      found.update({k: (row["step"], row[k]) for k in keys if k in row})
  return found


class Progress:
  """Steps/s and ETA over the last reporting interval."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._last_step, self._last_time = first_step, time.monotonic()

  def report(self, step: int) -> dict:
    now = time.monotonic()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    logging.info("step %d/%d (%.1f%%), %.2f steps/s, ETA %s", step, self.total,
                 100.0 * step / self.total, rate, format_seconds(eta))
    return {"steps_per_sec": rate}

  def restart(self, step: int) -> None:
    """Begin the current interval at `step`, now (the loop calls it once the first step,
    which waits for compiling, is done: the first rate and ETA then leave compiling out)."""
    self._last_step, self._last_time = step, time.monotonic()


def format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
