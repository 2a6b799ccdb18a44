"""A profiler trace of a window of train steps (config.train.profile_*), to see where time goes.

The trace lands in `<workdir>/profile` and opens in TensorBoard's profile plugin or in
Perfetto (ui.perfetto.dev). Only process 0 traces, so a pod writes one trace.
"""

import logging

import jax
from etils import epath


class StepWindow:
  """Traces steps start+1 .. start+num_steps: call `after_step(step)` after each step, and
  once before the first step with the step the run starts from.

  The trace stops after the window's last step has finished on the device (blocks on its
  outputs), so it holds whole steps. With num_steps=0 it does nothing. A run resumed inside
  the window traces the rest of it; one resumed past it says so instead of staying silent.
  """

  def __init__(self, directory: str, start: int, num_steps: int):
    self.directory, self.start, self.stop_at = directory, start, start + num_steps
    self.enabled = num_steps > 0 and jax.process_index() == 0
    self.active = False
    self._first = True

  def after_step(self, step: int, outputs=None) -> None:
    if not self.enabled:
      return
    first, self._first = self._first, False
    if first and step >= self.stop_at:
      logging.warning("no profiler trace: the run starts at step %d, past the window of steps "
                      "%d..%d; set config.train.profile_start_step to %d or later", step,
                      self.start + 1, self.stop_at, step)
    elif not self.active and self.start <= step < self.stop_at:
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active, self.start = True, step  # a resume inside the window traces the rest
    elif step >= self.stop_at and self.active:
      jax.block_until_ready(outputs)
      self.close()
      logging.info("profiler trace of steps %d..%d written to %s", self.start + 1,
                   self.stop_at, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
