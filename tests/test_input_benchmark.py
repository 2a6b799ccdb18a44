"""Tests for the input-pipeline benchmark's output and its generated JPEG folder (no timings)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags
from PIL import Image

from conftest import ROOT
from pr_mim_jax.tools import input_benchmark


def _run(*args):
  return subprocess.run([sys.executable, "-m", "pr_mim_jax.tools.input_benchmark", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_write_jpegs_makes_decodable_photo_sized_files_once(tmp_path):
  folder = input_benchmark.write_jpegs(str(tmp_path / "jpegs"), 3)
  names = sorted(os.listdir(folder))
  assert names == ["img_000000.jpg", "img_000001.jpg", "img_000002.jpg"]
  first = os.path.join(folder, names[0])
  with Image.open(first) as img:
    assert img.format == "JPEG" and img.size == (500, 375) and img.mode == "RGB"
    pixels = np.asarray(img, np.float32)
  assert pixels.std() > 20  # real content, not a flat image
  before = os.path.getmtime(first)
  input_benchmark.write_jpegs(folder, 4)  # a rerun adds the missing file only
  assert len(os.listdir(folder)) == 4 and os.path.getmtime(first) == before
  input_benchmark.write_jpegs(folder, 1, size=(64, 48))  # another size replaces the file
  with Image.open(first) as img:
    assert img.size == (64, 48)


@pytest.mark.slow
def test_reports_per_host_and_per_core_rates(tmp_path):
  out = tmp_path / "input.json"
  proc = _run("--sources=jpeg,shapes", "--backends=numpy,auto", "--batch=8", "--batches=2",
              "--jpeg_count=12", f"--jpeg_dir={tmp_path / 'jpegs'}", "--shapes_size=64",
              f"--data_dir={tmp_path / 'tfds'}", "--image_size=32", "--step_img_per_s=1000",
              "--accelerators=1,8", f"--json={out}")
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())
  printed = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert rows == printed
  expected_auto = "tf" if input_benchmark.datasets.tf_importable() else "numpy"
  assert [(r["source"], r["backend"]) for r in rows] == [
      ("jpeg", "numpy"), ("jpeg", expected_auto), ("shapes", "numpy"), ("shapes", expected_auto)]
  for r in rows:
    assert r["batch"] == 8 and r["image_size"] == 32 and r["host_cores"] == os.cpu_count()
    assert r["img_per_s"] > 0 and r["cpu_cores_busy"] > 0
    assert r["img_per_s_per_core"] == pytest.approx(r["img_per_s"] / r["cpu_cores_busy"], rel=0.02)
    assert r["image_dtype"] == "uint8" and r["bytes_per_img"] == 32 * 32 * 3
    assert r["h2d_mb_per_s"] == pytest.approx(r["img_per_s"] * 32 * 32 * 3 / 1e6, rel=0.02,
                                              abs=0.06)
    one = 1000 / r["img_per_s_per_core"]
    assert r["cores_to_feed"]["1"] == pytest.approx(one, rel=0.02, abs=0.06)
    assert r["cores_to_feed"]["8"] == pytest.approx(8 * one, rel=0.02, abs=0.06)
    assert r["h2d_mb_per_s_per_accelerator"] == pytest.approx(1000 * 32 * 32 * 3 / 1e6, abs=0.06)
  assert len(os.listdir(tmp_path / "jpegs")) == 12


def _main(argv, monkeypatch, tmp_path):
  """input_benchmark.main in-process with fresh flags; HOME (~/tensorflow_datasets) in tmp_path."""
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))
  monkeypatch.setattr(input_benchmark, "measure", _must_not_run)
  monkeypatch.setattr(input_benchmark, "write_jpegs", _must_not_run)
  with pytest.raises(SystemExit) as e:
    input_benchmark.main(["input_benchmark", *argv], flags.FlagValues())
  return e.value.code


def _must_not_run(*args, **kwargs):
  raise AssertionError("the benchmark ran")


@pytest.mark.parametrize("args,message", [
    ([], "--sources is required, e.g. --sources=shapes,jpeg"),
    (["--sources=imagenet"], "--sources: unknown ['imagenet']; use names from ['shapes', 'jpeg']"),
    (["--sources=shapes", "--batch=0"], "--batch: got 0; use an integer > 0"),
    (["--sources=jpeg", "--jpeg_size=500"],
     "--jpeg_size: got '500'; use WIDTHxHEIGHT of at least 32x32, e.g. 500x375"),
    (["--sources=shapes", "--accelerators=8,x"],
     "--accelerators: got 8,x; use counts > 0, e.g. --accelerators=1,8"),
    (["--sources=shapes", "--accelerators=0,8"],
     "--accelerators: got 0,8; use counts > 0, e.g. --accelerators=1,8"),
    (["--sources=jpeg", "--jpeg_size=500x16"],
     "--jpeg_size: got '500x16'; use WIDTHxHEIGHT of at least 32x32, e.g. 500x375"),
    (["--sources=shapes", "--step_img_per_s=-3523"],
     "--step_img_per_s: got -3523; use the accelerator's measured images/s, or 0 for no sizing"),
])
def test_bad_arguments_are_one_error_line_and_write_nothing(args, message, monkeypatch, tmp_path,
                                                            capsys):
  assert _main(args, monkeypatch, tmp_path) == 2
  out = capsys.readouterr()
  assert out.err.splitlines() == [f"error: {message}"] and out.out == ""
  assert list(tmp_path.iterdir()) == []


def test_help_needs_no_sources(monkeypatch, tmp_path, capsys):
  assert _main(["--help"], monkeypatch, tmp_path) == 0
  out = capsys.readouterr().out
  assert "python -m pr_mim_jax.tools.input_benchmark --sources=shapes,jpeg" in out and "--sources" in out


def test_a_jpeg_dir_that_is_a_file_is_one_error_line(monkeypatch, tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("mine")
  assert _main(["--sources=jpeg", f"--jpeg_dir={blocker}"], monkeypatch, tmp_path) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: --jpeg_dir={blocker} is a file, not a directory: choose a directory (a new path, "
      "or an existing directory)"]
  assert blocker.read_text() == "mine"


def _generated_folder(path, count):
  """`count` small JPEGs named as write_jpegs names them (written here, not by it)."""
  path.mkdir(parents=True)
  for i in range(count):
    Image.new("RGB", (40, 32), (i, 0, 0)).save(path / f"img_{i:06d}.jpg")
  return path


@pytest.mark.parametrize("extra,count,example", [
    # A previous run's larger --jpeg_count (or another --jpeg_size) left more files behind.
    ([], 2, "img_000002.jpg"),
    # A folder of the user's own images: the generated ones would be mixed into it.
    (["train/cls/photo.png"], 3, "train/cls/photo.png"),
])
def test_a_jpeg_dir_with_other_images_is_one_error_line(extra, count, example, monkeypatch,
                                                        tmp_path, capsys):
  folder = _generated_folder(tmp_path / "jpegs", 3)
  for rel in extra:
    (folder / rel).parent.mkdir(parents=True)
    Image.new("RGB", (40, 32)).save(folder / rel)
  before = sorted(p.name for p in folder.rglob("*"))
  assert _main(["--sources=jpeg", f"--jpeg_dir={folder}", f"--jpeg_count={count}"], monkeypatch,
               tmp_path) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"error: --jpeg_dir: {folder} holds 1 other image file(s)")
  assert f"(e.g. {example})" in line
  assert sorted(p.name for p in folder.rglob("*")) == before  # nothing written


def test_the_generated_jpegs_alone_are_not_foreign(tmp_path):
  folder = _generated_folder(tmp_path / "jpegs", 3)
  (folder / ".hidden.jpg").write_bytes(b"")  # the folder source skips hidden files too
  (folder / "notes.txt").write_text("not an image")
  assert input_benchmark.foreign_images(str(folder), 3) == []
  assert input_benchmark.foreign_images(str(folder), 4) == []  # a missing one is written later
  assert input_benchmark.foreign_images(str(folder), 1) == ["img_000001.jpg", "img_000002.jpg"]


@pytest.mark.parametrize("where", ["missing_folder", "a_directory"])
def test_a_json_path_that_cannot_be_written_fails_before_anything_runs(where, monkeypatch,
                                                                       tmp_path, capsys):
  path = tmp_path / "missing" / "input.json" if where == "missing_folder" else tmp_path
  why = (f"No such directory {tmp_path / 'missing'}" if where == "missing_folder" else
         "Is a directory")
  assert _main(["--sources=shapes,jpeg", f"--json={path}"], monkeypatch, tmp_path) == 2
  assert capsys.readouterr().err.splitlines() == [f"error: --json: cannot write {path}: {why}"]


def test_a_backend_that_cannot_run_fails_before_anything_runs(monkeypatch, tmp_path, capsys):
  from pr_mim_jax.data import dali_batches  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(dali_batches, "importable", lambda: False)  # DALI not installed
  assert _main(["--sources=jpeg", "--backends=numpy,dali"], monkeypatch, tmp_path) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: data backend 'dali' needs NVIDIA DALI")
  assert _main(["--sources=shapes,jpeg", "--backends=numpy,dali"], monkeypatch, tmp_path) == 2
  assert capsys.readouterr().err.splitlines() == [
      "error: --backends: 'dali' decodes image files, and the in-memory shapes source has none; "
      "time dali with --sources=jpeg alone, or drop it"]


# ----------------------------------------------------------------------------------------
# The rates, on a fake pipeline, clock and CPU-time counter with known numbers.

class _FakeHost:
  """Each batch takes `wall` seconds and `user` + `system` CPU seconds; the first two
  (pipeline start-up) take ten times as long."""

  def __init__(self, wall, user, system):
    self.wall, self.user, self.system = wall, user, system
    self.now = self.utime = self.stime = 0.0
    self.served = 0

  def batches(self, data, *, seed, global_batch, image_size):
    image = np.zeros((global_batch, image_size, image_size, 3), np.uint8)
    while True:
      slow = 10 if self.served < 2 else 1
      self.now += slow * self.wall
      self.utime += slow * self.user
      self.stime += slow * self.system
      self.served += 1
      yield {"image": image}

  def getrusage(self, who):
    return types.SimpleNamespace(ru_utime=self.utime, ru_stime=self.stime)


@pytest.mark.parametrize("user,system,cores,per_core", [(0.15, 0.05, 2.0, 1280.0),
                                                        (0.04, 0.01, 0.5, 5120.0)])
def test_measure_reports_timed_batches_per_second_and_busy_cores(monkeypatch, user, system,
                                                                  cores, per_core):
  # 4 timed batches of 256 images, 0.1 s each: 2560 images/s of 224x224x3 uint8 pixels.
  host = _FakeHost(0.1, user, system)
  monkeypatch.setattr(input_benchmark.pipeline, "host_batches", host.batches)
  monkeypatch.setattr(input_benchmark, "time", types.SimpleNamespace(perf_counter=lambda: host.now))
  monkeypatch.setattr(input_benchmark, "resource",
                      types.SimpleNamespace(getrusage=host.getrusage, RUSAGE_SELF=0))
  row = input_benchmark.measure(None, batch=256, image_size=224, batches=4)
  assert host.served == input_benchmark.WARMUP_BATCHES + 4
  assert row["img_per_s"] == pytest.approx(2560.0)
  assert row["cpu_cores_busy"] == cores  # user + system CPU time over wall time
  assert row["img_per_s_per_core"] == per_core
  assert (row["bytes_per_img"], row["image_dtype"]) == (224 * 224 * 3, "uint8")
  assert row["h2d_mb_per_s"] == 385.4  # 2560 x 150528 bytes, in 1e6 bytes/s


def test_sizing_scales_the_per_core_rate_to_the_accelerators():
  # An accelerator stepping 3523 images/s needs 3523 / 1280 = 2.75 cores at 1280 per core.
  row = {"img_per_s": 2560.0, "img_per_s_per_core": 1280.0, "bytes_per_img": 150528}
  assert input_benchmark.sizing(row, 3523.0, [1, 4, 8]) == {
      "step_img_per_s": 3523.0, "cores_per_accelerator": 2.75,
      "cores_to_feed": {"1": 2.8, "4": 11.0, "8": 22.0},
      "h2d_mb_per_s_per_accelerator": 530.3}  # 3523 x 150528 bytes, in 1e6 bytes/s


@pytest.mark.parametrize("step_img_per_s", [0, 3523])
def test_a_step_rate_adds_the_sizing_and_none_leaves_it_out(monkeypatch, tmp_path, capsys,
                                                            step_img_per_s):
  monkeypatch.setenv("HOME", str(tmp_path))
  measured = {"img_per_s": 2560.0, "img_per_s_per_core": 1280.0, "bytes_per_img": 150528}
  monkeypatch.setattr(input_benchmark, "measure", lambda data, **kw: dict(measured))
  assert not input_benchmark.main(["input_benchmark", "--sources=shapes", "--backends=numpy",
                                   f"--step_img_per_s={step_img_per_s}", "--accelerators=1,8"],
                                  flags.FlagValues())
  (row,) = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  if step_img_per_s:
    assert row["cores_to_feed"] == {"1": 2.8, "8": 22.0}
  else:
    assert "cores_to_feed" not in row and "step_img_per_s" not in row
