"""A background thread that keeps the next few device batches ready.

The loader thread holds no reference to its DevicePrefetcher, so dropping the
prefetcher stops it. Live threads are joined at exit: a thread (or a TF thread it
drives) still running during interpreter teardown aborts the process.
"""

import atexit
import queue
import threading
from typing import Any, Iterator


class _Failure:
  """An exception raised in the loader thread, to re-raise in the consumer."""

  def __init__(self, exc: BaseException):
    self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
  """Blocking put that gives up once `stop` is set."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      pass
  return False


# Live loader threads and their stop events. Joined at exit: a thread (or a TF
# thread it drives) still running during interpreter teardown aborts the process.
_WORKERS: dict[threading.Thread, threading.Event] = {}
_WORKERS_LOCK = threading.Lock()


def _prefetch_worker(iterator: Iterator[Any], q: queue.Queue, stop: threading.Event):
  # Holds no reference to the DevicePrefetcher, so dropping it stops this thread.
  try:
    for item in iterator:
      if not _put(q, item, stop):
        break
  except BaseException as e:  # pylint: disable=broad-except
    _put(q, _Failure(e), stop)
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()  # shuts the tf.data pipeline down from this thread
    with _WORKERS_LOCK:
      _WORKERS.pop(threading.current_thread(), None)


@atexit.register
def _stop_workers():
  """Stops loader threads and waits for them before the interpreter tears down TF and JAX."""
  with _WORKERS_LOCK:
    workers = list(_WORKERS.items())
  for _, stop in workers:
    stop.set()
  for thread, _ in workers:
    thread.join(timeout=30)


class DevicePrefetcher:
  """Runs an iterator in a background thread, keeping up to `size` items ready.

  Starts at construction, so the first batches load while the caller compiles.
  Exceptions in the thread re-raise in the consumer. `close()` (or dropping the
  prefetcher) stops the thread, which then closes the iterator.
  """

  def __init__(self, iterator: Iterator[Any], size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=_prefetch_worker, name="device_prefetch", daemon=True,
                                    args=(iterator, self._queue, self._stop))
    with _WORKERS_LOCK:
      _WORKERS[self._thread] = self._stop
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          self._done = True
          raise StopIteration from None
    if isinstance(item, _Failure):
      self._done = True
      raise item.exc
    return item

  def close(self, timeout: float | None = None):
    """Stops the loader thread; waits up to `timeout` seconds for it to finish."""
    self._stop.set()
    self._done = True
    if timeout:
      self._thread.join(timeout)

  def __del__(self):
    self._stop.set()
