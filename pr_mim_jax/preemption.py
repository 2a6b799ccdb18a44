"""Stop requests: SIGTERM/SIGINT (TPU preemption, Ctrl-C) become a flag the loop polls.

The handler only records the request; the loop then saves a checkpoint at a step
boundary and exits cleanly. A second signal is left to the default handler, so a
stuck run can still be killed.
"""

import logging
import signal


class StopRequest:
  """Installs handlers for SIGTERM and SIGINT; `requested` turns True on the first one."""

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                    self.signal_name)
    signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once

  def restore(self):
    """Put the previous handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
