"""Tests for pr_mim_jax.training.workdir_records.check_writable."""

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
  assert msg.startswith(f"--workdir {workdir} is not writable (Not a directory).")
  assert "point --workdir elsewhere" in msg and "\n" not in msg
