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



def test_denormalize_saturates_out_of_range_values():
  """A reconstruction may leave [0, 255] after un-normalising: it clips, it does not wrap
  around uint8 (300 would become 44, -20 would become 236)."""
  x = np.array([[[5.0, 5.0, 5.0], [-5.0, -5.0, -5.0], [3.0, -3.0, 0.0]]], np.float32)
  want_last = np.clip(np.round((np.array([3.0, -3.0, 0.0]) * np.array(pixels.STD)
                                + np.array(pixels.MEAN)) * 255), 0, 255)
  np.testing.assert_array_equal(pixels.denormalize(x),
                                [[[255, 255, 255], [0, 0, 0], want_last]])


def test_non_uint8_batches_are_never_renormalised():
  """Only uint8 means pixels: float64 / bfloat16 batches are already normalised."""
  x = np.random.default_rng(1).standard_normal((2, 3, 3))
  np.testing.assert_array_equal(pixels.normalized(x), x.astype(np.float32))
  assert pixels.normalized(x).dtype == np.float32
  bf16 = jnp.asarray(x, jnp.bfloat16)
  out = pixels.model_input(bf16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(bf16, np.float32))


def test_host_twin_agrees_with_the_step_for_every_dtype():
  """`normalized` is `model_input` on the host: for each dtype a batch may arrive in, both give
  the same values (only uint8 is treated as pixels; other integers pass as numbers)."""
  x = _all_pixels()
  for dtype in (np.uint8, np.int32, np.uint16, np.float16, np.float32):
    batch = x.astype(dtype)
    device = np.asarray(pixels.model_input(jnp.asarray(batch)), np.float32)
    np.testing.assert_allclose(pixels.normalized(batch), device, rtol=0, atol=1e-5,
                               err_msg=str(dtype))
