"""Tests for pr_mim_jax.training.workdir_records: the writable check, what a resume may change,
metrics rows past the resumed step."""

import json
import os
import logging

import numpy as np
import pytest

from conftest import TINY_OVERRIDES, apply_overrides, load_config

from pr_mim_jax.errors import UserError
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import workdir_records


def test_a_writable_workdir_is_created_and_left_as_it_was(tmp_path):
  workdir = tmp_path / "new" / "run"
  workdir_records.check_writable(str(workdir))
  assert workdir.is_dir() and list(workdir.iterdir()) == []  # the probe is gone
  (workdir / "checkpoints").mkdir()
  workdir_records.check_writable(str(workdir))
  assert [p.name for p in workdir.iterdir()] == ["checkpoints"]


def test_an_unwritable_workdir_is_one_line_that_names_it(tmp_path):
  (tmp_path / "file").write_text("")  # a file where the workdir's parent should be
  workdir = tmp_path / "file" / "run"
  with pytest.raises(UserError) as err:
    workdir_records.check_writable(str(workdir))
  msg = str(err.value)
  assert msg.startswith(f"--workdir {workdir} is not writable (Not a directory). No checkpoint")
  assert "point --workdir elsewhere" in msg and "\n" not in msg


def test_a_workdir_that_is_a_file_says_so_and_keeps_it(tmp_path):
  workdir = tmp_path / "file"
  workdir.write_text("mine")
  with pytest.raises(UserError) as err:
    workdir_records.check_writable(str(workdir))
  assert str(err.value) == (f"--workdir={workdir} is a file, not a directory: choose a directory "
                            "(a new path, or an existing directory)")
  assert workdir.read_text() == "mine"


def test_a_remote_store_error_is_named_by_its_type(tmp_path, monkeypatch):
  class PermissionDeniedError(Exception):  # what a remote filesystem layer might raise
    pass

  def deny(self, *args, **kwargs):
    raise PermissionDeniedError("403 on gs://bucket/run/.write_probe.0\nmore detail")

  monkeypatch.setattr(workdir_records.epath.Path, "write_text", deny)
  with pytest.raises(UserError) as err:
    workdir_records.check_writable(str(tmp_path))
  assert str(err.value).startswith(f"--workdir {tmp_path} is not writable (PermissionDeniedError: "
                                   "403 on gs://bucket/run/.write_probe.0). No checkpoint")


def test_every_process_stops_when_one_cannot_write(tmp_path, monkeypatch):
  """This process can write, process 1 cannot: this one stops too, naming process 1, rather
  than wait for it at the first collective."""
  monkeypatch.setattr(workdir_records.jax, "process_count", lambda: 2)
  gathered = []

  def allgather(x):
    gathered.append(x.tolist())
    return np.asarray([[False], [True]])

  monkeypatch.setattr(workdir_records.multihost_utils, "process_allgather", allgather)
  with pytest.raises(UserError) as err:
    workdir_records.check_writable(str(tmp_path))
  assert gathered == [[False]]  # this process's own verdict went in
  assert str(err.value).startswith(f"--workdir {tmp_path} is not writable from process(es) 1. ")


def _recorded(workdir, **overrides):
  """A workdir whose config.json holds the tiny config with `overrides`."""
  workdir.mkdir(parents=True, exist_ok=True)
  config = apply_overrides(apply_overrides(load_config(), TINY_OVERRIDES), overrides)
  (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True))
  return str(workdir)


def _tiny(**overrides):
  return apply_overrides(apply_overrides(load_config(), TINY_OVERRIDES), overrides)


@pytest.mark.parametrize("field,value", [("batch_size", 32), ("seed", 3),
                                         ("masking.mask_ratio", 0.8),
                                         ("data.dataset", "cifar10"), ("model.image_size", 32)])
def test_resuming_with_a_changed_training_field_names_it(tmp_path, field, value):
  workdir = _recorded(tmp_path / "run")
  before = (tmp_path / "run" / "config.json").read_text()
  old = str(_tiny()[field.split(".")[0]] if "." not in field else
            _tiny()[field.split(".")[0]][field.split(".")[1]])
  with pytest.raises(UserError) as err:
    workdir_records.check_resume_config(workdir, _tiny(**{field: value}), 8,
                                        pretrain.FIXED_ON_RESUME)
  msg = str(err.value)
  assert msg.startswith(f"config.{field}: ") and f"--config.{field}={old}" in msg
  assert "\n" not in msg and "step 8" in msg
  assert (tmp_path / "run" / "config.json").read_text() == before


@pytest.mark.parametrize("field,value", [
    ("method", "partial"), ("masking.throw_ratio", 0.25), ("masking.throw_strategy", "random"),
    ("reconstruction.aggregator", "last_block"), ("reconstruction.num_stages", 2),
    ("loss.target", "pixel"), ("loss.thrown_loss_weight", 0.5), ("data.crop_min_scale", 0.2),
    ("data.train_split", "test"), ("data.shapes.difficulty", "easy")])
def test_resuming_pre_training_with_another_method_loss_or_examples_is_refused(tmp_path, field,
                                                                               value):
  """What the saved steps trained on (the method, its masks, reconstruction and loss, the
  examples and their crops), each checked on its own."""
  workdir = _recorded(tmp_path / "run")
  with pytest.raises(UserError, match=rf"^config\.{field}: "):
    workdir_records.check_resume_config(workdir, _tiny(**{field: value}), 8,
                                        pretrain.FIXED_ON_RESUME)


def test_a_workdir_holding_another_kind_of_run_says_to_use_a_new_one(tmp_path):
  """A probe given its init run as --workdir was told to pass --config.mode=pretrain, and
  pre-training into a probe's workdir failed later on 151 mismatched leaves."""
  pretrained = _recorded(tmp_path / "pre")
  with pytest.raises(UserError) as err:
    workdir_records.check_run_kind(pretrained, _tiny(mode="linear_probe"))
  assert str(err.value) == (
      f"config.mode: --workdir {pretrained} holds a 'pretrain' run (its config.json), and this "
      "is a 'linear_probe' run; point --workdir at a new folder, and init= at the run to start "
      "from")
  probe = _recorded(tmp_path / "probe", mode="finetune")
  with pytest.raises(UserError, match=r"^config\.mode: .* holds a 'finetune' run .* this is a "
                     r"'pretrain' run; point --workdir at a new folder$"):
    workdir_records.check_run_kind(probe, _tiny())
  # The same kind, a new folder, or a config.json that does not parse: no objection here.
  workdir_records.check_run_kind(pretrained, _tiny())
  workdir_records.check_run_kind(str(tmp_path / "new"), _tiny(mode="finetune"))
  for text in ("{", "[]"):
    (tmp_path / "probe" / "config.json").write_text(text)
    workdir_records.check_run_kind(probe, _tiny())


def test_allowed_changes_are_named_and_step_0_or_no_record_takes_any_config(tmp_path, caplog):
  workdir = _recorded(tmp_path / "run")
  with caplog.at_level(logging.WARNING):
    workdir_records.check_resume_config(
        workdir, _tiny(**{"optim.base_lr": 5e-3, "train.total_steps": 40}), 8,
        pretrain.FIXED_ON_RESUME)
  assert "optim.base_lr 0.01 -> 0.005" in caplog.text
  assert "train.total_steps 0 -> 40" in caplog.text
  # A converted workdir (step 0) has trained nothing; an old workdir may lack config.json.
  workdir_records.check_resume_config(workdir, _tiny(batch_size=32), 0, pretrain.FIXED_ON_RESUME)
  workdir_records.check_resume_config(str(tmp_path / "none"), _tiny(batch_size=32), 8,
                                      pretrain.FIXED_ON_RESUME)
  # The same images read from a new path.
  moved = _recorded(tmp_path / "folder", **{"data.dataset": "folder:/old/images"})
  workdir_records.check_resume_config(moved, _tiny(**{"data.dataset": "folder:/new/images"}), 8,
                                      pretrain.FIXED_ON_RESUME)


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s} for s in (4, 8, 12, 16)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20, "lo'  # torn by a kill
  (tmp_path / "metrics.jsonl").write_text(text)
  workdir_records.drop_metrics_after(str(tmp_path), 8)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == rows[:2]
  workdir_records.drop_metrics_after(str(tmp_path), 0)  # a fresh start keeps none
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_git_commit_is_this_checkouts_and_never_an_enclosing_projects(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  assert workdir_records.git_commit().removesuffix("-dirty") == head
  # The package installed inside another project's repository (its ignored site folder).
  project = tmp_path / "project"
  shutil.copytree(ROOT / "pr_mim_jax", project / "site" / "pr_mim_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  (project / ".gitignore").write_text("site/\n")
  git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
  for args in (["init", "-q"], ["add", ".gitignore"], ["commit", "-qm", "x"]):
    subprocess.run(git + args, check=True, capture_output=True)
  code = "from pr_mim_jax.training import workdir_records as w; print(w.git_commit())"
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, check=True, env={**os.environ,
                                                   "PYTHONPATH": str(project / "site")})
  assert out.stdout.strip() == "None"


def test_fields_only_one_of_the_configs_has_are_not_compared(tmp_path, caplog):
  """A workdir written by an older version lacks fields added since (and may hold one that is
  gone): those cannot have changed, so the resume goes on, naming only real changes."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  recorded = json.loads(_tiny().to_json())
  del recorded["train"]["image_every"]  # added after this workdir was written
  recorded["optim"]["retired_knob"] = 3  # removed since
  recorded["optim"]["base_lr"] = 0.02
  (workdir / "config.json").write_text(json.dumps(recorded))
  with caplog.at_level(logging.WARNING):
    workdir_records.check_resume_config(str(workdir), _tiny(), 8, pretrain.FIXED_ON_RESUME)
  assert "optim.base_lr 0.02 -> 0.01" in caplog.text
  assert "image_every" not in caplog.text and "retired_knob" not in caplog.text


@pytest.mark.parametrize("old,new", [("shapes", "folder:/data/images"),
                                     ("folder:/data/images", "shapes")])
def test_switching_between_a_folder_and_another_dataset_is_refused(tmp_path, old, new):
  """Only a folder read from a new path is the same images moved; a folder in place of a
  named dataset (or the reverse) is other images."""
  workdir = _recorded(tmp_path / "run", **{"data.dataset": old})
  with pytest.raises(UserError, match=r"^config\.data\.dataset: "):
    workdir_records.check_resume_config(workdir, _tiny(**{"data.dataset": new}), 8,
                                        pretrain.FIXED_ON_RESUME)


@pytest.mark.parametrize("text", ['{"batch_size": 16, "se',  # torn by a full disk
                                  '[16, 32]'])  # JSON, but no object of fields
def test_a_config_json_that_holds_no_config_resumes_with_a_warning(tmp_path, caplog, text):
  (tmp_path / "config.json").write_text(text)
  with caplog.at_level(logging.WARNING):
    workdir_records.check_resume_config(str(tmp_path), _tiny(batch_size=32), 8,
                                        pretrain.FIXED_ON_RESUME)
    workdir_records.check_run_kind(str(tmp_path), {"mode": "linear_probe"})
  assert "holds no JSON object; resuming without comparing the config" in caplog.text


def test_records_and_metrics_are_written_by_process_0_only(tmp_path, monkeypatch):
  rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (4, 8, 12))
  (tmp_path / "metrics.jsonl").write_text(rows)
  config = _tiny(seed=7)
  monkeypatch.setattr(workdir_records.jax, "process_index", lambda: 1)
  workdir_records.write_records(str(tmp_path / "other"), config)
  workdir_records.drop_metrics_after(str(tmp_path), 4)
  assert not (tmp_path / "other").exists()
  assert (tmp_path / "metrics.jsonl").read_text() == rows  # process 0 trims it
  monkeypatch.setattr(workdir_records.jax, "process_index", lambda: 0)
  workdir_records.write_records(str(tmp_path / "run"), config)
  assert json.loads((tmp_path / "run" / "config.json").read_text()) == json.loads(config.to_json())
  assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 7
  provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
  assert provenance["process_count"] == 1 and provenance["packages"]["jax"]


def test_git_commit_is_marked_dirty_only_when_a_tracked_file_changed(tmp_path, monkeypatch):
  """On a checkout of its own (built here, so independent of this repository's state)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  checkout = tmp_path / "checkout"
  module = checkout / "pr_mim_jax" / "training" / "workdir_records.py"
  module.parent.mkdir(parents=True)
  module.write_text("# stand-in\n")
  git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
  for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
    subprocess.run(git + args, check=True, capture_output=True)
  head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True,
                        text=True).stdout.strip()
  monkeypatch.setattr(workdir_records, "__file__", str(module))
  assert workdir_records.git_commit() == head
  (checkout / "notes.txt").write_text("untracked")
  assert workdir_records.git_commit() == head  # an untracked file changes no source
  module.write_text("# edited\n")
  assert workdir_records.git_commit() == head + "-dirty"


def test_a_write_killed_halfway_leaves_the_old_config_json_whole(tmp_path, monkeypatch):
  workdir_records.write_records(str(tmp_path), _tiny(seed=7))
  before = (tmp_path / "config.json").read_text()

  def torn_write(path, text, *args, **kwargs):
    with open(path, "w") as f:
      f.write(text[:len(text) // 2])
    raise OSError("No space left on device")

  monkeypatch.setattr(workdir_records.epath.Path, "write_text", torn_write)
  with pytest.raises(OSError, match="No space"):
    workdir_records.write_records(str(tmp_path), _tiny(seed=8))
  assert (tmp_path / "config.json").read_text() == before
  assert not (tmp_path / "config.json.tmp").exists()  # no half-written copy left either


def test_a_write_failing_before_any_byte_raises_its_own_error(tmp_path, monkeypatch):
  """No .tmp was made (e.g. a read-only folder): the write's error, not a missing-file one."""
  def refused(path, text, *args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(workdir_records.epath.Path, "write_text", refused)
  with pytest.raises(PermissionError, match="Permission denied"):
    workdir_records.write_whole(workdir_records.epath.Path(tmp_path) / "config.json", "{}")
  assert not list(tmp_path.iterdir())


def test_rows_logged_after_a_trim_start_on_their_own_line(tmp_path):
  """The resumed run appends its rows to the trimmed file: each must stay a line of its own."""
  from pr_mim_jax.training import metrics  # pylint: disable=g-import-not-at-top
  rows = [{"step": s, "loss": 1.0 / s} for s in (4, 8, 12)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir_records.drop_metrics_after(str(tmp_path), 8)
  metrics.MetricWriter(str(tmp_path), tensorboard=False).write_scalars(12, {"loss": 0.5})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [(r["step"], r["loss"]) for r in map(json.loads, lines)] == [(4, 0.25), (8, 0.125),
                                                                      (12, 0.5)]


def test_a_changed_batch_size_points_to_gradient_accumulation(tmp_path):
  """Resuming on fewer devices: the way to keep the recorded batch is more micro-batches."""
  workdir = _recorded(tmp_path / "run", batch_size=16)
  with pytest.raises(UserError) as err:
    workdir_records.check_resume_config(workdir, _tiny(batch_size=8), 8,
                                        pretrain.FIXED_ON_RESUME)
  assert "Pass --config.batch_size=16 (to fit fewer devices, keep it and raise " \
         "train.grad_accum_steps)" in str(err.value)


def test_a_resume_with_no_rows_past_its_step_leaves_metrics_alone(tmp_path, caplog):
  """Nothing to drop: the file is not rewritten and no drop is announced."""
  text = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (4, 8))
  (tmp_path / "metrics.jsonl").write_text(text)
  os.utime(tmp_path / "metrics.jsonl", ns=(1, 1))
  with caplog.at_level(logging.WARNING):
    workdir_records.drop_metrics_after(str(tmp_path), 8)
  assert (tmp_path / "metrics.jsonl").read_text() == text
  assert os.stat(tmp_path / "metrics.jsonl").st_mtime_ns == 1 and "dropped" not in caplog.text


def test_a_trim_killed_halfway_leaves_metrics_jsonl_whole(tmp_path, monkeypatch):
  """Dropping rows rewrites the file aside and renames it: a kill mid-write loses no row."""
  text = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (4, 8, 12))
  (tmp_path / "metrics.jsonl").write_text(text)

  def torn_write(path, data, *args, **kwargs):
    with open(path, "w") as f:
      f.write(data[:5])
    raise OSError("No space left on device")

  monkeypatch.setattr(workdir_records.epath.Path, "write_text", torn_write)
  with pytest.raises(OSError, match="No space"):
    workdir_records.drop_metrics_after(str(tmp_path), 8)
  assert (tmp_path / "metrics.jsonl").read_text() == text
