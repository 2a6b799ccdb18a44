"""Multi-process start-up: `jax.distributed.initialize` when the job spans processes, only then.

Where the processes come from, in order:
1. explicit values (main's --coordinator_address / --num_processes / --process_id flags),
   else the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment;
2. a Cloud TPU pod slice (several TPU_WORKER_HOSTNAMES) or a SLURM job step (`srun`) with
   several tasks: JAX detects everything itself;
3. otherwise one process, and nothing is initialized. `--num_processes=1` (or
   JAX_NUM_PROCESSES=1) alone also means one process.
In a SLURM step of one task per node each task drives all of its node's GPUs (JAX alone
would give it only the GPU numbered SLURM_LOCALID), whichever way the processes were
found. Calling `initialize` twice is harmless. JAX's own runtime does all communication.
"""

import errno
import logging
import os
import socket
from typing import Mapping

import jax

from pr_mim_jax.errors import UserError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
ADDRESS = "--coordinator_address / JAX_COORDINATOR_ADDRESS"  # how errors name the address
# What JAX's SLURM detection reads: present inside an `srun` step, not in a batch script or
# an `salloc` shell, which carry SLURM_NTASKS of the whole allocation.
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
  text = environ.get(name, "")
  try:
    return int(text) if text else default
  except ValueError:
    raise UserError(f"environment variable {name}={text!r} is not an integer") from None


def check_address(address: str) -> tuple[str, int]:
  """(host, port) of a HOST:PORT coordinator address; a UserError naming what is wrong."""
  host, colon, port = address.rpartition(":")
  if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"{ADDRESS}: {address!r} is not HOST:PORT with a port in 1..65535; give "
                    "process 0's host and a free port, e.g. 10.0.0.1:12345")
  return host.strip("[]"), int(port)  # [::1]:port is an IPv6 host


def _slurm_step_tasks(environ: Mapping[str, str]) -> int:
  """Tasks of the SLURM step this process belongs to; 0 outside an `srun` step."""
  if not all(environ.get(name) for name in SLURM_STEP_VARS):
    return 0
  return _int_env(environ, "SLURM_NTASKS", 0)


def _whole_nodes(environ: Mapping[str, str]) -> dict:
  """{'local_device_ids': []} in a SLURM step of one task per node, unless
  JAX_LOCAL_DEVICE_IDS chooses: [] restricts nothing, where JAX's SLURM default would give
  each task only the GPU numbered SLURM_LOCALID. That includes a step of one task on one
  node whose process joins a job given by the flags (one `srun -N1 -n1` per node). {}
  otherwise."""
  tasks = _slurm_step_tasks(environ)
  if (tasks >= 1 and tasks == _int_env(environ, "SLURM_STEP_NUM_NODES", 0)
      and not environ.get("JAX_LOCAL_DEVICE_IDS")):
    return {"local_device_ids": []}
  return {}


def cluster_args(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                 environ: Mapping[str, str] = os.environ) -> dict | None:
  """kwargs for jax.distributed.initialize; {} = auto-detect; None = a single process."""
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
  count = num_processes or _int_env(environ, "JAX_NUM_PROCESSES", 0)
  index = process_id if process_id >= 0 else _int_env(environ, "JAX_PROCESS_ID", -1)
  if count == 1:  # one process, said explicitly
    if index > 0:
      raise UserError(f"--process_id / JAX_PROCESS_ID: {index} is outside [0, 1)")
    return None
  if address or count or index >= 0:
    missing = [name for name, ok in ((ADDRESS, address),
                                     ("--num_processes / JAX_NUM_PROCESSES", count > 0),
                                     ("--process_id / JAX_PROCESS_ID", index >= 0)) if not ok]
    if missing:
      raise UserError(f"multi-process start needs all three of coordinator, process count and "
                      f"process id; missing {', '.join(missing)}")
    if not 0 <= index < count:
      raise UserError(f"--process_id / JAX_PROCESS_ID: {index} is outside [0, {count})")
    check_address(address)
    return {"coordinator_address": address, "num_processes": count, "process_id": index,
            **_whole_nodes(environ)}
  if _slurm_step_tasks(environ) > 1:
    return _whole_nodes(environ)
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return {}
  return None


def check_reachable(args: dict) -> None:
  """A UserError when the coordinator's host name does not resolve, or, on process 0, when
  its port is taken (a second process 0, or another program): JAX would wait for minutes
  or abort with a C++ stack trace."""
  if "coordinator_address" not in args:
    return
  host, port = check_address(args["coordinator_address"])
  try:
    socket.getaddrinfo(host, port)
  except (socket.gaierror, UnicodeError) as e:
    raise UserError(f"{ADDRESS}: host {host!r} does not resolve ({e}); give process 0's host "
                    "name or IP address") from None
  # The coordinator listens on every address at this port, unless told another place.
  if args["process_id"] == 0 and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    try:
      socket.create_server(("", port)).close()
    except OSError as e:
      reason = os.strerror(e.errno) if e.errno else str(e)
      why = ("ports below 1024 need root" if e.errno == errno.EACCES else
             "another program, or a second process started with --process_id=0, holds it")
      raise UserError(f"{ADDRESS}: process 0 cannot listen on port {port} ({reason}): {why}; "
                      "choose a free port, and give each process its own id") from None


def check_process_count(args: dict) -> None:
  """A UserError when this process was told another process count than the coordinator's
  (JAX would quietly use the coordinator's)."""
  wanted = args.get("num_processes")
  if wanted and jax.process_count() != wanted:
    raise UserError(f"--num_processes / JAX_NUM_PROCESSES: this process was given {wanted}, "
                    f"but the coordinator at {args['coordinator_address']} runs "
                    f"{jax.process_count()} processes; give every process the same count")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Start the distributed runtime if the job spans processes; True if this call started it."""
  if jax.distributed.is_initialized():
    return False
  args = cluster_args(coordinator_address, num_processes, process_id)
  if args is None:
    if (num_processes != 1 and _int_env(os.environ, "SLURM_NTASKS", 1) > 1
        and not _slurm_step_tasks(os.environ)):
      logging.warning("SLURM_NTASKS=%s, but this is no srun step: running as one process "
                      "(start every task with srun, as launch/slurm_gpu.sbatch does)",
                      os.environ["SLURM_NTASKS"])
    return False
  check_reachable(args)
  # CPU-only multi-process jobs (tests, laptops) need a collectives backend; GPUs/TPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  check_process_count(args)
  return True
