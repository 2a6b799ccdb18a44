"""How images travel: uint8 pixels from host to device, normalised float32 inside the step.

The pipeline's batches hold uint8 [B, S, S, 3] pixels, a quarter of float32's bytes on the
host-to-device link. The one exception is fine-tuning's RandAugment recipe: random erasing
writes normal noise in normalised space, values no uint8 pixel has, so those batches arrive
as float32, already normalised. `model_input` is the first op of every jitted step and
accepts both; `normalized` is its host-side twin for pictures.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# ImageNet normalisation, as MAE.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN255 = np.asarray(MEAN, np.float32) * 255  # [3]
STD255 = np.asarray(STD, np.float32) * 255  # [3]


def normalize(images) -> np.ndarray:
  """[..., 3] pixels in [0, 255] (any dtype) -> float32 normalised with MEAN / STD, on the host."""
  return (np.asarray(images, np.float32) - MEAN255) / STD255


def normalized(images) -> np.ndarray:
  """A batch as the model sees it, on the host: uint8 pixels are normalised, float passes."""
  images = np.asarray(images)
  return normalize(images) if images.dtype == np.uint8 else images.astype(np.float32)


def model_input(images):
  """The step's first op: uint8 [..., 3] pixels -> float32 normalised; float passes unchanged.

  The same arithmetic as `normalize` (float32 subtract, then divide), so device and host
  agree within float rounding.
  """
  if images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) - jnp.asarray(MEAN255)) / jnp.asarray(STD255)


def denormalize(images) -> np.ndarray:
  """Normalised float [..., 3] -> uint8 pixels (for PNGs); uint8 pixels pass unchanged."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  x = images.astype(np.float32) * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
