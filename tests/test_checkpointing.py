"""Tests for pr_mim_jax.training.checkpointing: retention, exact restore, damage handling."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pr_mim_jax.errors import UserError
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import checksums


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _make_state(seed: int = 0, width: int = 3) -> TrainState:
  """A small state with a nested optax state (chain + masked adamw)."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      'dense': {'kernel': jax.random.normal(k1, (4, width)),
                'bias': jax.random.normal(k2, (width,))},
      'scale': jnp.ones((2,), jnp.bfloat16)}
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(1e-3, mask=jax.tree.map(lambda p: p.ndim > 1, params)))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  _, opt_state = tx.update(grads, opt_state, params)  # Non-zero mu/nu/count.
  return TrainState(step=jnp.int32(seed), params=params, opt_state=opt_state,
                    rng=jax.random.key_data(k3))


def _sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract(state, sharding=None):
  sharding = sharding or _sharding()
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(lambda: state))


def _assert_identical(got, want, sharding=None):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    if sharding is not None:
      assert g.sharding == sharding


def _snapshot(path: pathlib.Path) -> dict[str, bytes]:
  return {str(f): f.read_bytes() for f in sorted(path.rglob('*')) if f.is_file()}


def _saved(directory, steps, *, max_to_keep=3):
  """Saves one distinct state per step, closes, returns {step: state}."""
  ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=max_to_keep)
  states = {s: _make_state(seed=s) for s in steps}
  for s, state in states.items():
    ckpt.save(s, state)
  ckpt.close()
  return states


def test_checkpoint_dir():
  assert checkpointing.checkpoint_dir('/w/run1') == '/w/run1/checkpoints'
  assert issubclass(checkpointing.CheckpointError, UserError)


@pytest.mark.slow
def test_keeps_newest_and_restores_exactly(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  states = {s: _make_state(seed=s) for s in (10, 20, 30)}
  for s, state in states.items():
    ckpt.save(s, state)
  ckpt.wait()
  assert ckpt.all_steps() == [20, 30]
  assert ckpt.latest_step() == 30
  assert sorted(p.name for p in tmp_path.iterdir()) == ['20', '30']

  sharding = _sharding()
  restored = ckpt.restore(_abstract(states[30], sharding))
  assert isinstance(restored, TrainState)
  # Optax namedtuples (ScaleByAdamState, MaskedState, ...) come back as such.
  assert type(restored.opt_state[1][0]) is type(states[30].opt_state[1][0])
  _assert_identical(restored, states[30], sharding)
  _assert_identical(ckpt.restore(_abstract(states[20]), step=20), states[20])
  # Concrete arrays work as the target too, with their own sharding.
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.device_put(_make_state(seed=99), single)
  _assert_identical(ckpt.restore(target), states[30], single)
  ckpt.close()


def test_sync_save(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  state = _make_state()
  ckpt.save(1, state)
  assert ckpt.latest_step() == 1
  assert (tmp_path / '1' / checkpointing.CHECKSUMS_FILE).is_file()  # final on return
  _assert_identical(ckpt.restore(_abstract(state)), state)
  ckpt.close()


def test_write_checkpoint_is_final_when_it_returns(tmp_path):
  """A converted workdir's one save: on return the step is renamed into place with its
  checksums, and it restores verified."""
  state = _make_state(seed=4)
  checkpointing.write_checkpoint(str(tmp_path), 7, state)
  step_dir = tmp_path / 'checkpoints' / '7'
  assert (step_dir / 'state').is_dir() and (step_dir / checkpointing.CHECKSUMS_FILE).is_file()
  assert not list((tmp_path / 'checkpoints').glob('*.orbax-checkpoint-tmp*'))
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path)))
  _assert_identical(ckpt.restore(_abstract(state)), state)
  assert ckpt.restored == (7, True)
  ckpt.close()


def test_async_save_close_and_reopen(tmp_path):
  main_threads = set(threading.enumerate())
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  state = _make_state(seed=1)
  ckpt.save(1, state)  # May still be writing when this returns.
  ckpt.save(2, _make_state(seed=2))  # Waits for step 1, then starts step 2.
  ckpt.wait()
  assert ckpt.latest_step() == 2
  # Finalized: renamed into place. (orbax 0.12.8 also writes commit_success.txt on local
  # disks, 0.11.30 does not; the rename is what both do.)
  assert (tmp_path / '2' / 'state').is_dir()
  assert not list(tmp_path.glob('*.orbax-checkpoint-tmp*'))
  ckpt.close()
  # No lingering non-daemon threads that would keep the process alive.
  # (Threads that end on their own within a few seconds do not keep it alive.)
  deadline = time.monotonic() + 10
  while True:
    leftover = [t for t in threading.enumerate()
                if t not in main_threads and not t.daemon and t.is_alive()]
    if not leftover or time.monotonic() > deadline:
      break
    time.sleep(0.1)
  assert not leftover, [t.name for t in leftover]

  reopened = checkpointing.Checkpointer(str(tmp_path))
  assert reopened.all_steps() == [1, 2]
  _assert_identical(reopened.restore(_abstract(state), step=1), state)
  reopened.close()


def test_unfinished_save_is_ignored(tmp_path):
  states = _saved(tmp_path, [1, 2])
  # Make step 2 look like a save killed before orbax's final rename, and add
  # an empty leftover temp dir as well: neither is a complete checkpoint.
  (tmp_path / '2').rename(tmp_path / '2.orbax-checkpoint-tmp')
  (tmp_path / '3.orbax-checkpoint-tmp-1700000000').mkdir()

  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1]
  assert ckpt.latest_step() == 1
  _assert_identical(ckpt.restore(_abstract(states[1])), states[1])
  # The step can be saved again properly.
  ckpt.save(2, states[2])
  ckpt.wait()
  assert ckpt.latest_step() == 2
  _assert_identical(ckpt.restore(_abstract(states[2])), states[2])
  ckpt.close()


def _garble(step_dir: pathlib.Path):
  for f in step_dir.rglob('d/*'):
    f.write_bytes(b'not a checkpoint' * 3)


def _truncate(step_dir: pathlib.Path):
  for f in step_dir.rglob('d/*'):
    f.write_bytes(f.read_bytes()[:7])


def _drop_metadata(step_dir: pathlib.Path):
  (step_dir / 'state' / '_METADATA').unlink()


def _drop_manifest(step_dir: pathlib.Path):
  for f in step_dir.rglob('manifest.ocdbt'):
    f.unlink()


# After a failed read, tensorstore callbacks for the other leaves still in flight
# hit orbax's already-closed event loop ("Event loop is closed"); harmless noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_garble, _truncate, _drop_metadata,
                                    _drop_manifest])
def test_corrupt_checkpoint_raises_and_is_untouched(tmp_path, damage):
  states = _saved(tmp_path, [1, 2])
  damage(tmp_path / '2')
  before = _snapshot(tmp_path)

  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 2
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.restore(_abstract(states[2]))  # Must not fall back to step 1.
  msg = str(err.value)
  assert str(tmp_path / '2') in msg
  assert 'move it away' in msg and 'untouched' in msg
  assert '\n' not in msg
  assert err.value.__cause__ is not None
  # What an evaluation's init= and convert --from read: the same one line, nothing touched.
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.restore_subtree(('params',), _sharding())
  assert str(tmp_path / '2') in str(err.value) and 'untouched' in str(err.value)
  assert '\n' not in str(err.value)
  ckpt.close()
  assert _snapshot(tmp_path) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']


def test_incompatible_shapes_dtypes_and_tree(tmp_path):
  _saved(tmp_path, [5])
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  wider = _make_state(width=8)
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.restore(_abstract(wider))
  msg = str(err.value)
  assert str(tmp_path / '5') in msg and '\n' not in msg
  assert 'params/dense/kernel: saved (4, 3) float32, expected (4, 8)' in msg
  assert 'and 1 more' in msg  # 6 mismatches (params + mu + nu), 5 listed.

  # Orbax alone would silently cast a changed dtype.
  state = _make_state()
  recast = state.replace(step=jnp.float32(0))
  with pytest.raises(checkpointing.CheckpointError, match='step: saved'):
    ckpt.restore(_abstract(recast))

  changed = state.replace(params={**state.params, 'extra': jnp.zeros(3)})
  with pytest.raises(checkpointing.CheckpointError,
                     match='params/extra .missing from checkpoint'):
    ckpt.restore(_abstract(changed))
  ckpt.close()


def test_existing_step_is_not_overwritten(tmp_path):
  first = _saved(tmp_path, [1])[1]
  before = _snapshot(tmp_path)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, _make_state(seed=7))
  ckpt.wait()
  assert _snapshot(tmp_path) == before
  _assert_identical(ckpt.restore(_abstract(first)), first)
  ckpt.close()


def test_missing_directory_and_empty(tmp_path):
  directory = tmp_path / 'does' / 'not' / 'exist'
  ckpt = checkpointing.Checkpointer(str(directory))
  assert not (tmp_path / 'does').exists()  # created by the first save, not by reading
  assert ckpt.latest_step() is None
  assert ckpt.all_steps() == []
  with pytest.raises(checkpointing.CheckpointError, match='holds no complete checkpoint'):
    ckpt.restore(_abstract(_make_state()))
  with pytest.raises(checkpointing.CheckpointError, match='holds no complete checkpoint'):
    ckpt.restore(_abstract(_make_state()), step=4)
  ckpt.save(1, _make_state())
  ckpt.close()
  assert checkpointing.Checkpointer(str(directory)).all_steps() == [1]


def test_relative_directory_async_save_and_restore(tmp_path, monkeypatch):
  """A relative workdir (as typed on the command line) saves asynchronously and restores."""
  monkeypatch.chdir(tmp_path)
  state = _make_state(seed=3)
  ckpt = checkpointing.Checkpointer("workdirs/run/checkpoints", max_to_keep=2)
  ckpt.save(1, state)
  ckpt.save(2, state)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  _assert_identical(ckpt.restore(_abstract(state)), state)
  ckpt.close()
  assert (tmp_path / "workdirs" / "run" / "checkpoints" / "2").is_dir()


# ------------------------------------------------------------------ checksums


def _swap_in_other_arrays(step_dir: pathlib.Path, other: pathlib.Path):
  """Silent corruption: valid files holding other values (those of `other`), as a misplaced
  or torn write leaves them. orbax reads them without complaint; only checksums tell. (Flipped
  bytes are no substitute here: with OCDBT and zstd they mostly fail to decode, which the
  damage tests above cover, or land in file regions no array reads.)"""
  shutil.rmtree(step_dir / 'state')
  shutil.copytree(other / 'state', step_dir / 'state')


def _leaf_names(state) -> set[str]:
  return {jax.tree_util.keystr(p, simple=True, separator='/')
          for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize('async_save', [True, False])
def test_every_save_records_its_arrays_checksums(tmp_path, async_save):
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=async_save)
  states = {s: _make_state(seed=s) for s in (1, 2)}
  for s, state in states.items():
    ckpt.save(s, state)
  ckpt.close()
  for s, state in states.items():
    record = json.loads((tmp_path / str(s) / checkpointing.CHECKSUMS_FILE).read_text())
    assert record['algorithm'] == checksums.ALGORITHM
    assert set(record['arrays']) == _leaf_names(state)
    assert record['arrays']['params/dense/kernel'] == checksums.of_numpy(
        np.asarray(state.params['dense']['kernel']))  # the NumPy reference, independently
  reopened = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(reopened.restore(_abstract(states[2])), states[2])
  assert reopened.restored == (2, True)
  reopened.close()


def test_silent_corruption_is_caught_named_and_left_in_place(tmp_path, caplog):
  states = _saved(tmp_path, [1, 2, 3])
  _swap_in_other_arrays(tmp_path / '3', tmp_path / '1')
  before = _snapshot(tmp_path)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.DamagedCheckpoint) as err:
    ckpt.restore(_abstract(states[3]))  # no fallback asked for
  msg = str(err.value)
  assert msg.startswith(f'Checkpoint {tmp_path / "3"} fails its checksums: ') and '\n' not in msg
  assert 'params/dense/kernel' in msg or 'step' in msg  # the first arrays that failed
  # Resuming falls back to the newest checkpoint that verifies, loudly.
  restored = ckpt.restore(_abstract(states[3]), fallback=True)
  _assert_identical(restored, states[2])
  assert ckpt.restored == (2, True)
  assert 'RESUMING FROM AN OLDER CHECKPOINT, step 2' in caplog.text
  ckpt.close()
  assert _snapshot(tmp_path) == before  # nothing moved, deleted or rewritten


def _change_recorded_checksum(step_dir, name):
  """Edit `name`'s recorded checksum in a step's checksums file: it then stands for a silent
  change of that array, which reads back fine."""
  path = step_dir / checkpointing.CHECKSUMS_FILE
  record = json.loads(path.read_text())
  record['arrays'][name] ^= 1
  path.write_text(json.dumps(record))


def test_a_changed_array_is_named(tmp_path):
  """Arrays that read back fine but differ from what was saved (the checksums file edited
  to stand for a silent change) are named in the error."""
  states = _saved(tmp_path, [1])
  _change_recorded_checksum(tmp_path / '1', 'params/dense/bias')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.DamagedCheckpoint, match=r'1 of \d+ arrays .*params/dense/bias'):
    ckpt.restore(_abstract(states[1]))
  with pytest.raises(checkpointing.DamagedCheckpoint, match='params/dense/bias'):
    ckpt.restore_subtree(('params', 'dense'), _sharding())
  _, step = ckpt.restore_subtree(('params', 'scale'), _sharding())  # an intact part reads
  assert step == 1
  with pytest.raises(checkpointing.CheckpointError, match=r"has no params/nope \(it has "
                     r"\['dense', 'scale'\]\); is it a pre-training"):
    ckpt.restore_subtree(('params', 'nope'), _sharding())
  with pytest.raises(checkpointing.DamagedCheckpoint, match='Every checkpoint'):
    ckpt.restore(_abstract(states[1]), fallback=True)
  ckpt.close()


def test_checkpoints_without_checksums_restore_with_a_note(tmp_path, caplog):
  states = _saved(tmp_path, [1])
  (tmp_path / '1' / checkpointing.CHECKSUMS_FILE).unlink()  # as written before this change
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(ckpt.restore(_abstract(states[1])), states[1])
  assert ckpt.restored == (1, False)
  assert 'has no checksums' in caplog.text and 'restored unverified' in caplog.text
  ckpt.close()


@pytest.mark.parametrize('error,says', [
    (OSError(28, 'No space left on device'), 'the disk is full'),
    (OSError(13, 'Permission denied'), 'the directory is not writable'),
    (ValueError('something else'), 'ValueError, details in the log above')])
def test_a_failed_save_is_one_line_with_the_cause_and_the_fix(tmp_path, monkeypatch, error, says):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, _make_state(1))
  ckpt.wait()
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ckpt._mngr, 'save', fail)  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.save(2, _make_state(2))
  msg = str(err.value)
  assert msg.startswith(f'Writing checkpoint step 2 to {tmp_path} failed: {says}')
  assert 'rerun the same command' in msg and '\n' not in msg
  monkeypatch.undo()
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1']  # the good one stays


def test_a_directory_deleted_during_the_run_is_named_and_saving_goes_on(tmp_path, caplog):
  """Someone deletes the checkpoint directory mid-run: the next save warns loudly, names the
  steps that went with it, and saves into a new directory; orbax forgets the deleted steps
  (no retention error about them, and they are not listed or restored)."""
  directory = tmp_path / 'checkpoints'
  ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=2)
  ckpt.save(8, _make_state(8))
  ckpt.wait()
  shutil.rmtree(directory)
  ckpt.save(16, _make_state(16))
  ckpt.wait()
  assert 'THE CHECKPOINT DIRECTORY' in caplog.text and 'checkpoints 8 went with it' in caplog.text
  assert ckpt.all_steps() == [16]
  caplog.clear()
  ckpt.save(24, _make_state(24))
  ckpt.save(32, _make_state(32))
  ckpt.close()
  assert 'Unable to find the step' not in caplog.text
  assert sorted(int(p.name) for p in directory.iterdir()) == [24, 32]
  ckpt = checkpointing.Checkpointer(str(directory))
  _assert_identical(ckpt.restore(_abstract(_make_state(32))), _make_state(32))
  assert ckpt.restored == (32, True)
  ckpt.close()


def test_a_directory_that_cannot_be_created_is_one_line(tmp_path):
  (tmp_path / 'file').write_text('')  # a file where a parent directory should be
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'file' / 'checkpoints'))  # reads nothing
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.save(1, _make_state())  # the first save creates the directory
  assert str(err.value).startswith(
      f'Creating the checkpoint directory {tmp_path}/file/checkpoints failed: ')
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('read', ['restore', 'restore_subtree'])
def test_reading_a_run_without_checkpoints_names_it_and_creates_nothing(tmp_path, read):
  (tmp_path / 'config.json').write_text('{}')  # another run's workdir, checkpoints never saved
  directory = checkpointing.checkpoint_dir(str(tmp_path))
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=1 << 30)
  with pytest.raises(checkpointing.CheckpointError) as err:
    if read == 'restore':
      ckpt.restore(_abstract(_make_state()), fallback=True)
    else:
      ckpt.restore_subtree(('params',), _sharding())
  ckpt.close()
  assert str(err.value) == (
      f'{directory} holds no complete checkpoint: point config.init.workdir (or convert\'s '
      '--from) at the workdir of a run that saved one, or run pre-training first (python -m '
      'pr_mim_jax.main --config=pr_mim_jax/configs/pretrain.py ...).')
  assert [p.name for p in tmp_path.iterdir()] == ['config.json']  # no checkpoints/ made


def test_a_missing_step_names_the_steps_there(tmp_path):
  _saved(tmp_path, [4])
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError, match=(
      rf'^{tmp_path} has no complete checkpoint of step 5; it holds steps \[4\]: pick one')):
    ckpt.restore_subtree(('params',), _sharding(), step=5)
  ckpt.close()


_READ_EMPTY = """
import sys
from pr_mim_jax.training import checkpointing
ckpt = checkpointing.Checkpointer(sys.argv[1])
try:
  ckpt.latest_step()
finally:
  ckpt.close()
"""


def test_opening_to_read_leaves_nothing_running_at_exit(tmp_path):
  """No background clean-up outlives a read: it printed an orbax traceback after the error."""
  proc = subprocess.run([sys.executable, '-c', _READ_EMPTY, str(tmp_path / 'checkpoints')],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and proc.stderr == '', proc.stderr
  assert not (tmp_path / 'checkpoints').exists()


_KILLED_MID_SAVE = '''
import sys, numpy as np, jax.numpy as jnp
from pr_mim_jax.training import checkpointing
ckpt = checkpointing.Checkpointer(sys.argv[1])
ckpt.save(1, {"w": jnp.arange(1000.0)})
ckpt.wait()
noise = np.random.default_rng(0).normal(size=(64, 1 << 20)).astype(np.float32)  # 256 MiB
ckpt.save(2, {"w": jnp.asarray(noise[0, :1000]), "big": jnp.asarray(noise)})
print("saving", flush=True)
sys.stdin.read()  # the parent kills us long before this returns
'''


def test_a_save_killed_midway_leaves_the_previous_checkpoint_good(tmp_path):
  """SIGKILL while step 2's 256 MiB are being written: step 1 stays the newest complete
  checkpoint and restores verified; the unfinished step is ignored and can be saved again."""
  proc = subprocess.Popen([sys.executable, '-c', _KILLED_MID_SAVE, str(tmp_path)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == 'saving\n'
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert not (tmp_path / '2').exists()  # killed before orbax's final rename,
  assert list(tmp_path.glob('2.orbax-checkpoint-tmp*'))  # while writing
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1]
  restored = ckpt.restore({'w': jax.ShapeDtypeStruct((1000,), jnp.float32, sharding=_sharding())})
  np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(1000.0))
  assert ckpt.restored == (1, True)
  ckpt.save(2, {'w': jnp.zeros(1000)})
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']


def test_a_directory_deleted_during_a_save_says_so(tmp_path):
  """Deleted while an asynchronous save is writing: that save fails, and the error says the
  checkpoints are gone instead of promising an untouched one."""
  directory = tmp_path / 'checkpoints'
  ckpt = checkpointing.Checkpointer(str(directory))
  ckpt.save(8, _make_state(8))
  ckpt.wait()
  def deleted_midway(*args, **kwargs):
    shutil.rmtree(directory)
    raise ValueError('NOT_FOUND: Error writing local file')  # what TensorStore then raises
  finish = ckpt._mngr.wait_until_finished  # pylint: disable=protected-access
  ckpt._mngr.wait_until_finished = deleted_midway  # pylint: disable=protected-access
  ckpt._pending = 16  # as save(16) leaves it  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.wait()
  ckpt._mngr.wait_until_finished = finish  # pylint: disable=protected-access
  ckpt.close()
  assert str(err.value) == (
      f'Writing checkpoint step 16 to {directory} failed: the directory was deleted while '
      'the step was being written, and every checkpoint in it went with it. Rerun the same '
      'command to start afresh.')


def test_a_run_resumed_past_a_damaged_step_saves_that_step_anew(tmp_path, caplog):
  """Resuming falls back from a damaged step 2 to step 1; when the run reaches step 2 again,
  its new state must be saved (the damaged one kept aside), not skipped as 'already there'."""
  states = _saved(tmp_path, [1, 2])
  _swap_in_other_arrays(tmp_path / '2', tmp_path / '1')  # step 2 fails its checksums
  damaged_files = _snapshot(tmp_path / '2')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(ckpt.restore(_abstract(states[2]), fallback=True), states[1])
  retrained = _make_state(seed=5)  # what the resumed run holds at step 2
  ckpt.save(2, retrained)
  ckpt.close()
  reopened = checkpointing.Checkpointer(str(tmp_path))
  assert reopened.all_steps() == [1, 2]
  _assert_identical(reopened.restore(_abstract(retrained), fallback=True), retrained)
  assert reopened.restored == (2, True)
  reopened.close()
  kept = tmp_path / '2.damaged'  # the damaged checkpoint, byte for byte, out of orbax's way
  assert {k.replace(str(kept), str(tmp_path / '2')): v
          for k, v in _snapshot(kept).items()} == damaged_files
  assert '2.damaged' in caplog.text


@pytest.mark.parametrize('keep,after_5', [(1, ['5', '6']), (2, ['4', '5', '6'])])
def test_retention_counts_good_steps_and_never_deletes_a_damaged_one(tmp_path, keep, after_5):
  """Steps 2, 4, 6 with 6 damaged, resumed from 4. Saving 5 keeps the newest `keep` good
  steps and leaves damaged 6 in place, as the resume promised (orbax's own retention counts
  in save order: it deleted 6 with keep=1, and with keep=2 kept 6 in place of good 4)."""
  states = _saved(tmp_path, [2, 4, 6])
  _swap_in_other_arrays(tmp_path / '6', tmp_path / '4')
  damaged = _snapshot(tmp_path / '6')
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=keep)
  _assert_identical(ckpt.restore(_abstract(states[6]), fallback=True), states[4])
  ckpt.save(5, _make_state(seed=5))
  ckpt.wait()
  assert sorted(p.name for p in tmp_path.iterdir()) == after_5
  assert _snapshot(tmp_path / '6') == damaged
  new = _make_state(seed=16)
  ckpt.save(6, new)  # reaches the damaged step: it goes aside, whole
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == after_5[1:] + ['6.damaged']
  assert {k.replace(f'{tmp_path}/6.damaged', f'{tmp_path}/6'): v
          for k, v in _snapshot(tmp_path / '6.damaged').items()} == damaged
  reopened = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(reopened.restore(_abstract(new)), new)
  reopened.close()


def test_a_step_damaged_again_goes_aside_under_a_new_name(tmp_path):
  """Earlier damaged copies of a step, kept for inspection, are never overwritten: the next
  one takes the first free '<step>.damaged-N' name."""
  states = _saved(tmp_path, [1, 2])
  for name in ('2.damaged', '2.damaged-2'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'note').write_text(name)
  _swap_in_other_arrays(tmp_path / '2', tmp_path / '1')
  damaged_files = _snapshot(tmp_path / '2')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(ckpt.restore(_abstract(states[2]), fallback=True), states[1])
  retrained = _make_state(seed=5)
  ckpt.save(2, retrained)
  ckpt.close()
  for name in ('2.damaged', '2.damaged-2'):
    assert [p.name for p in (tmp_path / name).iterdir()] == ['note']
    assert (tmp_path / name / 'note').read_text() == name
  kept = tmp_path / '2.damaged-3'
  assert {k.replace(str(kept), str(tmp_path / '2')): v
          for k, v in _snapshot(kept).items()} == damaged_files
  reopened = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(reopened.restore(_abstract(retrained)), retrained)
  reopened.close()


def test_a_step_still_being_written_is_not_listed(tmp_path, monkeypatch):
  """Orbax lists an async save's step once it starts: until it is final, the newest complete
  checkpoint is the previous one (a kill now would leave only that one)."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=True)
  ckpt.save(1, _make_state(seed=1))
  ckpt.wait()
  ckpt.save(2, _make_state(seed=2))
  with monkeypatch.context() as m:
    m.setattr(ckpt._mngr, 'is_saving_in_progress', lambda: True)  # pylint: disable=protected-access
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  ckpt.close()


def test_resuming_into_another_models_checkpoints_names_the_mismatch_not_damage(tmp_path):
  """Resuming (fallback) with a changed model: the error is the config mismatch of the
  newest checkpoint, not 'every checkpoint is damaged' (which tells the user to start
  afresh), and no older step is restored in its place."""
  _saved(tmp_path, [1, 2])
  before = _snapshot(tmp_path)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.restore(_abstract(_make_state(width=8)), fallback=True)
  assert not isinstance(err.value, checkpointing.DamagedCheckpoint)
  assert str(err.value).startswith(
      f'Checkpoint {tmp_path / "2"} does not match the current model/optimizer')
  assert ckpt.restored is None
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_only_the_damaged_steps_go_aside_each_under_its_own_name(tmp_path):
  """Steps 2 and 3 damaged, resumed from 1: saving step 2 anew moves exactly step 2 aside;
  damaged step 3 stays where it is until the run reaches it, and then goes aside too."""
  states = _saved(tmp_path, [1, 2, 3])
  for s in (2, 3):
    _swap_in_other_arrays(tmp_path / str(s), tmp_path / '1')
  damaged = {s: _snapshot(tmp_path / str(s)) for s in (2, 3)}
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(ckpt.restore(_abstract(states[3]), fallback=True), states[1])
  good = _snapshot(tmp_path / '1')
  ckpt.save(1, _make_state(seed=9))  # an existing good step: never moved or overwritten
  ckpt.wait()
  assert _snapshot(tmp_path / '1') == good
  new = {s: _make_state(seed=10 + s) for s in (2, 3)}
  ckpt.save(2, new[2])
  ckpt.wait()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '2.damaged', '3']
  assert _snapshot(tmp_path / '3') == damaged[3]
  ckpt.save(3, new[3])
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '2.damaged', '3', '3.damaged']
  for s in (2, 3):
    kept = tmp_path / f'{s}.damaged'
    assert {k.replace(str(kept), str(tmp_path / str(s))): v
            for k, v in _snapshot(kept).items()} == damaged[s]
  reopened = checkpointing.Checkpointer(str(tmp_path))
  for s in (2, 3):
    _assert_identical(reopened.restore(_abstract(new[s]), step=s), new[s])
    assert reopened.restored == (s, True)
  reopened.close()


def test_a_step_saved_anew_is_never_moved_aside_again(tmp_path):
  """Once a damaged step has been saved anew, that new checkpoint is a good one: a second
  save of the same step leaves it in place (the step is never overwritten)."""
  states = _saved(tmp_path, [1, 2])
  _swap_in_other_arrays(tmp_path / '2', tmp_path / '1')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.restore(_abstract(states[2]), fallback=True)
  retrained = _make_state(seed=5)
  ckpt.save(2, retrained)
  ckpt.wait()
  good = _snapshot(tmp_path / '2')
  ckpt.save(2, _make_state(seed=6))
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '2.damaged']
  assert _snapshot(tmp_path / '2') == good
  reopened = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(reopened.restore(_abstract(retrained)), retrained)
  reopened.close()


def test_garbled_checksums_make_the_step_damaged_and_resuming_passes_it(tmp_path):
  """A checksums file that no longer parses is damage, not a missing file: reading the step
  fails, resuming falls back to the older one, and both are left as they were."""
  states = _saved(tmp_path, [1, 2])
  path = tmp_path / '2' / checkpointing.CHECKSUMS_FILE
  path.write_text(path.read_text()[:20])  # torn
  before = _snapshot(tmp_path)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.DamagedCheckpoint, match=f'Checkpoint {tmp_path / "2"} is '):
    ckpt.restore(_abstract(states[2]))
  _assert_identical(ckpt.restore(_abstract(states[2]), fallback=True), states[1])
  assert ckpt.restored == (1, True)
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_checksums_of_another_algorithm_restore_unverified(tmp_path, caplog):
  """Values recorded by another checksum algorithm cannot be compared: the step restores
  unverified, with the note, instead of failing every array."""
  states = _saved(tmp_path, [1])
  path = tmp_path / '1' / checkpointing.CHECKSUMS_FILE
  record = json.loads(path.read_text())
  path.write_text(json.dumps({'algorithm': 'another-v9',
                              'arrays': {k: v ^ 1 for k, v in record['arrays'].items()}}))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(ckpt.restore(_abstract(states[1]), fallback=True), states[1])
  assert ckpt.restored == (1, False)
  assert 'restored unverified' in caplog.text
  ckpt.close()


def test_a_checksums_write_that_fails_midway_leaves_the_step_restorable(tmp_path, monkeypatch,
                                                                         caplog):
  """The disk fills while checksums.json is written: the step itself is complete, so it
  must restore (unverified, with a note), not read as damaged because of a half-written
  checksums file."""
  state = _make_state(seed=1)
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  write_text = type(ckpt.directory).write_text

  def torn(self, text, *args, **kwargs):
    if not self.name.startswith(checkpointing.CHECKSUMS_FILE):
      return write_text(self, text, *args, **kwargs)
    write_text(self, text[:len(text) // 2], *args, **kwargs)
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(type(ckpt.directory), 'write_text', torn)
  ckpt.save(1, state)
  monkeypatch.undo()
  ckpt.close()
  assert 'Could not write the checksums' in caplog.text
  reopened = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(reopened.restore(_abstract(state), fallback=True), state)
  assert reopened.restored == (1, False)
  reopened.close()


def test_reading_leaves_another_runs_unfinished_save_alone(tmp_path):
  """Opening a run's checkpoints to read them (init=, convert, the study) while that run is
  saving must not remove its step in progress."""
  states = _saved(tmp_path, [1])
  writing = tmp_path / '2.orbax-checkpoint-tmp-1700000000'
  (writing / 'state').mkdir(parents=True)
  (writing / 'state' / 'part').write_text('being written')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(ckpt.restore(_abstract(states[1])), states[1])
  ckpt.restore_subtree(('params',), _sharding())
  ckpt.close()
  assert (writing / 'state' / 'part').read_text() == 'being written'


_FREE_SPACE = 'the disk is full (or a file size or quota limit was hit): free space'
_WRITABLE = ('the directory is not writable (permissions, or a read-only file system): make '
             'it writable')


@pytest.mark.parametrize('error,cause', [
    (OSError(28, 'No space left on device'), _FREE_SPACE),
    (OSError(122, 'Disk quota exceeded'), _FREE_SPACE),
    (OSError(27, 'File too large'), _FREE_SPACE),
    (OSError(13, 'Permission denied'), _WRITABLE),
    (OSError(30, 'Read-only file system'), _WRITABLE)])
def test_a_failed_save_says_what_to_do_and_that_the_last_checkpoint_is_kept(
    tmp_path, monkeypatch, error, cause):
  """Each disk cause gets its fix, and the promise that the last checkpoint is untouched."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _make_state(1))
  good = _snapshot(tmp_path)
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ckpt._mngr, 'save', fail)  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.save(2, _make_state(2))
  monkeypatch.undo()
  ckpt.close()
  assert str(err.value) == (
      f'Writing checkpoint step 2 to {tmp_path} failed: {cause}, then rerun the same command '
      'to resume from the last complete checkpoint, which is untouched.')
  assert _snapshot(tmp_path) == good


def test_checksum_failures_say_the_checkpoint_is_kept_and_how_to_go_on(tmp_path):
  """The full lines: one changed array of the newest step, then every step damaged."""
  states = _saved(tmp_path, [1])
  _change_recorded_checksum(tmp_path / '1', 'params/dense/bias')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.DamagedCheckpoint) as err:
    ckpt.restore(_abstract(states[1]))
  assert str(err.value) == (
      f'Checkpoint {tmp_path / "1"} fails its checksums: 1 of {len(_leaf_names(states[1]))} '
      'arrays changed since they were saved (params/dense/bias). It is left untouched: move '
      'it away to resume from an older checkpoint, or point --workdir elsewhere.')
  with pytest.raises(checkpointing.DamagedCheckpoint) as err:
    ckpt.restore(_abstract(states[1]), fallback=True)
  assert str(err.value) == (
      f'Every checkpoint in {tmp_path} is damaged (steps 1); they are left untouched. Point '
      '--workdir elsewhere to start afresh.')
  ckpt.close()


def test_a_damaged_step_deleted_by_hand_mid_run_does_not_stop_the_save(tmp_path):
  """The user deletes the damaged step (as the warning suggests) while the resumed run goes
  on: when the run reaches that step it simply saves it."""
  states = _saved(tmp_path, [1, 2])
  _swap_in_other_arrays(tmp_path / '2', tmp_path / '1')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.restore(_abstract(states[2]), fallback=True)
  shutil.rmtree(tmp_path / '2')
  retrained = _make_state(seed=5)
  ckpt.save(2, retrained)
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']
  reopened = checkpointing.Checkpointer(str(tmp_path))
  _assert_identical(reopened.restore(_abstract(retrained)), retrained)
  assert reopened.restored == (2, True)
  reopened.close()


def test_a_failed_async_save_is_named_by_the_next_save(tmp_path, monkeypatch):
  """Step 1's background write fails (disk full): the next save stops with an error naming
  step 1, the one that was lost, not step 2."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=True)
  ckpt.save(1, _make_state(1))
  ckpt._mngr.wait_until_finished()  # pylint: disable=protected-access
  def fail():
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(ckpt._mngr, 'wait_until_finished', fail)  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointError,
                     match=f'^Writing checkpoint step 1 to {tmp_path} failed: the disk is full'):
    ckpt.save(2, _make_state(2))
  monkeypatch.undo()
  ckpt.close()


def test_a_damaged_step_that_cannot_be_moved_aside_is_one_line(tmp_path, monkeypatch):
  """The rename of a damaged step fails (permissions): one error line with the cause and the
  fix, and the damaged step stays where it was."""
  states = _saved(tmp_path, [1, 2])
  _swap_in_other_arrays(tmp_path / '2', tmp_path / '1')
  damaged = _snapshot(tmp_path / '2')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.restore(_abstract(states[2]), fallback=True)
  def refuse(self, target):
    raise PermissionError(13, 'Permission denied', str(self))
  monkeypatch.setattr(type(ckpt.directory), 'rename', refuse)
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.save(2, _make_state(seed=5))
  monkeypatch.undo()
  ckpt.close()
  assert str(err.value).startswith(f'Writing checkpoint step 2 to {tmp_path} failed: the '
                                   'directory is not writable')
  assert '\n' not in str(err.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']
  assert _snapshot(tmp_path / '2') == damaged


def test_a_checkpoint_with_arrays_the_model_lacks_is_named_not_dropped(tmp_path):
  """A resume with a model that lost a parameter must not silently drop the saved array."""
  state = _make_state()
  extra = state.replace(params={**state.params, 'extra': jnp.zeros(3)})
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, extra)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'does not match .*params/extra \(only in checkpoint\)'):
    ckpt.restore(_abstract(state), fallback=True)
  ckpt.close()
