"""Tests for checkpoint_errors: orbax's late failures quieted, and nothing else.

The one-line errors themselves are tested where they are raised, through the Checkpointer
(tests/test_checkpointing.py, tests/test_checkpoint_faults.py)."""

import logging
import sys
import traceback

import pytest

from pr_mim_jax.training import checkpoint_errors
from pr_mim_jax.training import checkpointing


def test_only_late_checkpoint_failures_are_quieted(monkeypatch, caplog):
  """The hooks route an "Event loop is closed" error to one log line; any other uncaught
  exception, even one raised through orbax's code, reaches the previous hook."""
  seen = []
  monkeypatch.setattr('sys.excepthook', lambda *a: seen.append(a[1]))
  monkeypatch.setattr('sys.unraisablehook', lambda a: seen.append(a.exc_value))
  checkpoint_errors.quiet_late_reads()
  caplog.set_level(logging.INFO, logger='absl')
  late = RuntimeError('Event loop is closed')
  sys.excepthook(RuntimeError, late, None)
  assert seen == [] and 'ended after its read or write failed' in caplog.text
  with pytest.raises(OSError) as raised:
    checkpointing.ocp.CheckpointManager('/proc/version/not-a-directory')
  real = raised.value
  assert any('/orbax/' in f.filename for f in traceback.extract_tb(real.__traceback__))
  sys.excepthook(type(real), real, real.__traceback__)
  assert seen == [real]
