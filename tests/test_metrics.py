"""The metric writers: JSONL always, TensorBoard through clu with TensorFlow's GPUs hidden."""

import collections
import errno
import json
import pathlib

import numpy as np
import pytest

from pr_mim_jax.training import metrics

tensorflow_devices = pytest.importorskip("pr_mim_jax.data.tensorflow_devices")
pytest.importorskip("clu.metric_writers")


def _record_visibility_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(tensorflow_devices.tf.config, "set_visible_devices",
                      lambda devices, kind: calls.append((list(devices), kind)))
  return calls


def test_tensorboard_writer_hides_gpus_and_writes_both_outputs(tmp_path, monkeypatch):
  calls = _record_visibility_calls(monkeypatch)
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=True)
  assert calls == [([], "GPU")]
  writer.write_scalars(7, {"loss": 0.5})
  writer.close()
  row = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert (row["step"], row["loss"]) == (7, 0.5)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_without_tensorboard_tensorflow_is_left_alone(tmp_path, monkeypatch):
  calls = _record_visibility_calls(monkeypatch)
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write_scalars(1, {"loss": 2.0})
  assert calls == [] and not (tmp_path / "tensorboard").exists()
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0


def test_hide_gpus_after_tensorflow_started_is_not_an_error(monkeypatch):
  def already_initialised(devices, kind):
    raise RuntimeError("Visible devices cannot be modified after being initialized")
  monkeypatch.setattr(tensorflow_devices.tf.config, "set_visible_devices", already_initialised)
  tensorflow_devices.hide_gpus()  # must not raise


@pytest.mark.skipif(not pathlib.Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_names_metrics_jsonl(tmp_path):
  """A failed append (a link to /dev/full, which refuses every write) raises the disk's error
  with the file's name on it, for the one error line cli.run prints."""
  (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(OSError) as e:
    writer.write_scalars(1, {"loss": 0.5})
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "metrics.jsonl"))


@pytest.mark.parametrize("where", ["__init__", "write_scalars"])
def test_tensorboard_on_a_full_disk_raises_the_disks_os_error(tmp_path, monkeypatch, where):
  """TensorFlow reports a full disk as its ResourceExhaustedError (seen on a full tmpfs, at the
  writer's creation): it becomes the OSError cli.run prints as one line, naming the folder.
  Any other TensorFlow error, and an OSError that names its own file, is raised as it was."""
  tf = pytest.importorskip("tensorflow")
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  full = tf.errors.ResourceExhaustedError(
      None, None, f"{tmp_path}/tensorboard/events.out.tfevents.1.vm.1.0.v2; No space left on "
      "device\n\tFailed to flush 1 events")
  raised = [full]

  class Writer:
    def __init__(self, logdir):
      if where == "__init__":
        raise raised[0]

    def write_scalars(self, step, scalars):
      raise raised[0]

  monkeypatch.setattr(metric_writers, "SummaryWriter", Writer)
  with pytest.raises(OSError) as e:
    metrics.MetricWriter(str(tmp_path)).write_scalars(1, {"loss": 0.5})
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "tensorboard"))
  assert e.value.__cause__ is full
  raised[0] = tf.errors.InvalidArgumentError(None, None, "not a disk problem")
  with pytest.raises(tf.errors.InvalidArgumentError):
    metrics.MetricWriter(str(tmp_path)).write_scalars(1, {"loss": 0.5})
  event_file = str(tmp_path / "tensorboard" / "events.out")  # an OSError keeps its own file
  raised[0] = OSError(errno.ENOSPC, "No space left on device", event_file)
  with pytest.raises(OSError) as e:
    metrics.MetricWriter(str(tmp_path)).write_scalars(1, {"loss": 0.5})
  assert e.value is raised[0] and e.value.filename == event_file


def test_last_recorded_takes_each_keys_last_row_past_torn_lines(tmp_path):
  rows = ['{"step": 1, "loss": 3.0, "knn_top1": 0.1}', '{"step": 2, "loss": 2.0}',
          '{"step": 3, "lo', '{"step": 4, "loss": 1.0}', '']
  (tmp_path / "metrics.jsonl").write_text("\n".join(rows))
  assert metrics.last_recorded(str(tmp_path), ["loss", "knn_top1", "absent"]) == {
      "loss": (4, 1.0), "knn_top1": (1, 0.1)}
  assert metrics.last_recorded(str(tmp_path / "nowhere"), ["loss"]) == {}


def test_format_seconds():
  assert metrics.format_seconds(3 * 3600 + 25 * 60 + 7.9) == "3h25m07s"
  assert metrics.format_seconds(59) == "0h00m59s"
  assert metrics.format_seconds(float("inf")) == "?"


def test_progress_rate_is_over_the_last_interval(monkeypatch):
  clock = iter([100.0, 102.0, 106.0, 106.0])
  monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
  progress = metrics.Progress(first_step=10, total_steps=100)
  assert progress.report(20) == {"steps_per_sec": 5.0}  # 10 steps in 2 s
  assert progress.report(60) == {"steps_per_sec": 10.0}  # 40 steps in the next 4 s
  assert progress.report(60) == {"steps_per_sec": 0.0}  # no time, no steps: no division error


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=True)
  writer.write_scalars(1, {"loss": 2.0})
  writer.write_images(1, {"img": [[[0, 0, 0]]]})
  writer.close()
  assert not writer.active and list(tmp_path.iterdir()) == []


def _steps_by_tag(logdir) -> dict:
  """{tag: Counter of steps} over every event file in `logdir`, read with TensorFlow up to a
  torn record, as TensorBoard reads them."""
  tf = tensorflow_devices.tf
  found = collections.defaultdict(collections.Counter)
  for path in sorted(logdir.glob("*tfevents*")):
    try:
      for record in tf.data.TFRecordDataset(str(path)):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
          found[value.tag][event.step] += 1
    except tf.errors.DataLossError:
      pass
  return dict(found)


@pytest.mark.parametrize("name", ["run", "run[1]"])  # [1] is a glob pattern, not this name
def test_a_resumed_run_logs_each_step_once_in_tensorboard(tmp_path, name):
  """Steps 7-10 of the first run were never saved: the run resumed at step 6 logs 7 and 8
  again, and TensorBoard must hold each step once. Steps up to 6 stay, even when the last
  record was torn by a kill."""
  tmp_path = tmp_path / name
  first = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 11):
    first.write_scalars(step, {"loss": 1.0 / step})
  for step in (5, 9):
    first.write_images(step, {"picture": np.zeros((2, 2, 3), np.uint8)})
  first.close()
  (old,) = (tmp_path / "tensorboard").glob("*tfevents*")
  old.write_bytes(old.read_bytes()[:-5])  # the last record (the picture at step 9) is torn
  metrics.MetricWriter(str(tmp_path), start_step=10).close()  # nothing past 10: untouched
  assert _steps_by_tag(tmp_path / "tensorboard")["loss"] == collections.Counter(range(1, 11))

  resumed = metrics.MetricWriter(str(tmp_path), start_step=6)
  for step in (7, 8):
    resumed.write_scalars(step, {"loss": 0.0})
  resumed.close()
  assert _steps_by_tag(tmp_path / "tensorboard") == {
      "loss": collections.Counter(range(1, 9)), "picture": collections.Counter([5])}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_progress_line_shows_the_share_done_and_the_eta_at_the_last_rate(monkeypatch, caplog):
  clock = iter([100.0, 102.0, 106.0])
  monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
  progress = metrics.Progress(first_step=10, total_steps=100)
  with caplog.at_level("INFO"):
    progress.report(20)  # 5 steps/s: 80 steps left take 16 s
    progress.report(60)  # 10 steps/s: 40 steps left take 4 s
  assert [r.getMessage() for r in caplog.records] == [
      "step 20/100 (20.0%), 5.00 steps/s, ETA 0h00m16s",
      "step 60/100 (60.0%), 10.00 steps/s, ETA 0h00m04s"]


def test_format_seconds_carries_minutes_into_hours():
  assert metrics.format_seconds(2 * 3600 + 59 * 60 + 59.99) == "2h59m59s"
  assert metrics.format_seconds(26 * 3600 + 60) == "26h01m00s"


def test_jsonl_rows_hold_plain_floats_of_device_scalars(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write_scalars(3, {"loss": jnp.float32(0.25), "lr": np.float64(1e-4), "n": 2})
  row = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert {k: row[k] for k in ("step", "loss", "lr", "n")} == {
      "step": 3, "loss": 0.25, "lr": 1e-4, "n": 2.0}
  assert isinstance(row["time"], float)


def test_a_rerun_from_step_0_drops_every_event_of_the_unsaved_run(tmp_path):
  """No checkpoint was saved: the rerun starts at step 0, and TensorBoard must not keep the
  first run's curve under the new one."""
  first = metrics.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    first.write_scalars(step, {"loss": 1.0})
  first.close()
  metrics.MetricWriter(str(tmp_path), start_step=0).close()
  assert _steps_by_tag(tmp_path / "tensorboard") == {}
