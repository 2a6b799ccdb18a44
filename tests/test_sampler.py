"""The index schedule: coverage, process independence, resume, seeding."""

import itertools

import numpy as np
import pytest

from pr_mim_jax.data import sampler
from pr_mim_jax.errors import UserError

N, B = 103, 8  # 12 steps per epoch, 7 examples dropped per epoch


def _global(seed, start, steps, process_count, n=N, b=B):
  """Global batches [steps, B] assembled from simulated processes' parts."""
  parts = []
  for p in range(process_count):
    it = sampler.host_schedule(seed, n, b, start, p, process_count)
    parts.append([next(it) for _ in range(steps)])
  out = []
  for k in range(steps):
    assert all(parts[p][k].step == start + k for p in range(process_count))
    out.append(np.concatenate([parts[p][k].indices for p in range(process_count)]))
    positions = np.concatenate([parts[p][k].positions for p in range(process_count)])
    np.testing.assert_array_equal(positions, np.arange(b))
  return np.stack(out)


def test_epoch_covers_each_index_at_most_once():
  spe = sampler.steps_per_epoch(N, B)
  assert spe == N // B
  batches = _global(0, 0, 3 * spe, 1)
  for e in range(3):
    epoch = batches[e * spe:(e + 1) * spe].reshape(-1)
    assert len(np.unique(epoch)) == spe * B
    assert epoch.min() >= 0 and epoch.max() < N


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_independent_of_process_count(process_count):
  one = _global(5, 0, 30, 1)
  many = _global(5, 0, 30, process_count)
  np.testing.assert_array_equal(one, many)


def test_matches_global_batch_indices():
  batches = _global(3, 0, 30, 1)
  for s in range(30):
    np.testing.assert_array_equal(batches[s], sampler.global_batch_indices(3, s, N, B))


@pytest.mark.parametrize("k", [1, 11, 12, 25])
def test_restart_equals_uninterrupted(k):
  full = _global(1, 0, k + 15, 2)
  resumed = _global(1, k, 15, 2)
  np.testing.assert_array_equal(full[k:], resumed)


def test_seeds_differ_and_epochs_reshuffle():
  spe = sampler.steps_per_epoch(N, B)
  a, b = _global(0, 0, 2 * spe, 1), _global(1, 0, 2 * spe, 1)
  assert not np.array_equal(a, b)
  assert not np.array_equal(a[:spe], a[spe:])
  # Same examples may appear, but the order differs between epochs.
  assert not np.array_equal(np.sort(a[:spe].reshape(-1)), a[spe:].reshape(-1))


def test_positions_partition_batch():
  parts = [sampler.process_positions(B, p, 4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), np.arange(B))


def test_user_errors():
  with pytest.raises(UserError, match="divisible"):
    sampler.process_positions(10, 0, 4)
  with pytest.raises(UserError, match="fewer than one global batch"):
    sampler.steps_per_epoch(5, 8)
  with pytest.raises(UserError, match="seed"):
    next(sampler.host_schedule(-1, N, B, 0, 0, 1))


def test_schedule_is_lazy_and_infinite():
  it = sampler.host_schedule(0, N, B, 10**9, 0, 1)  # far-future start: one permutation
  steps = [s.step for s in itertools.islice(it, 3)]
  assert steps == [10**9, 10**9 + 1, 10**9 + 2]


def test_batches_follow_the_documented_formula():
  """The module docstring's contract, written out independently: a run resumed by another
  version of the code must see the same examples. perm(epoch) = default_rng([seed, epoch])."""
  spe = N // B
  for seed, step in ((0, 0), (3, 5), (3, spe), (7, 3 * spe + 4)):
    perm = np.random.default_rng([seed, step // spe]).permutation(N)
    want = perm[(step % spe) * B:(step % spe + 1) * B]
    np.testing.assert_array_equal(sampler.global_batch_indices(seed, step, N, B), want)
    it = sampler.host_schedule(seed, N, B, step, 1, 2)
    np.testing.assert_array_equal(next(it).indices, want[B // 2:])


def test_bad_arguments_are_refused():
  with pytest.raises(UserError, match="positive"):
    sampler.steps_per_epoch(N, 0)
  with pytest.raises(UserError, match="start step"):
    next(sampler.host_schedule(0, N, B, -1, 0, 1))
  with pytest.raises(ValueError, match="positions"):
    next(sampler.schedule(0, N, B, 0, [0, B]))  # position B is outside the batch
  with pytest.raises(ValueError, match="positions"):
    next(sampler.schedule(0, N, B, 0, [-1]))
  for index, count in ((4, 4), (-1, 4), (0, 0)):
    with pytest.raises(ValueError, match="process_index"):
      sampler.process_positions(B, index, count)
