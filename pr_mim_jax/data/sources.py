"""Random-access example sources: what they share, and in-memory arrays.

Image folders are in folder_sources.py, tfds datasets in tfds_sources.py.

A source has a length and gives example `i` on demand, so each process reads only
the examples its part of the batch needs. Two access styles, one per backend:

* NumPy (`raw(i)`, `image(i)`, `label(i)`): the image as stored (encoded bytes, or
  uint8 [H, W, 3] for arrays) and decoded, for the TF-free path.
* TF (`keys(indices)` then `tf_parse(key)`): `keys` runs in Python (inside a
  `tf.numpy_function`) and returns cheap per-example keys (a file path, a raw
  serialized record); `tf_parse` runs in TF ops and turns one key into
  {'image': encoded bytes, 'label'?}, so file reads and image decoding run in
  tf.data's parallel threads, not under the GIL.

This module never imports TensorFlow at import time: tfds and TF are imported
inside the functions that need them.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from pr_mim_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_PREFIX = "folder:"
SHAPES = "shapes"
OWN_DATASETS = (SHAPES,)  # dataset names of this project (besides folder:PATH and tfds names)


def tensorflow_distribution(system: str = sys.platform, machine: str = platform.machine()) -> str:
  """The TensorFlow that pip can install here: tensorflow-cpu on Linux x86-64, tensorflow on
  macOS and Linux on ARM, where tensorflow-cpu has no wheels (requirements.txt's choice too)."""
  return "tensorflow-cpu" if system == "linux" and machine == "x86_64" else "tensorflow"


TF_INSTALL = f"pip install {tensorflow_distribution()} tensorflow-datasets array-record"


def parse_dataset(name: str) -> tuple[str, str]:
  """'shapes' | 'folder:PATH' | tfds name -> (kind, arg), kind in {'shapes', 'folder', 'tfds'}."""
  if not isinstance(name, str) or not name.strip():
    raise UserError(f"data.dataset must be a non-empty string, got {name!r}; "
                    "use 'shapes', a tfds name or 'folder:/path'")
  name = name.strip()
  if name == SHAPES:
    return "shapes", ""
  if name.startswith(FOLDER_PREFIX):
    path = name[len(FOLDER_PREFIX):]
    if not path:
      raise UserError("data.dataset='folder:' has no path; write folder:/path/to/images")
    return "folder", os.path.expanduser(path)
  return "tfds", name


class ArraySource:
  """Examples held in memory: uint8 [N, H, W, 3] images and optional int labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = images  # [N, H, W, 3] uint8
    self.labels = labels  # [N] int32 or None
    self.labeled = labels is not None

  def __len__(self) -> int:
    return len(self.images)

  def image(self, i: int) -> np.ndarray:
    return self.images[i]

  def raw(self, i: int) -> np.ndarray:
    return self.images[i]  # [H, W, 3] uint8

  def label(self, i: int) -> int:
    return int(self.labels[i])

  def where(self, i: int) -> str:
    """Where example i is, for error messages."""
    return f"example {int(i)} of the in-memory dataset"


def listing(names: list[str], most: int = 10) -> str:
  """The first `most` names, comma-separated, then ', ...' if there are more."""
  return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
