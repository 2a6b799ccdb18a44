"""Tests for the benchmark CLI's output (never its timings)."""

import json
import subprocess
import sys

from conftest import ROOT, TINY_OVERRIDES, override_flags


def _run(*args):
  return subprocess.run([sys.executable, "-m", "pr_mim_jax.benchmark", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_no_timing_prints_one_line_per_setting():
  proc = _run("--config=configs/pretrain.py", "--methods=mae,partial,pr_mim",
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


def test_timing_fields_on_a_tiny_config(tmp_path):
  flags = [f for f in override_flags(TINY_OVERRIDES) if not f.startswith("--config.knn")]
  proc = _run("--config=configs/pretrain.py:dataset=shapes", *flags, "--steps=2", "--warmup=1",
              "--batch=8")
  assert proc.returncode == 0, proc.stderr
  (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert row["method"] == "pr_mim" and row["batch"] == 8
  for key in ("compile_s", "step_ms", "img_per_s", "tflop_per_s", "loss"):
    assert isinstance(row[key], float) and row[key] > 0, key


def test_bad_method_is_one_error_line():
  proc = _run("--config=configs/pretrain.py", "--methods=simmim", "--no-timing")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --methods: unknown ['simmim']; use names from ['mae', 'partial', 'pr_mim']"]
