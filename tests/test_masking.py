"""Tests for pr_mim_jax.method.masking: static token counts, random masks and throw strategies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr_mim_jax.method import masking
from pr_mim_jax.models import progressive


@pytest.mark.parametrize('length,mask,throw,expected', [
    # (n_vis, n_dec, n_throw), hand-computed.
    (196, 0.75, 0.0, (49, 147, 0)),
    (196, 0.75, 0.5, (49, 49, 98)),
    (16, 0.75, 0.0, (4, 12, 0)),
    (16, 0.5, 0.25, (8, 4, 4)),
    # n_vis truncates as the official MAE's int(L * (1 - mask_ratio)); n_throw rounds.
    (10, 0.75, 0.0, (2, 8, 0)),  # int(2.5) = 2
    (10, 0.65, 0.0, (3, 7, 0)),  # int(3.5) = 3 (rounding would give 4)
    (196, 0.7, 0.0, (58, 138, 0)),  # int(58.8) = 58 (rounding would give 59)
    (196, 0.9, 0.0, (19, 177, 0)),  # int(19.6) = 19 (rounding would give 20)
    (64, 0.9, 0.3, (6, 39, 19)),  # int(6.4) = 6, round(19.2) = 19
    (16, 0.75, 0.3, (4, 7, 5)),  # round(4.8) = 5 (truncating would give 4)
    (16, 0.75, 0.2, (4, 9, 3)),  # round(3.2) = 3 (ceil would give 4)
    (49, 0.75, 0.5, (12, 13, 24)),  # round(24.5) = 24: an exact half goes to the even side
    # In floating point 1 - 0.8 is just below 0.2, so MAE's int(100 * (1 - 0.8)) keeps 19.
    (100, 0.8, 0.0, (19, 81, 0)),
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


@pytest.mark.slow
def test_binary_mask_of_masked_sets_complements_visible():
  split = masking.token_split(25, 0.6, 0.2)
  m = masking.random_masks(jax.random.key(7), 5, split)
  vis = np.asarray(masking.binary_mask(m.ids_vis, 25))
  masked = np.asarray(masking.binary_mask(m.ids_mask, 25))
  np.testing.assert_array_equal(vis + masked, np.ones((5, 25)))
  np.testing.assert_array_equal(masked.sum(1), np.full(5, split.n_mask))


# --- Throw strategies -------------------------------------------------------------------------

_STRATEGY_CASES = [  # (grid, mask, throw, num_stages)
    (4, 0.75, 0.5, 3),
    (5, 0.76, 0.4, 2),  # odd grid: 6 visible, 9 decoded, 10 thrown
    (7, 0.75, 0.25, 1),
    (7, 0.75, 0.0, 1),  # nothing thrown
]


_make_masks_jit = jax.jit(masking.make_masks, static_argnums=(1, 2, 3, 4, 5))


def _make(key, batch, grid, mask, throw, strategy, num_stages=1):
  split = masking.token_split(grid * grid, mask, throw)
  return split, _make_masks_jit(jax.random.key(key), batch, split, strategy, grid, num_stages)


@pytest.mark.slow
@pytest.mark.parametrize('strategy', masking.THROW_STRATEGIES)
@pytest.mark.parametrize('grid,mask,throw,num_stages', _STRATEGY_CASES)
def test_make_masks_partition(strategy, grid, mask, throw, num_stages):
  split, masks = _make(0, 4, grid, mask, throw, strategy, num_stages)
  _check_masks(masks, split, 4)
  for a in jax.tree.leaves(masks):
    assert a.dtype == jnp.int32


@pytest.mark.parametrize('strategy', masking.THROW_STRATEGIES)
def test_make_masks_key_determinism(strategy):
  _, a = _make(3, 4, 4, 0.75, 0.5, strategy, 3)
  _, b = _make(3, 4, 4, 0.75, 0.5, strategy, 3)
  _, c = _make(4, 4, 4, 0.75, 0.5, strategy, 3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for name in ('ids_vis', 'ids_dec', 'ids_throw'):
    assert not np.array_equal(np.sort(np.asarray(getattr(a, name)), 1),
                              np.sort(np.asarray(getattr(c, name)), 1)), name


@pytest.mark.slow
@pytest.mark.parametrize('throw', [0.0, 0.25])
def test_make_masks_random_equals_random_masks(throw):
  split, masks = _make(9, 4, 7, 0.75, throw, 'random', 1)
  expected = masking.random_masks(jax.random.key(9), 4, split)
  for x, y in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_make_masks_same_visible_set_for_every_strategy():
  # The gradient study compares methods on the same visible set: it may depend on rng only.
  vis = [np.asarray(_make(11, 4, 7, 0.75, 0.25, s)[1].ids_vis) for s in masking.THROW_STRATEGIES]
  vis.append(np.asarray(_make(11, 4, 7, 0.75, 0.25, 'furthest', 3)[1].ids_vis))
  for v in vis[1:]:
    np.testing.assert_array_equal(v, vis[0])


@pytest.mark.slow
def test_make_masks_under_jit_matches_eager():
  split, jitted = _make(2, 4, 4, 0.75, 0.5, 'furthest', 3)
  eager = masking.make_masks(jax.random.key(2), 4, split, 'furthest', 4, 3)
  for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_make_masks_unknown_strategy_raises():
  split = masking.token_split(16, 0.75, 0.5)
  with pytest.raises(ValueError, match='running_cell'):
    masking.make_masks(jax.random.key(0), 2, split, 'checkerboard', 4)


def test_make_masks_bad_stages_or_grid_raise():
  split = masking.token_split(16, 0.75, 0.25)  # 4 thrown
  with pytest.raises(ValueError):
    masking.make_masks(jax.random.key(0), 2, split, 'furthest', 4, num_stages=5)
  with pytest.raises(ValueError):
    masking.make_masks(jax.random.key(0), 2, split, 'random', 4, num_stages=0)
  with pytest.raises(ValueError):
    masking.make_masks(jax.random.key(0), 2, split, 'furthest', 5)


@pytest.mark.parametrize('strategy', ['random', 'running_cell'])
def test_noise_order_strategies_ignore_num_stages(strategy):
  # Partial reconstruction leaves reconstruction.num_stages unused: more stages than thrown
  # tokens used to raise at the first step; the thrown tokens stay in noise order.
  _, one = _make(12, 4, 4, 0.75, 0.25, strategy, 1)  # 4 thrown
  _, many = _make(12, 4, 4, 0.75, 0.25, strategy, 7)
  for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_running_cell_pattern_hand_cases():
  diag = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], bool)
  # mask 0.75, throw 0.5: 8 of 16 patches in the decoder -> k = 2, the diagonal of each cell.
  np.testing.assert_array_equal(
      masking.running_cell_pattern(4, masking.token_split(16, 0.75, 0.5)).reshape(4, 4), diag)
  # 12 of 16 in the decoder -> k = 3: everything but (1, 0) of each cell.
  k3 = np.array([[1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1]], bool)
  np.testing.assert_array_equal(
      masking.running_cell_pattern(4, masking.token_split(16, 0.75, 0.25)).reshape(4, 4), k3)
  # Odd grid, 4 of 25 in the decoder -> k = 1: the (0, 0) corners, cut off at the border.
  k1 = np.zeros((5, 5), bool)
  k1[::2, ::2] = True
  np.testing.assert_array_equal(
      masking.running_cell_pattern(5, masking.token_split(25, 0.92, 0.76)).reshape(5, 5), k1)


def test_running_cell_prefers_pattern_then_fills_or_trims():
  # grid 5: 6 visible, 9 decoded, 10 thrown; k = round(4 * 15 / 25) = 2 -> a 13-patch pattern.
  # The masked part of the pattern holds 7..13 patches, so some examples trim it to 9 and
  # others decode all of it and fill up with off-pattern patches.
  split, masks = _make(5, 64, 5, 0.76, 0.4, 'running_cell')
  assert (split.n_vis, split.n_dec, split.n_throw) == (6, 9, 10)
  pattern = set(np.flatnonzero(masking.running_cell_pattern(5, split)))
  assert len(pattern) == 13
  trimmed = filled = 0
  for vis, dec in zip(np.asarray(masks.ids_vis), np.asarray(masks.ids_dec)):
    on = pattern - set(vis)  # masked pattern patches
    if len(on) >= split.n_dec:
      assert set(dec) <= on
      trimmed += 1
    else:
      assert on <= set(dec)
      filled += 1
  assert trimmed and filled
  # Trimming is by noise: different examples keep different subsets of the pattern.
  assert len({tuple(sorted(d)) for d in np.asarray(masks.ids_dec)}) > 32


@pytest.mark.slow
def test_furthest_stages_continue_furthest_sampling():
  grid = 10
  split, one = _make(6, 8, grid, 0.75, 0.5, 'furthest', 1)
  _, three = _make(6, 8, grid, 0.75, 0.5, 'furthest', 3)
  np.testing.assert_array_equal(np.asarray(one.ids_dec), np.asarray(three.ids_dec))
  sizes = progressive.stage_sizes(split.n_throw, 3)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  for vis, dec, throw in zip(np.asarray(three.ids_vis), np.asarray(three.ids_dec),
                             np.asarray(three.ids_throw)):
    # Each pick (decoded, then stages 1 and 2) is a furthest remaining patch from those before.
    kept = list(vis)
    remaining = sorted(set(range(grid * grid)) - set(vis))
    for p in np.concatenate([dec, throw[:sum(sizes[:-1])]]):
      sq = (rows[remaining, None] - rows[kept]) ** 2 + (cols[remaining, None] - cols[kept]) ** 2
      nearest = dict(zip(remaining, sq.min(axis=1)))  # remaining patch -> its nearest kept
      assert nearest[p] == max(nearest.values())
      kept.append(p)
      remaining.remove(p)
    assert set(throw[sum(sizes[:-1]):]) == set(remaining)


@pytest.mark.parametrize('n_throw,num_stages,expected', [
    (98, 3, (33, 33, 32)),
    (98, 1, (98,)),
    (98, 2, (49, 49)),
    (10, 4, (3, 3, 2, 2)),
    (5, 5, (1, 1, 1, 1, 1)),
    (0, 1, ()),
    (0, 3, ()),
])
def test_stage_sizes(n_throw, num_stages, expected):
  assert progressive.stage_sizes(n_throw, num_stages) == expected


@pytest.mark.parametrize('n_throw,num_stages', [(5, 0), (5, -1), (5, 6), (0, 0)])
def test_stage_sizes_raises(n_throw, num_stages):
  with pytest.raises(ValueError):
    progressive.stage_sizes(n_throw, num_stages)


# --- The running-cell pattern's rounding and fill regime; the stages' furthest order ------------

def test_running_cell_pattern_k_rounds_half_up():
  # 7 of 16 patches in the decoder (4 visible + 3 decoded, 9 thrown): 4 * 7 / 16 = 1.75 rounds
  # to k = 2, the diagonal of each cell (truncating would give k = 1, the (0, 0) corners only).
  split = masking.token_split(16, 0.75, 0.5625)
  assert (split.n_vis, split.n_dec, split.n_throw) == (4, 3, 9)
  diag = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], bool)
  np.testing.assert_array_equal(masking.running_cell_pattern(4, split).reshape(4, 4), diag)


def test_running_cell_fill_regime_is_still_a_partition():
  # When the masked part of the pattern is smaller than n_dec the decoder fills up with
  # off-pattern patches: those must be masked ones, never visible ones. A visible patch wins
  # a fill slot only in rare draws (few off-pattern candidates), hence the large batch.
  split, masks = _make(5, 2048, 5, 0.76, 0.4, 'running_cell')
  pattern = masking.running_cell_pattern(5, split)
  vis, dec, throw = (np.asarray(a) for a in (masks.ids_vis, masks.ids_dec, masks.ids_throw))
  onehot = lambda ids: np.eye(25, dtype=np.int32)[ids].sum(axis=1)  # noqa: E731  [B, L]
  vis_1h = onehot(vis)
  assert ((pattern & (vis_1h == 0)).sum(1) < split.n_dec).sum() > 100  # the fill regime (182 of 2048)
  counts = vis_1h + onehot(dec) + onehot(throw)
  np.testing.assert_array_equal(counts, 1)  # every patch in exactly one set
  _check_masks(jax.tree.map(lambda a: a[:64], masks), split, 64)


def _nearest_sq(remaining, kept, grid):
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  r, k = np.asarray(remaining), np.asarray(kept)
  return ((rows[r, None] - rows[k]) ** 2 + (cols[r, None] - cols[k]) ** 2).min(axis=1)


def test_furthest_stages_follow_furthest_order_on_a_sparse_grid():
  # Few kept patches, so picks are still far apart when the thrown stages are formed
  # (on a dense grid every remaining patch ties at distance 1 and any order would pass).
  # 8x8, 6 visible, 7 decoded, 51 thrown in stages of 17: the first two stages are
  # furthest-point picks in order, the last stage is the rest.
  grid = 8
  split, masks = _make(21, 4, grid, 0.9, 0.8, 'furthest', 3)
  assert (split.n_vis, split.n_dec, split.n_throw) == (6, 7, 51)
  sizes = progressive.stage_sizes(split.n_throw, 3)
  far_picks = 0
  for vis, dec, throw in zip(np.asarray(masks.ids_vis), np.asarray(masks.ids_dec),
                             np.asarray(masks.ids_throw)):
    kept = list(vis)
    remaining = sorted(set(range(grid * grid)) - set(vis))
    for p in np.concatenate([dec, throw[:sum(sizes[:-1])]]):
      nearest = dict(zip(remaining, _nearest_sq(remaining, kept, grid)))
      assert nearest[p] == max(nearest.values())
      far_picks += nearest[p] > 1
      kept.append(p)
      remaining.remove(p)
    assert set(throw[sum(sizes[:-1]):]) == set(remaining)
  assert far_picks > 4 * split.n_dec  # thrown stages too were picked at distance > 1


@pytest.mark.slow
def test_furthest_stage_count_keeps_one_furthest_sequence():
  # Stages continue ONE furthest-point sequence (only the last stage is the unpicked rest),
  # so the picked prefix of ids_throw does not depend on how many stages cut it.
  # 18 thrown: (6, 6, 6) picks 12, (5, 5, 4, 4) picks 14, (3,) * 6 picks 15.
  grid = 6
  split, three = _make(13, 8, grid, 0.8, 0.5, 'furthest', 3)
  _, four = _make(13, 8, grid, 0.8, 0.5, 'furthest', 4)
  _, six = _make(13, 8, grid, 0.8, 0.5, 'furthest', 6)
  assert split.n_throw == 18
  for m in (four, six):
    np.testing.assert_array_equal(np.asarray(m.ids_vis), np.asarray(three.ids_vis))
    np.testing.assert_array_equal(np.asarray(m.ids_dec), np.asarray(three.ids_dec))
  np.testing.assert_array_equal(np.asarray(six.ids_throw)[:, :12], np.asarray(three.ids_throw)[:, :12])
  np.testing.assert_array_equal(np.asarray(four.ids_throw)[:, :14], np.asarray(six.ids_throw)[:, :14])


def test_furthest_ties_are_broken_by_fresh_noise_per_image():
  # 4x4 grid, 4 visible: the first decoded pick is a furthest masked patch from the visible
  # set, and distance ties are common. A brute-force Euclidean reference finds the tied
  # candidates. Random tie-breaking picks the smallest index of k tied ones with chance 1/k
  # (a fixed order would always pick it), and images that happen to share a visible set
  # (1820 possible sets, 2048 images) still get different decoded sets.
  grid, batch = 4, 2048
  split, masks = _make(17, batch, grid, 0.75, 0.5, 'furthest')
  vis, dec = np.asarray(masks.ids_vis), np.asarray(masks.ids_dec)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  sq = (rows[:, None] - rows) ** 2 + (cols[:, None] - cols) ** 2  # [L, L]
  is_vis = np.zeros((batch, grid * grid), bool)
  is_vis[np.arange(batch)[:, None], vis] = True
  nearest = np.where(is_vis[:, None, :], sq[None], 10 ** 6).min(axis=2)  # [B, L]
  nearest = np.where(is_vis, -1, nearest)  # visible patches are never candidates
  tied = nearest == nearest.max(axis=1, keepdims=True)  # [B, L]
  assert tied[np.arange(batch), dec[:, 0]].all()  # the first pick is a furthest one
  k = tied.sum(axis=1)
  with_ties = k > 1
  assert with_ties.sum() > 500
  smallest = dec[:, 0] == tied.argmax(axis=1)
  expected = np.mean(1.0 / k[with_ties])  # about 0.26 here
  assert abs(smallest[with_ties].mean() - expected) < 0.06
  by_visible = {}
  for v, d in zip(vis, dec):
    by_visible.setdefault(tuple(sorted(v)), set()).add(tuple(sorted(d)))
  assert sum(len(d) > 1 for d in by_visible.values()) > 50


def test_running_cell_fill_is_random_among_masked_off_pattern_patches():
  # grid 5: 6 visible, 9 decoded, 13-patch pattern. When five or six visible patches fall on
  # the pattern, fewer than 9 pattern patches are masked, and the remaining decoder slots go
  # to off-pattern masked patches drawn by noise. Drawn by patch index instead, every such
  # example would fill with its lowest-index candidates; by noise that happens for about
  # one in C(candidates, slots) >= 1 in 11 of them.
  split, masks = _make(23, 2048, 5, 0.76, 0.4, 'running_cell')
  pattern = set(np.flatnonzero(masking.running_cell_pattern(5, split)))
  lowest = fills = 0
  for vis, dec in zip(np.asarray(masks.ids_vis), np.asarray(masks.ids_dec)):
    on = pattern - set(vis)
    if len(on) >= split.n_dec:
      continue
    fill = set(dec) - pattern
    candidates = sorted(set(range(25)) - pattern - set(vis))
    assert on <= set(dec) and fill <= set(candidates) and len(fill) == split.n_dec - len(on)
    lowest += fill == set(candidates[:len(fill)])
    fills += 1
  assert fills > 100
  assert lowest < 0.3 * fills


@pytest.mark.parametrize('strategy', ['running_cell', 'furthest'])
def test_last_thrown_stage_is_in_visibility_noise_order(strategy):
  # The patches no strategy picks keep the order of the visibility noise (make_masks), so
  # "furthest" with one stage runs furthest sampling for the decoded patches only. The
  # "random" strategy's (vis, dec, throw) with the same key is that noise order.
  split, masks = _make(24, 8, 7, 0.75, 0.5, strategy, 1)
  _, noise_order = _make(24, 8, 7, 0.75, 0.5, 'random', 1)
  order = np.concatenate([np.asarray(noise_order.ids_vis), np.asarray(noise_order.ids_mask)], 1)
  for b in range(8):
    taken = set(np.asarray(masks.ids_vis)[b]) | set(np.asarray(masks.ids_dec)[b])
    expected = [p for p in order[b] if p not in taken]
    np.testing.assert_array_equal(np.asarray(masks.ids_throw)[b], expected)


@pytest.mark.parametrize('strategy', masking.THROW_STRATEGIES)
def test_make_masks_grid_not_matching_the_split_raises(strategy):
  # 16 patches are a 4x4 grid; a 5x5 grid is refused by every strategy, "random" included,
  # although it does not use the grid.
  split = masking.token_split(16, 0.75, 0.25)
  with pytest.raises(ValueError, match='grid 5'):
    masking.make_masks(jax.random.key(0), 2, split, strategy, 5)


def test_running_cell_fill_never_takes_a_visible_patch():
  # 4x4, 4 visible, 9 decoded, 3 thrown: k = round(4 * 13 / 16) = 3, a 12-patch pattern and
  # 4 off-pattern patches. When all 4 visible patches are on the pattern (495 of 1820 sets)
  # only 8 pattern patches are masked, so one decoder slot is filled from the 4 off-pattern
  # ones, all masked: the decoded set is then exactly those 8 plus one off-pattern patch.
  split, masks = _make(25, 2048, 4, 0.75, 0.1875, 'running_cell')
  assert (split.n_vis, split.n_dec, split.n_throw) == (4, 9, 3)
  pattern = masking.running_cell_pattern(4, split)
  assert pattern.sum() == 12
  vis, dec, throw = (np.asarray(a) for a in (masks.ids_vis, masks.ids_dec, masks.ids_throw))
  filling = pattern[vis].all(axis=1)  # [B]
  assert filling.sum() > 400
  onehot = lambda ids: np.eye(16, dtype=np.int32)[ids].sum(axis=1)  # noqa: E731  [B, L]
  np.testing.assert_array_equal(onehot(vis) + onehot(dec) + onehot(throw), 1)
  dec_on = pattern[dec].sum(axis=1)  # [B]
  np.testing.assert_array_equal(dec_on[filling], 8)
  np.testing.assert_array_equal(dec_on[~filling], 9)
