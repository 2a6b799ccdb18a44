"""Drop known, harmless start-up log lines; everything else passes unchanged.

On a machine without libtpu, jax logs (INFO, logger `jax._src.xla_bridge`) that it could
not initialize the 'tpu' backend because libtpu.so is missing, on every run. That is the
expected state of a CPU or GPU host, not news. A TPU that jax cannot use is still reported:
libtpu that is installed but fails keeps its line, and jax's own warning "A Google TPU may
be present on this machine ..." is another message, untouched.
"""

import logging

JAX_BACKEND_LOGGER = "jax._src.xla_bridge"
# How the loader words "libtpu.so is not there"; other failures (installed but broken) stay.
_NOT_INSTALLED = ("cannot open shared object file", "No such file or directory")


def is_missing_libtpu(record: logging.LogRecord) -> bool:
  """Whether `record` only says that the 'tpu' backend is absent because libtpu is not installed."""
  if record.name != JAX_BACKEND_LOGGER or record.levelno > logging.INFO:
    return False
  message = record.getMessage()
  return (message.startswith("Unable to initialize backend 'tpu'") and "libtpu" in message
          and any(reason in message for reason in _NOT_INSTALLED))


class DropMissingLibtpu(logging.Filter):
  """Drops the 'no libtpu' INFO line of jax's backend start-up."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not is_missing_libtpu(record)


def is_narration(record: logging.LogRecord) -> bool:
  """INFO lines that repeat what our own log says: orbax narrating every save, and tfds's
  "Generating dataset shapes" (the shapes builder prints its own line with an estimate)."""
  if record.levelno >= logging.WARNING:
    return False
  return "/orbax/" in record.pathname or (
      "/tensorflow_datasets/" in record.pathname
      and record.getMessage().startswith("Generating dataset"))


def install() -> None:
  """Attach the filters to their loggers (once; later calls do nothing)."""
  logger = logging.getLogger(JAX_BACKEND_LOGGER)
  if not any(isinstance(f, DropMissingLibtpu) for f in logger.filters):
    logger.addFilter(DropMissingLibtpu())
