"""Stop requests (TPU preemption, SIGTERM, Ctrl-C) become a check the loop makes every step.

One process: SIGTERM/SIGINT handlers only record the request; the loop then saves a
checkpoint at the next step boundary and exits cleanly. A second signal is left to the
default handler, so a stuck run can still be killed.

Several processes: per-host signal handlers could stop hosts at different steps and
deadlock the collective save, so no handler is installed. JAX's distributed runtime
receives the preemption notice and `multihost_utils.reached_preemption_sync_point(step)`
turns True on every host at the same step.
"""

import logging
import signal

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """`should_stop(step)` turns True once a stop was requested (at the same step everywhere)."""

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}
    self._multi_process = jax.process_count() > 1
    if self._multi_process:
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                    self.signal_name)
    signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process, with the same step."""
    if self._multi_process and not self.requested:
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = True
        self.signal_name = "preemption notice"
        logging.warning("preemption notice: every host saves at step %d, then exits", step)
    return self.requested

  def restore(self):
    """Put the previous handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
