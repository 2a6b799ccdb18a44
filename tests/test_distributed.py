"""Tests for multi-process start-up decisions (the runtime itself is exercised end to end elsewhere)."""

import logging
import os

import pytest

from pr_mim_jax.errors import UserError
from pr_mim_jax.parallel import distributed


def test_single_process_by_default():
  assert distributed.cluster_args(environ={}) is None
  assert distributed.cluster_args(environ={"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "h0"}) is None


def test_explicit_flags_win_over_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7"}
  assert distributed.cluster_args("host:1234", 2, 1, environ=env) == {
      "coordinator_address": "host:1234", "num_processes": 2, "process_id": 1}
  assert distributed.cluster_args(environ=env) == {
      "coordinator_address": "env:1", "num_processes": 8, "process_id": 7}


def test_one_explicit_process_is_single_process():
  assert distributed.cluster_args("host:1", 1, 0, environ={}) is None


@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
     "SLURM_LOCALID": "3", "SLURM_STEP_NUM_NODES": "1"},
    {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}])
def test_slurm_steps_and_tpu_pods_auto_detect(env):
  assert distributed.cluster_args(environ=env) == {}


@pytest.mark.parametrize("args,env,match", [
    (("host:1", 0, -1), {}, "JAX_NUM_PROCESSES"),
    (("", 2, 0), {}, "JAX_COORDINATOR_ADDRESS"),
    (("host:1", 2, -1), {}, "JAX_PROCESS_ID"),
    (("host:1", 2, 2), {}, "outside"),
    (("", 0, -1), {"JAX_NUM_PROCESSES": "two"}, "not an integer"),
])
def test_incomplete_or_bad_values_are_user_errors(args, env, match):
  with pytest.raises(UserError, match=match):
    distributed.cluster_args(*args, environ=env)


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  for name in distributed.ENV_VARS + ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize() is False  # twice is harmless


def _fake_runtime(monkeypatch, initialized=False):
  """Stubs jax.distributed and jax.config.update; returns the list of calls they get."""
  import jax  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: initialized)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("init", kw)))
  # The runtime's process count: the one the fake initialize was given.
  monkeypatch.setattr(jax, "process_count", lambda: next(
      (kw.get("num_processes", 1) for name, kw in calls if name == "init"), 1))
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
  for name in distributed.ENV_VARS + ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                      "JAX_LOCAL_DEVICE_IDS"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_passes_the_cluster_to_jax_with_cpu_collectives(monkeypatch):
  calls = _fake_runtime(monkeypatch)
  assert distributed.initialize("localhost:1234", 4, 3) is True
  assert calls == [("jax_cpu_collectives_implementation", "gloo"),
                   ("init", {"coordinator_address": "localhost:1234", "num_processes": 4,
                             "process_id": 3})]


def test_initialize_auto_detects_a_slurm_step_with_no_arguments(monkeypatch):
  calls = _fake_runtime(monkeypatch)
  for name, value in SRUN_STEP.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize() is True
  assert calls[-1] == ("init", {"local_device_ids": []})


def test_initialize_does_nothing_when_already_initialized(monkeypatch):
  calls = _fake_runtime(monkeypatch, initialized=True)
  assert distributed.initialize("host:1234", 4, 3) is False
  assert calls == []


def test_process_zero_is_a_valid_id_and_beats_the_environment():
  env = {"JAX_PROCESS_ID": "1"}
  assert distributed.cluster_args("host:1", 2, 0, environ=env) == {
      "coordinator_address": "host:1", "num_processes": 2, "process_id": 0}
  assert distributed.cluster_args(environ={"JAX_COORDINATOR_ADDRESS": "h:2",
                                           "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "0"}) == {
      "coordinator_address": "h:2", "num_processes": 3, "process_id": 0}


def test_empty_environment_variables_count_as_unset():
  env = {"JAX_COORDINATOR_ADDRESS": "", "JAX_NUM_PROCESSES": "", "JAX_PROCESS_ID": "",
         "SLURM_NTASKS": ""}
  assert distributed.cluster_args(environ=env) is None


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":1234", "localhost:99999",
                                     "localhost:0", "localhost:port"])
def test_a_coordinator_address_without_a_valid_port_is_a_user_error(address):
  # Before: "localhost" reached JAX and ended in an IndexError traceback.
  with pytest.raises(UserError, match="is not HOST:PORT"):
    distributed.cluster_args(address, 2, 0, environ={})


def test_an_ipv6_coordinator_address_is_accepted():
  assert distributed.check_address("[::1]:1234") == ("::1", 1234)


def test_a_coordinator_host_that_does_not_resolve_is_a_user_error(monkeypatch):
  # Before: JAX retried for 5 minutes, then aborted with a C++ stack trace. (The resolver is
  # stubbed: a search domain with a wildcard could resolve any name on some machines.)
  import socket  # pylint: disable=g-import-not-at-top
  real = socket.getaddrinfo

  def getaddrinfo(host, *args, **kwargs):
    if host.endswith(".invalid"):
      raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)

  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
  args = distributed.cluster_args("nohost.invalid:1234", 2, 1, environ={})
  with pytest.raises(UserError, match="'nohost.invalid' does not resolve"):
    distributed.check_reachable(args)
  distributed.check_reachable(distributed.cluster_args("localhost:1234", 2, 1, environ={}))


def test_one_process_said_alone_is_single_process():
  # Before: --num_processes=1 alone asked for a coordinator and a process id.
  assert distributed.cluster_args("", 1, -1, environ={}) is None
  assert distributed.cluster_args(environ={"JAX_NUM_PROCESSES": "1"}) is None


# A task of `srun --nodes=2 --ntasks-per-node=1` (the variables JAX's SLURM detection reads).
SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}


@pytest.mark.parametrize("outside", [
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NNODES": "1"},
])
def test_a_slurm_batch_script_or_salloc_shell_is_one_process(outside):
  # Before: SLURM_NTASKS > 1 alone meant auto-detect, and JAX, finding no srun step, raised
  # "coordinator_address should be defined" (gpu_local.sh inside `salloc -n 8`).
  assert distributed.cluster_args(environ=outside) is None


def test_slurm_tasks_per_gpu_keep_jax_default_of_one_gpu_each():
  env = dict(SRUN_STEP, SLURM_NTASKS="16")  # 8 tasks on each of 2 nodes
  assert distributed.cluster_args(environ=env) == {}


_SLURM_PROCESS = """
import jax
from pr_mim_jax.parallel import distributed
assert distributed.initialize()
visible = jax.config.values["jax_cuda_visible_devices"]
print("VISIBLE", visible, jax.process_index(), jax.process_count())
"""


def _srun_step(tasks_per_node: int, nodes: int = 2) -> list[str]:
  """Runs _SLURM_PROCESS as every task of a fake srun step on localhost; their VISIBLE lines."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  tasks = tasks_per_node * nodes
  procs = []
  for i in range(tasks):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env.update(SRUN_STEP, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(tasks),
               SLURM_STEP_NUM_NODES=str(nodes), SLURM_PROCID=str(i),
               SLURM_LOCALID=str(i % tasks_per_node), JAX_COORDINATOR_PORT=str(port),
               JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen([sys.executable, "-c", _SLURM_PROCESS], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:  # none left waiting for a coordinator after a failure
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  return [next(l for l in out.splitlines() if l.startswith("VISIBLE")) for out, _ in outs]


@pytest.mark.slow
def test_one_srun_task_per_node_sees_all_of_its_gpus():
  # Before: JAX's SLURM detection set local_device_ids=[SLURM_LOCALID], so the one process
  # of each node (launch/slurm_gpu.sbatch) drove only GPU 0 of its 8.
  assert _srun_step(tasks_per_node=1) == ["VISIBLE all 0 2", "VISIBLE all 1 2"]


@pytest.mark.slow
def test_one_srun_task_per_gpu_sees_its_own_gpu():
  assert _srun_step(tasks_per_node=2, nodes=1) == ["VISIBLE 0 0 2", "VISIBLE 1 1 2"]


def test_one_process_with_an_id_above_zero_is_a_user_error():
  with pytest.raises(UserError, match="outside"):
    distributed.cluster_args("", 1, 1, environ={})


def test_process_zero_refuses_a_coordinator_port_already_taken(monkeypatch):
  # Before: a second process started with --process_id=0 could not bind the port and hung
  # in silence while the first aborted with a C++ stack trace (ALREADY_EXISTS).
  import socket  # pylint: disable=g-import-not-at-top
  calls = _fake_runtime(monkeypatch)
  with socket.create_server(("", 0)) as taken:
    port = taken.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot listen on port {port}.*its own id"):
      distributed.initialize(f"localhost:{port}", 2, 0)
    assert calls == []
    distributed.check_reachable({"coordinator_address": f"localhost:{port}", "process_id": 1})


def test_a_process_count_the_coordinator_does_not_run_is_a_user_error(monkeypatch):
  # Before: process 1 started with --num_processes=3 joined a 2-process job in silence.
  import jax  # pylint: disable=g-import-not-at-top
  _fake_runtime(monkeypatch)
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # what the coordinator runs
  with pytest.raises(UserError, match="given 3, but the coordinator at localhost:1 runs 2"):
    distributed.initialize("localhost:1", 3, 1)
  assert distributed.initialize("localhost:1", 2, 1) is True


@pytest.mark.parametrize("address,ok", [("localhost:65535", True), ("localhost:65536", False),
                                        ("localhost:1", True)])
def test_coordinator_port_bounds_are_those_of_tcp(address, ok):
  if ok:
    assert distributed.check_address(address) == ("localhost", int(address.split(":")[1]))
  else:
    with pytest.raises(UserError, match="port in 1..65535"):
      distributed.check_address(address)


def test_a_coordinator_host_with_an_empty_label_is_a_user_error():
  # "node1..cluster" (a doubled dot) makes getaddrinfo raise UnicodeError, not gaierror.
  args = distributed.cluster_args("node1..cluster:1234", 2, 1, environ={})
  with pytest.raises(UserError, match="'node1..cluster' does not resolve"):
    distributed.check_reachable(args)


def test_a_one_task_srun_step_is_one_process():
  # `srun -n 1 python -m pr_mim_jax.main`: nothing to coordinate, no coordinator to start.
  assert distributed.cluster_args(environ=dict(SRUN_STEP, SLURM_NTASKS="1",
                                               SLURM_STEP_NUM_NODES="1")) is None


def test_explicit_processes_in_a_step_of_one_task_per_node_see_all_of_its_gpus():
  # With the address, count and id given, JAX still read SLURM_LOCALID in an srun step and
  # gave each node's one process only that GPU.
  assert distributed.cluster_args("n1:1234", 2, 1, environ=SRUN_STEP) == {
      "coordinator_address": "n1:1234", "num_processes": 2, "process_id": 1,
      "local_device_ids": []}
  assert "local_device_ids" not in distributed.cluster_args(  # one task per GPU: JAX's way
      "n1:1234", 4, 1, environ=dict(SRUN_STEP, SLURM_NTASKS="4"))
  assert "local_device_ids" not in distributed.cluster_args("n1:1234", 2, 1, environ={})


def test_process_zero_names_a_port_below_1024_as_needing_root(monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(socket, "create_server", refuse)
  with pytest.raises(UserError, match=r"cannot listen on port 80 \(Permission denied\): ports "
                                      r"below 1024 need root; choose a free port"):
    distributed.check_reachable({"coordinator_address": "localhost:80", "process_id": 0})
  # JAX_COORDINATOR_BIND_ADDRESS makes the coordinator listen elsewhere: nothing to check.
  monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "[::]:2345")
  distributed.check_reachable({"coordinator_address": "localhost:80", "process_id": 0})


def test_local_device_ids_set_by_the_user_are_left_to_jax():
  # JAX reads JAX_LOCAL_DEVICE_IDS only when initialize is given no local_device_ids.
  env = dict(SRUN_STEP, JAX_LOCAL_DEVICE_IDS="0,1")
  assert distributed.cluster_args(environ=env) == {}


@pytest.mark.parametrize("given,runs", [(3, 2), (2, 3)])
def test_a_process_count_above_or_below_the_coordinators_is_a_user_error(monkeypatch, given,
                                                                         runs):
  import jax  # pylint: disable=g-import-not-at-top
  _fake_runtime(monkeypatch)
  monkeypatch.setattr(jax, "process_count", lambda: runs)
  with pytest.raises(UserError, match=f"given {given}, but the coordinator at localhost:1 runs "
                                      f"{runs}"):
    distributed.initialize("localhost:1", given, 1)


def test_process_zero_refuses_a_port_another_program_holds_on_any_address(monkeypatch):
  # The coordinator listens on every address of its port: a program holding that port on one
  # address only (here 127.0.0.2, a loopback address other than localhost's) blocks it too.
  import socket  # pylint: disable=g-import-not-at-top
  calls = _fake_runtime(monkeypatch)
  try:
    taken = socket.create_server(("127.0.0.2", 0))
  except OSError:
    pytest.skip("no 127.0.0.2 on this machine")
  with taken:
    port = taken.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot listen on port {port}"):
      distributed.initialize(f"localhost:{port}", 2, 0)
  assert calls == []


def _slurm_env(monkeypatch, env):
  for name in list(os.environ):
    if name.startswith("SLURM_"):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)


SALLOC_SHELL = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NNODES": "1"}


def test_a_salloc_shell_warns_that_it_runs_one_process_unless_one_was_asked(monkeypatch,
                                                                          caplog):
  _fake_runtime(monkeypatch)
  _slurm_env(monkeypatch, SALLOC_SHELL)
  with caplog.at_level(logging.WARNING):
    assert distributed.initialize() is False
  assert any("no srun step: running as one process" in r.getMessage() for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert distributed.initialize(num_processes=1) is False  # launch/gpu_local.sh
  assert not caplog.records


def test_one_process_asked_inside_an_srun_step_is_not_told_it_is_outside_one(monkeypatch,
                                                                             caplog):
  _fake_runtime(monkeypatch)
  _slurm_env(monkeypatch, dict(SRUN_STEP, SLURM_NTASKS="8"))
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  with caplog.at_level(logging.WARNING):
    assert distributed.initialize() is False
  assert not any("no srun step" in r.getMessage() for r in caplog.records)


def test_explicit_processes_in_one_task_steps_of_one_node_see_all_of_its_gpus():
  # One `srun -N1 -n1` per node, the job given by the flags: JAX's SLURM default would give
  # the node's one process only GPU SLURM_LOCALID (0) of its 8.
  step = dict(SRUN_STEP, SLURM_NTASKS="1", SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="n2")
  assert distributed.cluster_args("n1:1234", 2, 1, environ=step) == {
      "coordinator_address": "n1:1234", "num_processes": 2, "process_id": 1,
      "local_device_ids": []}
  assert distributed.cluster_args(environ=step) is None  # and alone: one process, no JAX set-up


def test_mains_flag_defaults_leave_the_processes_to_the_environment():
  # python -m pr_mim_jax.main with only JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  # JAX_PROCESS_ID set: the flags' defaults must not stand for "one process" or "process 0".
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  importlib.import_module("pr_mim_jax.main")  # defines its flags
  defaults = [flags.FLAGS[name].default
              for name in ("coordinator_address", "num_processes", "process_id")]
  env = {"JAX_COORDINATOR_ADDRESS": "n1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.cluster_args(*defaults, environ=env) == {
      "coordinator_address": "n1:1234", "num_processes": 4, "process_id": 3}
  assert distributed.cluster_args(*defaults, environ={}) is None  # nothing set: one process
