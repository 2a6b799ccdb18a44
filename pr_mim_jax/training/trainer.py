"""What every training loop shares. Pre-training (pretrain.py) and the probe / fine-tune loop
(evaluation/classify.py) read as short scripts on top of it; the benchmark, the gradient
study, the compile report and convert build their state and step here too.

- `setup_jax`: process-wide JAX settings.
- State born sharded: `state_shardings` lays a state out from its abstract shapes,
  `born_sharded` runs its init once under jit with those out_shardings, and
  `abstract_with_shardings` gives the same layout without running anything (compile-only
  devices).
- `jit_step`: the donated train step, sharded in and out.
- A finished run: `finished_summary` reads its recorded results; nothing is recomputed.
- `run`: the loop skeleton. Steps are bounded ahead of the device; logging comes with
  progress and an ETA, a non-finite loss stops the run before any save, checkpoints are
  written on schedule and at a preemption notice.
"""

import dataclasses
import logging
import time
from typing import Callable, Iterator

import jax
import numpy as np
from etils import epath

from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import metrics as metrics_lib
from pr_mim_jax.training import preemption
from pr_mim_jax.training import step_queue


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the state is not saved. `loss` and `step` say where."""

  def __init__(self, message: str, loss: float = float("nan"), step: int = -1):
    super().__init__(message)
    self.loss, self.step = loss, step


def setup_jax(config) -> None:
  """Process-wide JAX settings: device-count-independent RNG, optional compile cache."""
  jax.config.update("jax_threefry_partitionable", True)
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      str(epath.Path(config.compilation_cache_dir).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


PARAM_FIELDS = ("params", "ema_params")  # laid out by the sharding rules; the rest replicated


def state_shardings(abstract, params_sharding, mesh):
  """Shardings of a state dataclass (TrainState, ClassifierState) from its abstract value:
  params (and an EMA of them) by the rules, the optimizer state like the params it tracks,
  everything else replicated."""
  sharding.check_divisible(abstract.params, params_sharding)
  replicated = sharding.replicated(mesh)
  fields = {}
  for field in dataclasses.fields(abstract):
    value = getattr(abstract, field.name)
    if value is None:
      fields[field.name] = None
    elif field.name in PARAM_FIELDS:
      fields[field.name] = params_sharding
    elif field.name == "opt_state":
      fields[field.name] = sharding.opt_state_shardings(value, abstract.params, params_sharding,
                                                        mesh)
    else:
      fields[field.name] = jax.tree.map(lambda _: replicated, value)
  return abstract.replace(**fields)


def born_sharded(init_fn, state_sharding, *args):
  """init_fn(*args) run once under jit, each array created in its shard."""
  return jax.jit(init_fn, out_shardings=state_sharding)(*args)


def abstract_with_shardings(state, state_sharding):
  """ShapeDtypeStructs carrying the shardings: what a restore or a compile needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, state_sharding)


def jit_step(step: Callable, state_sharding, batch_sharding, mesh):
  """step(state, batch) -> (state, metrics), jitted with the state donated and sharded in and
  out, the batch sharded, the metrics replicated."""
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


SOON_AFTER_RESTORE = 1000  # steps: a non-finite loss this soon may come from the checkpoint


def check_finite(step: int, pending: list, lr_hint: float, restored=None) -> list:
  """Raise if any pending loss is not finite; returns the fetched metrics. `restored`:
  (step, verified) of the checkpoint this run resumed from, if it did."""
  fetched = jax.device_get(pending)
  for s, m in fetched:
    if not np.isfinite(m["loss"]):
      cause = ""
      if restored is not None and s - restored[0] <= SOON_AFTER_RESTORE:
        cause = (f"; it came {s - restored[0]} steps after resuming from checkpoint "
                 f"{restored[0]}, which " + ("passed its checksums" if restored[1] else
                 "had no checksums to verify") + ": the checkpoint may be damaged or hold a "
                 "state about to diverge; move it away to resume from an older one")
      raise NonFiniteLossError(
          f"loss is {m['loss']} at step {s}: training stopped and this state was NOT saved "
          f"(peak lr {lr_hint:.3g}){cause}; {'otherwise ' if cause else ''}lower "
          "config.optim.base_lr, set config.optim.clip_grad_norm, or use "
          "model.compute_dtype=float32, then rerun to resume from the last checkpoint",
          loss=m["loss"], step=s)
  return fetched


def log_metrics(step: int, pending: list, peak_lr: float, progress, writer,
                restored=None) -> dict:
  """Means of the pending steps' metrics (after the finite check) plus steps/s, written."""
  fetched = check_finite(step, pending, peak_lr, restored)
  means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
  means.update(progress.report(step))
  if writer is not None:
    writer.write_scalars(step, means)
  return means


def finished_summary(workdir: str, step: int, keys, needed=()) -> dict | None:
  """The summary of a run whose checkpoint is already at its last step, read from its
  metrics.jsonl: nothing is recomputed and nothing is appended. None when one of the
  `needed` keys was never recorded (a run killed during its final k-NN): compute it then."""
  recorded = metrics_lib.last_recorded(workdir, keys)
  if any(k not in recorded for k in needed):
    return None
  logging.info("%s is already finished (step %d); nothing to do. Recorded results: %s. To "
               "train longer, raise config.train.total_steps (or optim.epochs): the learning-rate "
               "schedule is then recomputed for the new length, so the lr rises again at the "
               "step it resumes from.", workdir, step,
               ", ".join(f"{k}={v:.4g} (step {s})" for k, (s, v) in recorded.items()) or "none")
  return {"step": step, "finished_before": True, **{k: v for k, (_, v) in recorded.items()}}


def log_outputs(workdir: str, ckpt_dir, *, pictures: bool) -> None:
  """Says where the run writes; `pictures` for a pre-training run's reconstructions."""
  logging.info("writing to %s: checkpoints in %s, metrics in metrics.jsonl and tensorboard/%s. "
               "Setting up the model state, the input pipeline and the metric writers", workdir,
               ckpt_dir, ", reconstruction pictures in images/" if pictures else "")


def wait_for_first_step(step: int, outputs, started: float) -> None:
  """Block on the run's first step once, so the log says what the silent wait was."""
  jax.block_until_ready(outputs)
  logging.info("step %d done %.0f s after start (compiling the step takes most of it)", step,
               time.monotonic() - started)


AfterStep = Callable[[int, object, dict, dict, bool], dict | None]


def run(state, step_fn, batches: Iterator[dict], *, start_step: int, total_steps: int,
        log_every: int, peak_lr: float, ckpt=None, checkpoint_every: int = 0, writer=None,
        after_step: AfterStep | None = None):
  """Steps start_step+1 .. total_steps of step_fn over `batches`; returns (state, summary).

  Every `log_every` steps (and at the last) the metrics are checked, averaged and written;
  after each step after_step(step, state, batch, metrics, last) may return entries for the
  summary (evaluations, pictures, k-NN). With `ckpt`, the state is saved every
  `checkpoint_every` steps (0: none between), at the last one and when a preemption signal
  asks to stop (that step's after_step is then skipped, except at the last step), and a
  non-finite loss is never saved; without it, signals are left alone. The summary holds the
  last logged loss (and its step), the final step, and whether the run stopped early.
  """
  summary = {}
  # Without checkpoints there is nothing to save at a stop: signals keep their default effect.
  stop = preemption.StopRequest() if ckpt is not None else None
  progress = metrics_lib.Progress(start_step, total_steps)
  pending, queue = [], step_queue.StepQueue()
  restored = ckpt.restored if ckpt is not None and start_step > 0 else None  # (step, verified)
  logging.info("compiling the train step; the first step waits for it")
  started = time.monotonic()
  step = start_step
  try:
    while step < total_steps:
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      step += 1
      if step == start_step + 1:
        wait_for_first_step(step, metrics, started)
        if step % log_every and step != total_steps:  # else this step's own line logs it
          progress.restart(step)
      queue.push(metrics)
      pending.append((step, metrics))
      if ckpt is not None:
        ckpt.poll()  # checksums of a save that has become final
      last = step == total_steps
      if step % log_every == 0 or last:
        summary.update(loss=log_metrics(step, pending, peak_lr, progress, writer,
                                        restored)["loss"], loss_step=step)
        pending = []
      # should_stop runs every step, before the schedule is consulted: JAX's preemption sync
      # point is the step after the fastest host's last call and matches only that exact step.
      # A stop skips this step's evaluations (k-NN, pictures), which could outlast the grace
      # period, and saves at once; not at the last step, whose evaluations are the run's
      # result (a rerun of the finished workdir only reports them).
      stopping = stop is not None and stop.should_stop(step)
      if after_step is not None and (last or not stopping):
        summary.update(after_step(step, state, batch, metrics, last) or {})
      # (One process: a signal that arrived during the evaluations also saves this step.)
      if stop and (stop.requested or last or checkpoint_every and step % checkpoint_every == 0):
        check_finite(step, pending, peak_lr, restored)  # a non-finite state is never saved
        pending = []
        logging.info("saving checkpoint %d in %s", step, ckpt.directory)
        ckpt.save(step, state)
        if stop.requested:  # only ever right after a save: a stop always leaves its step saved
          break
    if stop and stop.requested:
      logging.warning("stopped by %s at step %d; checkpoint saved in %s; rerun the same "
                      "command to resume", stop.signal_name, step, ckpt.directory)
  finally:
    if stop:
      stop.restore()
  summary.update(step=step, stopped=bool(stop and stop.requested))
  return state, summary
