r"""Train-step cost and speed on synthetic, device-resident data (no TensorFlow needed).

  python -m pr_mim_jax.tools.benchmark --config=pr_mim_jax/configs/pretrain.py --methods=mae,partial,pr_mim \
      --variants=B/16 --batch=256 --steps=20 --json=bench.json --markdown=bench.md
  python -m pr_mim_jax.tools.benchmark --config=pr_mim_jax/configs/pretrain.py --variants=B/16,L/16 --no-timing

Per (method, variant) setting it prints one JSON line: the analytic fwd+bwd GFLOP per image
(encoder / decoder / thrown-token reconstruction) and its ratio to MAE; unless --no-timing,
also compile time, median step time, images/s, achieved TFLOP/s, MFU against a matmul
ceiling in the step's compute dtype measured in the same run, peak device memory (and
XLA's compile-time temp-buffer size and total, which any backend reports), and the time
furthest sampling takes.
Each timed setting runs in a fresh process (JAX cannot reset the memory peak), and so does
the ceiling measurement. A timed run then prints a summary with the ratios to MAE as
markdown (--markdown writes it with or without timing). The step timed is the one `pretrain`
runs (`pretrain.jit_train_step`), with the config's model, attention, remat and optimizer
settings. Timed work lives here, never in tests.
"""

import dataclasses
import datetime
import json
import re
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pr_mim_jax import cli
from pr_mim_jax.errors import UserError
from pr_mim_jax.method import flops
from pr_mim_jax.method import methods
from pr_mim_jax.parallel import sharding
from pr_mim_jax.tools import compile_report
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import optim
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import profiler
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training import trainer

RESULT_PREFIX = "RESULT "  # a child process's result line on stdout
CEILING = "ceiling"  # --child value of the matmul-ceiling process
MASK_LOOP = 20  # mask generations per timed call (amortizes dispatch)


def _define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined when it runs (so importing this module defines none)."""
  return types.SimpleNamespace(
      config=cli.define_config_file("config", None, "Config file.", lock_config=True),
      batch=flags.DEFINE_integer("batch", 0, "Global batch; 0 = the config's."),
      steps=flags.DEFINE_integer("steps", 20, "Timed steps."),
      warmup=flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation."),
      methods=flags.DEFINE_list("methods", [], f"Methods to run, from {list(methods.METHODS)}; "
                                "default: the config's."),
      variants=flags.DEFINE_list("variants", [], "Encoder variants, e.g. B/16,L/16; default: the "
                                 "config's."),
      no_timing=flags.DEFINE_boolean("no-timing", False, "Only print the analytic cost model."),
      json=flags.DEFINE_string("json", "", "Also write every result, the ceiling and the "
                               "ratios to this JSON file."),
      markdown=flags.DEFINE_string("markdown", "", "Also write the summary tables here."),
      isolate=flags.DEFINE_boolean("isolate", True, "Time each setting in a fresh process "
                                   "(exact peak memory); --noisolate runs all in this one."),
      ceiling_size=flags.DEFINE_integer("ceiling_size", 0, "Matrix side of the bf16 matmul "
                                        "ceiling; 0 = the best of 4096 and 8192 on "
                                        "accelerators, 512 on CPU."),
      profile_dir=flags.DEFINE_string("profile_dir", "", "Record a profiler trace of 5 more "
                                      "steps per setting under this directory."),
      child=flags.DEFINE_string("child", "", "Internal: run one setting index (or 'ceiling') "
                                "and print its result line."))


def cost(config) -> dict:
  """The analytic cost of one setting, with its ratio to MAE on the same model."""
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  f = flops.step_flops(model, task.split, task.reconstruct_thrown)
  mae_task = train_step_lib.task_from_config(methods.with_method(config, "mae"))
  mae_total = flops.step_flops(model, mae_task.split, False).total
  return {
      "method": config.method, "variant": config.model.variant,
      "image_size": config.model.image_size, "mask_ratio": config.masking.mask_ratio,
      "throw_ratio": config.masking.throw_ratio, "throw_strategy": config.masking.throw_strategy,
      "thrown_reconstruction": config.reconstruction.thrown_reconstruction,
      "aggregator": config.reconstruction.aggregator if task.reconstruct_thrown else None,
      "decoder": config.model.decoder, "target": config.loss.target,
      "dtype": config.model.compute_dtype, "attention": config.model.get("attention", "einsum"),
      "remat": config.model.get("remat", "none"), "mu_dtype": config.optim.get("mu_dtype", ""),
      "tokens": {"vis": task.split.n_vis, "dec": task.split.n_dec, "throw": task.split.n_throw},
      "gflop_per_img": {"encoder": round(f.encoder, 3), "decoder": round(f.decoder, 3),
                        "thrown": round(f.thrown, 3), "total": round(f.total, 3)},
      "flop_ratio_vs_mae": round(f.total / mae_total, 4),
  }


def _median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` (which must block until its work is done)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


DTYPE_NAMES = {"bfloat16": "bf16", "float32": "float32"}  # as the summary names a ceiling


def matmul_ceiling(size: int = 0, chain: int = 10, dtype: str = "bfloat16") -> dict:
  """Matmul TFLOP/s in `dtype` on device 0: the best of a few sizes, `chain` dependent
  products per call (so dispatch is amortized). The MFU denominator, measured rather than
  quoted, in the dtype the step computes in: a recent NVIDIA GPU's bf16 peak is twice its
  TF32 one (vendor figures), so a float32 step held to a bf16 ceiling reads half its MFU or
  less. (On a CPU, XLA multiplies bf16 in float32: both measured 0.06-0.09 TFLOP/s at 512²
  on the project's 2-core machine, five runs each, 2026-12-07.)"""
  device = jax.devices()[0]
  sizes = [size] if size else ([512] if device.platform == "cpu" else [4096, 8192])
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
    run = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda _, x: x @ b, a))
    jax.block_until_ready(run(a, b))
    seconds = _median_seconds(lambda: jax.block_until_ready(run(a, b)), 5)
    best = max(best, chain * 2 * n ** 3 / seconds / 1e12)
  return {"matmul_ceiling_tflop_per_s": round(best, 2), "ceiling_sizes": sizes,
          "device": device.device_kind}


def time_masks(task, batch_size: int, repeats: int = 5) -> float:
  """Milliseconds per batch of mask generation for `task`, on device, in one jitted loop."""
  def body(i, acc):
    m = train_step_lib.step_masks(jax.random.key(0), i, batch_size, task)
    return acc + m.ids_dec[0, 0] + m.ids_throw[0, 0]  # keeps every generation live

  run = jax.jit(lambda: jax.lax.fori_loop(0, MASK_LOOP, body, jnp.int32(0)))
  jax.block_until_ready(run())
  return _median_seconds(lambda: jax.block_until_ready(run()), repeats) / MASK_LOOP * 1e3


def time_train_step(config, batch_size: int, steps: int, warmup: int, profile_dir: str = "") -> dict:
  """Compile, warm up and time the train step `pretrain` runs, on synthetic on-device images."""
  trainer.setup_jax(config)
  mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  schedule = optim.lr_schedule(optim.peak_lr(config.optim, batch_size), 10_000, 100)
  tx = optim.make_optimizer(config.optim, schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_sharding = pretrain.create_state(model, tx, task.split, config.seed, mesh, rules)
    size = config.model.image_size
    images = jax.device_put(  # uint8 pixels, as the pipeline delivers them
        np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8),
        sharding.batch_sharding(mesh))  # [B, H, W, 3], on device
    batch = {"image": images}
    step_fn = pretrain.jit_train_step(model, tx, task, schedule, mesh, state_sharding)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compile_report.Memory.of(compiled)  # XLA's compile-time buffer sizes (any backend)
    for _ in range(warmup):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    if profile_dir:
      window = profiler.StepWindow(
          f"{profile_dir}/{config.method}_{config.model.variant.replace('/', '_')}", 0, 5)
      window.after_step(0)
      for i in range(1, 6):
        state, metrics = compiled(state, batch)
        window.after_step(i, metrics)
  step_s = float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  row = {
      "batch": batch_size, "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "compile_s": round(compile_s, 2),
      "step_ms": round(step_s * 1e3, 2), "img_per_s": round(batch_size / step_s, 1),
      "peak_gib": round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
      # What the compile report states for this very program, next to the measured peak.
      "xla_temp_gib": round(memory.temp / 2**30, 3),
      "xla_total_gib": round(memory.total / 2**30, 3),
      "loss": float(metrics["loss"]),
  }
  if task.split.n_throw:
    masks_ms = time_masks(task, batch_size)
    random_ms = time_masks(dataclasses.replace(task, throw_strategy="random"), batch_size)
    row.update(masks_ms=round(masks_ms, 3), masks_random_ms=round(random_ms, 3))
    if task.throw_strategy == "furthest":
      furthest = max(masks_ms - random_ms, 0.0)
      row.update(furthest_ms=round(furthest, 3), furthest_share=round(furthest / (step_s * 1e3), 4))
  return row


def add_throughput(row: dict, ceiling: float | None) -> dict:
  """Achieved TFLOP/s (all devices together) from the analytic count, and MFU against the
  measured ceiling, which is one device's: the step's images are global, so the peak it is
  held to is the ceiling times the devices that ran it."""
  if "img_per_s" in row:
    row["tflop_per_s"] = round(row["gflop_per_img"]["total"] * row["img_per_s"] / 1e3, 6)
    peak = ceiling * row.get("num_devices", 1) if ceiling else None
    row["mfu"] = round(row["tflop_per_s"] / peak, 6) if peak else None
  return row


def ratios(rows: list[dict]) -> list[dict]:
  """Each non-MAE method against MAE on the same variant: images/s, memory and FLOPs."""
  mae_rows = {r["variant"]: r for r in rows if r["method"] == "mae" and "error" not in r}
  out = []
  for r in rows:
    base = mae_rows.get(r["variant"])
    if r["method"] == "mae" or base is None or "error" in r:
      continue
    entry = {"method": r["method"], "variant": r["variant"], "vs": "mae",
             "gflop_per_img": r["flop_ratio_vs_mae"]}
    for key in ("img_per_s", "peak_gib"):
      if r.get(key) and base.get(key):
        entry[key] = round(r[key] / base[key], 3)
    out.append(entry)
  return out


def _cell(value, fmt="{}"):
  return "–" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
  """The summary tables of a report (settings, then ratios to MAE)."""
  dtype = DTYPE_NAMES[report.get("ceiling_dtype", "bfloat16")]
  ceiling = (f"failed ({report['ceiling_error']}), so no MFU" if "ceiling_error" in report else
             f"{_cell(report.get('matmul_ceiling_tflop_per_s'), '{:.3g}')} TFLOP/s per device "
             "(MFU: TFLOP/s over it times the devices)")
  lines = [f"Device: {report.get('device') or '?'} x{report.get('num_devices') or '?'}, "
           f"jax {report['jax']}; {dtype} matmul ceiling {ceiling}.", "",
           "| method | variant | attention | batch | img/s | step ms | peak GiB | XLA total GiB | "
           "GFLOP/img | TFLOP/s | MFU | furthest ms (share of step) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["settings"]:
    if "error" in r:
      lines.append(f"| {r['method']} | {r['variant']} | {r['attention']} | failed: "
                   f"{r['error'].replace('|', '/')} |" + " |" * 8)
      continue
    furthest = (f"{r['furthest_ms']:.2f} ({100 * r['furthest_share']:.1f}%)"
                if "furthest_ms" in r else "–")
    lines.append(
        f"| {r['method']} | {r['variant']} | {r['attention']} | {_cell(r.get('batch'))} | "
        f"{_cell(r.get('img_per_s'), '{:.0f}')} | {_cell(r.get('step_ms'), '{:.1f}')} | "
        f"{_cell(r.get('peak_gib'), '{:.2f}')} | {_cell(r.get('xla_total_gib'), '{:.2f}')} | "
        f"{r['gflop_per_img']['total']:.3g} | "
        f"{_cell(r.get('tflop_per_s'), '{:.3g}')} | "
        f"{_cell(r.get('mfu') and 100 * r['mfu'], '{:.1f}%')} | {furthest} |")
  if report["ratios"]:
    lines += ["", "| method vs MAE | variant | img/s × | peak memory × | FLOPs × |",
              "|---|---|---|---|---|"]
    for q in report["ratios"]:
      lines.append(f"| {q['method']} | {q['variant']} | {_cell(q.get('img_per_s'), '{:.3f}')} | "
                   f"{_cell(q.get('peak_gib'), '{:.3f}')} | {q['gflop_per_img']:.3f} |")
  return "\n".join(lines) + "\n"


def _child_argv(argv) -> list[str]:
  """This run's flags, minus the ones only the parent uses (as --f=v or --f v)."""
  skip, out, args = ("--json", "--markdown", "--child"), [], iter(argv[1:])
  for a in args:
    if a in skip:
      next(args, None)
    elif a.split("=", 1)[0] not in skip:
      out.append(a)
  return out


def _in_child(argv, child: str) -> dict:
  """Run `--child=child` in a fresh Python process; its result row, or {'error': ...}."""
  cmd = [sys.executable, "-m", "pr_mim_jax.tools.benchmark", *_child_argv(argv), f"--child={child}"]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  return {"error": _error_line(proc.stderr, proc.returncode)}


def _error_line(stderr: str, returncode: int) -> str:
  """The exception line of a child's traceback (e.g. 'XlaRuntimeError: RESOURCE_EXHAUSTED:
  ...'), else its last line; JAX prints a note after the exception, so the last line is not
  enough."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  errors = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Exhausted)\b", l)]
  return ((errors or lines or [f"exit code {returncode}"])[-1])[:300]


def progress_line(i: int, n: int, row: dict, elapsed: float) -> str:
  """The stderr line after setting i of n: its images/s or why it failed, and the time left."""
  done = f"failed: {row['error']}" if "error" in row else f"{row.get('img_per_s')} img/s"
  return (f"[{i + 1}/{n}] {row['method']} {row['variant']}: {done}; about "
          f"{elapsed / (i + 1) * (n - i - 1):.0f} s left")


def ceiling_fields(row: dict) -> dict:
  """The report's fields from the ceiling measurement; a failed one is kept as
  `ceiling_error` (not the report's own `error`), and MFU is then left out."""
  if "error" not in row:
    return row
  return {"matmul_ceiling_tflop_per_s": None, "ceiling_error": row["error"]}


def device_fields(report: dict) -> dict:
  """The report's num_devices, and its device where the ceiling did not name it (failed, or
  not measured), from the timed rows."""
  def first(key):
    return next((r[key] for r in report["settings"] if key in r), None)
  return {"num_devices": first("num_devices"), "device": report.get("device") or first("device")}


def _run(f: types.SimpleNamespace, argv) -> int:
  unknown = set(f.methods.value) - set(methods.METHODS)
  if unknown:
    raise UserError(f"--methods: unknown {sorted(unknown)}; use names from {list(methods.METHODS)}")
  cli.at_least(f.steps, 1, "the timed steps")
  cli.at_least(f.warmup, 0, "untimed steps before them; 0 = none")
  cli.at_least(f.batch, 0, "the global batch; 0 = the config's")
  cli.at_least(f.ceiling_size, 0, "the ceiling's matrix side; 0 = the device's default")
  cli.check_output_file(f.json.value, "json")
  cli.check_output_file(f.markdown.value, "markdown")
  configs = methods.sweep(f.config.value, f.methods.value, f.variants.value)
  timing = not f.no_timing.value
  if timing and f.profile_dir.value:  # made now: the traces are taken after each timing
    cli.output_dir(f.profile_dir.value, "profile_dir")
  for c in configs:
    if f.batch.value:  # --batch is the config's batch_size, checked like it
      c.batch_size = f.batch.value
    shards = 1
    if timing:  # the batch must split over the devices that will run the step
      config_validation.validate_mesh(c)
      shards = sharding.num_batch_shards(sharding.mesh_from_config(c))
    config_validation.validate_pretrain(c, shards)
    if timing:
      config_validation.validate_attention_backend(c.model, jax.default_backend())
  batch_of = lambda c: c.batch_size
  dtype = configs[0].model.compute_dtype  # the sweep varies methods and variants, not this
  if f.child.value:  # one setting (or the ceiling) in this fresh process
    if f.child.value == CEILING:
      row = matmul_ceiling(f.ceiling_size.value, dtype=dtype)
    else:
      c = configs[int(f.child.value)]
      row = time_train_step(c, batch_of(c), f.steps.value, f.warmup.value, f.profile_dir.value)
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return

  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "command": " ".join(argv), "timed": timing,
            "isolated": timing and f.isolate.value, "steps": f.steps.value,
            "ceiling_dtype": dtype, "settings": []}
  if timing:
    measure = ((lambda child: _in_child(argv, child)) if f.isolate.value else
               (lambda child: matmul_ceiling(f.ceiling_size.value, dtype=dtype)
                if child == CEILING else
                time_train_step(configs[int(child)], batch_of(configs[int(child)]),
                                f.steps.value, f.warmup.value, f.profile_dir.value)))
    report.update(ceiling_fields(measure(CEILING)))
    if "ceiling_error" in report:
      print(f"warning: the matmul ceiling failed ({report['ceiling_error']}); no MFU",
            file=sys.stderr, flush=True)
  start = time.perf_counter()
  for i, c in enumerate(configs):
    row = cost(c)
    if timing:
      row.update(measure(str(i)))
      add_throughput(row, report.get("matmul_ceiling_tflop_per_s"))
      elapsed = time.perf_counter() - start
      print(progress_line(i, len(configs), row, elapsed), file=sys.stderr, flush=True)
    report["settings"].append(row)
    print(json.dumps(row), flush=True)
  report.update(device_fields(report))
  report["ratios"] = ratios(report["settings"])
  text = markdown(report)
  if timing:
    print(text, flush=True)
  cli.write_report(f.json.value, report, f.markdown.value, text)
  return cli.failed_settings_exit(report["settings"])


def main(argv=None) -> int:
  f = _define_flags()
  argv = list(argv if argv is not None else sys.argv)
  return cli.run(lambda: _run(f, argv), {"config": "pr_mim_jax/configs/pretrain.py:variant=B/16"},
                 argv, config_kinds=("pretrain",))


if __name__ == "__main__":
  sys.exit(main())
