"""Tests for pr_mim_jax.masking: static token counts and uniform random masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr_mim_jax import masking


@pytest.mark.parametrize('length,mask,throw,expected', [
    # (n_vis, n_dec, n_throw), hand-computed.
    (196, 0.75, 0.0, (49, 147, 0)),
    (196, 0.75, 0.5, (49, 49, 98)),
    (16, 0.75, 0.0, (4, 12, 0)),
    (16, 0.5, 0.25, (8, 4, 4)),
    (10, 0.75, 0.0, (2, 8, 0)),  # round(2.5) -> 2 (banker's rounding)
    (10, 0.65, 0.0, (4, 6, 0)),  # round(3.5) -> 4
    (64, 0.9, 0.3, (6, 39, 19)),  # round(6.4) = 6, round(19.2) = 19
])
def test_token_split_counts(length, mask, throw, expected):
  split = masking.token_split(length, mask, throw)
  assert (split.n_vis, split.n_dec, split.n_throw) == expected
  assert split.num_patches == length
  assert split.n_mask == length - expected[0]
  assert split.n_vis + split.n_dec + split.n_throw == length


def test_token_split_default_throw_is_zero():
  split = masking.token_split(196, 0.75)
  assert split.n_throw == 0 and split.n_dec == 147


@pytest.mark.parametrize('length,mask,throw', [
    (16, 0.99, 0.0),  # no visible patch
    (16, 1.0, 0.0),
    (16, 0.75, 0.75),  # throws every masked patch: nothing decoded
    (16, 0.5, 0.6),  # more thrown than masked
    (16, 0.0, 0.0),  # nothing masked -> nothing decoded
    (16, 0.75, -0.5),  # negative throw
])
def test_token_split_impossible_raises(length, mask, throw):
  with pytest.raises(ValueError):
    masking.token_split(length, mask, throw)


def _check_masks(masks, split, batch):
  ids_vis, ids_dec, ids_throw, ids_restore = (
      np.asarray(a) for a in (masks.ids_vis, masks.ids_dec, masks.ids_throw, masks.ids_restore))
  length = split.num_patches
  assert ids_vis.shape == (batch, split.n_vis)
  assert ids_dec.shape == (batch, split.n_dec)
  assert ids_throw.shape == (batch, split.n_throw)
  assert ids_restore.shape == (batch, length)
  for a in (ids_vis, ids_dec, ids_throw, ids_restore):
    assert np.issubdtype(a.dtype, np.integer)
  for b in range(batch):
    vis, dec, throw = set(ids_vis[b]), set(ids_dec[b]), set(ids_throw[b])
    # No duplicates inside a set, the three sets are disjoint and cover every patch.
    assert len(vis) == split.n_vis and len(dec) == split.n_dec and len(throw) == split.n_throw
    assert not vis & dec and not vis & throw and not dec & throw
    assert vis | dec | throw == set(range(length))
    # ids_restore inverts the shuffle: gathering (vis, dec, throw) by it gives arange(L).
    shuffle = np.concatenate([ids_vis[b], ids_dec[b], ids_throw[b]])
    np.testing.assert_array_equal(shuffle[ids_restore[b]], np.arange(length))
    # ... and it is the position of patch l in the shuffled order.
    for pos, patch in enumerate(shuffle):
      assert ids_restore[b, patch] == pos
  # ids_mask is every masked patch: decoded then thrown.
  np.testing.assert_array_equal(np.asarray(masks.ids_mask), np.concatenate([ids_dec, ids_throw], 1))


@pytest.mark.parametrize('mask,throw', [(0.75, 0.0), (0.75, 0.5), (0.5, 0.25)])
def test_random_masks_partition(mask, throw):
  split = masking.token_split(16, mask, throw)
  masks = masking.random_masks(jax.random.key(0), 8, split)
  _check_masks(masks, split, 8)


def test_random_masks_differ_across_batch():
  split = masking.token_split(49, 0.75)
  masks = masking.random_masks(jax.random.key(1), 16, split)
  visible = {tuple(sorted(row)) for row in np.asarray(masks.ids_vis).tolist()}
  assert len(visible) == 16  # C(49, 12) sets: collisions essentially impossible


def test_random_masks_key_determinism():
  split = masking.token_split(36, 0.75, 0.25)
  a = masking.random_masks(jax.random.key(3), 4, split)
  b = masking.random_masks(jax.random.key(3), 4, split)
  c = masking.random_masks(jax.random.key(4), 4, split)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.ids_restore), np.asarray(c.ids_restore))
  assert not np.array_equal(np.sort(np.asarray(a.ids_vis), 1), np.sort(np.asarray(c.ids_vis), 1))


def test_random_masks_under_jit_matches_eager():
  split = masking.token_split(16, 0.75, 0.25)
  fn = jax.jit(masking.random_masks, static_argnums=(1, 2))
  jitted = fn(jax.random.key(5), 4, split)
  eager = masking.random_masks(jax.random.key(5), 4, split)
  _check_masks(jitted, split, 4)
  for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_random_masks_jit_with_closed_over_split():
  split = masking.token_split(16, 0.75)

  @jax.jit
  def count_visible(rng):
    m = masking.random_masks(rng, 3, split)
    return masking.binary_mask(m.ids_vis, split.num_patches).sum(axis=1)

  np.testing.assert_array_equal(np.asarray(count_visible(jax.random.key(0))), [4, 4, 4])


def test_random_masks_roughly_uniform():
  length, mask = 16, 0.75
  split = masking.token_split(length, mask)
  draws = 4000
  masks = jax.jit(functools.partial(masking.random_masks, batch=draws, split=split))(
      jax.random.key(42))
  ids_vis = np.asarray(masks.ids_vis)
  freq = np.bincount(ids_vis.ravel(), minlength=length) / draws
  # Each patch visible with probability 1 - mask = 0.25; std of the estimate ~0.0068.
  np.testing.assert_allclose(freq, 1 - mask, atol=0.035)
  # The position of a patch within the visible list is also not biased to small indices.
  first = np.bincount(ids_vis[:, 0], minlength=length) / draws
  np.testing.assert_allclose(first, 1 / length, atol=0.025)


def test_binary_mask_hand_case():
  ids = jnp.array([[0, 2], [3, 1]], jnp.int32)
  expected = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 1, 0]], np.float32)
  out = masking.binary_mask(ids, 5)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_binary_mask_of_masked_sets_complements_visible():
  split = masking.token_split(25, 0.6, 0.2)
  m = masking.random_masks(jax.random.key(7), 5, split)
  vis = np.asarray(masking.binary_mask(m.ids_vis, 25))
  masked = np.asarray(masking.binary_mask(m.ids_mask, 25))
  np.testing.assert_array_equal(vis + masked, np.ones((5, 25)))
  np.testing.assert_array_equal(masked.sum(1), np.full(5, split.n_mask))
