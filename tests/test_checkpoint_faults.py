"""Checkpoint faults end to end, through the command line: what the user sees, and that
nothing good is lost."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT, TINY_OVERRIDES, apply_overrides, load_config
from test_pretrain import _cli, final_params
from pr_mim_jax.training import checkpointing


def _truncate_biggest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if os.path.basename(r) == "d"]
  biggest = max(files, key=os.path.getsize)
  data = open(biggest, "rb").read()
  with open(biggest, "wb") as f:
    f.write(data[:len(data) // 2])


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_and_only_total_damage_stops(tmp_path):
  """The newest checkpoint truncated: the resume warns, leaves it in place and continues from
  the older one. With every checkpoint damaged: one error line, no traceback around it."""
  data_dir, run_dir = str(tmp_path / "tfds"), str(tmp_path / "run")
  cmd, env = _cli(run_dir, data_dir, 16, ["--config.data.backend=numpy"])
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  ckpt_dir = checkpointing.checkpoint_dir(run_dir)
  assert sorted(os.listdir(ckpt_dir)) == ["16", "8"]
  _truncate_biggest_data_file(os.path.join(ckpt_dir, "16"))
  damaged = {os.path.join(r, f): open(os.path.join(r, f), "rb").read()
             for r, _, fs in os.walk(os.path.join(ckpt_dir, "16")) for f in fs}

  cmd, env = _cli(run_dir, data_dir, 20, ["--config.data.backend=numpy"])
  resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "RESUMING FROM AN OLDER CHECKPOINT, step 8" in resumed.stderr
  assert "Traceback" not in resumed.stderr
  assert sorted(os.listdir(ckpt_dir)) == ["16", "20", "8"]
  assert {p: open(p, "rb").read() for p in damaged} == damaged  # left untouched
  assert final_params(apply_overrides(load_config(), TINY_OVERRIDES), run_dir)[0] == 20

  shutil.rmtree(os.path.join(ckpt_dir, "8"))
  shutil.rmtree(os.path.join(ckpt_dir, "20"))
  stopped = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert stopped.returncode == 2, stopped.stderr[-3000:]
  assert "Traceback" not in stopped.stderr
  errors = [l for l in stopped.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: Every checkpoint in {ckpt_dir} is damaged (steps 16); they are "
                    "left untouched. Point --workdir elsewhere to start afresh."]
  assert "TensorStore" not in errors[0] and "checkpoints/16" in stopped.stderr

