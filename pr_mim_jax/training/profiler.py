"""A profiler trace of a window of train steps (config.train.profile_*), to see where time goes.

The trace lands in `<workdir>/profile` and opens in TensorBoard's profile plugin or in
Perfetto (ui.perfetto.dev). Only process 0 traces, so a pod writes one trace.
"""

import logging

import jax
from etils import epath


class StepWindow:
  """Traces steps start+1 .. start+num_steps: call `after_step(step)` after each step.

  The trace stops after the window's last step has finished on the device (blocks on its
  outputs), so it holds whole steps. With num_steps=0 it does nothing.
  """

  def __init__(self, directory: str, start: int, num_steps: int):
    self.directory, self.start, self.stop_at = directory, start, start + num_steps
    self.enabled = num_steps > 0 and jax.process_index() == 0
    self.active = False

  def after_step(self, step: int, outputs=None) -> None:
    if not self.enabled:
      return
    if step == self.start and not self.active:
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True
    elif step >= self.stop_at and self.active:
      jax.block_until_ready(outputs)
      self.close()
      logging.info("profiler trace of steps %d..%d written to %s", self.start + 1,
                   self.stop_at, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
