"""Tests for pr_mim_jax.method.furthest_sampling and the coverage it gives make_masks('furthest')."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr_mim_jax.method import furthest_sampling
from pr_mim_jax.method import masking
from conftest import run_with_fake_devices


def _fps_numpy(noise, kept, grid, num_samples):
  """Plain re-implementation: loops over examples and picks, brute-force distances."""
  batch, length = noise.shape
  rows, cols = np.divmod(np.arange(length), grid)
  out = np.zeros((batch, num_samples), np.int32)
  for b in range(batch):
    chosen = [l for l in range(length) if kept[b, l]]
    for i in range(num_samples):
      cand = np.array([l for l in range(length) if l not in chosen])  # explicit exclusion
      if chosen:
        sq = ((rows[cand, None] - rows[chosen]) ** 2 + (cols[cand, None] - cols[chosen]) ** 2)
        nearest = sq.min(axis=1)
      else:
        nearest = np.full(len(cand), 2 * grid * grid)
      # Same float32 arithmetic as the op: integer distance + 0.5 * noise.
      score = nearest.astype(np.float32) + np.float32(0.5) * noise[b, cand].astype(np.float32)
      out[b, i] = cand[np.argmax(score)]
      chosen.append(int(out[b, i]))
  return out


def _random_inputs(seed, batch, grid, visible):
  rng = np.random.default_rng(seed)
  noise = rng.random((batch, grid * grid), dtype=np.float32)
  kept = np.zeros((batch, grid * grid), bool)
  for b in range(batch):
    kept[b, rng.choice(grid * grid, visible, replace=False)] = True
  return noise, kept


_fps_jit = jax.jit(furthest_sampling.furthest_point_sample, static_argnums=(2, 3))


@pytest.mark.parametrize('grid,visible,num_samples', [
    (3, 2, 7),  # every masked patch: picks are a permutation of them
    (5, 6, 19),
    (7, 12, 37),
    (7, 1, 20),
    (14, 49, 49),
])
def test_matches_numpy_reference(grid, visible, num_samples):
  noise, kept = _random_inputs(grid * 100 + visible, 4, grid, visible)
  got = np.asarray(_fps_jit(jnp.asarray(noise), jnp.asarray(kept), grid, num_samples))
  assert got.dtype == np.int32 and got.shape == (4, num_samples)
  np.testing.assert_array_equal(got, _fps_numpy(noise, kept, grid, num_samples))


def test_never_repicks_kept_or_chosen():
  # Kept and chosen patches sit at distance 0 and unchosen masked ones at >= 1, so asking for
  # every masked patch must give each exactly once, none of them kept.
  grid, visible = 6, 5
  noise, kept = _random_inputs(0, 8, grid, visible)
  got = np.asarray(_fps_jit(jnp.asarray(noise), jnp.asarray(kept), grid, 36 - visible))
  for b in range(8):
    assert sorted(got[b]) == sorted(np.flatnonzero(~kept[b]))


def test_noise_not_matching_the_grid_raises():
  with pytest.raises(ValueError, match='grid'):
    furthest_sampling.furthest_point_sample(jnp.zeros((2, 16)), jnp.zeros((2, 16), bool), 5, 3)


def test_kept_sq_distance_matches_brute_force():
  grid = 7
  _, kept = _random_inputs(1, 6, grid, 5)
  kept[0] = False  # nothing kept: at least 2 * grid**2 everywhere
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  pair = (rows[:, None] - rows) ** 2 + (cols[:, None] - cols) ** 2  # [L, L]
  got = np.asarray(furthest_sampling.kept_sq_distance(jnp.asarray(kept), grid))
  for b in range(1, 6):
    np.testing.assert_array_equal(got[b], pair[:, kept[b]].min(axis=1))
  assert (got[0] >= 2 * grid * grid).all()


def test_hand_case_opposite_corner_first():
  # 3x3 grid, only the top-left corner (patch 0) visible.
  #   0 1 2
  #   3 4 5
  #   6 7 8
  # Patch 8 is furthest (squared distance 8). Then 2 and 6 tie at 4 (noise decides), then
  # the centre 4 at 2; the rest are at 1.
  kept = np.zeros((2, 9), bool)
  kept[:, 0] = True
  noise = np.full((2, 9), 0.5, np.float32)
  noise[0, 2], noise[1, 6] = 0.9, 0.9
  got = np.asarray(furthest_sampling.furthest_point_sample(
      jnp.asarray(noise), jnp.asarray(kept), 3, 4))
  np.testing.assert_array_equal(got, [[8, 2, 6, 4], [8, 6, 2, 4]])


def test_ties_broken_by_noise():
  # Centre visible: all four corners tie at squared distance 2; the noise picks one.
  kept = np.zeros((32, 9), bool)
  kept[:, 4] = True
  noise = np.asarray(jax.random.uniform(jax.random.key(0), (32, 9)))
  got = np.asarray(_fps_jit(jnp.asarray(noise), jnp.asarray(kept), 3, 1))[:, 0]
  corners = np.array([0, 2, 6, 8])
  np.testing.assert_array_equal(got, corners[np.argmax(noise[:, corners], axis=1)])
  assert len(set(got.tolist())) == 4  # different noise, different picks


@pytest.mark.slow
def test_furthest_masks_cover_every_thrown_patch():
  # 14x14, mask 0.75, throw 0.5: 49 visible, 49 decoded, 98 thrown (the paper's Fig. 5).
  grid, batch = 14, 256
  split = masking.token_split(grid * grid, 0.75, 0.5)
  rows, cols = np.divmod(np.arange(grid * grid), grid)

  def nearest_kept(masks):
    kept = np.concatenate([np.asarray(masks.ids_vis), np.asarray(masks.ids_dec)], axis=1)
    thrown = np.asarray(masks.ids_throw)
    dr = rows[thrown][:, :, None] - rows[kept][:, None, :]  # [B, n_throw, n_kept]
    dc = cols[thrown][:, :, None] - cols[kept][:, None, :]
    cheb = np.maximum(np.abs(dr), np.abs(dc)).min(axis=2)  # [B, n_throw]
    eucl = np.sqrt(dr ** 2 + dc ** 2).min(axis=2)
    return cheb, eucl

  make = lambda s: jax.jit(functools.partial(  # noqa: E731
      masking.make_masks, batch=batch, split=split, strategy=s, grid=grid))(jax.random.key(0))
  furthest, random = make('furthest'), make('random')
  np.testing.assert_array_equal(np.asarray(furthest.ids_vis), np.asarray(random.ids_vis))
  cheb, eucl = nearest_kept(furthest)
  assert cheb.max() <= 1  # a kept patch inside every thrown patch's 3x3 box
  _, eucl_random = nearest_kept(random)
  assert eucl.mean() < eucl_random.mean()


_SHARDED_CHECK = """
import functools
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.config.update('jax_threefry_partitionable', True)
from pr_mim_jax.method import furthest_sampling, masking

devices = jax.devices()
assert len(devices) == 8, devices
data = NamedSharding(Mesh(np.array(devices), ('data',)), P('data'))
batch, grid = 16, 7
split = masking.token_split(grid * grid, 0.75, 0.5)
fn = functools.partial(masking.make_masks, batch=batch, split=split, strategy='furthest',
                       grid=grid, num_stages=2)
key = jax.random.key(3)
single = jax.jit(fn)(key)
sharded = jax.jit(fn, out_shardings=data)(key)
for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
  assert len(b.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

noise = jax.random.uniform(jax.random.key(4), (batch, grid * grid))
kept = jax.random.uniform(jax.random.key(5), (batch, grid * grid)) < 0.3
fps = functools.partial(furthest_sampling.furthest_point_sample, grid=grid, num_samples=20)
single = jax.jit(fps)(noise, kept)
sharded = jax.jit(fps, in_shardings=(data, data), out_shardings=data)(
    jax.device_put(noise, data), jax.device_put(kept, data))
assert len(sharded.sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(single), np.asarray(sharded))
print('SHARDED_OK')
"""


@pytest.mark.slow
def test_batch_sharded_over_8_devices_matches_single_device():
  proc = run_with_fake_devices(_SHARDED_CHECK, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'SHARDED_OK' in proc.stdout
