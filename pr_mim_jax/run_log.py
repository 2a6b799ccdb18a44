"""The run's log file in its workdir, and a console that keeps library tracebacks out.

Every log record goes in full to `<workdir>/log.txt` (`log.<process>.txt` on processes
other than 0), appended across resumes. On the console, a record that carries a traceback
(orbax logs one per failed background thread when a save fails) keeps its message line
and points at the file instead, so that what fills the screen is the one `error:` line.
Remote workdirs (gs://...) get no file, and their console keeps the tracebacks.
"""

import logging
import os
import sys

from absl import logging as absl_logging
import jax


def log_path(workdir: str) -> str | None:
  """Where this process's log goes, or None for a remote workdir."""
  if "://" in workdir:
    return None
  name = "log.txt" if jax.process_index() == 0 else f"log.{jax.process_index()}.txt"
  return os.path.join(workdir, name)


class _TracebackToFile(logging.Filter):
  """Console side: drops a record's traceback and names the file that has it. The file's
  handler runs first (it sits first in the root logger's list), so it saw the traceback."""

  def __init__(self, path: str):
    super().__init__()
    self.note = f" (traceback in {path})"

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info or record.exc_text:
      record.msg, record.args = record.getMessage() + self.note, None
      record.exc_info, record.exc_text = None, None
    return True


class _RunLogHandler(logging.FileHandler):
  """The log file's handler, a class of its own so that a second attach() replaces it. When
  the file cannot be written (its disk is full, say), it says so once on the console and
  detaches, instead of printing a traceback for every line; the console then keeps the
  tracebacks, which have nowhere else to go."""

  def handleError(self, record: logging.LogRecord) -> None:
    if self in logging.getLogger().handlers:
      print(f"warning: the run's log file {self.baseFilename} cannot be written "
            f"({sys.exc_info()[1]}); the log goes on on the console only.", file=sys.stderr)
      _detach()


def _detach() -> None:
  """Removes what attach() added. The root logger gets a new list rather than an edit of
  the one it may be iterating (a handler that fails detaches while the record is being
  handled, and the console's handler must still see that record)."""
  root, console = logging.getLogger(), absl_logging.get_absl_handler()
  ours = [h for h in root.handlers if isinstance(h, _RunLogHandler)]
  root.handlers = [h for h in root.handlers if h not in ours]
  for handler in ours:
    try:
      handler.close()
    except OSError:  # flushing to a full disk
      pass
  for f in [f for f in console.filters if isinstance(f, _TracebackToFile)]:
    console.removeFilter(f)


def attach(workdir: str) -> str | None:
  """Starts the log file (after the workdir is known writable), replacing the one an
  earlier call in this process started; returns its path."""
  _detach()
  path = log_path(workdir)
  if path is None:
    return None
  handler = _RunLogHandler(path, encoding="utf-8")
  handler.setFormatter(absl_logging.PythonFormatter())
  logging.getLogger().handlers.insert(0, handler)
  absl_logging.get_absl_handler().addFilter(_TracebackToFile(path))
  return path
