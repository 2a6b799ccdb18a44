"""Saving and restoring the train state with orbax (the only module using orbax).

A thin wrapper around `orbax.checkpoint.CheckpointManager` that keeps the
training loop free of orbax details and turns damaged or incompatible
checkpoints into one-line `CheckpointError`s instead of orbax tracebacks.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp*` and only
renames it to `<step>` once every file is written (on GCS, where renames are
not atomic, it writes a final `commit_success.txt` instead). The manager lists
only finalized steps, so a process killed mid-save never leaves a step that
`latest_step` reports; `cleanup_tmp_directories` removes such leftovers.
"""

from absl import logging
import os
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from pr_mim_jax.errors import UserError

_ITEM = 'state'  # Name of the single item inside each step directory.
_MAX_LISTED = 5  # Mismatched leaves listed in an incompatibility error.


class CheckpointError(UserError):
  """A checkpoint that cannot be used; the message says which and why."""


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return str(epath.Path(workdir) / 'checkpoints')


def _short(e: Exception, limit: int = 200) -> str:
  """First line of an exception, truncated: enough to hint, not a traceback."""
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ''
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}'


def _to_abstract(x):
  """Concrete arrays become ShapeDtypeStructs carrying their sharding."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def _flat(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Maps 'a/b/0'-style leaf paths to (shape, dtype).

  Works for both the target tree (dataclasses, namedtuples) and orbax's saved
  metadata tree (plain dicts/lists), which flatten to the same path strings.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      jax.tree_util.keystr(p, simple=True, separator='/'):
          (tuple(x.shape), np.dtype(x.dtype))
      for p, x in leaves}


def _mismatches(saved, expected) -> list[str]:
  """Human-readable differences between saved and expected leaves."""
  saved, expected = _flat(saved), _flat(expected)
  out = []
  for k in list(expected) + [k for k in saved if k not in expected]:
    if k not in expected:
      out.append(f'{k} (only in checkpoint)')
    elif k not in saved:
      out.append(f'{k} (missing from checkpoint)')
    elif saved[k] != expected[k]:
      (s_shape, s_dtype), (e_shape, e_dtype) = saved[k], expected[k]
      out.append(f'{k}: saved {s_shape} {s_dtype}, expected {e_shape} {e_dtype}')
  return out


def _damaged(path, e: Exception) -> CheckpointError:
  return CheckpointError(
      f'Checkpoint {path} is damaged or unreadable ({_short(e)}). It is left untouched: '
      'move it away to resume from an older checkpoint, or point --workdir elsewhere.')


class Checkpointer:
  """Keeps the newest `max_to_keep` train states under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    # orbax needs absolute paths; a relative local workdir is resolved against the cwd.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self._pending = None  # Step of the last async save, maybe still writing.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_ITEM, ocp.args.StandardSave)
    registry.add(_ITEM, ocp.args.StandardRestore)
    options = ocp.CheckpointManagerOptions(
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep))
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry)

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, ascending."""
    steps = sorted(self._mngr.all_steps())
    # Orbax lists an async save's step as soon as it starts; hide it until done.
    if self._pending is not None and self._mngr.is_saving_in_progress():
      steps = [s for s in steps if s != self._pending]
    return steps

  def latest_step(self) -> int | None:
    """Newest complete checkpoint's step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step`; never overwrites an existing step."""
    step = int(step)
    if step in self._mngr.all_steps():
      logging.info('Checkpoint for step %d already exists in %s; not saving.',
                   step, self.directory)
      return
    try:
      # force: save whenever asked; the training loop decides the cadence.
      self._mngr.save(step, force=True, args=ocp.args.Composite(
          **{_ITEM: ocp.args.StandardSave(state)}))
    except Exception as e:
      raise CheckpointError(f'Could not save checkpoint step {step} to '
                            f'{self.directory}: {_short(e)}') from e
    self._pending = step

  def wait(self) -> None:
    """Blocks until pending async saves are complete on disk."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f'Writing checkpoint step {self._pending} to '
                            f'{self.directory} failed: {_short(e)}') from e
    self._pending = None

  def check(self, abstract_state, step: int | None = None, relayouts=()):
    """What `restore` checks before reading any array: the step exists, its metadata is
    readable and matches `abstract_state` (directly or through a relayout). Raises a
    CheckpointError naming the mismatched leaves; returns (step, target, convert)."""
    self.wait()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f'No complete checkpoint found in {self.directory}.')
    if step not in self.all_steps():
      raise CheckpointError(f'No checkpoint for step {step} in {self.directory}; '
                            f'available steps: {self.all_steps()}.')
    path = self.directory / str(step)
    target = jax.tree.map(_to_abstract, abstract_state)
    # Orbax silently casts dtypes and reports shape errors one leaf at a time,
    # so compare with the saved metadata first. Reading it also catches most
    # damage (missing/garbled metadata, manifest or array headers).
    try:
      saved = self._mngr.item_metadata(step)[_ITEM].tree
      problems = _mismatches(saved, target)
    except Exception as e:
      raise _damaged(path, e) from e
    convert = None
    for to_saved, from_saved in relayouts if problems else ():
      alt = to_saved(target)
      if not _mismatches(saved, alt):
        logging.info('Checkpoint %s has another layout; converting it on restore.', path)
        target, convert, problems = alt, from_saved, []
        break
    if problems:
      listed = '; '.join(problems[:_MAX_LISTED])
      more = len(problems) - _MAX_LISTED
      listed += f'; and {more} more' if more > 0 else ''
      raise CheckpointError(
          f'Checkpoint {path} does not match the current model/optimizer '
          f'({len(problems)} mismatched leaves: {listed}). Use the config it '
          'was trained with, or point --workdir elsewhere to start afresh.')
    return step, target, convert

  def restore(self, abstract_state, step: int | None = None, relayouts=()):
    """Restores `step` (default: latest) with `abstract_state`'s tree/shardings.

    `relayouts`: (to_saved, from_saved) pairs of pure functions over state trees (e.g.
    vit.unscan_params / vit.scan_params). When the checkpoint does not match
    `abstract_state` but matches `to_saved(abstract_state)`, it is restored in that layout
    and returned as `from_saved(restored)`, placed on `abstract_state`'s shardings.
    """
    step, target, convert = self.check(abstract_state, step, relayouts)
    path = self.directory / str(step)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(
          **{_ITEM: ocp.args.StandardRestore(target)}))
    except Exception as e:
      raise _damaged(path, e) from e
    if convert is None:
      return restored[_ITEM]
    final = jax.tree.map(_to_abstract, abstract_state)
    return jax.tree.map(lambda x, t: jax.device_put(x, getattr(t, 'sharding', None)),
                        convert(restored[_ITEM]), final)

  def restore_subtree(self, keys: tuple[str, ...], sharding, step: int | None = None):
    """Reads only the subtree at `keys` of a saved state (e.g. ('params', 'encoder')).

    Returns (subtree of arrays placed with `sharding`, step). Nothing else is read, so a
    pre-training checkpoint's optimizer state costs no memory.
    """
    self.wait()
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.all_steps():
      raise CheckpointError(f'No complete checkpoint {"" if step is None else step} in '
                            f'{self.directory}; available steps: {self.all_steps()}.')
    try:
      node = self._mngr.item_metadata(step)[_ITEM].tree
    except Exception as e:
      raise CheckpointError(f'Checkpoint {self.directory / str(step)} is damaged or '
                            f'unreadable ({_short(e)}).') from e
    for i, key in enumerate(keys):
      if not isinstance(node, dict) or key not in node:
        have = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise CheckpointError(f'Checkpoint {self.directory / str(step)} has no '
                              f'{"/".join(keys[:i + 1])} (it has {have}); is it a '
                              'pre-training checkpoint of this project?')
      node = node[key]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), node)
    for key in reversed(keys):
      target = {key: target}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    try:
      restored = ocp.PyTreeCheckpointer().restore(
          self.directory / str(step) / _ITEM, args=ocp.args.PyTreeRestore(
              item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise CheckpointError(f'Checkpoint {self.directory / str(step)} is damaged or '
                            f'unreadable ({_short(e)}).') from e
    for key in keys:
      restored = restored[key]
    return restored, step

  def close(self) -> None:
    """Waits for pending saves, then stops orbax's background threads."""
    try:
      self.wait()
    finally:
      self._mngr.close()
