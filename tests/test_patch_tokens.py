"""Tests for pr_mim_jax.patch_tokens.scatter_rows: both of its forms against a NumPy loop.

The per-example vmap form runs under meshes of several devices and the row-iota form on
one device; tests/test_sharding.py checks that the FSDP step keeps the batch sharded.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pr_mim_jax import patch_tokens
from pr_mim_jax.parallel import sharding


def numpy_scatter(x, ids, values, drop=False):
  out = np.array(x)
  for b in range(ids.shape[0]):
    for k in range(ids.shape[1]):
      if drop and not 0 <= ids[b, k] < x.shape[1]:
        continue
      out[b, ids[b, k]] = values[b, k]
  return out


@pytest.fixture(params=["iota", "vmap"])
def form(request, monkeypatch):
  monkeypatch.setattr(patch_tokens, "_on_several_devices", lambda: request.param == "vmap")
  return request.param


def test_scatter_rows_matches_numpy_with_feature_dims(form):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 10, 2, 4)).astype(np.float32)  # [B, L, ...]
  ids = np.stack([rng.permutation(10)[:6] for _ in range(3)]).astype(np.int32)  # [B, K]
  values = rng.normal(size=(3, 6, 2, 4))  # float64 values are cast to x's dtype
  got = jax.jit(patch_tokens.scatter_rows)(x, ids, values)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), numpy_scatter(x, ids, values.astype(np.float32)))


def test_scatter_rows_drop_skips_out_of_range_ids(form):
  x = np.zeros((2, 4), np.int32)
  ids = np.array([[0, 4, 2], [9, 3, 1]], np.int32)  # 4 and 9 are past L = 4
  values = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
  got = patch_tokens.scatter_rows(jnp.asarray(x), ids, values, mode="drop")
  np.testing.assert_array_equal(np.asarray(got), [[1, 0, 3, 0], [0, 6, 0, 5]])
  np.testing.assert_array_equal(np.asarray(got), numpy_scatter(x, ids, values, drop=True))


def test_one_device_takes_the_row_iota_form():
  assert not patch_tokens._on_several_devices()  # outside any mesh
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  with jax.set_mesh(mesh):
    assert not patch_tokens._on_several_devices()
    jaxpr = str(jax.make_jaxpr(patch_tokens.scatter_rows)(
        jnp.zeros((2, 5)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))))
  assert "iota" in jaxpr  # the explicit row index


def numpy_patchify(images, p):
  """Patch (i, j) of the grid -> token i * (W / p) + j, its pixels in (row, col, channel) order."""
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
  for i in range(h // p):
    for j in range(w // p):
      out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
  return out


@pytest.mark.parametrize("channels", [3, 1])
def test_patchify_and_unpatchify_match_numpy(channels):
  images = np.random.default_rng(1).normal(size=(2, 12, 12, channels)).astype(np.float32)
  tokens = np.asarray(patch_tokens.patchify(jnp.asarray(images), 4))
  np.testing.assert_array_equal(tokens, numpy_patchify(images, 4))
  # The inverse puts every pixel back: not transposed, rows not swapped with columns.
  back = np.asarray(patch_tokens.unpatchify(jnp.asarray(numpy_patchify(images, 4)), 4, channels))
  np.testing.assert_array_equal(back, images)


def test_gather_tokens_picks_rows_per_example():
  x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  ids = np.array([[4, 0], [1, 3]], np.int32)
  got = np.asarray(patch_tokens.gather_tokens(jnp.asarray(x), jnp.asarray(ids)))
  np.testing.assert_array_equal(got, np.stack([x[0, [4, 0]], x[1, [1, 3]]]))


def test_scatter_rows_casts_values_to_the_canvas_dtype(form):
  # The progressive canvas is bf16 under bf16 compute while some writers hand float32 rows:
  # the values take the canvas's dtype, with no JAX unsafe-cast warning (a future error).
  x = jnp.zeros((2, 4, 3), jnp.bfloat16)
  ids = jnp.asarray([[1, 3], [0, 2]], jnp.int32)
  values = jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 3)), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = patch_tokens.scatter_rows(x, ids, values)
  assert out.dtype == jnp.bfloat16
  ref = numpy_scatter(np.zeros((2, 4, 3), np.float32), np.asarray(ids),
                      np.asarray(values.astype(jnp.bfloat16).astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), ref)


def test_scatter_rows_passes_the_mode_on(form):
  # mode reaches the scatter: 'clip' writes out-of-range ids to the last row (the default and
  # 'drop' skip them).
  x = jnp.zeros((1, 4), jnp.int32)
  ids, values = jnp.asarray([[0, 9]], jnp.int32), jnp.asarray([[1, 2]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(patch_tokens.scatter_rows(x, ids, values, "clip")),
                                [[1, 0, 0, 2]])
  np.testing.assert_array_equal(np.asarray(patch_tokens.scatter_rows(x, ids, values)),
                                [[1, 0, 0, 0]])
