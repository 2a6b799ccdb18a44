"""Tests for pr_mim_jax.run_log: the full log in the workdir, tracebacks kept off the console."""

import io
import logging
import re

from absl import logging as absl_logging

from pr_mim_jax import run_log


def test_remote_workdirs_get_no_file_and_process_0_gets_log_txt(tmp_path):
  assert run_log.log_path("gs://bucket/run") is None
  assert run_log.log_path(str(tmp_path)) == str(tmp_path / "log.txt")
  assert run_log.log_path(str(tmp_path / "run:2")) == str(tmp_path / "run:2" / "log.txt")


def test_the_file_keeps_the_traceback_and_the_console_names_the_file(tmp_path):
  """The same arrangement attach() makes on the root logger, on a private logger: the file's
  handler first, then a console handler carrying the filter."""
  logger = logging.getLogger("test_run_log")
  logger.propagate = False
  logger.setLevel(logging.INFO)
  path = str(tmp_path / "log.txt")
  to_file = logging.FileHandler(path)
  to_file.setFormatter(absl_logging.PythonFormatter())
  console = io.StringIO()
  to_console = logging.StreamHandler(console)
  to_console.addFilter(run_log._TracebackToFile(path))  # pylint: disable=protected-access
  logger.handlers = [to_file, to_console]
  try:
    raise ValueError("disk 100% full")
  except ValueError:
    logger.exception("Save thread failed at %s", "step 16")
  logger.info("a plain line")
  to_file.close()
  text = open(path).read()
  assert "Save thread failed at step 16" in text and "Traceback" in text
  assert "ValueError: disk 100% full" in text
  assert console.getvalue().splitlines() == [
      f"Save thread failed at step 16 (traceback in {path})", "a plain line"]


def test_attach_writes_every_line_and_a_second_call_replaces_the_first(tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  first.mkdir()
  second.mkdir()
  try:
    assert run_log.attach(str(first)) == str(first / "log.txt")
    absl_logging.warning("one")
    assert run_log.attach(str(second)) == str(second / "log.txt")
    absl_logging.warning("two")
  finally:
    run_log.attach("gs://detach")  # a remote workdir: no file, and nothing left attached
  assert sum(isinstance(h, run_log._RunLogHandler)  # pylint: disable=protected-access
             for h in logging.getLogger().handlers) == 0
  one, two = (first / "log.txt").read_text(), (second / "log.txt").read_text()
  assert "one" in one and "two" not in one
  assert "two" in two and "one" not in two


def test_attach_puts_the_file_first_and_keeps_tracebacks_off_the_console(tmp_path, capsys):
  """attach() itself, on the root logger and absl's console handler, as the command uses
  them (before flags are parsed, absl's handler writes to sys.stderr)."""
  logging.getLogger().addHandler(absl_logging.get_absl_handler())
  try:
    path = run_log.attach(str(tmp_path))
    try:
      raise OSError(28, "No space left on device")
    except OSError:
      absl_logging.exception("save thread failed")
  finally:
    run_log.attach("gs://detach")
    logging.getLogger().removeHandler(absl_logging.get_absl_handler())
  text = open(path).read()
  assert "save thread failed" in text and "Traceback" in text and "No space left" in text
  shown = capsys.readouterr().err
  assert f"save thread failed (traceback in {path})" in shown and "Traceback" not in shown


def test_a_log_file_that_cannot_be_written_says_so_once_and_detaches(tmp_path, capsys):
  logging.getLogger().handlers.insert(0, absl_logging.get_absl_handler())  # right after ours
  try:
    run_log.attach(str(tmp_path))
    ours = logging.getLogger().handlers[0]
    ours.stream.close()
    ours.stream = open("/dev/full", "w")  # every write fails with ENOSPC
    for i in range(3):
      absl_logging.warning("line %d", i)
  finally:
    run_log.attach("gs://detach")
    logging.getLogger().removeHandler(absl_logging.get_absl_handler())
  err = capsys.readouterr().err
  assert err.count("warning: the run's log file") == 1 and "Traceback" not in err
  assert [l.split("] ")[-1] for l in err.splitlines() if "test_run_log.py" in l] == [
      "line 0", "line 1", "line 2"]  # the line that failed still reaches the console


def test_every_other_process_gets_a_log_file_of_its_own(tmp_path, monkeypatch):
  """Processes share a workdir: a second process writing log.txt would interleave its lines
  with process 0's, so each names its file by its index."""
  monkeypatch.setattr(run_log.jax, "process_index", lambda: 3)
  assert run_log.log_path(str(tmp_path)) == str(tmp_path / "log.3.txt")
  assert run_log.log_path("gs://bucket/run") is None


def test_a_traceback_already_rendered_as_text_is_kept_off_the_console_too(tmp_path):
  """A record may carry its traceback only as exc_text (rendered earlier, exc_info gone):
  the console still gets the message and the file's name, not the traceback."""
  record = logging.LogRecord("t", logging.ERROR, __file__, 1, "save of %s failed", ("step 8",),
                             None)
  record.exc_text = "Traceback (most recent call last):\n  ...\nOSError: disk full"
  note = run_log._TracebackToFile(str(tmp_path / "log.txt"))  # pylint: disable=protected-access
  assert note.filter(record)
  assert record.exc_text is None and record.exc_info is None
  assert record.getMessage() == f"save of step 8 failed (traceback in {tmp_path / 'log.txt'})"


def test_a_resumed_run_appends_to_the_log_file_in_absl_format(tmp_path):
  (tmp_path / "log.txt").write_text("the first run's line\n")
  try:
    run_log.attach(str(tmp_path))
    absl_logging.warning("resumed at step %d", 8)
  finally:
    run_log.attach("gs://detach")
  lines = (tmp_path / "log.txt").read_text().splitlines()
  assert lines[0] == "the first run's line"
  assert re.fullmatch(r"W\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ test_run_log\.py:\d+\] resumed at step 8",
                      lines[1]), lines[1]


def test_the_console_note_keeps_messages_that_are_not_format_strings(tmp_path):
  """A failure logged as the exception object itself, and a workdir whose name holds '%'."""
  path = str(tmp_path / "100%" / "log.txt")
  note = run_log._TracebackToFile(path)  # pylint: disable=protected-access
  raw = logging.LogRecord("t", logging.ERROR, __file__, 1, OSError(28, "No space left"), None,
                          None)
  formatted = logging.LogRecord("t", logging.ERROR, __file__, 1, "save of %s failed",
                                ("step 8",), None)
  for record in (raw, formatted):
    record.exc_text = "Traceback (most recent call last):\n  ...\nOSError: disk full"
    assert note.filter(record)
  assert raw.getMessage() == f"[Errno 28] No space left (traceback in {path})"
  assert formatted.getMessage() == f"save of step 8 failed (traceback in {path})"
