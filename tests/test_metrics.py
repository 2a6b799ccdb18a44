"""The metric writers: JSONL always, TensorBoard through clu with TensorFlow's GPUs hidden."""

import json

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
