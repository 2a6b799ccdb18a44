"""TensorFlow without GPUs: JAX owns the accelerators, TensorFlow only works on the host.

The TF input pipeline (augment.py) calls `hide_gpus` when it loads, and so do the metric
writers before clu (which imports TF) loads, so neither takes GPU memory from JAX.
"""

import tensorflow as tf


def hide_gpus() -> None:
  """Make every GPU invisible to TensorFlow (effective before TF first touches a device)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices; nothing can change that now
    pass
