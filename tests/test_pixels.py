"""uint8 pixels to the device: the step's normalisation against the host's, and round trips."""

import jax
import jax.numpy as jnp
import numpy as np

from pr_mim_jax.data import pixels


def _all_pixels():
  """uint8 [256, 1, 3]: every value in every channel."""
  return np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)


def test_device_normalisation_equals_the_hosts_within_float_rounding():
  x = _all_pixels()
  # An independent reference: the ImageNet statistics written out, in float64.
  want = (x.astype(np.float64) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  host = pixels.normalize(x)
  device = np.asarray(jax.jit(pixels.model_input)(jnp.asarray(x)))
  assert host.dtype == device.dtype == np.float32
  np.testing.assert_allclose(host, want, rtol=0, atol=1e-5)
  # float32 rounding: a few units in the last place of values up to |2.7|.
  np.testing.assert_allclose(device, host, rtol=0, atol=4 * np.finfo(np.float32).eps * 4)


def test_float_batches_pass_unchanged():
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(pixels.model_input)(x)), x)
  np.testing.assert_array_equal(pixels.normalized(x), x)


def test_round_trip_and_host_twin():
  x = _all_pixels()
  np.testing.assert_array_equal(pixels.denormalize(pixels.normalize(x)), x)
  np.testing.assert_array_equal(pixels.denormalize(x), x)  # pixels stay pixels
  np.testing.assert_array_equal(pixels.normalized(x), pixels.normalize(x))

