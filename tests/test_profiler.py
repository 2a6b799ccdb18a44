"""Tests for the profiler's step window (what it traces, not how long anything takes)."""

import os

import jax
import jax.numpy as jnp
import pytest

from pr_mim_jax.training import profiler


def _run(directory, start, num_steps, total=6):
  window = profiler.StepWindow(str(directory), start, num_steps)
  step_fn = jax.jit(lambda x: x @ x / 8)
  x = jnp.ones((8, 8))
  window.after_step(0)
  active = []
  for step in range(1, total + 1):
    x = step_fn(x)
    active.append(window.active)  # tracing while this step ran
    window.after_step(step, x)
  window.close()
  return active


def _traces(directory):
  return [f for _, _, files in os.walk(directory) for f in files if f.endswith(".xplane.pb")]


@pytest.mark.slow
def test_traces_exactly_the_window(tmp_path):
  active = _run(tmp_path / "p", start=2, num_steps=3)
  assert active == [False, False, True, True, True, False]  # steps 3, 4 and 5
  assert len(_traces(tmp_path / "p")) == 1


def test_window_from_step_zero_and_off(tmp_path):
  assert _run(tmp_path / "a", start=0, num_steps=1) == [True] + [False] * 5
  assert _run(tmp_path / "b", start=2, num_steps=0) == [False] * 6
  assert not (tmp_path / "b").exists()


def test_a_window_past_the_run_is_closed_by_close(tmp_path):
  assert _run(tmp_path / "c", start=5, num_steps=10) == [False] * 5 + [True]
  assert len(_traces(tmp_path / "c")) == 1


def _resumed(directory, start, num_steps, resume, total):
  """(tracing flags of steps resume+1..total, the window) for a run resumed at `resume`."""
  window = profiler.StepWindow(str(directory), start, num_steps)
  x = jnp.ones((8, 8))
  window.after_step(resume)  # the loop's call before its first step
  active = []
  for step in range(resume + 1, total + 1):
    x = x @ x / 8
    active.append(window.active)
    window.after_step(step, x)
  window.close()
  return active, window


def test_a_run_resumed_inside_the_window_traces_the_rest(tmp_path):
  active, _ = _resumed(tmp_path / "r", start=2, num_steps=4, resume=4, total=8)
  assert active == [True, True, False, False]  # steps 5 and 6 of the window 3..6
  assert len(_traces(tmp_path / "r")) == 1


def test_a_run_resumed_past_the_window_says_there_is_no_trace(tmp_path, caplog):
  with caplog.at_level("WARNING"):
    active, _ = _resumed(tmp_path / "late", start=2, num_steps=3, resume=50, total=52)
  assert active == [False, False] and not (tmp_path / "late").exists()
  assert "no profiler trace: the run starts at step 50, past the window of steps 3..5" in caplog.text
  assert "config.train.profile_start_step" in caplog.text


# The profiler itself is faked below: these check which steps the window asks it to trace,
# and that the last one is finished before it stops.


@pytest.fixture
def fake_profiler(monkeypatch):
  events = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: events.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop",)))
  monkeypatch.setattr(profiler.jax, "block_until_ready",
                      lambda outputs: events.append(("block", outputs)))
  return events


def test_the_trace_stops_only_after_the_window_last_step_finished(tmp_path, fake_profiler):
  window = profiler.StepWindow(str(tmp_path / "p"), 1, 2)  # steps 2 and 3
  window.after_step(0)
  for step in range(1, 6):
    window.after_step(step, f"outputs of step {step}")
  window.close()
  assert fake_profiler == [("start", str(tmp_path / "p")), ("block", "outputs of step 3"),
                           ("stop",)]


def test_a_run_resumed_inside_the_window_logs_the_steps_it_traced(tmp_path, fake_profiler,
                                                                   caplog):
  window = profiler.StepWindow(str(tmp_path / "r"), 2, 4)  # window 3..6
  with caplog.at_level("INFO"):
    for step in range(4, 9):  # resumed at 4
      window.after_step(step, step)
  assert [e[0] for e in fake_profiler] == ["start", "block", "stop"]
  assert "profiler trace of steps 5..6 written to" in caplog.text


def test_a_run_resumed_exactly_at_the_window_end_says_there_is_no_trace(tmp_path, fake_profiler,
                                                                         caplog):
  with caplog.at_level("WARNING"):
    window = profiler.StepWindow(str(tmp_path / "e"), 2, 3)  # window 3..5
    for step in range(5, 8):
      window.after_step(step, step)
    window.close()
  assert fake_profiler == []
  assert "no profiler trace: the run starts at step 5" in caplog.text


def test_profiling_off_is_silent_on_a_resumed_run(tmp_path, fake_profiler, caplog):
  """The default config (profile_steps=0) must not warn on every resume."""
  with caplog.at_level("WARNING"):
    window = profiler.StepWindow(str(tmp_path / "off"), 0, 0)
    for step in range(100, 103):
      window.after_step(step, step)
    window.close()
  assert fake_profiler == [] and "profiler" not in caplog.text


def test_only_process_0_traces(tmp_path, fake_profiler, monkeypatch):
  """A pod writes one trace: the other processes run the window without tracing."""
  monkeypatch.setattr(profiler.jax, "process_index", lambda: 1)
  window = profiler.StepWindow(str(tmp_path / "p1"), 0, 2)
  for step in range(4):
    window.after_step(step, step)
  window.close()
  assert fake_profiler == [] and not (tmp_path / "p1").exists()


def test_steps_after_a_traced_window_log_no_warning(tmp_path, fake_profiler, caplog):
  with caplog.at_level("WARNING"):
    window = profiler.StepWindow(str(tmp_path / "w"), 1, 2)  # steps 2 and 3
    for step in range(0, 8):
      window.after_step(step, step)
    window.close()
  assert [e[0] for e in fake_profiler] == ["start", "block", "stop"]
  assert not caplog.records
