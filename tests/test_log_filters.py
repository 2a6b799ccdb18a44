"""The start-up log filter drops jax's 'no libtpu' line and nothing else."""

import logging

import pytest

from pr_mim_jax import log_filters

NO_LIBTPU = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
             "cannot open shared object file: No such file or directory")


def _record(message, name=log_filters.JAX_BACKEND_LOGGER, level=logging.INFO):
  return logging.LogRecord(name, level, "xla_bridge.py", 1, message, None, None)


def test_drops_the_missing_libtpu_line():
  assert log_filters.is_missing_libtpu(_record(NO_LIBTPU))
  assert not log_filters.DropMissingLibtpu().filter(_record(NO_LIBTPU))


@pytest.mark.parametrize("record", [
    _record("Unable to initialize backend 'tpu': INTERNAL: TPU initialization failed: "
            "open(/dev/accel0): Device or resource busy"),  # libtpu present, TPU busy: news
    _record("Unable to initialize backend 'cuda': FAILED_PRECONDITION: No visible GPU devices."),
    _record("A Google TPU may be present on this machine, but either a TPU-enabled jaxlib or "
            "libtpu is not installed. Falling back to cpu.", level=logging.WARNING),
    _record(NO_LIBTPU, level=logging.WARNING),  # raised above INFO by someone: keep it
    _record(NO_LIBTPU, name="pr_mim_jax"),  # another logger
    _record("Unable to initialize backend 'tpu': INTERNAL: Failed to open libnuma.so.1: "
            "cannot open shared object file: No such file or directory"),  # not libtpu
    _record("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: "
            "/usr/lib/libtpu.so: undefined symbol: TpuExecutor_Create"),  # installed, broken
    _record("Compiling train_step with global shapes and types"),
])
def test_passes_every_other_line(record):
  assert log_filters.DropMissingLibtpu().filter(record)


def test_install_filters_the_jax_logger_once(caplog):
  logger = logging.getLogger(log_filters.JAX_BACKEND_LOGGER)
  before = list(logger.filters)
  try:
    log_filters.install()
    log_filters.install()
    assert sum(isinstance(f, log_filters.DropMissingLibtpu) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=log_filters.JAX_BACKEND_LOGGER):
      logger.info(NO_LIBTPU)
      logger.info("Unable to initialize backend 'rocm': NOT_FOUND: no ROCm devices")
    assert [r.getMessage() for r in caplog.records] == [
        "Unable to initialize backend 'rocm': NOT_FOUND: no ROCm devices"]
  finally:
    logger.filters[:] = before


def _at(pathname, message, level=logging.INFO):
  return logging.LogRecord("absl", level, pathname, 1, message, None, None)


@pytest.mark.parametrize("record,dropped", [
    (_at("/site-packages/orbax/checkpoint/checkpoint_manager.py", "Saving checkpoint 3"), True),
    (_at("/site-packages/orbax/checkpoint/checkpoint_manager.py", "Save failed",
         logging.WARNING), False),
    (_at("/site-packages/tensorflow_datasets/core/dataset_builder.py",
         "Generating dataset shapes (/root/tensorflow_datasets/shapes/1.1.0)"), True),
    (_at("/site-packages/tensorflow_datasets/core/dataset_info.py", "Load dataset info"), False),
    (_at("/work/pr_mim_jax/training/pretrain.py", "saving checkpoint 3 in /w/checkpoints"), False),
    (_at("/home/me/orbax_trials/train.py", "step 3: loss 0.41"), False),  # not orbax's own code
])
def test_narration_is_orbax_info_and_tfds_generating_only(record, dropped):
  assert log_filters.is_narration(record) == dropped
