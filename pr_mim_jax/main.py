r"""Command line: python -m pr_mim_jax.main --config=pr_mim_jax/configs/FILE.py[:k=v,...] --workdir=DIR [--config.x=y]

config.mode picks the job: pretrain (pr_mim_jax/configs/pretrain.py), linear_probe
(pr_mim_jax/configs/linear_probe.py), finetune (pr_mim_jax/configs/finetune.py) or knn (pr_mim_jax/configs/knn.py).

Invalid flags and config values stop before anything compiles, with one line that
names the field and the fix, and exit code 2.
"""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

from pr_mim_jax import cli
from pr_mim_jax import log_filters

_CONFIG = cli.define_config_file("config", None, "Config file, big_vision style.",
                                 lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and pictures go "
                               "(local path or gs://). Rerunning with the same workdir resumes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a "
                                   "multi-process run outside TPU pods and SLURM (or "
                                   "JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (or JAX_PROCESS_ID).")

MODES = ("pretrain", "linear_probe", "finetune", "knn")
REQUIRED = {"config": "pr_mim_jax/configs/pretrain.py:dataset=shapes", "workdir": "workdirs/demo"}


def _run() -> int:
  config = _CONFIG.value
  mode = cli.config_kind(config)  # one of MODES: cli.run checked it
  # pylint: disable=g-import-not-at-top,g-multiple-import
  from pr_mim_jax import run_log
  from pr_mim_jax.parallel import distributed
  import jax
  from pr_mim_jax.training import config_validation, pretrain, trainer, workdir_records
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if mode == "pretrain":
    run, check = pretrain.train, pretrain.check_config
  else:
    from pr_mim_jax.evaluation import classify, knn_eval  # pylint: disable=g-import-not-at-top
    run, check = ((knn_eval.knn_eval, knn_eval.check_knn_config) if mode == "knn"
                  else (classify.train, classify.check_config))
  if (config.get("init") and config.init.get("workdir") or "").startswith("~"):  # as --workdir
    config.init.workdir = os.path.expanduser(config.init.workdir)
  checked = check(config)  # before INFO logging, so a mistake prints one line
  if mode == "pretrain":  # before the workdir is made
    from pr_mim_jax.data import datasets  # pylint: disable=g-import-not-at-top
    datasets.check_workdir_outside_images(config.data, _WORKDIR.value)
  elif mode == "knn":  # before the run log appends to another run's log.txt
    knn_eval.check_knn_workdir(_WORKDIR.value)
  config_validation.validate_attention_backend(config.model, jax.default_backend())
  workdir_records.check_run_kind(_WORKDIR.value, config)  # before its log.txt is appended to
  workdir_records.check_writable(_WORKDIR.value)
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(lambda r: not log_filters.is_narration(r))
  run_log.attach(_WORKDIR.value)
  try:
    summary = run(config, _WORKDIR.value, checked)
  except trainer.NonFiniteLossError as e:
    cli.print_error(str(e))
    return 1
  logging.info("done: %s", summary)
  return 0


def main(argv=None) -> int:
  return cli.run(_run, REQUIRED, argv, config_kinds=MODES,
                 interrupted="the checkpoints already saved are kept; rerun the same command "
                             "to resume")


if __name__ == "__main__":
  sys.exit(main())
