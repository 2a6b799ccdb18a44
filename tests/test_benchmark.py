"""Tests for the benchmark CLI's output (never its timings)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import (ROOT, TINY_OVERRIDES, apply_overrides, fake_devices_env, load_config,
                      override_flags, without_tensorflow)
from pr_mim_jax import cli
from pr_mim_jax.tools import benchmark


def _run(*args, env=None):
  return subprocess.run([sys.executable, "-m", "pr_mim_jax.tools.benchmark", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


def test_no_timing_prints_one_line_per_setting():
  proc = _run("--config=pr_mim_jax/configs/pretrain.py", "--methods=mae,partial,pr_mim",
              "--variants=B/16,L/16", "--no-timing")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [(r["method"], r["variant"]) for r in rows] == [
      (m, v) for v in ("B/16", "L/16") for m in ("mae", "partial", "pr_mim")]
  for r in rows:
    g = r["gflop_per_img"]
    assert set(g) == {"encoder", "decoder", "thrown", "total"}
    assert abs(g["encoder"] + g["decoder"] + g["thrown"] - g["total"]) < 0.01
    assert (g["thrown"] > 0) == (r["method"] == "pr_mim")
    assert r["tokens"]["vis"] + r["tokens"]["dec"] + r["tokens"]["throw"] == 196
    assert "step_ms" not in r  # nothing timed
  by = {(r["method"], r["variant"]): r for r in rows}
  assert by[("mae", "B/16")]["flop_ratio_vs_mae"] == 1.0
  assert by[("pr_mim", "B/16")]["flop_ratio_vs_mae"] <= 0.73
  assert by[("mae", "L/16")]["gflop_per_img"]["encoder"] > 3 * by[("mae", "B/16")]["gflop_per_img"]["encoder"]


@pytest.mark.slow
def test_isolated_timing_writes_json_and_markdown(tmp_path):
  """Without TensorFlow, tfds or clu (as on the GPU machines), in every process it starts."""
  flags = [f for f in override_flags(TINY_OVERRIDES) if not f.startswith("--config.knn")]
  out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
  proc = _run("--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *flags,
              "--methods=mae,pr_mim", "--steps=2", "--warmup=1", "--batch=8", "--ceiling_size=64",
              f"--json={out_json}", f"--markdown={out_md}",
              env=without_tensorflow(tmp_path / "site"))
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out_json.read_text())
  assert report["isolated"] and report["timed"] and report["jax"]
  assert report["matmul_ceiling_tflop_per_s"] > 0 and report["ceiling_sizes"] == [64]
  assert report["ceiling_dtype"] == "float32"  # the shapes config computes in float32
  mae_row, pr_row = report["settings"]
  assert (mae_row["method"], pr_row["method"]) == ("mae", "pr_mim")
  for r in report["settings"]:
    assert r["batch"] == 8 and r["attention"] == "einsum" and r["num_devices"] == 1
    for key in ("compile_s", "step_ms", "img_per_s", "tflop_per_s", "mfu", "xla_temp_gib", "xla_total_gib",
                "loss"):
      assert isinstance(r[key], float) and r[key] > 0, key
    # Derived fields follow from the measured ones.
    assert r["img_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3), rel=0.01)
    assert r["tflop_per_s"] == pytest.approx(r["gflop_per_img"]["total"] * r["img_per_s"] / 1e3,
                                             rel=0.01)
    assert r["mfu"] == pytest.approx(r["tflop_per_s"] / report["matmul_ceiling_tflop_per_s"],
                                     rel=0.01)
  assert "furthest_ms" not in mae_row  # MAE throws nothing
  assert pr_row["throw_strategy"] == "furthest" and pr_row["masks_ms"] > 0
  assert pr_row["furthest_ms"] == pytest.approx(
      max(pr_row["masks_ms"] - pr_row["masks_random_ms"], 0), abs=2e-3)
  # Both are rounded (ms to 3 decimals, the share to 4), so allow half of each unit.
  assert pr_row["furthest_share"] == pytest.approx(pr_row["furthest_ms"] / pr_row["step_ms"],
                                                   abs=5e-5 + 5e-4 / pr_row["step_ms"])
  (ratio,) = report["ratios"]
  assert ratio["method"] == "pr_mim" and ratio["vs"] == "mae"
  assert ratio["img_per_s"] == pytest.approx(pr_row["img_per_s"] / mae_row["img_per_s"], rel=0.01)
  assert ratio["gflop_per_img"] == pr_row["flop_ratio_vs_mae"] < 1
  md = out_md.read_text()
  assert "| mae | Ti/4 | einsum | 8 |" in md and "| pr_mim | Ti/4 |" in md
  assert md in proc.stdout  # the summary is printed too


def _row(method, img_per_s, peak, flop_ratio, variant="B/16"):
  return {"method": method, "variant": variant, "attention": "einsum", "img_per_s": img_per_s,
          "peak_gib": peak, "flop_ratio_vs_mae": flop_ratio,
          "gflop_per_img": {"total": 58.0 * flop_ratio}}


def test_ratios_and_throughput_hand_case():
  rows = [_row("mae", 4000.0, 10.0, 1.0), _row("pr_mim", 6000.0, 6.5, 0.7),
          _row("partial", 5000.0, None, 0.72), _row("pr_mim", 900.0, 30.0, 0.7, "L/16"),
          {**_row("pr_mim", 1.0, 1.0, 0.7, "S/16"), "error": "out of memory"}]
  assert benchmark.ratios(rows) == [
      {"method": "pr_mim", "variant": "B/16", "vs": "mae", "gflop_per_img": 0.7,
       "img_per_s": 1.5, "peak_gib": 0.65},
      {"method": "partial", "variant": "B/16", "vs": "mae", "gflop_per_img": 0.72,
       "img_per_s": 1.25}]  # no memory ratio without a peak; no MAE row for L/16 or S/16
  row = benchmark.add_throughput(_row("mae", 4000.0, 10.0, 1.0), ceiling=800.0)
  assert row["tflop_per_s"] == 232.0 and row["mfu"] == 0.29  # 58 GFLOP x 4000 / s
  assert benchmark.add_throughput(_row("mae", 4000.0, 10.0, 1.0), None)["mfu"] is None


def test_mfu_holds_a_multi_device_step_to_every_devices_ceiling():
  # 8 devices step 4000 images/s of 58 GFLOP: 232 TFLOP/s in all, against 8 x 800 TFLOP/s.
  row = benchmark.add_throughput({**_row("mae", 4000.0, 10.0, 1.0), "num_devices": 8}, 800.0)
  assert row["tflop_per_s"] == 232.0 and row["mfu"] == 0.03625


def test_markdown_lists_settings_failures_and_ratios():
  rows = [_row("mae", 4000.0, 10.0, 1.0), _row("pr_mim", 6000.0, 6.5, 0.7),
          {**_row("partial", None, None, 0.72), "error": "RESOURCE_EXHAUSTED | oom"}]
  report = {"device": "NVIDIA H200", "num_devices": 1, "jax": "0.11.2",
            "matmul_ceiling_tflop_per_s": 790.0, "settings": rows,
            "ratios": benchmark.ratios(rows)}
  md = benchmark.markdown(report).splitlines()
  assert md[0] == ("Device: NVIDIA H200 x1, jax 0.11.2; bf16 matmul ceiling 790 TFLOP/s per "
                   "device (MFU: TFLOP/s over it times the devices).")
  assert any(l.startswith("| pr_mim | B/16 | einsum | – | 6000 |") for l in md)
  failed = [l for l in md if "failed" in l]
  assert failed and "RESOURCE_EXHAUSTED / oom" in failed[0]  # '|' would break the table
  assert "| pr_mim | B/16 | 1.500 | 0.650 | 0.700 |" in md
  assert all(l.count("|") == md[3].count("|") for l in md[2:6])  # every row has every column


def test_markdown_shows_mfu_as_a_percentage():
  row = benchmark.add_throughput({**_row("mae", 4000.0, 10.0, 1.0), "num_devices": 1}, 800.0)
  md = benchmark.markdown({"jax": "0", "matmul_ceiling_tflop_per_s": 800.0, "settings": [row],
                           "ratios": []})
  assert "| 58 | 232 | 29.0% | – |" in md  # GFLOP/img, TFLOP/s, MFU, no furthest sampling


def test_child_processes_get_the_parents_flags_minus_outputs():
  argv = ["benchmark", "--config=c.py", "--json=a.json", "--markdown", "b.md", "--steps=3",
          "--child=1", "--jsonl=keep"]
  assert benchmark._child_argv(argv) == ["--config=c.py", "--steps=3", "--jsonl=keep"]


def test_bad_method_is_one_error_line():
  proc = _run("--config=pr_mim_jax/configs/pretrain.py", "--methods=simmim", "--no-timing")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --methods: unknown ['simmim']; use names from ['mae', 'partial', 'pr_mim']"]


def test_a_failed_child_reports_its_exception_line():
  stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
            "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB\n"
            "--------------------\nFor simplicity, JAX has removed its internal frames from the "
            "traceback of the following exception.\n")
  assert benchmark._error_line(stderr, 1) == (
      "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
  assert benchmark._error_line("warning\nkilled\n", -9) == "killed"
  assert benchmark._error_line("", -9) == "exit code -9"


@pytest.mark.parametrize("flag,message", [
    ("--steps=0", "error: --steps=0: must be >= 1 (the timed steps)"),
    ("--warmup=-1", "error: --warmup=-1: must be >= 0 (untimed steps before them; 0 = none)"),
    ("--ceiling_size=-5",
     "error: --ceiling_size=-5: must be >= 0 (the ceiling's matrix side; 0 = the device's "
     "default)"),
])
def test_step_counts_below_their_minimum_are_one_error_line(flag, message):
  proc = _run("--config=pr_mim_jax/configs/pretrain.py", flag)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [message]


@pytest.mark.parametrize("args,devices,message", [
    (("--batch=-4",), 1, "error: --batch=-4: must be >= 0 (the global batch; 0 = the config's)"),
    (("--batch=6", "--config.train.grad_accum_steps=4"), 1,
     "error: config.train.grad_accum_steps: global batch 6 is not divisible by "
     "grad_accum_steps=4 x 1 batch shards; use a batch_size that is a multiple of 4, or fewer "
     "grad_accum_steps"),
    (("--batch=15",), 2, "error: config.batch_size: global batch 15 is not divisible by the 2 "
     "devices on the batch axes; use a multiple of 2, or (resuming a run, which keeps its "
     "batch_size) devices on the batch axes that divide 15"),
])
def test_batch_flag_is_checked_like_the_configs_batch(args, devices, message):
  env = fake_devices_env(devices)
  proc = subprocess.run([sys.executable, "-m", "pr_mim_jax.tools.benchmark",
                         "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", "--methods=mae",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines() == [message]


@pytest.mark.slow
def test_no_warmup_still_times_the_step_and_a_trace_follows_it(tmp_path):
  config = apply_overrides(load_config("method=mae,dataset=shapes"),
                           dict(TINY_OVERRIDES, **{"model.depth": 1}))
  row = benchmark.time_train_step(config, 8, steps=1, warmup=0, profile_dir=str(tmp_path))
  assert row["step_ms"] > 0 and np.isfinite(row["loss"])
  # --profile_dir: one trace per setting, in a folder named after it, that TensorBoard reads
  traces = list((tmp_path / "mae_Ti_4").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, sorted(tmp_path.rglob("*"))


def test_a_report_path_that_cannot_be_written_fails_before_anything_runs(tmp_path):
  proc = _run("--config=pr_mim_jax/configs/pretrain.py", "--methods=mae", "--no-timing",
              f"--json={tmp_path}/missing/bench.json")
  assert proc.returncode == 2 and proc.stdout == ""  # no setting was measured first
  assert proc.stderr.strip().splitlines() == [
      f"error: --json: cannot write {tmp_path}/missing/bench.json: No such directory "
      f"{tmp_path}/missing"]


def test_a_profile_dir_that_is_a_file_fails_before_anything_is_timed(tmp_path):
  (tmp_path / "traces").write_text("not a folder")
  proc = _run("--config=pr_mim_jax/configs/pretrain.py", "--methods=mae",
              f"--profile_dir={tmp_path}/traces")
  assert proc.returncode == 2 and proc.stdout == ""  # not even the ceiling was measured
  assert proc.stderr.strip().splitlines() == [
      f"error: --profile_dir={tmp_path}/traces is a file, not a directory: choose a directory "
      "(a new path, or an existing directory)"]
  assert (tmp_path / "traces").read_text() == "not a folder"


def test_a_bad_markdown_path_leaves_an_earlier_json_report_alone(tmp_path):
  good = tmp_path / "bench.json"
  good.write_text("an earlier run's report")
  proc = _run("--config=pr_mim_jax/configs/pretrain.py", "--methods=mae", "--no-timing",
              f"--json={good}", f"--markdown={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: --markdown: cannot write {tmp_path}: Is a directory"]
  assert good.read_text() == "an earlier run's report"


def test_a_failed_ceiling_is_named_and_leaves_no_mfu():
  assert benchmark.ceiling_fields({"matmul_ceiling_tflop_per_s": 0.2, "device": "cpu"}) == {
      "matmul_ceiling_tflop_per_s": 0.2, "device": "cpu"}
  fields = benchmark.ceiling_fields({"error": "MLIRError: Invalid type"})
  assert fields == {"matmul_ceiling_tflop_per_s": None,
                    "ceiling_error": "MLIRError: Invalid type"}
  text = benchmark.markdown({"jax": "0.10.2", "settings": [], "ratios": [], **fields})
  assert "bf16 matmul ceiling failed (MLIRError: Invalid type), so no MFU." in text
  row = benchmark.add_throughput({"gflop_per_img": {"total": 10.0}, "img_per_s": 100.0}, None)
  assert row["tflop_per_s"] == 1.0 and row["mfu"] is None  # 10 GFLOP x 100 img/s


def test_progress_names_a_failed_setting_as_failed():
  ok = {"method": "mae", "variant": "B/16", "img_per_s": 3523.0}
  failed = {"method": "pr_mim", "variant": "L/16", "error": "JaxRuntimeError: Out of memory"}
  assert benchmark.progress_line(0, 3, ok, 30.0) == "[1/3] mae B/16: 3523.0 img/s; about 60 s left"
  assert benchmark.progress_line(2, 3, failed, 90.0) == (
      "[3/3] pr_mim L/16: failed: JaxRuntimeError: Out of memory; about 0 s left")


def test_gpu_benchmark_refuses_an_out_dir_that_is_a_file(tmp_path):
  (tmp_path / "bin").mkdir()
  fake = tmp_path / "bin" / "python"
  fake.write_text('#!/bin/sh\ntouch "$RAN_FILE"\n')
  fake.chmod(0o755)
  blocker = tmp_path / "results"
  blocker.write_text("an earlier run's notes")
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
             RAN_FILE=str(tmp_path / "ran"))
  proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_benchmark.sh"), str(blocker)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: OUT_DIR {blocker}: cannot create that folder (a file of that name, or no "
      "permission)"]
  assert not (tmp_path / "ran").exists() and blocker.read_text() == "an earlier run's notes"


def test_a_report_without_a_ceiling_measured_says_no_failure():
  """--no-timing measures no ceiling: its summary has no value there, and no failure."""
  line = benchmark.markdown({"jax": "0.10.2", "settings": [], "ratios": []}).splitlines()[0]
  assert line.startswith("Device: ? x?, jax 0.10.2; bf16 matmul ceiling ")
  assert line.endswith(" TFLOP/s per device (MFU: TFLOP/s over it times the devices).")
  assert "failed" not in line


def test_a_failed_ceiling_still_names_the_device_the_steps_ran_on():
  rows = [{"method": "mae", "variant": "B/16", "error": "JaxRuntimeError: Out of memory"},
          {"method": "pr_mim", "variant": "B/16", "device": "NVIDIA H100", "num_devices": 1}]
  report = {"settings": rows, "matmul_ceiling_tflop_per_s": None, "ceiling_error": "MLIRError"}
  assert benchmark.device_fields(report) == {"num_devices": 1, "device": "NVIDIA H100"}
  report["device"] = "NVIDIA H200"  # the ceiling's own, when it ran, wins
  assert benchmark.device_fields(report)["device"] == "NVIDIA H200"


def test_gpu_benchmark_goes_on_past_a_failed_run_and_exits_with_its_code(tmp_path):
  """B/16's settings all fail (exit 1, its report written) and L/16's run never starts
  (exit 2): the summary holds both, and the script exits non-zero after the last run."""
  (tmp_path / "bin").mkdir()
  fake = tmp_path / "bin" / "python"
  fake.write_text('#!/bin/sh\nfor a in "$@"; do case $a in --markdown=*) md=${a#*=};; esac; done\n'
                  'case $md in *vit_b16*) echo "| mae | failed: Out of memory |" >"$md"; exit 1;; '
                  'esac\necho "error: bad flag" >&2\nexit 2\n')
  fake.chmod(0o755)
  out = tmp_path / "out"
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_benchmark.sh"), str(out)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert "vit_b16: exit code 1" in proc.stderr and "vit_l16: exit code 2" in proc.stderr
  assert (out / "summary.md").read_text() == (
      "## vit_b16\n\n| mae | failed: Out of memory |\n\n"
      "## vit_l16\n\nno report: exit code 2 (its error line is on stderr)\n\n")


def test_a_report_tool_exits_1_only_when_every_setting_failed(capsys):
  ok, failed = {"method": "mae"}, {"method": "pr_mim", "error": "Out of memory"}
  assert cli.failed_settings_exit([ok, failed]) == 0 and cli.failed_settings_exit([]) == 0
  assert capsys.readouterr().err == ""
  assert cli.failed_settings_exit([failed, failed]) == 1
  assert capsys.readouterr().err == (
      "error: all 2 settings failed, the last with: Out of memory; the report names each "
      "one's error\n")


# ----------------------------------------------------------------------------------------
# The timing arithmetic, on a fake clock and a fake compiled step with known durations.

class _FakeDevice:
  """An accelerator that executes asynchronously: a call queues its work, and the clock moves
  only when the caller blocks on the result (as jax.block_until_ready does)."""

  def __init__(self, tick=0.0):
    self.now, self.pending, self.tick = 0.0, 0.0, tick

  def perf_counter(self):
    self.now += self.tick
    return self.now

  def block_until_ready(self, x):
    self.now, self.pending = self.now + self.pending, 0.0
    return x


class _FakeStep:
  """`jit_train_step`'s result: compiling takes `compile_s`, the n-th call `durations[n]`."""

  def __init__(self, device, compile_s, durations, memory):
    self.device, self.compile_s, self.durations, self.memory = device, compile_s, durations, memory
    self.calls = 0

  def lower(self, state, batch):
    return self

  def compile(self):
    self.device.now += self.compile_s
    return self

  def memory_analysis(self):
    return self.memory

  def __call__(self, state, batch):
    self.device.pending += self.durations[self.calls]
    self.calls += 1
    return state, {"loss": np.float32(0.5)}


def _fake_timing(monkeypatch, method, durations, compile_s=7.0, peak_bytes=None, devices=1):
  """time_train_step's row for a tiny config, run on the fakes above (nothing compiles)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  device = _FakeDevice()
  memory = types.SimpleNamespace(argument_size_in_bytes=2 * 2 ** 30, output_size_in_bytes=2 ** 30,
                                 alias_size_in_bytes=2 ** 30, temp_size_in_bytes=3 * 2 ** 29,
                                 generated_code_size_in_bytes=0)
  step = _FakeStep(device, compile_s, durations, memory)
  monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=device.perf_counter))
  monkeypatch.setattr(jax, "block_until_ready", device.block_until_ready)
  monkeypatch.setattr(pretrain, "create_state", lambda *a, **k: ({"w": np.zeros(1)}, None))
  monkeypatch.setattr(pretrain, "jit_train_step", lambda *a, **k: step)
  stats = types.SimpleNamespace(device_kind="Fake GPU", memory_stats=lambda: (
      None if peak_bytes is None else {"peak_bytes_in_use": peak_bytes}))
  # The device the row describes (kind, peak memory, count), swapped in once the real one
  # has held the batch.
  monkeypatch.setattr(jax, "device_put", lambda x, s: (
      monkeypatch.setattr(jax, "devices", lambda *a: [stats] * devices),
      monkeypatch.setattr(jax, "device_count", lambda *a: devices), x)[-1])
  config = apply_overrides(load_config(f"method={method},dataset=shapes"), TINY_OVERRIDES)
  row = benchmark.time_train_step(config, 8, steps=5, warmup=2)
  assert step.calls == 7  # 2 warm-up steps, 5 timed
  return row


def test_step_time_is_the_median_of_the_timed_steps_alone(monkeypatch):
  # Two slow warm-up steps, then five timed ones with one outlier: the median is 0.25 s.
  row = _fake_timing(monkeypatch, "mae", [10.0, 10.0, 0.2, 0.1, 0.3, 0.25, 5.0],
                     peak_bytes=3 * 2 ** 30, devices=4)
  assert row["compile_s"] == 7.0  # the compile alone, no step in it
  assert row["step_ms"] == 250.0
  assert row["img_per_s"] == 32.0  # the global batch of 8 over 0.25 s, all devices together
  assert row["peak_gib"] == 3.0  # bytes / 2**30
  assert (row["xla_temp_gib"], row["xla_total_gib"]) == (1.5, 3.5)  # 2 + 1 - 1 + 1.5 GiB
  assert (row["device"], row["num_devices"], row["loss"]) == ("Fake GPU", 4, 0.5)
  assert "furthest_ms" not in row  # MAE throws no tokens


@pytest.mark.parametrize("furthest_ms,random_ms,expected_ms", [(3.0, 1.0, 2.0), (1.0, 1.5, 0.0)])
def test_furthest_sampling_time_is_its_extra_over_random(monkeypatch, furthest_ms, random_ms,
                                                         expected_ms):
  """furthest_ms is what furthest sampling adds over random sampling (never below 0, as
  timing noise could make it), and its share is of the 250 ms step."""
  masks = {"furthest": furthest_ms, "random": random_ms}
  monkeypatch.setattr(benchmark, "time_masks", lambda task, batch: masks[task.throw_strategy])
  row = _fake_timing(monkeypatch, "pr_mim", [1.0, 1.0] + [0.25] * 5)
  assert (row["masks_ms"], row["masks_random_ms"]) == (furthest_ms, random_ms)
  assert row["furthest_ms"] == expected_ms
  assert row["furthest_share"] == pytest.approx(expected_ms / 250.0)


def test_median_seconds_is_the_middle_duration(monkeypatch):
  durations = iter([0.5, 9.0, 0.25, 1.0, 0.75])
  device = _FakeDevice()
  monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=device.perf_counter))
  fn = lambda: setattr(device, "now", device.now + next(durations))
  assert benchmark._median_seconds(fn, 5) == 0.75


def test_mask_time_is_per_generation_in_milliseconds(monkeypatch):
  # Each timed call reads 1 ms on the clock; it runs MASK_LOOP generations.
  from pr_mim_jax.training import train_step as ts  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(benchmark, "time",
                      types.SimpleNamespace(perf_counter=_FakeDevice(tick=1e-3).perf_counter))
  config = apply_overrides(load_config("method=pr_mim,dataset=shapes"), TINY_OVERRIDES)
  ms = benchmark.time_masks(ts.task_from_config(config), 4)
  assert ms == pytest.approx(1.0 / benchmark.MASK_LOOP)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_matmul_ceiling_counts_every_product_of_the_chain(monkeypatch, dtype):
  """The MFU denominator: products in the dtype asked for, all 10 of the chain counted; here
  64x64 matrices (2 * 64**3 FLOPs each), each call 1 us on the clock."""
  import jax  # pylint: disable=g-import-not-at-top
  jit, dtypes = jax.jit, set()

  def recording_jit(fn):
    compiled = jit(fn)
    return lambda *args: (dtypes.update(str(a.dtype) for a in args), compiled(*args))[-1]

  monkeypatch.setattr(jax, "jit", recording_jit)
  monkeypatch.setattr(benchmark, "time",
                      types.SimpleNamespace(perf_counter=_FakeDevice(tick=1e-6).perf_counter))
  got = benchmark.matmul_ceiling(size=64, chain=10, dtype=dtype)
  assert dtypes == {dtype}
  assert got["matmul_ceiling_tflop_per_s"] == round(10 * 2 * 64 ** 3 / 1e-6 / 1e12, 2) == 5.24
  assert got["ceiling_sizes"] == [64]


def _flag_values(config, **values):
  """What _define_flags gives _run, with these values (the rest at their defaults)."""
  defaults = dict(config=config, batch=0, steps=1, warmup=0, methods=["mae", "pr_mim"],
                  variants=[], no_timing=False, json="", markdown="", isolate=False,
                  ceiling_size=64, profile_dir="", child="")
  return types.SimpleNamespace(**{k: types.SimpleNamespace(value=v)
                                  for k, v in {**defaults, **values}.items()})


@pytest.mark.parametrize("dtype,name", [("float32", "float32"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("child", ["", benchmark.CEILING])
def test_the_ceiling_is_measured_in_the_dtype_the_steps_compute_in(monkeypatch, capsys, dtype,
                                                                   name, child):
  """In this process and in a ceiling child alike; the summary names that dtype."""
  asked = []
  monkeypatch.setattr(benchmark, "matmul_ceiling", lambda size, dtype: (
      asked.append((size, dtype)), {"matmul_ceiling_tflop_per_s": 2.0, "device": "cpu"})[-1])
  monkeypatch.setattr(benchmark, "time_train_step", lambda c, b, *a: {
      "batch": b, "img_per_s": 100.0, "step_ms": 80.0, "num_devices": 1})
  config = apply_overrides(load_config("method=mae,dataset=shapes"),
                           dict(TINY_OVERRIDES, **{"model.compute_dtype": dtype}))
  run = benchmark._run  # pylint: disable=protected-access
  run(_flag_values(config, child=child), ["benchmark"])
  assert asked == [(64, dtype)]
  out = capsys.readouterr().out
  if child:
    row = json.loads(out.split(benchmark.RESULT_PREFIX, 1)[1])
    assert row["matmul_ceiling_tflop_per_s"] == 2.0
  else:
    assert f"; {name} matmul ceiling 2 TFLOP/s per device" in out


def test_cost_ratio_is_the_ratio_of_the_reported_totals():
  """flop_ratio_vs_mae compares whole steps: PR-MIM's thrown-token work is in it."""
  rows = {m: benchmark.cost(load_config(f"method={m},variant=B/16")) for m in ("mae", "pr_mim")}
  mae, pr = rows["mae"]["gflop_per_img"], rows["pr_mim"]["gflop_per_img"]
  assert pr["thrown"] > 0 and rows["mae"]["flop_ratio_vs_mae"] == 1.0
  assert rows["pr_mim"]["flop_ratio_vs_mae"] == pytest.approx(pr["total"] / mae["total"], abs=2e-4)
  assert pr["total"] == pytest.approx(pr["encoder"] + pr["decoder"] + pr["thrown"], abs=2e-3)
