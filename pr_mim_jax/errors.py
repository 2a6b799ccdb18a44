"""The one exception type for user mistakes (configs, datasets, checkpoints, flags).

`main` catches it, prints its message on one line and exits with code 2, without a
traceback. Messages name what was wrong and how to fix it. A write that a full disk refuses
is reported on one line too (cli.storage_full), naming the file that `naming` puts on it.
"""

import contextlib
import errno
import os

# The errors of a write that the disk, a quota or a file-size limit refused.
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UserError(Exception):
  """A mistake the user can fix; its message says what and how."""


@contextlib.contextmanager
def naming(path):
  """An OSError raised inside carries `path` as its filename: a failed write() (a full disk)
  names no file, and the error line should."""
  try:
    yield
  except OSError as e:
    if e.errno is not None and e.filename is None:
      e.filename = str(path)
    raise


@contextlib.contextmanager
def storage_errors_as_os_errors(path):
  """A library that reports a full disk in its own exception type (TensorFlow's
  ResourceExhaustedError) raises it here as the OSError it is, naming `path`."""
  try:
    yield
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    for code in STORAGE_FULL:
      if os.strerror(code) in str(e):
        raise OSError(code, os.strerror(code), str(path)) from e
    raise
