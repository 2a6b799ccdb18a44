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
