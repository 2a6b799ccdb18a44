"""Tests for pr_mim_jax.training.workdir_records.check_writable."""

import numpy as np
import pytest

from pr_mim_jax.errors import UserError
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
