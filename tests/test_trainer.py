"""The shared loop and state helpers (training/trainer.py), on toy steps: what is logged,
saved and stopped, and how a state is laid out."""

import inspect
import json
import os
import signal
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pr_mim_jax.errors import UserError
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import preemption
from pr_mim_jax.training import trainer
from pr_mim_jax.training.train_state import ClassifierState, TrainState


class FakeCheckpointer:
  directory = "fake"

  def __init__(self, restored=None):
    self.saved = []
    self.restored = restored  # (step, verified) of the checkpoint a resume read
    self.polls = 0

  def save(self, step, state):
    self.saved.append((step, int(state)))

  def poll(self):
    self.polls += 1


class FakeWriter:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, values):
    self.rows.append((step, dict(values)))


def _step(state, batch):
  """Counts steps; the 'loss' is the batch's value."""
  return state + 1, {"loss": jnp.float32(batch["x"])}


def _batches(values):
  return iter([{"x": v} for v in values])


def test_run_logs_window_means_calls_after_step_and_saves_on_schedule():
  ckpt, writer, seen = FakeCheckpointer(), FakeWriter(), []

  def after_step(step, state, batch, metrics, last):
    seen.append((step, int(state), batch["x"], float(metrics["loss"]), last))
    return {"seen": step}

  state, summary = trainer.run(
      jnp.int32(3), _step, _batches([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), start_step=3,
      total_steps=10, log_every=3, peak_lr=0.1, ckpt=ckpt, checkpoint_every=4, writer=writer,
      after_step=after_step)
  assert int(state) == 10
  # Steps 4..10; after_step sees each step's state and batch, `last` only at step 10.
  assert seen == [(s, s, float(s - 3), float(s - 3), s == 10) for s in range(4, 11)]
  assert ckpt.saved == [(4, 4), (8, 8), (10, 10)]  # multiples of 4, and the last step
  # Logged at multiples of 3 and at the last step: the mean loss of the steps since the last
  # log or save (a save checks the pending losses first): steps 5-6, 9, 10.
  assert [(s, r["loss"]) for s, r in writer.rows] == [(6, 2.5), (9, 6.0), (10, 7.0)]
  assert all(r["steps_per_sec"] > 0 for _, r in writer.rows)
  assert summary == {"loss": 7.0, "loss_step": 10, "seen": 10, "step": 10, "stopped": False}


@pytest.mark.parametrize("log_every,rates", [
    (10, [(10, 1.0), (20, 1.0), (21, 1.0)]),  # step 1's 100 s are in no window
    (1, [(1, 0.01)] + [(s, 1.0) for s in range(2, 22)]),  # step 1 is its own window
])
def test_steps_per_second_leaves_out_the_first_steps_compile(monkeypatch, log_every, rates):
  """Step 1 waits 100 s for compiling and every later step takes 1 s (on a fake clock): the
  first logged rate (and so the first ETA) is the training speed, not compile-bound."""
  clock = [0.0]
  monkeypatch.setattr(trainer.time, "monotonic", lambda: clock[0])  # the time module's own

  def timed_step(state, batch):
    clock[0] += 100.0 if int(state) == 0 else 1.0
    return _step(state, batch)

  writer = FakeWriter()
  trainer.run(jnp.int32(0), timed_step, _batches([1.0] * 21), start_step=0, total_steps=21,
              log_every=log_every, peak_lr=0.1, writer=writer)
  assert [(s, r["steps_per_sec"]) for s, r in writer.rows] == rates


def test_checkpoint_every_zero_saves_only_the_last_step():
  ckpt = FakeCheckpointer()
  trainer.run(jnp.int32(0), _step, _batches([1.0] * 5), start_step=0, total_steps=5,
              log_every=100, peak_lr=0.1, ckpt=ckpt, checkpoint_every=0)
  assert ckpt.saved == [(5, 5)]


def test_a_non_finite_loss_is_never_saved():
  ckpt = FakeCheckpointer()
  with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step 2.*NOT saved") as err:
    trainer.run(jnp.int32(0), _step, _batches([1.0, float("nan"), 3.0, 4.0]), start_step=0,
                total_steps=4, log_every=100, peak_lr=0.1, ckpt=ckpt, checkpoint_every=2)
  assert ckpt.saved == []
  assert err.value.step == 2 and np.isnan(err.value.loss)  # for callers' own messages (study)


@pytest.mark.parametrize("verified,says", [(True, "passed its checksums"),
                                            (False, "had no checksums to verify")])
def test_a_non_finite_loss_soon_after_a_resume_names_the_checkpoint(verified, says):
  ckpt = FakeCheckpointer(restored=(936, verified))
  with pytest.raises(trainer.NonFiniteLossError) as err:
    trainer.run(jnp.int32(936), _step, _batches([1.0, float("nan")]), start_step=936,
                total_steps=940, log_every=100, peak_lr=0.1, ckpt=ckpt, checkpoint_every=2)
  msg = str(err.value)
  assert "loss is nan at step 938: training stopped and this state was NOT saved" in msg
  assert f"2 steps after resuming from checkpoint 936, which {says}" in msg
  assert "may be damaged" in msg and "otherwise lower config.optim.base_lr" in msg
  assert ckpt.saved == [] and ckpt.polls == 2  # checksums polled every step
  # Long after the resume, only the usual advice.
  far = trainer.check_finite(5000, [(4000, {"loss": 1.0})], 0.1, restored=(936, True))
  assert far == [(4000, {"loss": 1.0})]
  with pytest.raises(trainer.NonFiniteLossError) as err:
    trainer.check_finite(5000, [(5000, {"loss": float("inf")})], 0.1, restored=(936, True))
  assert "resuming" not in str(err.value) and "; lower config.optim.base_lr" in str(err.value)


def test_a_stop_signal_saves_at_the_next_step_and_ends_the_run():
  ckpt = FakeCheckpointer()
  previous = signal.getsignal(signal.SIGTERM)

  def after_step(step, state, batch, metrics, last):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler only records the request

  state, summary = trainer.run(jnp.int32(0), _step, _batches(np.arange(1.0, 11.0)), start_step=0,
                               total_steps=10, log_every=100, peak_lr=0.1, ckpt=ckpt,
                               checkpoint_every=100, after_step=after_step)
  assert ckpt.saved == [(2, 2)] and int(state) == 2
  assert summary["stopped"] and summary["step"] == 2
  assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored


class FakePreemptionSync:
  """JAX's PreemptionSyncManager (xla/tsl preemption_sync_manager.cc): a notice sets the sync
  point to the last step any host reported + 1, and reached(step) is True only on equality."""

  def __init__(self):
    self.last, self.sync_point, self.calls = -1, None, []

  def notice(self):
    self.sync_point = self.last + 1

  def __call__(self, step):
    self.calls.append(step)
    self.last = step
    return self.sync_point == step


@pytest.mark.parametrize("notice_at", [3, 4])  # 4: a checkpoint step
def test_multi_host_preemption_is_polled_every_step_and_stops_at_the_sync_point(
    monkeypatch, notice_at):
  sync = FakePreemptionSync()
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", sync)
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)  # no signal handlers
  ckpt = FakeCheckpointer()
  monitored = []

  def step_fn(state, batch):
    if int(state) + 1 == notice_at:
      sync.notice()  # arrives while step `notice_at` runs, before the loop polls it
    return _step(state, batch)

  state, summary = trainer.run(jnp.int32(0), step_fn, _batches([1.0] * 10), start_step=0,
                               total_steps=10, log_every=100, peak_lr=0.1, ckpt=ckpt,
                               checkpoint_every=4,
                               after_step=lambda step, *_: monitored.append(step))
  assert sync.calls == list(range(1, notice_at + 1))  # every step, checkpoint steps included
  assert monitored == list(range(1, notice_at))  # the stopping step saves without evaluating
  assert summary["stopped"] and summary["step"] == notice_at == int(state)
  assert ckpt.saved[-1] == (notice_at, notice_at)


def test_a_stop_before_the_evaluations_skips_them_and_saves_at_once():
  """SIGTERM while step 3 runs: its k-NN / pictures (after_step) could outlast the grace
  period, so the loop saves step 3 without them."""
  ckpt, monitored = FakeCheckpointer(), []

  def step_fn(state, batch):
    if int(state) + 1 == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return _step(state, batch)

  state, summary = trainer.run(jnp.int32(0), step_fn, _batches(np.arange(1.0, 11.0)),
                               start_step=0, total_steps=10, log_every=100, peak_lr=0.1,
                               ckpt=ckpt, checkpoint_every=100,
                               after_step=lambda step, *_: monitored.append(step))
  assert monitored == [1, 2] and ckpt.saved == [(3, 3)]
  assert summary["stopped"] and summary["step"] == 3 == int(state)


def test_a_stop_at_the_last_step_still_runs_its_final_evaluations():
  ckpt, monitored = FakeCheckpointer(), []

  def step_fn(state, batch):
    if int(state) + 1 == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return _step(state, batch)

  trainer.run(jnp.int32(0), step_fn, _batches([1.0] * 4), start_step=0, total_steps=4,
              log_every=100, peak_lr=0.1, ckpt=ckpt, checkpoint_every=100,
              after_step=lambda step, *_: monitored.append(step))
  assert monitored == [1, 2, 3, 4] and ckpt.saved == [(4, 4)]


def test_without_a_checkpointer_signals_are_left_alone():
  seen = []

  def after_step(step, state, batch, metrics, last):
    seen.append(signal.getsignal(signal.SIGTERM))

  before = signal.getsignal(signal.SIGTERM)
  _, summary = trainer.run(jnp.int32(0), _step, _batches([1.0, 2.0]), start_step=0, total_steps=2,
                           log_every=1, peak_lr=0.1, after_step=after_step)
  assert seen == [before, before] and summary["step"] == 2 and not summary["stopped"]


def _abstract_classifier_state(with_ema: bool):
  """(abstract ClassifierState of a 2-leaf model with AdamW, its params)."""
  params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros((2,))}
  tx = optax.adamw(1e-3)
  return jax.eval_shape(lambda: ClassifierState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats={"mean": jnp.zeros((2,))},
      opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32),
      ema_params=params if with_ema else None)), params


def test_state_shardings_follow_the_fields():
  mesh = sharding.make_mesh(jax.devices()[:1])
  abstract, params = _abstract_classifier_state(with_ema=False)
  params_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  got = trainer.state_shardings(abstract, params_sharding, mesh)
  assert got.params is params_sharding and got.ema_params is None
  assert got.step == got.rng == sharding.replicated(mesh)
  assert got.batch_stats == {"mean": sharding.replicated(mesh)}
  assert jax.tree.structure(got.opt_state) == jax.tree.structure(abstract.opt_state)
  state = trainer.born_sharded(
      lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract), got)
  assert all(x.sharding == sharding.replicated(mesh) for x in jax.tree.leaves(state))
  restored = trainer.abstract_with_shardings(state, got)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), restored) == jax.tree.map(
      lambda x: (x.shape, x.dtype), abstract)


def test_check_finite_finds_a_nan_anywhere_in_the_window_and_names_its_step():
  """Every pending loss is checked, not only the last one, and the error names the step of the
  bad loss (not the step the check ran at)."""
  pending = [(7, {"loss": 1.0}), (8, {"loss": float("nan")}), (9, {"loss": 2.0})]
  with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step 8:"):
    trainer.check_finite(9, pending, 0.1)
  assert trainer.check_finite(9, pending[:1] + pending[2:], 0.1) == [pending[0], pending[2]]


@pytest.mark.parametrize("after,names_checkpoint", [(1000, True), (1001, False)])
def test_a_non_finite_loss_names_the_checkpoint_up_to_1000_steps_after_the_resume(
    after, names_checkpoint):
  with pytest.raises(trainer.NonFiniteLossError) as err:
    trainer.check_finite(936 + after, [(936 + after, {"loss": float("-inf")})], 0.1,
                         restored=(936, False))
  assert (f"{after} steps after resuming from checkpoint 936" in str(err.value)) == \
      names_checkpoint


def test_without_a_checkpointer_a_non_finite_loss_still_stops_the_run_at_the_log():
  """No checkpointer: the log's finite check is the only one; nothing non-finite is written."""
  writer = FakeWriter()
  with pytest.raises(trainer.NonFiniteLossError, match="loss is inf at step 3"):
    trainer.run(jnp.int32(0), _step, _batches([1.0, 2.0, float("inf"), 4.0]), start_step=0,
                total_steps=4, log_every=2, peak_lr=0.1, writer=writer)
  assert [(s, r["loss"]) for s, r in writer.rows] == [(2, 1.5)]


def test_the_first_step_of_a_resumed_run_is_waited_for_and_logged_once(caplog):
  with caplog.at_level("INFO"):
    trainer.run(jnp.int32(5), _step, _batches([1.0, 2.0, 3.0]), start_step=5, total_steps=8,
                log_every=100, peak_lr=0.1)
  done = [r.getMessage() for r in caplog.records if "done" in r.getMessage()]
  assert len(done) == 1 and done[0].startswith("step 6 done")


def _metrics_jsonl(tmp_path, rows):
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(tmp_path)


def test_finished_summary_reports_the_last_recorded_values(tmp_path):
  workdir = _metrics_jsonl(tmp_path, [
      {"step": 10, "loss": 0.9}, {"step": 20, "loss": 0.5, "steps_per_sec": 3.0},
      {"step": 20, "knn_top1": 0.25}])
  got = trainer.finished_summary(workdir, 20, ("loss", "knn_top1", "knn_top1_random_init"))
  assert got == {"step": 20, "finished_before": True, "loss": 0.5, "knn_top1": 0.25}


def test_finished_summary_is_none_when_any_needed_key_is_missing(tmp_path):
  """A run killed during its final k-NN recorded one of the needed keys, not the other: the
  summary is None so that the caller computes the missing one."""
  workdir = _metrics_jsonl(tmp_path, [{"step": 20, "loss": 0.5, "knn_top1": 0.25}])
  keys = ("loss", "knn_top1", "knn_top1_random_init")
  assert trainer.finished_summary(workdir, 20, keys,
                                  needed=("knn_top1", "knn_top1_random_init")) is None
  assert trainer.finished_summary(workdir, 20, keys, needed=("knn_top1",))["knn_top1"] == 0.25


def test_state_shardings_lay_out_params_ema_and_optimizer_moments_like_the_params():
  """With a params sharding different from replicated: params and ema_params take it, Adam's
  mu and nu (params-shaped) follow it, the rest (step counts, rng, batch stats) is replicated."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  abstract, params = _abstract_classifier_state(with_ema=True)
  split = NamedSharding(mesh, P("data"))
  assert split != sharding.replicated(mesh)
  params_sharding = jax.tree.map(lambda _: split, params)
  got = trainer.state_shardings(abstract, params_sharding, mesh)
  assert got.params is params_sharding and got.ema_params is params_sharding
  adam = got.opt_state[0]  # ScaleByAdamState(count, mu, nu)
  assert adam.mu is params_sharding and adam.nu is params_sharding
  assert adam.count == sharding.replicated(mesh)
  rest = [got.step, got.rng] + jax.tree.leaves(got.batch_stats)
  assert all(s == sharding.replicated(mesh) for s in rest)


def test_jit_step_donates_the_state_not_the_batch():
  mesh = sharding.make_mesh(jax.devices()[:1])
  rep = sharding.replicated(mesh)
  step = trainer.jit_step(lambda s, b: (s + b, {"loss": b.sum()}), rep, rep, mesh)
  state, batch = jnp.ones(4), jnp.full((4,), 2.0)
  new_state, metrics = step(state, batch)
  assert state.is_deleted() and not batch.is_deleted()
  np.testing.assert_array_equal(new_state, 3.0)
  assert float(metrics["loss"]) == 8.0 and metrics["loss"].sharding == rep


def test_a_stop_request_records_sigterm_and_sigint_and_leaves_a_second_signal_to_the_default():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
    stop = preemption.StopRequest()
    try:
      # Both handlers are installed (checked before sending: an uncaught SIGINT would abort).
      assert all(signal.getsignal(s) != before[s] for s in before)
      assert not stop.should_stop(1)
      os.kill(os.getpid(), sig)
      assert stop.requested and stop.signal_name == name and stop.should_stop(2)
      assert signal.getsignal(sig) == signal.SIG_DFL  # a second one stops at once
    finally:
      stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_several_processes_install_no_signal_handlers(monkeypatch):
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                      lambda step: step == 5)
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  stop = preemption.StopRequest()
  assert {s: signal.getsignal(s) for s in before} == before
  assert [stop.should_stop(s) for s in (4, 5, 6)] == [False, True, True]
  assert stop.signal_name == "preemption notice"
  stop.restore()


def test_every_state_field_is_a_traced_leaf_and_ema_defaults_to_none():
  """train_state.py: a step reads and writes every field under jit (none is static), and a
  ClassifierState without an EMA carries no ema_params leaves."""
  rng = jax.random.key_data(jax.random.PRNGKey(0))
  state = TrainState(step=jnp.int32(0), params={"w": jnp.ones(2)}, opt_state=(jnp.zeros(2),),
                     rng=rng)
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s))
  new = bump(state)
  assert len(jax.tree.leaves(state)) == 4
  assert int(new.step) == 1 and np.array_equal(new.rng, rng + 1)
  probe = ClassifierState(step=jnp.int32(0), params={"w": jnp.ones(2)},
                          batch_stats={"mean": jnp.zeros(2)}, opt_state=(), rng=rng)
  assert probe.ema_params is None and len(jax.tree.leaves(probe)) == 4
  assert np.array_equal(bump(probe).batch_stats["mean"], np.ones(2))


def test_a_param_the_mesh_cannot_split_is_refused_before_any_layout():
  """A 4-way split of a dimension of 6 would fail deep inside the first jit: state_shardings
  names the param first, as one UserError."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  abstract, params = _abstract_classifier_state(with_ema=False)
  four_ways = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 1})
  params_sharding = {"w": types.SimpleNamespace(spec=("fsdp", None), mesh=four_ways),
                     "b": types.SimpleNamespace(spec=(None,), mesh=four_ways)}
  assert params["w"].shape == (4, 2)
  abstract = abstract.replace(params={"w": jax.ShapeDtypeStruct((6, 2), jnp.float32),
                                      "b": params["b"]})
  with pytest.raises(UserError, match=r"param w of shape \(6, 2\) cannot be split 4 ways"):
    trainer.state_shardings(abstract, params_sharding, mesh)


def test_the_host_waits_for_each_step_before_dispatching_the_one_after_next(monkeypatch):
  """At most the running step and one more are queued, so a stop request waits for at most
  those two before its save (not for every step dispatched since the last log)."""
  events = []
  real_wait = jax.block_until_ready

  def wait(x):
    events.append(("wait", float(x["loss"])))
    return real_wait(x)

  def step_fn(state, batch):
    events.append(("dispatch", float(batch["x"])))
    return _step(state, batch)

  monkeypatch.setattr(jax, "block_until_ready", wait)
  trainer.run(jnp.int32(0), step_fn, _batches([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), start_step=0,
              total_steps=6, log_every=100, peak_lr=0.1)
  for k in range(1, 5):  # step k's loss is k
    assert events.index(("wait", float(k))) < events.index(("dispatch", float(k + 2))), events


def test_a_non_finite_loss_in_a_run_started_at_step_0_blames_no_checkpoint():
  """A converted workdir restores checkpoint 0: there is no older one to fall back to, so a
  NaN is met with the usual advice only."""
  ckpt = FakeCheckpointer(restored=(0, True))
  with pytest.raises(trainer.NonFiniteLossError) as err:
    trainer.run(jnp.int32(0), _step, _batches([1.0, float("nan")]), start_step=0,
                total_steps=4, log_every=100, peak_lr=0.1, ckpt=ckpt, checkpoint_every=2)
  assert "resuming" not in str(err.value) and "; lower config.optim.base_lr" in str(err.value)


def test_a_signal_between_a_steps_save_decision_and_the_next_step_is_still_saved():
  """SIGTERM landing after step 2 decided not to save and before step 3 starts (traced to
  hit that instant): the run must end on a checkpoint of the step it reports as stopped at,
  never exit saying "checkpoint saved" without one."""
  ckpt = FakeCheckpointer()
  lines, first = inspect.getsourcelines(trainer.run)
  loop_head = first + next(i for i, line in enumerate(lines)
                           if line.strip().startswith("while step < total_steps"))
  fired = []

  def local(frame, event, arg):
    if event == "line" and frame.f_lineno == loop_head and frame.f_locals["step"] == 2:
      if not fired:
        fired.append(2)
        os.kill(os.getpid(), signal.SIGTERM)
    return local

  def tracer(frame, event, arg):
    return local if frame.f_code is trainer.run.__code__ else None

  previous = sys.gettrace()
  sys.settrace(tracer)
  try:
    _, summary = trainer.run(jnp.int32(0), _step, _batches([1.0] * 10), start_step=0,
                             total_steps=10, log_every=100, peak_lr=0.1, ckpt=ckpt,
                             checkpoint_every=100)
  finally:
    sys.settrace(previous)
  assert fired == [2] and summary["stopped"]
  assert ckpt.saved and ckpt.saved[-1][0] == summary["step"], (ckpt.saved, summary)


def test_the_compilation_cache_dir_expands_home_and_is_left_alone_when_empty(monkeypatch,
                                                                              tmp_path):
  """config.compilation_cache_dir ('~' allowed) becomes JAX's persistent compilation cache,
  for compiles over a second; '' keeps whatever JAX was given (the tests' session cache)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {n: getattr(jax.config, n) for n in names}
  monkeypatch.setenv("HOME", str(tmp_path))
  try:
    trainer.setup_jax(types.SimpleNamespace(compilation_cache_dir="~/xla"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
    for name, value in before.items():
      jax.config.update(name, value)
    trainer.setup_jax(types.SimpleNamespace(compilation_cache_dir=""))
    assert {n: getattr(jax.config, n) for n in names} == before
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
