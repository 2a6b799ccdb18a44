"""Keep the input pipeline's freed buffers in the process instead of handing them to the OS.

Every example allocates buffers of hundreds of KB (the decoded photo, the crop, the resize's
float planes). glibc's malloc serves them with fresh mmaps or trims the heap after each
free, so each example page-faults its memory back in. Raising three malloc thresholds
keeps the memory mapped and reused, for a few hundred MB more held by the process. What
that buys depends on what a page fault costs on the machine (JPEG benchmark, tf backend,
2-core dev machines): on 2026-11-28 the faults were a third of the pipeline's CPU time and
tuning gave each core about 1.8x the images; on 2026-12-06 it gave 7%.
`data.tune_malloc=False` turns it off; it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

# mallopt parameters (glibc malloc.h) and the values set.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20),  # buffers under 32 MiB come from the heap
            (M_TRIM_THRESHOLD, 256 << 20),  # keep up to 256 MiB free at a heap's top
            (M_TOP_PAD, 64 << 20))  # grow heaps 64 MiB at a time


@functools.cache
def tune_malloc() -> bool:
  """Set glibc's malloc thresholds once per process; False where that is not possible."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  done = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  logging.info("input pipeline: glibc malloc thresholds %s", "raised" if done else "unchanged")
  return done
