"""Tests for the compile report: the fit search on fake numbers, the report's arithmetic, and
real compiles of a tiny model (this host's CPU always; a TPU slice and a GPU where their
compile-only pieces are installed, see README "Will it fit?")."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT, TINY_OVERRIDES, override_flags
from pr_mim_jax.tools import compile_report
from pr_mim_jax.tools.compile_report import Memory, Probe

GIB = 2 ** 30


# ----------------------------------------------------------------------------------------
# The fit search, on made-up memory curves.

def _measure(curve, limit, calls, report_total=True):
  def measure(b):
    calls.append(b)
    total = curve(b)
    return Probe(b, total if report_total or total <= limit else None, total <= limit)
  return measure


def _brute_force(curve, limit, step, max_batch):
  fitting = [b for b in range(step, max_batch + 1, step) if curve(b) <= limit]
  return max(fitting, default=0)


def test_affine_memory_is_found_in_a_few_compiles():
  curve = lambda b: int(1.5 * GIB + 0.03 * GIB * b)  # fixed state + activations per example
  calls = []
  best, trail = compile_report.largest_fitting(_measure(curve, 16 * GIB, calls), 16,
                                               limit_bytes=16 * GIB, max_batch=4096)
  assert best == 483 == _brute_force(curve, 16 * GIB, 1, 4096)
  assert len(calls) <= 5, calls  # 16, 32, then the line's answer and its neighbour
  assert len(set(calls)) == len(calls)  # never the same compile twice
  assert [p.per_device_batch for p in trail] == sorted(calls)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_monotone_curves(seed):
  rng = np.random.default_rng(seed)
  fixed, linear, quad = rng.uniform(0.1, 4) * GIB, rng.uniform(1e-3, 0.2) * GIB, rng.uniform(0, 1e-4) * GIB
  jumps = np.sort(rng.integers(1, 600, size=3))  # XLA changing its mind about a layout
  curve = lambda b: int(fixed + linear * b + quad * b * b + 0.3 * GIB * np.sum(b >= jumps))
  limit = int(rng.uniform(2, 40) * GIB)
  step = int(rng.choice([1, 2, 8]))
  start = int(rng.integers(1, 700))
  report_total = bool(seed % 2)  # odd seeds: failures carry no total, as a TPU refusal
  calls = []
  best, _ = compile_report.largest_fitting(_measure(curve, limit, calls, report_total), start,
                                           limit_bytes=limit, step=step, max_batch=1024)
  assert best == _brute_force(curve, limit, step, 1024)
  assert best % step == 0
  assert len(calls) == len(set(calls)) <= 24


def test_a_jump_in_memory_falls_back_to_bisection():
  # Past 1000 examples the compiler switches to a plan with 19 GiB more (a made-up jump, like
  # XLA's scheduler giving up overlap), so straight lines keep guessing wrong.
  curve = lambda b: int((1 + 0.01 * b + (19 if b > 1000 else 0)) * GIB)
  calls = []
  best, _ = compile_report.largest_fitting(_measure(curve, 15 * GIB, calls), 100,
                                           limit_bytes=15 * GIB, max_batch=4096)
  assert best == 1000
  assert len(calls) <= 2 * np.log2(4096), calls


def test_tolerance_stops_early_with_a_bracket():
  curve = lambda b: int((1 + 0.01 * b + (19 if b > 1000 else 0)) * GIB)
  exact_calls, rough_calls = [], []
  compile_report.largest_fitting(_measure(curve, 15 * GIB, exact_calls), 100,
                                 limit_bytes=15 * GIB, max_batch=4096)
  best, trail = compile_report.largest_fitting(_measure(curve, 15 * GIB, rough_calls), 100,
                                               limit_bytes=15 * GIB, max_batch=4096, tolerance=0.05)
  failing = min(p.per_device_batch for p in trail if not p.fits)
  assert best <= 1000 < failing <= 1.05 * best
  assert len(rough_calls) < len(exact_calls)


def test_nothing_fits_and_everything_fits():
  calls = []
  best, trail = compile_report.largest_fitting(_measure(lambda b: 10 * GIB + b, GIB, calls), 64,
                                               limit_bytes=GIB, max_batch=512)
  assert best == 0 and trail[0].per_device_batch == 1 and not trail[0].fits
  calls = []
  best, _ = compile_report.largest_fitting(_measure(lambda b: b, GIB, calls), 100,
                                           limit_bytes=GIB, max_batch=512)
  assert best == 512 and calls[-1] == 512


# ----------------------------------------------------------------------------------------
# The report's arithmetic.

def _fake_compiled(argument, output, alias, temp, code=0, flops=None):
  analysis = types.SimpleNamespace(argument_size_in_bytes=argument, output_size_in_bytes=output,
                                   alias_size_in_bytes=alias, temp_size_in_bytes=temp,
                                   generated_code_size_in_bytes=code)
  return types.SimpleNamespace(memory_analysis=lambda: analysis, cost_analysis=lambda: flops)


def test_memory_total_counts_aliased_outputs_once():
  m = Memory.of(_fake_compiled(3 * GIB, 2 * GIB, 2 * GIB, 5 * GIB, code=GIB // 2))
  assert m.total == 3 * GIB + 5 * GIB + GIB // 2
  assert m.bytes()["total"] == m.total
  assert m.gib() == {"argument": 3.0, "output": 2.0, "alias": 2.0, "temp": 5.0, "code": 0.5,
                     "total": 8.5}


def test_memory_total_counts_outputs_that_reuse_no_argument():
  # The new state reuses the donated 2 GiB of the 3 GiB of arguments; the other 0.5 GiB of
  # outputs (metrics, the loss) are buffers of their own.
  m = Memory.of(_fake_compiled(3 * GIB, 5 * GIB // 2, 2 * GIB, GIB))
  assert m.total == 3 * GIB + GIB // 2 + GIB


@pytest.mark.parametrize("cost,expected", [
    ({"flops": 4e12}, 4e12 * 8 / 256 / 1e9),
    ([{"flops": 4e12}], 4e12 * 8 / 256 / 1e9),  # older jax: one dict per program
    (None, None),  # the GPU compiler gives no cost analysis
    ({}, None),
])
def test_xla_flops_scale_to_one_image(cost, expected):
  got = compile_report.xla_gflop_per_img(_fake_compiled(0, 0, 0, 0, flops=cost), 8, 256)
  assert got == pytest.approx(expected) if expected else got is None


def test_markdown_lists_each_setting_and_an_out_of_memory_refusal():
  base = {"mode": "pretrain", "variant": "B/16", "mesh": {"data": 4, "fsdp": 1, "tensor": 1},
          "global_batch": 64, "per_device_batch": 16, "compile_s": 12.0,
          "analytic_gflop_per_img": 41.9, "xla_gflop_per_img": None}
  report = {"target": "TPU v5e:2x2 (4 chips)", "device_memory_gib": 15.75, "memory_note": "n",
            "versions": "jax 0", "settings": [
                dict(base, method="mae", fits=True, headroom_gib=5.5, largest_per_device_batch=40,
                     memory_gib={"argument": 1.0, "temp": 9.25, "total": 10.25}),
                dict(base, method="pr_mim", fits=False, memory_gib=None, headroom_gib=None),
                {"mode": "pretrain", "method": "partial", "variant": "B/16", "error": "boom | x"}]}
  text = compile_report.markdown(report)
  rows = [l for l in text.splitlines() if l.startswith("| pretrain")]
  assert len(rows) == 3
  assert "| 4x1x1 | 64 | 16 | 1.00 | 9.25 | 10.25 | yes (+5.50) | 40 |" in rows[0]
  assert "no (compiler: out of memory)" in rows[1]
  assert "failed: boom / x" in rows[2]
  assert all(r.count("|") == rows[0].count("|") for r in rows)


# ----------------------------------------------------------------------------------------
# Real compiles of a tiny model.

TINY_FLAGS = [f for f in override_flags(TINY_OVERRIDES)
              if f.startswith(("--config.model.", "--config.batch_size"))]


def _run(args, python=sys.executable, extra_path="", timeout=900):
  env = dict(os.environ)
  if extra_path:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
  return subprocess.run([python, "-m", "pr_mim_jax.tools.compile_report", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _check_report(report, row, max_batch):
  """What every report row must satisfy, whatever the target."""
  m = row["memory_bytes"]
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]
  assert row["memory_gib"] == {k: round(v / GIB, 3) for k, v in m.items()}
  assert row["fits"] == (m["total"] / GIB <= row["device_memory_gib"])
  assert row["headroom_gib"] == pytest.approx(row["device_memory_gib"] - m["total"] / GIB, abs=0.01)
  search = {p["per_device_batch"]: p for p in row["fit_search"]}
  best = row["largest_per_device_batch"]
  assert search[best]["fits"] and row["largest_global_batch"] == best * row["global_batch"] // row["per_device_batch"]
  step = row["search_step"]
  assert all(b % step == 0 for b in search)
  if best < max_batch:  # the search bracketed its answer
    failing = row["smallest_failing_per_device_batch"]
    assert not search[failing]["fits"] and failing > best
    assert failing - best <= max(step, row["search_tolerance"] * best)
  totals = [p["total_gib"] for _, p in sorted(search.items()) if p["total_gib"] is not None]
  assert totals == sorted(totals)  # more examples never took less memory
  assert report["target"] and report["versions"].startswith("jax ")


@pytest.mark.slow
def test_cpu_target_reports_the_compiled_step(tmp_path):
  out_json, out_md = tmp_path / "fit.json", tmp_path / "fit.md"
  proc = _run(["--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *TINY_FLAGS, "--target=cpu",
               "--num_devices=2", "--methods=mae,pr_mim", "--max_per_device_batch=16",
               f"--json={out_json}", f"--markdown={out_md}"])
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out_json.read_text())
  mae_row, pr_row = report["settings"]
  assert (mae_row["method"], pr_row["method"]) == ("mae", "pr_mim")
  for row in report["settings"]:
    assert row["num_devices"] == 2 and row["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert (row["global_batch"], row["per_device_batch"]) == (16, 8)
    _check_report(report, row, 16)
    assert row["largest_per_device_batch"] == 16  # a tiny model fits the host's memory
    assert row["xla_vs_analytic"] > 0.9  # XLA counts elementwise work too
  # PR-MIM decodes a quarter of the masked tokens MAE does. (At this toy size its memory is
  # dominated by fixed costs, so only the FLOPs are compared.)
  assert pr_row["analytic_gflop_per_img"] < mae_row["analytic_gflop_per_img"]
  assert out_md.read_text().count("| pretrain |") == 2


@pytest.mark.slow
def test_evaluation_configs_compile_their_own_step(tmp_path):
  rows = {}
  for mode in ("finetune", "linear_probe"):
    out_json = tmp_path / f"{mode}.json"
    proc = _run([f"--config=configs/{mode}.py:variant=Ti/4,dataset=shapes",
                 "--config.model.image_size=16", "--config.model.width=32",
                 "--config.model.depth=2", "--config.model.heads=2", "--config.batch_size=8",
                 "--target=cpu", "--nofit", "--num_classes=12", f"--json={out_json}"])
    assert proc.returncode == 0, proc.stderr
    rows[mode] = json.loads(out_json.read_text())["settings"][0]
    assert rows[mode]["mode"] == mode and rows[mode]["method"] is None
  probe, finetune = rows["linear_probe"]["memory_bytes"], rows["finetune"]["memory_bytes"]
  # The probe trains only its head: no optimizer state and no saved activations for the
  # frozen encoder, so it is the smaller program on both counts.
  assert probe["argument"] < finetune["argument"] and probe["temp"] < finetune["temp"]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--target=tpu:v9:2x2"], "--target: 'tpu:v9:2x2' is not a TPU slice"),
    (["--target=gpu:h100", "--num_devices=12"], "--num_devices: 12 GPUs"),
    (["--target=cpu", "--methods=mea"], "--methods: unknown ['mea']"),
    (["--target=cpu", "--num_devices=2", "--config.batch_size=15"],
     "config.batch_size: global batch 15 is not divisible by the 2 devices"),
    (["--target=cpu", "--config.mode=knn"],
     "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes is a knn config (config.mode='knn'"),
    # cuDNN attention exists only on NVIDIA GPUs: refused before anything compiles.
    # A head of no classes failed later as a "float division by zero" row, exit code 0.
    (["--target=cpu", "--num_classes=0"],
     "--num_classes=0: must be >= 1 (classes of the probe / fine-tune head)"),
    (["--target=cpu", "--config.model.attention=cudnn_padded"],
     "config.model.attention: 'cudnn_padded' runs only on NVIDIA GPUs, and the target is 'cpu'"),
    # A share of 1 would stop the search at any bracket, however wide.
    (["--target=cpu", "--fit_tolerance=1"],
     "--fit_tolerance: got 1.0; use a share in [0, 1), e.g. 0.03"),
])
def test_mistakes_are_one_line(args, message):
  proc = _run(["--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *TINY_FLAGS, "--nofit", *args])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr


def test_a_report_path_that_cannot_be_written_fails_before_anything_compiles(tmp_path):
  good = tmp_path / "fit.json"
  good.write_text("an earlier run's report")
  for args, why in (([f"--json={tmp_path}/missing/fit.json"],
                     f"--json: cannot write {tmp_path}/missing/fit.json: No such directory "
                     f"{tmp_path}/missing"),
                    ([f"--json={good}", f"--markdown={tmp_path}"],
                     f"--markdown: cannot write {tmp_path}: Is a directory")):
    proc = _run(["--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *TINY_FLAGS, "--nofit",
                 "--target=cpu", *args], timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # nothing was compiled
    assert proc.stderr.strip().splitlines() == [f"error: {why}"]
  assert good.read_text() == "an earlier run's report"


def _extra(module: str, env_var: str):
  """(python, extra PYTHONPATH) able to import `module`, or a skip saying how to get one."""
  try:
    if importlib.util.find_spec(module) is not None:
      return sys.executable, ""
  except ModuleNotFoundError:
    pass
  path = os.environ.get(env_var, "")
  if path and os.path.isdir(path):
    return sys.executable, path
  pytest.skip(f"{module} is not installed here and {env_var} names no directory holding it "
              "(README, 'Will it fit?': how to run these tests)")


def test_missing_pieces_say_what_to_install():
  for module, target, extra in (("libtpu", "tpu:v5e:2x2", "tpu-compile"),
                                ("jax_plugins.xla_cuda12", "gpu:h100", "gpu-compile")):
    try:
      if importlib.util.find_spec(module) is not None:
        continue
    except ModuleNotFoundError:
      pass
    proc = _run(["--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *TINY_FLAGS, "--nofit",
                 f"--target={target}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --target=") and f".[{extra}]" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("module,env_var,args,device_kind,devices", [
    ("libtpu", "PR_MIM_JAX_TPU_EXTRA", ["--target=tpu:v5e:2x2"], "TPU v5 lite", 4),
    # Two slices over DCN: the hybrid mesh needs the slice_index real TPU devices carry.
    ("libtpu", "PR_MIM_JAX_TPU_EXTRA", ["--target=tpu:v5e:2x2", "--num_slices=2",
                                        "--config.mesh_dcn.data=2"], "TPU v5 lite", 8),
    ("jax_plugins.xla_cuda12", "PR_MIM_JAX_GPU_EXTRA", ["--target=gpu:h100", "--num_devices=4"],
     "NVIDIA H100 80GB HBM3", 4),
])
def test_tiny_model_compiles_for_accelerators(tmp_path, module, env_var, args, device_kind,
                                              devices):
  python, path = _extra(module, env_var)
  out_json = tmp_path / "fit.json"
  gpu = "--target=gpu:h100" in args
  proc = _run(["--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *TINY_FLAGS, *args,
               f"--config.batch_size={8 * devices}", "--max_per_device_batch=16",
               f"--json={out_json}"], python=python, extra_path=path)
  assert proc.returncode == 0, proc.stderr
  # The native libraries' start-up complaints (no GPU, no TPU VM here) are kept out of sight.
  assert "cudart_stub" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
  report = json.loads(out_json.read_text())
  row = report["settings"][0]
  assert row["device_kind"] == device_kind and row["num_devices"] == devices
  assert row["mesh"] == {"data": devices, "fsdp": 1, "tensor": 1}
  assert row["memory_bytes"]["alias"] > 0  # the donated train state is reused for the new one
  assert row["per_device_batch"] == 8
  _check_report(report, row, 16)
  assert row["largest_per_device_batch"] == 16  # a tiny model fits any accelerator
  if not gpu:
    # The compiler's own HBM limit, and its FLOP count near ours (the rest is elementwise).
    assert 15 < report["device_memory_gib"] <= 16 and "compiler" in report["memory_note"]
    assert 0.9 < row["xla_vs_analytic"] < 2
  else:
    assert report["device_memory_gib"] == pytest.approx(0.75 * 84_942_979_072 / GIB, abs=0.01)
    assert row["xla_gflop_per_img"] is None


def _cudnn_importable() -> bool:
  try:
    return importlib.util.find_spec("nvidia.cudnn") is not None
  except ModuleNotFoundError:
    return False


@pytest.mark.slow
def test_cudnn_attention_without_the_cudnn_library_says_what_to_install():
  # JAX refuses cuDNN attention while the state is laid out, before the step compiles; that
  # refusal must be the one error line with the fix, not a "failed" row and exit code 0.
  python, path = _extra("jax_plugins.xla_cuda12", "PR_MIM_JAX_GPU_EXTRA")
  if _cudnn_importable():
    pytest.skip("the cuDNN library is installed here, so cuDNN attention compiles")
  proc = _run(["--config=pr_mim_jax/configs/pretrain.py:dataset=shapes", *TINY_FLAGS, "--nofit",
               "--target=gpu:h100", "--num_devices=1", "--config.model.attention=cudnn"],
              python=python, extra_path=path)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install nvidia-cudnn-cu12" in lines[0], proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override,why", [
    ({"model.scan_layers": True}, "model.scan_layers"),
    ({"train.grad_accum_steps": 2}, "train.grad_accum_steps"),
])
def test_xla_flops_are_not_reported_for_a_looped_step(override, why):
  # XLA's cost analysis counts a loop body once: under nn.scan the 2 encoder blocks count as
  # one, under gradient accumulation the 2 micro-batches as one. The plain step's count is
  # near the analytic one; a looped step's would fall short of it, so none is reported.
  from conftest import apply_overrides, load_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.tools import compile_targets  # pylint: disable=g-import-not-at-top
  target = compile_targets.make_target(compile_targets.TargetSpec("cpu", "cpu", 1))
  rows = {}
  for name, extra in (("plain", {}), ("looped", override)):
    config = apply_overrides(load_config("method=mae,dataset=shapes"),
                             {**TINY_OVERRIDES, "model.decoder_depth": 1, **extra})
    rows[name] = compile_report.report_setting(config, target, fit=False, max_per_device_batch=16,
                                               num_classes=12)
  plain, looped = rows["plain"], rows["looped"]
  assert 0.9 < plain["xla_vs_analytic"] < 2 and "xla_flops_note" not in plain
  assert looped["xla_gflop_per_img"] is None and looped["xla_vs_analytic"] is None
  assert why in looped["xla_flops_note"]
  assert looped["analytic_gflop_per_img"] == plain["analytic_gflop_per_img"]


# ----------------------------------------------------------------------------------------
# abstract_step.build in this process (one CPU device): what each mode's step is given.

def _tiny_pretrain(method, **extra):
  from conftest import apply_overrides, load_config  # pylint: disable=g-import-not-at-top
  return apply_overrides(load_config(f"method={method},dataset=shapes"),
                         {**TINY_OVERRIDES, **extra})


def _tiny_eval(mode):
  from conftest import apply_overrides  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.configs import classify as classify_config  # pylint: disable=g-import-not-at-top
  return apply_overrides(classify_config.get_config(mode, "variant=Ti/4,dataset=shapes"), {
      "model.image_size": 16, "model.width": 32, "model.depth": 2, "model.heads": 2,
      "batch_size": 8})


def test_abstract_pretrain_step_takes_unlabeled_pixels_and_counts_the_accumulation():
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top
  step = abstract_step.build(_tiny_pretrain("pr_mim", **{"train.grad_accum_steps": 2}),
                             jax.devices()[:1], num_classes=12)
  assert step.num_batch_shards == 1
  assert step.mesh_shape == {"data": 1, "fsdp": 1, "tensor": 1}  # data=-1 resolved
  assert step.granularity == 2  # per-device batches step by the 2 micro-batches
  batch = step.batch(16)
  assert set(batch) == {"image"}  # pre-training reads no labels
  assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.uint8
  step.jitted.trace(step.state, batch)  # the state and batch are what the step takes


def test_abstract_pretrain_flops_count_the_progressive_stage():
  """PR-MIM decodes the same tokens as partial reconstruction and then rebuilds the thrown
  ones: more work than partial, less than MAE's decoder over every masked token."""
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top
  gflop = {m: abstract_step.build(_tiny_pretrain(m), jax.devices()[:1], 12).gflop_per_img
           for m in ("mae", "partial", "pr_mim")}
  assert gflop["partial"] < gflop["pr_mim"] < gflop["mae"], gflop
  assert abstract_step.build(_tiny_pretrain("mae"), jax.devices()[:1], 12).granularity == 1


@pytest.mark.parametrize("mode,dtype", [("linear_probe", np.uint8), ("finetune", np.float32)])
def test_abstract_classify_step_takes_labels_and_its_augmentations_pixels(mode, dtype):
  """The probe trains on crop + flip (uint8 pixels), fine-tuning on RandAugment + erasing
  (float32, normalised): the abstract batch is what labeled_train_batches yields."""
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top
  step = abstract_step.build(_tiny_eval(mode), jax.devices()[:1], num_classes=12)
  assert (step.num_batch_shards, step.granularity, step.gflop_per_img) == (1, 1, None)
  batch = step.batch(8)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == dtype
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  step.jitted.trace(step.state, batch)


def test_abstract_step_checks_the_config_before_building():
  """A value the run would refuse is refused here too, naming the field, before anything
  is traced; so is a config whose mode has no train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top
  bad = _tiny_pretrain("pr_mim", **{"masking.throw_ratio": 0.9})  # >= mask_ratio 0.75
  with pytest.raises(UserError, match=r"^config\.masking\.throw_ratio"):
    abstract_step.build(bad, jax.devices()[:1], num_classes=12)
  probe = _tiny_eval("linear_probe")
  probe.model.drop_path = 0.1  # a frozen encoder runs without drop path
  with pytest.raises(UserError, match=r"^config\.model\.drop_path"):
    abstract_step.build(probe, jax.devices()[:1], num_classes=12)
  knn = _tiny_pretrain("mae")
  knn.mode = "knn"
  with pytest.raises(UserError, match=r"^config\.mode: 'knn'"):
    abstract_step.build(knn, jax.devices()[:1], num_classes=12)


def test_num_slices_must_match_the_configs_slice_grid():
  """--num_slices=2 with the default mesh_dcn (1 slice) would compile one flat mesh."""
  from pr_mim_jax.configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  config = pretrain_config.get_config("dataset=shapes")
  with pytest.raises(UserError, match=r"^--num_slices=2: config.mesh_dcn .* spans 1 slice\(s\); "
                     r".* --config.mesh_dcn.data=2$"):
    compile_report.check_slices(config, 2)
  config.mesh_dcn.data = 2
  compile_report.check_slices(config, 2)
  with pytest.raises(UserError, match=r"spans 2 slice"):
    compile_report.check_slices(config, 1)
  config.mesh_dcn.fsdp = 2  # a 2x2 slice grid
  compile_report.check_slices(config, 4)
  config.mesh_dcn.fsdp = -1  # not a slice count: left to the config check, which names it
  compile_report.check_slices(config, 4)


def test_a_zero_slice_size_is_left_to_the_configs_own_check():
  """mesh_dcn.data=0 is no slice grid: check_slices does not report it as spanning 0."""
  from pr_mim_jax.configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  config = pretrain_config.get_config("dataset=shapes")
  config.mesh_dcn.data = 0
  compile_report.check_slices(config, 2)


# ----------------------------------------------------------------------------------------
# report_setting on a fake step and target: memory 2 GiB + 0.25 GiB per example on each device.

def _fake_target(memory_gib=16, devices=4):
  from pr_mim_jax.tools import compile_targets  # pylint: disable=g-import-not-at-top
  return compile_targets.Target(compile_targets.TargetSpec("tpu", "v5e:2x2", devices),
                                [types.SimpleNamespace(device_kind="TPU v5 lite")] * devices,
                                memory_gib * GIB, "n", {})


def _fake_step(shards=4, granularity=1, refuse_above_gib=20.0, xla_gflop=12.0):
  """A Step whose compile of a global batch g gives, per device (g / shards examples), 2 GiB
  of arguments (1 GiB of them donated to the outputs) and 0.25 GiB of temporaries per example,
  and XLA's FLOP count of `xla_gflop` per image; above `refuse_above_gib` the compiler refuses,
  as a TPU compiler does."""
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top

  def compile_batch(batch, compiler_options=None):
    per_device = batch["image"] // shards
    if 2 + 0.25 * per_device > refuse_above_gib:
      raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Allocation "
                         "exceeds the HBM limit")
    compiled = _fake_compiled(2 * GIB, GIB, GIB, per_device * GIB // 4,
                              flops={"flops": xla_gflop * 1e9 * batch["image"] / shards})
    return compiled

  jitted = types.SimpleNamespace(trace=lambda state, batch: types.SimpleNamespace(
      lower=lambda: types.SimpleNamespace(compile=lambda compiler_options=None: compile_batch(
          batch, compiler_options))))
  return abstract_step.Step(jitted, None, lambda g: {"image": g}, 10.0, shards,
                            {"data": shards, "fsdp": 1, "tensor": 1}, granularity)


def _fake_report(monkeypatch, global_batch, max_batch=100, memory_gib=16, **step_fields):
  from conftest import apply_overrides, load_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(abstract_step, "build", lambda *a: _fake_step(**step_fields))
  config = apply_overrides(load_config("method=mae,dataset=shapes"),
                           {**TINY_OVERRIDES, "batch_size": global_batch})
  return compile_report.report_setting(config, _fake_target(memory_gib), fit=True,
                                       max_per_device_batch=max_batch, num_classes=12)


@pytest.mark.parametrize("global_batch,headroom", [(192, 2.0), (224, 0.0), (256, -2.0)])
def test_report_states_per_device_memory_fit_and_the_largest_batch(monkeypatch, global_batch,
                                                                    headroom):
  # 4 devices of 16 GiB: 48 examples each take 2 + 12 = 14 GiB, 56 exactly 16 GiB, 64 18 GiB,
  # and past 72 the compiler refuses. Searched in steps of 8 up to 96 (of 100).
  row = _fake_report(monkeypatch, global_batch)
  per_device = global_batch // 4
  assert row["per_device_batch"] == per_device and row["num_devices"] == 4
  assert row["memory_gib"]["total"] == 2 + per_device / 4
  assert row["fits"] == (headroom >= 0) and row["headroom_gib"] == headroom
  assert row["device_memory_gib"] == 16.0
  assert (row["largest_per_device_batch"], row["largest_global_batch"]) == (56, 224)
  assert row["smallest_failing_per_device_batch"] == 64
  assert (row["search_step"], row["search_limit"]) == (8, 96)
  assert all(p["per_device_batch"] % 8 == 0 for p in row["fit_search"])
  # XLA counts the per-device program; scaled by 4 devices over the global batch, per image.
  assert (row["xla_gflop_per_img"], row["analytic_gflop_per_img"]) == (12.0, 10.0)
  assert row["xla_vs_analytic"] == 1.2
  text = compile_report.markdown({"target": "t", "device_memory_gib": 16.0, "memory_note": "n",
                                  "versions": "jax", "settings": [row]})
  sign = "+" if headroom >= 0 else "-"
  assert f"| {'yes' if headroom >= 0 else 'no'} ({sign}{abs(headroom):.2f}) | 56 |" in text


def test_report_searches_in_whole_micro_batches(monkeypatch):
  """With 3 micro-batches per step, per-device batches step by lcm(8, 3) = 24; XLA's count,
  made inside the accumulation loop, is not reported."""
  row = _fake_report(monkeypatch, 192, granularity=3)
  assert (row["search_step"], row["search_limit"]) == (24, 96)
  assert row["largest_per_device_batch"] == 48  # 72 would take 20 GiB
  assert all(p["per_device_batch"] % 24 == 0 for p in row["fit_search"])
  assert row["xla_gflop_per_img"] is None and "micro-batches" in row["xla_flops_note"]


def test_a_search_that_reaches_its_limit_stays_on_the_grid(monkeypatch):
  """Everything fits: the answer is the largest multiple of the step within
  --max_per_device_batch (96 of 100), shown as a lower bound."""
  row = _fake_report(monkeypatch, 64, refuse_above_gib=1e9, max_batch=100, memory_gib=64)
  assert row["largest_per_device_batch"] == 96 == row["search_limit"]
  assert row["smallest_failing_per_device_batch"] is None
  text = compile_report.markdown({"target": "t", "device_memory_gib": 16.0, "memory_note": "n",
                                  "versions": "jax", "settings": [row]})
  assert "| ≥ 96 |" in text


@pytest.mark.parametrize("step,start,max_batch,limit", [
    (8, 8, 100, 10 ** 9), (8, 8, 100, 98), (24, 24, 4096, 4095), (3, 3, 10, 10),
    (8, 20, 100, 30),  # the config's own per-device batch, off the grid
])
def test_the_search_tries_only_multiples_of_its_step(step, start, max_batch, limit):
  """A --max_per_device_batch off the step's grid is rounded down, never probed: a batch of
  no whole micro-batches would not even compile."""
  calls = []
  best, _ = compile_report.largest_fitting(_measure(lambda b: b, limit, calls), start,
                                           limit_bytes=limit, step=step, max_batch=max_batch)
  assert best == _brute_force(lambda b: b, limit, step, max_batch)
  assert all(b % step == 0 and b <= max_batch for b in calls), calls


def test_memory_that_does_not_grow_between_probes_is_searched_on():
  # Up to 16 examples the compiler's plan takes the same 1 GiB (padded buffers); no straight
  # line through two equal totals meets the limit, so the search doubles on.
  curve = lambda b: max(GIB, b * GIB // 16)
  calls = []
  best, _ = compile_report.largest_fitting(_measure(curve, 8 * GIB, calls), 8,
                                           limit_bytes=8 * GIB, step=8, max_batch=4096)
  assert best == 128 == _brute_force(curve, 8 * GIB, 8, 4096)


def _flags(config, tmp_path, **values):
  """compile_report's flags as `_run` reads them (absl FlagHolders: .value and .name)."""
  values = {"config": config, "target": "cpu", "num_devices": 1, "num_slices": 1,
            "methods": ["mae", "pr_mim"], "variants": [], "num_classes": 12, "fit": False,
            "max_per_device_batch": 1024, "fit_step": 8, "fit_tolerance": 0.0,
            "json": str(tmp_path / "report.json"), "markdown": str(tmp_path / "report.md"),
            **values}
  return types.SimpleNamespace(**{k: types.SimpleNamespace(name=k, value=v)
                                  for k, v in values.items()})


def test_a_setting_that_fails_to_compile_is_a_row_and_the_sweep_goes_on(monkeypatch, tmp_path,
                                                                        capsys):
  from conftest import apply_overrides, load_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # _run sets it; restored after the test
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = apply_overrides(load_config("dataset=shapes"), TINY_OVERRIDES)
  compiled, real_report_setting = [], compile_report.report_setting

  def report_setting(c, target, **kw):  # MAE fails to compile, PR-MIM compiles for real
    if c.method == "mae":
      raise RuntimeError("INTERNAL: Failed to compile\nthe compiler's long explanation")
    compiled.append(c.method)
    return real_report_setting(c, target, **kw)

  monkeypatch.setattr(compile_report, "report_setting", report_setting)
  assert compile_report._run(_flags(config, tmp_path), ["compile_report"]) == 0
  assert compiled == ["pr_mim"]  # the failure did not stop the sweep
  rows = json.loads((tmp_path / "report.json").read_text())["settings"]
  assert rows[0] == {"mode": "pretrain", "method": "mae", "variant": "Ti/4",
                     "error": "INTERNAL: Failed to compile"}
  assert rows[1]["method"] == "pr_mim" and rows[1]["memory_gib"]["total"] > 0
  assert "| pretrain | mae | Ti/4 | failed: INTERNAL: Failed to compile |" in (
      tmp_path / "report.md").read_text()
  progress = capsys.readouterr().err.splitlines()
  assert progress[0].startswith("[1/2] mae Ti/4: total – GiB;")
  assert re.match(r"\[2/2\] pr_mim Ti/4: total [\d.]+ GiB;", progress[1]), progress
  # Every setting failed: the report is still written, and the exit code says so.
  monkeypatch.setattr(compile_report, "report_setting",
                      lambda c, t, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
  assert compile_report._run(_flags(config, tmp_path), ["compile_report"]) == 1
  assert capsys.readouterr().err.splitlines()[-1] == (
      "error: all 2 settings failed, the last with: boom; the report names each one's error")
  assert [r["error"] for r in json.loads((tmp_path / "report.json").read_text())["settings"]
          ] == ["boom", "boom"]
