"""Checkpoint failures as one-line errors, and orbax's late failure noise kept off the console.

checkpointing.py (the one module that uses orbax) raises these errors; the library's own
words go to the log. When one array of a read or write fails, the others can still finish
or fail after orbax has given up on them, with no one to catch their exceptions:
`quiet_late_reads` logs each as one line instead of a traceback around the error line.
"""

from absl import logging
import logging as logging_std
import sys
import traceback
import warnings

from etils import epath
import jax
import numpy as np

from pr_mim_jax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint that cannot be used; the message says which and why."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint whose files cannot be read or whose arrays fail their checksums."""


def short(e: Exception, limit: int = 200) -> str:
  """First line of an exception, truncated: enough to hint, not a traceback."""
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ''
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}'


def _flat(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Maps 'a/b/0'-style leaf paths to (shape, dtype).

  Works for both the target tree (dataclasses, namedtuples) and orbax's saved
  metadata tree (plain dicts/lists), which flatten to the same path strings.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      jax.tree_util.keystr(p, simple=True, separator='/'):
          (tuple(x.shape), np.dtype(x.dtype))
      for p, x in leaves}


def mismatches(saved, expected) -> list[str]:
  """Human-readable differences between saved and expected leaves."""
  saved, expected = _flat(saved), _flat(expected)
  out = []
  for k in list(expected) + [k for k in saved if k not in expected]:
    if k not in expected:
      out.append(f'{k} (only in checkpoint)')
    elif k not in saved:
      out.append(f'{k} (missing from checkpoint)')
    elif saved[k] != expected[k]:
      (s_shape, s_dtype), (e_shape, e_dtype) = saved[k], expected[k]
      out.append(f'{k}: saved {s_shape} {s_dtype}, expected {e_shape} {e_dtype}')
  return out


def _late_read(exc, tb) -> bool:
  """Whether an exception nobody catches comes from a checkpoint read or write that outlived
  a failed one: when one array fails, orbax stops waiting and closes its event loop while
  TensorStore still completes (or fails) the other arrays' operations, whose coroutines and
  callbacks then raise with no one to catch them."""
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  return any('/orbax/checkpoint/' in f.filename for f in traceback.extract_tb(tb))


class _LateTaskFilter(logging_std.Filter):
  """asyncio's "Task exception was never retrieved" for an orbax task becomes one INFO line."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and _late_read(exc, exc.__traceback__):
      record.levelno, record.levelname = logging_std.INFO, 'INFO'
      record.msg, record.args, record.exc_info, record.exc_text = (
          'A checkpoint operation ended after its read or write failed: %s',
          (short(exc, 120),), None, None)
    return True


def quiet_late_reads() -> None:
  """Those exceptions go to the log as one line each instead of to the console as tracebacks
  around the error line. They arrive as unraisable exceptions (coroutines destroyed while
  pending, TensorStore's threads), uncaught ones, asyncio's "never retrieved" log records,
  or "never awaited" warnings at exit, possibly before the failure itself reaches us, hence
  installed with the first Checkpointer; every other exception reaches the previous hooks
  unchanged."""
  if getattr(sys.unraisablehook, 'quiets_late_reads', False):
    return
  logging_std.getLogger('asyncio').addFilter(_LateTaskFilter())
  warnings.filterwarnings('ignore', r"coroutine '.*serializ", RuntimeWarning)  # orbax's I/O
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable(args):
    if _late_read(args.exc_value, args.exc_traceback):
      logging.info('A checkpoint operation ended after its read or write failed: %s',
                   short(args.exc_value, 120))
    else:
      previous_unraisable(args)

  def uncaught(exc_type, exc, tb):
    # Only the closed loop: any other exception reaching the main thread is a real failure
    # (a directory orbax cannot create, say), whatever orbax frames it passed through.
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      logging.info('A checkpoint operation ended after its read or write failed: %s',
                   short(exc, 120))
    else:
      previous_except(exc_type, exc, tb)

  unraisable.quiets_late_reads = True
  sys.unraisablehook, sys.excepthook = unraisable, uncaught


def write_failed(step, directory, e: Exception) -> CheckpointError:
  """The one-line error for a save that failed; the library's own words go to the log."""
  what = ('Creating the checkpoint directory' if step is None
          else f'Writing checkpoint step {step} to')
  logging.warning('%s %s failed: %s', what, directory, e)
  text = str(e)
  if step is not None and not epath.Path(directory).exists():
    return CheckpointError(
        f'{what} {directory} failed: the directory was deleted while the step was being '
        'written, and every checkpoint in it went with it. Rerun the same command to start '
        'afresh.')
  if 'No space left' in text or 'File too large' in text or 'Disk quota' in text:
    cause = 'the disk is full (or a file size or quota limit was hit): free space'
  elif 'Permission denied' in text or 'Read-only file system' in text:
    cause = ('the directory is not writable (permissions, or a read-only file system): make '
             'it writable')
  else:
    cause = f'{type(e).__name__}, details in the log above: fix the cause'
  return CheckpointError(
      f'{what} {directory} failed: {cause}, then rerun the same command to resume from the '
      'last complete checkpoint, which is untouched.')


def damaged(path, e: Exception) -> DamagedCheckpoint:
  """The one-line error for unreadable files; the library's own words go to the log."""
  logging.warning('Reading checkpoint %s failed: %s', path, e)
  return DamagedCheckpoint(
      f'Checkpoint {path} is damaged or unreadable ({type(e).__name__} while reading it; '
      'details in the log above). It is left untouched: move it away to resume from an '
      'older checkpoint, or point --workdir elsewhere.')
