"""The bound on steps queued ahead of the device."""

import jax.numpy as jnp
import pytest

from pr_mim_jax.training import step_queue


def test_waits_for_the_oldest_steps_beyond_the_depth(monkeypatch):
  waited = []
  monkeypatch.setattr(step_queue.jax, "block_until_ready", waited.append)
  queue = step_queue.StepQueue(depth=2)
  for step in range(1, 6):
    queue.push(step)
    assert len(queue) == min(step, 2)
  assert waited == [1, 2, 3]  # oldest first; steps 4 and 5 may still run


def test_waits_on_real_arrays():
  queue = step_queue.StepQueue(depth=1)
  queue.push({"loss": jnp.ones(())})
  queue.push({"loss": jnp.zeros(())})
  assert len(queue) == 1


def test_depth_must_be_positive():
  with pytest.raises(ValueError, match="depth"):
    step_queue.StepQueue(depth=0)


def test_by_default_one_step_stays_queued_behind_the_running_one(monkeypatch):
  """The default bound: a stop waits for at most the running step and one more."""
  waited = []
  monkeypatch.setattr(step_queue.jax, "block_until_ready", waited.append)
  queue = step_queue.StepQueue()
  queue.push("step 1")
  assert waited == [] and len(queue) == 1
  queue.push("step 2")
  assert waited == ["step 1"] and len(queue) == 1
