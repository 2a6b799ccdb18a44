"""The deterministic index schedule: which examples make up the batch at a step.

Pure NumPy, no TensorFlow, no JAX, no iterator state. Everything is a function of
(seed, step) and the dataset size, so a restarted run recomputes exactly what an
uninterrupted run would have seen, with any number of processes:

  steps_per_epoch = N // global_batch            (the remainder is dropped)
  perm(epoch)     = np.random.default_rng([seed, epoch]).permutation(N)
  batch(step)     = perm(step // spe)[pos * B:(pos + 1) * B],  pos = step % spe

Process p of P owns batch positions [p * B / P, (p + 1) * B / P) and only ever
reads those examples. Augmentation randomness is keyed by (seed, step, position),
never by process, so the global batch does not depend on P.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np

from pr_mim_jax.errors import UserError


class StepIndices(NamedTuple):
  """What one process loads for one step."""
  step: int
  indices: np.ndarray    # int64 [local_batch], example indices into the split
  positions: np.ndarray  # int64 [local_batch], positions within the global batch


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full batches per epoch; the remainder of each epoch is dropped."""
  if global_batch <= 0:
    raise UserError(f"global batch size must be positive, got {global_batch}; "
                    "fix the batch size in the config")
  spe = num_examples // global_batch
  if spe == 0:
    raise UserError(
        f"dataset has {num_examples} examples, fewer than one global batch of {global_batch}; "
        "use a smaller batch size or more data")
  return spe


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The shuffled order of all examples for one epoch, int64 [N]."""
  if seed < 0:
    raise UserError(f"seed must be non-negative, got {seed}; set a seed >= 0")
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def process_positions(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
  """Positions within the global batch that a process owns, int64 [B / P]."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
  if global_batch % process_count:
    raise UserError(
        f"global batch size {global_batch} is not divisible by the {process_count} processes; "
        f"use a multiple of {process_count}")
  local = global_batch // process_count
  return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)


def global_batch_indices(seed: int, step: int, num_examples: int, global_batch: int) -> np.ndarray:
  """Example indices of the whole global batch at `step`, int64 [B] (for tests and tools)."""
  spe = steps_per_epoch(num_examples, global_batch)
  perm = epoch_permutation(seed, step // spe, num_examples)
  pos = step % spe
  return perm[pos * global_batch:(pos + 1) * global_batch]


def schedule(seed: int, num_examples: int, global_batch: int, start_step: int,
             positions: Sequence[int] | np.ndarray) -> Iterator[StepIndices]:
  """Yields the indices at `positions` of every global batch from `start_step` on, forever.

  Computes one permutation per epoch (the one for start_step's epoch first): that is
  all that skipping ahead costs.
  """
  positions = np.asarray(positions, dtype=np.int64)
  if positions.ndim != 1 or ((positions < 0) | (positions >= global_batch)).any():
    raise ValueError(f"positions must be a 1-D subset of range({global_batch})")
  if start_step < 0:
    raise UserError(f"start step must be non-negative, got {start_step}")
  spe = steps_per_epoch(num_examples, global_batch)
  step = start_step
  epoch, perm = -1, None
  while True:
    if step // spe != epoch:
      epoch = step // spe
      perm = epoch_permutation(seed, epoch, num_examples)
    base = (step % spe) * global_batch
    yield StepIndices(step, perm[base + positions], positions)
    step += 1


def host_schedule(seed: int, num_examples: int, global_batch: int, start_step: int,
                  process_index: int, process_count: int) -> Iterator[StepIndices]:
  """`schedule` for the positions process `process_index` of `process_count` owns."""
  positions = process_positions(global_batch, process_index, process_count)
  return schedule(seed, num_examples, global_batch, start_step, positions)
