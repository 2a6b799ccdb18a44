"""Multi-process start-up: `jax.distributed.initialize` when, and only when, the job spans processes.

Where the processes come from, in order:
1. explicit values (main's --coordinator_address / --num_processes / --process_id flags),
   else the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment;
2. a Cloud TPU pod slice (several TPU_WORKER_HOSTNAMES) or a SLURM job with several tasks:
   JAX detects everything itself;
3. otherwise one process, and nothing is initialized.
Calling `initialize` twice is harmless. JAX's own runtime does all communication.
"""

import os
from typing import Mapping

import jax

from pr_mim_jax.errors import UserError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
  text = environ.get(name, "")
  try:
    return int(text) if text else default
  except ValueError:
    raise UserError(f"environment variable {name}={text!r} is not an integer") from None


def cluster_args(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                 environ: Mapping[str, str] = os.environ) -> dict | None:
  """kwargs for jax.distributed.initialize; {} = auto-detect; None = a single process."""
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
  count = num_processes or _int_env(environ, "JAX_NUM_PROCESSES", 0)
  index = process_id if process_id >= 0 else _int_env(environ, "JAX_PROCESS_ID", -1)
  if address or count or index >= 0:
    missing = [name for name, ok in (("--coordinator_address / JAX_COORDINATOR_ADDRESS", address),
                                     ("--num_processes / JAX_NUM_PROCESSES", count > 0),
                                     ("--process_id / JAX_PROCESS_ID", index >= 0)) if not ok]
    if missing:
      raise UserError(f"multi-process start needs all three of coordinator, process count and "
                      f"process id; missing {', '.join(missing)}")
    if not 0 <= index < count:
      raise UserError(f"--process_id / JAX_PROCESS_ID: {index} is outside [0, {count})")
    if count == 1:
      return None
    return {"coordinator_address": address, "num_processes": count, "process_id": index}
  if _int_env(environ, "SLURM_NTASKS", 1) > 1:
    return {}
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return {}
  return None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Start the distributed runtime if the job spans processes; True if this call started it."""
  if jax.distributed.is_initialized():
    return False
  args = cluster_args(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  # CPU-only multi-process jobs (tests, laptops) need a collectives backend; GPUs/TPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  return True
