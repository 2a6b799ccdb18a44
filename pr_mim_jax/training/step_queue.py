"""A bound on how far the host runs ahead of the device.

JAX dispatches steps asynchronously: without a bound, the Python loop can queue dozens of
steps before it next waits (at a log line). A stop request (SIGTERM, Ctrl-C) then waits
for all of them before the checkpoint is written, which can outlast a preemption notice.
With one step queued behind the running one, the device still never waits for the host
(as long as the host's work per step is shorter than a step), and a stop costs at most the
running step, one more and the save.
"""

import collections

import jax

DEFAULT_DEPTH = 1


class StepQueue:
  """`push(outputs)` after dispatching a step; it returns once at most `depth` remain queued."""

  def __init__(self, depth: int = DEFAULT_DEPTH):
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    self.depth = depth
    self._queued = collections.deque()

  def push(self, outputs) -> None:
    self._queued.append(outputs)
    while len(self._queued) > self.depth:
      jax.block_until_ready(self._queued.popleft())

  def __len__(self) -> int:
    return len(self._queued)
