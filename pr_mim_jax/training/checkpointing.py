"""Saving and restoring the train state with orbax (the only module using orbax).

A thin wrapper around `orbax.checkpoint.CheckpointManager` that keeps the
training loop free of orbax details and turns damaged or incompatible
checkpoints into one-line `CheckpointError`s (checkpoint_errors.py) instead of orbax tracebacks.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp*` and only
renames it to `<step>` once every file is written (on GCS, where renames are
not atomic, it writes a final `commit_success.txt` instead). The manager lists
only finalized steps, so a process killed mid-save never leaves a step that
`latest_step` reports; `cleanup_tmp_directories` removes such leftovers.

Verification: each save dispatches its arrays' checksums (checksums.py) and writes them to
`<step>/checksums.json` once the step is final (`poll`, every training step). Every
restore recomputes them and raises DamagedCheckpoint on a mismatch; resuming
(`fallback=True`) then takes the newest checkpoint that verifies and leaves the bad one in
place. A step killed after orbax's rename but before its checksums lacks the file and
restores unverified, with a note, as do checkpoints from before checksums existed. A run
resumed past a damaged step that reaches that step again moves it aside to `<step>.damaged`
and saves the step anew (otherwise the damaged one would block every save of that step).
Until then retention neither deletes the damaged step nor counts it (_NewestGoodSteps).
"""

from absl import logging
import json
import os
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from pr_mim_jax.training import checkpoint_errors
from pr_mim_jax.training import checksums
from pr_mim_jax.training.checkpoint_errors import CheckpointError, DamagedCheckpoint  # re-exported

_ITEM = 'state'  # Name of the single item inside each step directory.
_MAX_LISTED = 5  # Mismatched leaves listed in an incompatibility error.
CHECKSUMS_FILE = 'checksums.json'  # In each step directory, written once the save is final.


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return str(epath.Path(workdir) / 'checkpoints')


def write_checkpoint(workdir: str, step: int, state) -> None:
  """Saves `state` at `step` into `workdir`'s checkpoints and returns once it is final: a
  workdir made outside a training loop (a converted one)."""
  ckpt = Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    ckpt.save(step, state)
  finally:
    ckpt.close()


def _to_abstract(x):
  """Concrete arrays become ShapeDtypeStructs carrying their sharding."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


class _NewestGoodSteps:
  """orbax's retention policy for a Checkpointer: keeps the `n` highest steps not in
  `damaged` (the Checkpointer's own set, read at each save) and every step in it.

  orbax's LatestN counts in save order: after a resume that passed over damaged newer steps,
  it deleted them (which the resume had promised to leave in place) or kept them in place of
  good ones."""

  def __init__(self, n: int, damaged: set[int]):
    self.n, self.damaged = n, damaged

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    good = sorted(c.step for c in checkpoints if c.step not in self.damaged)
    keep = set(good[-self.n:]) | self.damaged
    return [c.step in keep for c in checkpoints]


class Checkpointer:
  """Keeps the newest `max_to_keep` train states under `directory`.

  Opened for reading: nothing under `directory` is created or cleaned up (and no background
  thread starts) until the first `save`, so reading another run's checkpoints never changes
  that run's workdir."""

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    # orbax needs absolute paths; a relative local workdir is resolved against the cwd.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    checkpoint_errors.quiet_late_reads()
    self._pending = None  # Step of the last async save, maybe still writing.
    self._sums = {}  # step -> its arrays' checksums, dispatched, to write once the save is final
    self.restored = None  # (step, verified) of the last restore
    self._damaged = set()  # steps a fallback restore found damaged and passed over
    self._max_to_keep, self._async_save = max_to_keep, async_save
    self._writable = False
    self._mngr = self._manager(write=False)

  def _manager(self, write: bool) -> ocp.CheckpointManager:
    """An orbax manager of `directory`; `write` creates it and removes unfinished saves."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_ITEM, ocp.args.StandardSave)
    registry.add(_ITEM, ocp.args.StandardRestore)
    options = ocp.CheckpointManagerOptions(
        create=write,
        cleanup_tmp_directories=write,
        enable_async_checkpointing=self._async_save,
        preservation_policy=_NewestGoodSteps(self._max_to_keep, self._damaged))
    try:
      return ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    except OSError as e:
      raise checkpoint_errors.write_failed(None, self.directory, e) from e

  def _open_for_writing(self) -> None:
    """Replaces the reading manager by one that writes (the first save does this)."""
    if not self._writable:
      writer = self._manager(write=True)
      self._mngr.close()
      self._mngr, self._writable = writer, True

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
    self._open_for_writing()
    if step in self._damaged and step in self._mngr.all_steps():
      self._move_aside(step)  # else the run, resumed from an older step, could never save it
    if step in self._mngr.all_steps():
      logging.info('Checkpoint for step %d already exists in %s; not saving.',
                   step, self.directory)
      return
    self.wait()  # orbax would wait for the previous save too; a failure of it is named here
    # Each process decides alone: one that looks after process 0 has begun this save finds
    # the directory again and keeps the deleted steps in its cached list. That only makes
    # its all_steps() list them; saving never skips a new step because of it.
    if not self.directory.exists():
      gone = self._mngr.all_steps()
      logging.warning('THE CHECKPOINT DIRECTORY %s WAS DELETED while this run was going%s. '
                      'Saving step %d into a new one.', self.directory,
                      f' (checkpoints {", ".join(map(str, gone))} went with it)' if gone else '',
                      step)
      self._mngr.reload()  # forget the deleted steps
    self._sums[step] = checksums.start(state)  # dispatched before the next step donates it
    try:
      # force: save whenever asked; the training loop decides the cadence.
      self._mngr.save(step, force=True, args=ocp.args.Composite(
          **{_ITEM: ocp.args.StandardSave(state)}))
    except Exception as e:
      self._sums.pop(step, None)
      raise checkpoint_errors.write_failed(step, self.directory, e) from e
    self._pending = step
    self.poll()  # a synchronous save is final already

  def _move_aside(self, step: int) -> None:
    """Renames the damaged `<step>` to `<step>.damaged` (orbax lists only plain step names,
    and never removes this one), kept for inspection, so that the run can save `step` anew."""
    self.wait()
    if jax.process_index() == 0:
      aside, n = self.directory / f'{step}.damaged', 1
      while aside.exists():
        n += 1
        aside = self.directory / f'{step}.damaged-{n}'
      try:
        (self.directory / str(step)).rename(aside)
      except Exception as e:  # pylint: disable=broad-except  # OSError, or a remote store's own
        raise checkpoint_errors.write_failed(step, self.directory, e) from e
      logging.warning('Saving step %d again: the damaged checkpoint of that step, passed over '
                      'when resuming, is now %s (delete it once you have looked at it).',
                      step, aside)
    if jax.process_count() > 1:  # no process saves before the damaged step is out of the way
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    self._mngr.reload()
    self._damaged.discard(step)

  def poll(self) -> None:
    """Writes `<step>/checksums.json` for each save that has become final since the last
    call: cheap, so the training loop calls it every step. Process 0 writes; a failure only
    loses the checksums (the checkpoint then restores unverified, with a note)."""
    saving = self._mngr.is_saving_in_progress()
    done = {s: v for s, v in self._sums.items() if not (saving and s == self._pending)}
    for s in done:
      del self._sums[s]
    for step, pending in done.items():
      record = {'algorithm': checksums.ALGORITHM, 'arrays': checksums.values(pending)}
      path = self.directory / str(step)
      if jax.process_index() != 0 or not path.exists():  # a failed save left no step
        continue
      try:
        tmp = path / f'{CHECKSUMS_FILE}.tmp'
        tmp.write_text(json.dumps(record))
        tmp.rename(path / CHECKSUMS_FILE)  # whole or absent
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not write the checksums of checkpoint %s (%s); it will '
                        'restore unverified.', path, checkpoint_errors.short(e))

  def wait(self) -> None:
    """Blocks until pending async saves are complete on disk, checksums included."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      self._sums.pop(self._pending, None)
      raise checkpoint_errors.write_failed(self._pending, self.directory, e) from e
    self.poll()
    self._pending = None

  def _step_to_read(self, step: int | None) -> int:
    """`step`, or the newest complete one for None; a CheckpointError naming the directory
    and what it holds when that checkpoint is not there."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(
          f'{self.directory} holds no complete checkpoint: point config.init.workdir (or '
          "convert's --from) at the workdir of a run that saved one, or run pre-training "
          'first (python -m pr_mim_jax.main --config=pr_mim_jax/configs/pretrain.py ...).')
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise CheckpointError(f'{self.directory} has no complete checkpoint of step {step}; it '
                            f'holds steps {steps}: pick one of those, or the newest.')
    return step

  def _verify(self, step: int, tree, prefix: tuple[str, ...] = ()) -> bool:
    """Checks restored arrays against the checksums saved with `step`, on every process (the
    sums are global, so every process reaches the same verdict). True when verified, False
    when the checkpoint has no checksums; DamagedCheckpoint on a mismatch."""
    path = self.directory / str(step)
    try:
      record = json.loads((path / CHECKSUMS_FILE).read_text())
      saved = record['arrays'] if record.get('algorithm') == checksums.ALGORITHM else None
    except FileNotFoundError:
      saved = None
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint_errors.damaged(path, e) from e
    if saved is None:
      logging.warning('Checkpoint %s has no checksums (written before they existed, or the '
                      'run stopped before they were written): restored unverified.', path)
      return False
    got = checksums.values(checksums.start(tree))
    names = {k: '/'.join(prefix + (k,)) if k else '/'.join(prefix) for k in got}
    bad = [names[k] for k in got if names[k] in saved and saved[names[k]] != got[k]]
    if bad:
      listed = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
      raise DamagedCheckpoint(
          f'Checkpoint {path} fails its checksums: {len(bad)} of {len(got)} arrays changed '
          f'since they were saved ({listed}). It is left untouched: move it away to resume '
          'from an older checkpoint, or point --workdir elsewhere.')
    return True

  def check(self, abstract_state, step: int | None = None, relayouts=()):
    """What `restore` checks before reading any array: the step exists, its metadata is
    readable and matches `abstract_state` (directly or through a relayout). Raises a
    CheckpointError naming the mismatched leaves; returns (step, target, convert)."""
    self.wait()
    step = self._step_to_read(step)
    path = self.directory / str(step)
    target = jax.tree.map(_to_abstract, abstract_state)
    # Orbax silently casts dtypes and reports shape errors one leaf at a time,
    # so compare with the saved metadata first. Reading it also catches most
    # damage (missing/garbled metadata, manifest or array headers).
    try:
      saved = self._mngr.item_metadata(step)[_ITEM].tree
      problems = checkpoint_errors.mismatches(saved, target)
    except Exception as e:
      raise checkpoint_errors.damaged(path, e) from e
    convert = None
    for to_saved, from_saved in relayouts if problems else ():
      alt = to_saved(target)
      if not checkpoint_errors.mismatches(saved, alt):
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

  def restore(self, abstract_state, step: int | None = None, relayouts=(), fallback=False):
    """Restores `step` (default: latest) with `abstract_state`'s tree/shardings, verified
    against its checksums.

    `relayouts`: (to_saved, from_saved) pairs of pure functions over state trees (e.g.
    vit.unscan_params / vit.scan_params). When the checkpoint does not match
    `abstract_state` but matches `to_saved(abstract_state)`, it is restored in that layout
    and returned as `from_saved(restored)`, placed on `abstract_state`'s shardings.
    `fallback` (with step=None, for resuming): a damaged newest checkpoint is named in a
    warning and left in place, and the newest one that verifies is restored instead.
    """
    if step is not None or not fallback:
      return self._restore(abstract_state, step, relayouts)
    self.wait()
    damaged = []
    for candidate in reversed(self.all_steps()):
      try:
        state = self._restore(abstract_state, candidate, relayouts)
      except DamagedCheckpoint as e:
        logging.warning('%s', e)
        damaged.append(candidate)
        continue
      self._damaged.update(damaged)
      if damaged:
        logging.warning('RESUMING FROM AN OLDER CHECKPOINT, step %d: the newer %s in %s '
                        'failed verification and are left in place, untouched.', candidate,
                        ', '.join(map(str, damaged)), self.directory)
      return state
    if damaged:
      raise DamagedCheckpoint(f'Every checkpoint in {self.directory} is damaged (steps '
                              f'{", ".join(map(str, damaged))}); they are left untouched. '
                              'Point --workdir elsewhere to start afresh.')
    return self._restore(abstract_state, None, relayouts)  # none saved: its error says so

  def _restore(self, abstract_state, step, relayouts):
    step, target, convert = self.check(abstract_state, step, relayouts)
    path = self.directory / str(step)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(
          **{_ITEM: ocp.args.StandardRestore(target)}))
    except Exception as e:
      raise checkpoint_errors.damaged(path, e) from e
    self.restored = (step, self._verify(step, restored[_ITEM]))  # in the saved layout
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
    step = self._step_to_read(step)
    try:
      node = self._mngr.item_metadata(step)[_ITEM].tree
    except Exception as e:
      raise checkpoint_errors.damaged(self.directory / str(step), e) from e
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
      raise checkpoint_errors.damaged(self.directory / str(step), e) from e
    for key in keys:
      restored = restored[key]
    self.restored = (step, self._verify(step, restored, keys))
    return restored, step

  def close(self) -> None:
    """Waits for pending saves, then stops orbax's background threads."""
    try:
      self.wait()
    finally:
      self._mngr.close()
