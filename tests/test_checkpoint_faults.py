"""Checkpoint faults end to end, through the command line: what the user sees, and that
nothing good is lost."""

import os
import shlex
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
  the older one; back at that step it moves it aside and saves the step anew. With every
  checkpoint damaged: one error line, no traceback around it."""
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
  # Back at step 16, the run saved it anew; the damaged one is kept aside, byte for byte.
  assert sorted(os.listdir(ckpt_dir)) == ["16", "16.damaged", "20", "8"]
  assert "16.damaged" in resumed.stderr
  aside = os.path.join(ckpt_dir, "16.damaged")
  assert {p: open(p.replace(os.path.join(ckpt_dir, "16"), aside), "rb").read()
          for p in damaged} == damaged
  config = apply_overrides(load_config(), TINY_OVERRIDES)
  assert final_params(config, run_dir)[0] == 20
  assert final_params(config, run_dir, 16)[0] == 16  # the new step 16 verifies and reads

  shutil.rmtree(os.path.join(ckpt_dir, "8"))
  shutil.rmtree(os.path.join(ckpt_dir, "20"))
  _truncate_biggest_data_file(os.path.join(ckpt_dir, "16"))
  stopped = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert stopped.returncode == 2, stopped.stderr[-3000:]
  assert "Traceback" not in stopped.stderr
  errors = [l for l in stopped.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: Every checkpoint in {ckpt_dir} is damaged (steps 16); they are "
                    "left untouched. Point --workdir elsewhere to start afresh."]
  assert "TensorStore" not in errors[0] and "checkpoints/16" in stopped.stderr



def _mount_namespace() -> list[str] | None:
  """A command prefix that runs in a private mount namespace where tmpfs mounts work: as
  root, or through an unprivileged user namespace; None when neither is allowed here."""
  probe = ('d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$d" && '
           'mount -o remount,bind,ro "$d" && umount "$d" && rmdir "$d"')
  for prefix in (["unshare", "--mount", "--propagation", "private"],
                 ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
    try:
      if subprocess.run(prefix + ["sh", "-c", probe], capture_output=True,
                        timeout=60).returncode == 0:
        return prefix
    except (OSError, subprocess.TimeoutExpired):
      return None
  return None


def _errors(text: str) -> list[str]:
  return [l for l in text.splitlines() if l.startswith("error:")]


@pytest.mark.slow
def test_read_only_workdir_and_full_disk_stop_in_one_line_and_lose_nothing(tmp_path):
  """On small tmpfs mounts: the workdir made read-only, then its checkpoint disk filled up
  during a save, then the workdir's own disk full at the start (config.json). Each run stops
  with one error line and no traceback, checkpoint 8 stays byte-identical, and once there is
  room the same command resumes from it and finishes."""
  prefix = _mount_namespace()
  if prefix is None:
    pytest.skip("needs a private mount namespace for small tmpfs mounts (root, or "
                "unprivileged user namespaces via `unshare`), which this machine refuses")
  ws, disk, out = tmp_path / "ws", tmp_path / "disk", tmp_path / "out"
  for d in (ws, disk, out):
    d.mkdir()
  run_dir, ckpt_dir = ws / "run", ws / "run" / "checkpoints"
  data_dir = str(tmp_path / "tfds")
  first, env = _cli(str(run_dir), data_dir, 8, ["--config.data.backend=numpy"])
  full, _ = _cli(str(run_dir), data_dir, 24, ["--config.data.backend=numpy"])
  first, full = shlex.join(first), shlex.join(full)
  # The checkpoints live on their own tmpfs (`disk`, bound onto the workdir's checkpoints/),
  # so a filler file there fills only their disk. Only bind remounts: a user namespace may
  # not remount a tmpfs's own options.
  script = f"""
    ws={ws}; disk={disk}; ck={ckpt_dir}; out={out}
    sums() {{ (cd $ck/8 && find . -type f | sort | xargs sha256sum) | sha256sum | cut -c1-64; }}
    mount -t tmpfs -o size=32m tmpfs $ws && mount -t tmpfs -o size=32m tmpfs $disk
    mkdir -p $ck $disk/checkpoints && mount --bind $disk/checkpoints $ck
    {first} > $out/first.txt 2>&1; echo "first rc=$? $(sums)"
    mount -o remount,bind,ro $ws
    {full} > $out/readonly.txt 2>&1; echo "readonly rc=$? $(sums)"
    mount -o remount,bind,rw $ws
    room=$(( $(df -k --output=avail $disk | tail -1) - $(du -sk $ck/8 | cut -f1) / 2 ))
    fallocate -l ${{room}}k $disk/filler
    {full} > $out/full.txt 2>&1; echo "full rc=$? $(sums)"
    rm $disk/filler
    dd if=/dev/zero of=$ws/filler bs=64k 2>/dev/null  # the workdir's own disk, to the last byte
    {full} > $out/workdir_full.txt 2>&1; echo "workdir_full rc=$? $(sums)"
    rm $ws/filler
    {full} > $out/resumed.txt 2>&1; echo "resumed rc=$? $(sums)"
    echo "steps $(ls $ck | sort -n | tr '\\n' ' ')"
    echo "tracebacks in log.txt $(grep -c Traceback $ws/run/log.txt)"
  """
  done = subprocess.run(prefix + ["bash", "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  report = dict(line.split(" ", 1) for line in done.stdout.splitlines())
  read = lambda name: (out / f"{name}.txt").read_text()
  assert report["first"].startswith("rc=0"), read("first")[-3000:]
  good = report["first"].split()[1]
  assert report["readonly"] == f"rc=2 {good}", read("readonly")[-3000:]
  assert _errors(read("readonly")) == [
      f"error: --workdir {run_dir} is not writable (Read-only file system). No checkpoint was "
      "touched: make it writable, or point --workdir elsewhere; rerunning then resumes from "
      "its newest checkpoint, if it has one."]
  assert report["full"] == f"rc=2 {good}", read("full")[-3000:]
  text = read("full")
  assert _errors(text) == [
      f"error: Writing checkpoint step 16 to {ckpt_dir} failed: the disk is full (or a file "
      "size or quota limit was hit): free space, then rerun the same command to resume from "
      "the last complete checkpoint, which is untouched."]
  assert "Traceback" not in text
  assert f"traceback in {run_dir}/log.txt" in text  # the detail went to the run's log
  assert int(report["tracebacks"].split()[-1]) > 0, report
  assert report["workdir_full"] == f"rc=2 {good}", read("workdir_full")[-3000:]
  text = read("workdir_full")
  assert _errors(text) == [
      f"error: writing {run_dir}/config.json failed: No space left on device (the disk is "
      "full, or a quota or file-size limit was hit); free space, then rerun the same command: "
      "pre-training, fine-tuning and study runs go on from their last complete checkpoint, "
      "which is untouched"]
  assert "Traceback" not in text
  assert report["resumed"] == f"rc=0 {good}", read("resumed")[-3000:]
  assert f"resumed from {ckpt_dir} at step 8" in read("resumed")
  assert report["steps"].split() == ["8", "16", "24"]
