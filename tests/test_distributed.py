"""Tests for multi-process start-up decisions (the runtime itself is exercised end to end elsewhere)."""

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


@pytest.mark.parametrize("env", [{"SLURM_NTASKS": "4"}, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}])
def test_slurm_and_tpu_pods_auto_detect(env):
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
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
  for name in distributed.ENV_VARS + ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_passes_the_cluster_to_jax_with_cpu_collectives(monkeypatch):
  calls = _fake_runtime(monkeypatch)
  assert distributed.initialize("host:1234", 4, 3) is True
  assert calls == [("jax_cpu_collectives_implementation", "gloo"),
                   ("init", {"coordinator_address": "host:1234", "num_processes": 4,
                             "process_id": 3})]


def test_initialize_auto_detects_a_slurm_job_with_no_arguments(monkeypatch):
  calls = _fake_runtime(monkeypatch)
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.initialize() is True
  assert calls[-1] == ("init", {})


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
