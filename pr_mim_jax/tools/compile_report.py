r"""Will it fit? Compile the real train step for hardware this host does not have.

  python -m pr_mim_jax.tools.compile_report --config=pr_mim_jax/configs/pretrain.py:method=pr_mim,variant=L/16 \
      --target=tpu:v5p:4x4x8 --config.mesh.data=1 --config.mesh.fsdp=-1
  python -m pr_mim_jax.tools.compile_report --config=pr_mim_jax/configs/pretrain.py --target=gpu:h100 \
      --num_devices=8 --methods=mae,partial,pr_mim --variants=B/16,L/16 --json=fit.json

It builds the step that training runs (pre-training, linear probing or fine-tuning, from
`config.mode`) with the config's mesh, sharding rules, remat, attention and batch, on
compile-only devices of `--target` (compile_targets.py), and compiles it. Nothing runs
and no data is read. Per setting it reports XLA's per-device memory (arguments, outputs,
aliased, temp, total), whether that fits the device and with what headroom, the largest
per-device batch that fits (a bracketed search over compiles), the compile time, and
XLA's FLOP count next to our analytic one. JSON and markdown on request.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import sys
import time
import types
from typing import Callable

from absl import flags

from pr_mim_jax import cli
from pr_mim_jax.errors import UserError
from pr_mim_jax.method import methods
from pr_mim_jax.tools import compile_targets

GIB = 2 ** 30
IMAGENET_CLASSES = 1000


def _define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined when it runs (so importing this module defines none)."""
  return types.SimpleNamespace(
      config=cli.define_config_file("config", None, "Config file (pretrain, "
                                    "linear_probe or finetune).", lock_config=True),
      target=flags.DEFINE_string("target", None, "tpu:GEN:TOPOLOGY (GEN in "
                                 f"{sorted(compile_targets.TPU_GENERATIONS)}), gpu:NAME (NAME in "
                                 f"{sorted(compile_targets.GPUS)}) or cpu."),
      num_devices=flags.DEFINE_integer("num_devices", 0, "GPUs (default 8; more than 8 means "
                                       "hosts of 8) or CPU devices (default 1); TPUs take the "
                                       "count from the topology."),
      num_slices=flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN; the sizes "
                                      "of --config.mesh_dcn.* must multiply to it."),
      methods=flags.DEFINE_list("methods", [], f"Pre-training methods to compile, from "
                                f"{list(methods.METHODS)}; default: the config's."),
      variants=flags.DEFINE_list("variants", [], "Encoder variants, e.g. B/16,L/16,H/14; "
                                 "default: the config's."),
      fit=flags.DEFINE_boolean("fit", True, "Also search for the largest per-device batch that "
                               "fits (several more compiles per setting)."),
      max_per_device_batch=flags.DEFINE_integer("max_per_device_batch", 4096, "Upper end of "
                                                "the --fit search."),
      fit_step=flags.DEFINE_integer("fit_step", 8, "The --fit search tries per-device batches "
                                    "that are multiples of this."),
      fit_tolerance=flags.DEFINE_float("fit_tolerance", 0.03, "The --fit search stops once the "
                                       "smallest failing batch is within this share above the "
                                       "largest fitting one (0: to one --fit_step)."),
      num_classes=flags.DEFINE_integer("num_classes", IMAGENET_CLASSES, "Classes of the "
                                       "probe / fine-tune head (no dataset is read)."),
      json=flags.DEFINE_string("json", "", "Write the full report (every compile) here."),
      markdown=flags.DEFINE_string("markdown", "", "Write the summary table here."))


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of one compiled program, as XLA's memory analysis states them."""
  argument: int
  output: int
  alias: int  # outputs that reuse an argument's buffer (the donated state)
  temp: int
  code: int

  @property
  def total(self) -> int:
    """Peak bytes the program holds: arguments, outputs not aliased to them, temporaries
    and generated code."""
    return self.argument + self.output - self.alias + self.temp + self.code

  @classmethod
  def of(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    return cls(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes)

  def bytes(self) -> dict:
    return dataclasses.asdict(self) | {"total": self.total}

  def gib(self) -> dict:
    return {k: round(v / GIB, 3) for k, v in self.bytes().items()}


@dataclasses.dataclass(frozen=True)
class Probe:
  """One compile of the search: per-device batch -> total bytes (None: the compiler refused)."""
  per_device_batch: int
  total: int | None
  fits: bool


def largest_fitting(measure: Callable[[int], Probe], start: int, *, limit_bytes: int,
                    step: int = 1, max_batch: int = 4096,
                    tolerance: float = 0.0) -> tuple[int, list[Probe]]:
  """The largest multiple of `step` in [step, max_batch] whose probe fits, and every probe.

  Memory grows with the batch, so the fitting batches form a prefix. The search keeps a
  bracket (largest fitting, smallest failing) and probes where a straight line through two
  measured totals meets the limit: memory is close to affine in the batch, so that guess
  is often exact. A guess that did not halve the bracket is followed by a plain bisection
  (near the limit XLA's scheduler trades memory for speed, and memory bends), and without
  a bracket it doubles or halves. It stops when the bracket is one step wide, or narrower
  than `tolerance` times the largest fitting batch. Returns 0 when not even `step` fits.
  """
  probes: dict[int, Probe] = {}
  max_batch = max_batch // step * step  # the largest candidate: off the grid it is never tried
  lo, hi = 0, None  # largest fitting batch (0: none yet), smallest failing one (None: none yet)
  b = max(step, min(max_batch, start // step * step))
  while b is not None:
    width = None if hi is None else hi - lo
    p = probes[b] = measure(b)
    if p.fits:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
    halved = width is None or hi is None or 2 * (hi - lo) <= width
    b = _next_probe(lo, hi, probes, limit_bytes, step, max_batch, tolerance, halved)
  return lo, sorted(probes.values(), key=lambda q: q.per_device_batch)


def _next_probe(lo: int, hi: int | None, probes: dict, limit_bytes: int, step: int,
                max_batch: int, tolerance: float, use_line: bool) -> int | None:
  """The next batch to compile, or None once the bracket is closed."""
  top = max_batch if hi is None else hi - step  # the open candidates are lo+step .. top
  if lo >= top or (hi is not None and lo and hi - lo <= tolerance * lo):
    return None
  if hi is None:
    default = 2 * lo
  elif lo == 0:
    default = hi // 2
  else:
    default = (lo + hi) // 2
  guess = _linear_guess(probes, lo, hi, limit_bytes) if use_line else None
  clamp = lambda x: min(max(int(x) // step * step, lo + step), top)
  b = clamp(default if guess is None else guess)
  if b in probes:
    b = clamp(default)
  return None if b in probes else b


def _linear_guess(probes: dict, lo: int, hi: int | None, limit_bytes: int) -> float | None:
  """Where the line through the bracket's ends (or, before there is one, the two measured
  probes on the side the search is on) meets the limit."""
  measured = sorted((p for p in probes.values() if p.total is not None),
                    key=lambda p: p.per_device_batch)
  ends = [probes[b] for b in (lo, hi) if b in probes and probes[b].total is not None]
  if len(ends) < 2:
    fitting = [p for p in measured if p.fits]
    ends = fitting[-2:] if lo else [p for p in measured if not p.fits][:2]
  if len(ends) < 2:
    return None
  a, b = ends
  if b.total <= a.total:
    return None
  slope = (b.total - a.total) / (b.per_device_batch - a.per_device_batch)
  return a.per_device_batch + (limit_bytes - a.total) / slope


def _significant(x: float | None, digits: int = 4) -> float | None:
  return None if x is None else float(f"{x:.{digits}g}")


def xla_gflop_per_img(compiled, num_devices: int, global_batch: int) -> float | None:
  """XLA's FLOP count of the per-device program, scaled to one image; None when the backend
  gives none (the GPU compiler does not)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or not cost.get("flops"):
    return None
  return cost["flops"] * num_devices / global_batch / 1e9


def looped_parts(config, grad_accum_steps: int) -> str:
  """What of the step runs inside an XLA loop ('' if nothing): the encoder blocks under
  `model.scan_layers`, the micro-batches of gradient accumulation. XLA's cost analysis
  counts a loop body once, whatever its trip count, so its FLOP count is then too low."""
  parts = []
  if config.model.get("scan_layers", False):
    parts.append("the encoder blocks (model.scan_layers)")
  if grad_accum_steps > 1:
    parts.append(f"the {grad_accum_steps} micro-batches (train.grad_accum_steps)")
  return " and ".join(parts)


def cudnn_missing() -> UserError:
  """The one-line error for a cuDNN attention compile without the cuDNN library."""
  return UserError("config.model.attention: the cuDNN kernels compile only with the cuDNN "
                   "library present; pip install nvidia-cudnn-cu12 into this environment, "
                   "or use einsum / xla attention")


def _is_cudnn_missing(e: Exception) -> bool:
  """JAX's refusal to build cuDNN attention without the library (at trace or compile time)."""
  message = str(e)
  return "cuDNN not found" in message or "cuDNN is not detected" in message


def check_attention_target(config, platform: str) -> None:
  """cuDNN attention exists only on NVIDIA GPUs: a UserError for any other target."""
  attention = config.model.get("attention", "einsum")
  if attention.startswith("cudnn") and platform != "gpu":
    raise UserError(f"config.model.attention: {attention!r} runs only on NVIDIA GPUs, and the "
                    f"target is {platform!r}; use a gpu: target, or einsum / xla attention")


class Compiler:
  """Compiles one abstract step for any per-device batch on one target."""

  def __init__(self, step, target: compile_targets.Target):
    self.step, self.target = step, target

  def compile(self, per_device_batch: int):
    """(compiled program or None when the compiler ran out of memory, seconds, its message)."""
    batch = self.step.batch(per_device_batch * self.step.num_batch_shards)
    t0 = time.perf_counter()
    try:
      compiled = self.step.jitted.trace(self.step.state, batch).lower().compile(
          compiler_options=self.target.compiler_options or None)
    except Exception as e:  # pylint: disable=broad-except  # a TPU compiler's OOM is an answer
      message = " ".join(str(e).split())
      if "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message:
        return None, time.perf_counter() - t0, message[:300]
      if _is_cudnn_missing(e):
        raise cudnn_missing() from None
      raise
    return compiled, time.perf_counter() - t0, None

  def probe(self, per_device_batch: int) -> Probe:
    compiled, seconds, _ = self.compile(per_device_batch)
    total = None if compiled is None else Memory.of(compiled).total
    fits = total is not None and total <= self.target.memory_bytes
    print(f"  per-device batch {per_device_batch}: "
          f"{'compiler out of memory' if total is None else f'{total / GIB:.2f} GiB'}, "
          f"{'fits' if fits else 'does not fit'} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return Probe(per_device_batch, total, fits)


def report_setting(config, target: compile_targets.Target, *, fit: bool, max_per_device_batch: int,
                   num_classes: int, fit_step: int = 8, fit_tolerance: float = 0.0) -> dict:
  """Compile one config on `target` (and search the largest batch if `fit`); one row."""
  from pr_mim_jax.tools import abstract_step  # pylint: disable=g-import-not-at-top  # after JAX's set-up
  step = abstract_step.build(config, target.devices, num_classes)
  per_device = config.batch_size // step.num_batch_shards
  compiler = Compiler(step, target)
  compiled, seconds, error = compiler.compile(per_device)
  row = {
      "mode": config.get("mode", "pretrain"), "method": config.get("method"),
      "variant": config.model.variant, "target": target.spec.label,
      "device_kind": target.devices[0].device_kind, "num_devices": len(target.devices),
      "mesh": step.mesh_shape, "global_batch": config.batch_size, "per_device_batch": per_device,
      "remat": config.model.get("remat", "none"), "attention": config.model.get("attention", "einsum"),
      "compute_dtype": config.model.compute_dtype, "compile_s": round(seconds, 1),
      "device_memory_gib": round(target.memory_bytes / GIB, 2), "memory_note": target.memory_note,
      "analytic_gflop_per_img": _significant(step.gflop_per_img),
  }
  loops = looped_parts(config, step.granularity)
  if loops:
    row["xla_flops_note"] = (f"not counted: XLA counts a loop body once, and {loops} run in a "
                             "loop")
  if compiled is None:
    row.update(fits=False, memory_gib=None, memory_bytes=None, headroom_gib=None,
               compiler_error=error, xla_gflop_per_img=None)
    first = Probe(per_device, None, False)
  else:
    memory = Memory.of(compiled)
    xla = None if loops else xla_gflop_per_img(compiled, len(target.devices), config.batch_size)
    row.update(memory_gib=memory.gib(), memory_bytes=memory.bytes(),
               fits=memory.total <= target.memory_bytes,
               headroom_gib=round((target.memory_bytes - memory.total) / GIB, 2),
               xla_gflop_per_img=_significant(xla),
               xla_vs_analytic=(round(xla / step.gflop_per_img, 3)
                                if xla and step.gflop_per_img else None))
    first = Probe(per_device, memory.total, row["fits"])
  if fit:
    search_step = math.lcm(fit_step, step.granularity)
    largest, trail = largest_fitting(
        lambda b: first if b == per_device else compiler.probe(b), per_device,
        limit_bytes=target.memory_bytes, step=search_step, max_batch=max_per_device_batch,
        tolerance=fit_tolerance)
    row.update(largest_per_device_batch=largest,
               largest_global_batch=largest * step.num_batch_shards,
               smallest_failing_per_device_batch=min(
                   (p.per_device_batch for p in trail if not p.fits and p.per_device_batch > largest),
                   default=None),
               search_step=search_step, search_tolerance=fit_tolerance,
               search_limit=max_per_device_batch // search_step * search_step,  # reached: >= it
               fit_search=[{"per_device_batch": p.per_device_batch, "fits": p.fits,
                            "total_gib": None if p.total is None else round(p.total / GIB, 3)}
                           for p in trail])
  return row


def _cell(value, fmt="{}"):
  return "–" if value is None else fmt.format(value)


def _largest(row: dict) -> str:
  best = row.get("largest_per_device_batch")
  if best is None:
    return "–"
  return f"≥ {best}" if best == row.get("search_limit") else str(best)


def markdown(report: dict) -> str:
  """The report's summary table."""
  lines = [f"Target: {report['target']}; usable memory per device "
           f"{report['device_memory_gib']} GiB ({report['memory_note']}). {report['versions']}.",
           "", "| mode | method | variant | mesh | global batch | per device | argument GiB | "
           "temp GiB | total GiB | fits (headroom GiB) | largest per-device batch | compile s | "
           "XLA / analytic GFLOP per image |", "|" + "---|" * 13]
  for r in report["settings"]:
    mesh = "x".join(str(v) for v in r.get("mesh", {}).values())
    if "error" in r:
      lines.append(f"| {r.get('mode')} | {r.get('method') or '–'} | {r.get('variant')} | failed: "
                   f"{r['error'].replace('|', '/')} |" + " |" * 9)
      continue
    m = r["memory_gib"] or {}
    fits = ("no (compiler: out of memory)" if r["memory_gib"] is None else
            f"{'yes' if r['fits'] else 'no'} ({r['headroom_gib']:+.2f})")
    flops_cell = f"{_cell(r['xla_gflop_per_img'])} / {_cell(r['analytic_gflop_per_img'])}"
    lines.append(
        f"| {r['mode']} | {r['method'] or '–'} | {r['variant']} | {mesh} | {r['global_batch']} | "
        f"{r['per_device_batch']} | {_cell(m.get('argument'), '{:.2f}')} | "
        f"{_cell(m.get('temp'), '{:.2f}')} | {_cell(m.get('total'), '{:.2f}')} | {fits} | "
        f"{_largest(r)} | {r['compile_s']:.0f} | {flops_cell} |")
  return "\n".join(lines) + "\n"


def versions(platform: str) -> str:
  names = ["jax", "jaxlib"] + {"tpu": ["libtpu"], "gpu": ["jax-cuda12-plugin"]}.get(platform, [])
  found = []
  for name in names:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return ", ".join(found)



def _prepare_process(spec: compile_targets.TargetSpec) -> None:
  """Before JAX starts its backends: run nothing on a local accelerator, and give a cpu
  target its device count."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  # libtpu allows one process per host unless told otherwise; compile-only use is safe to share.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if spec.platform == "cpu" and spec.num_devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={spec.num_devices}").strip()


def check_slices(config, num_slices: int) -> None:
  """--num_slices against config.mesh_dcn, the slice grid: a mismatch would compile a mesh
  laid out unlike the run's (with the default grid of 1, one flat mesh across the slices)."""
  sizes = list(config.mesh_dcn.values())
  if not all(isinstance(n, int) and n >= 1 for n in sizes):
    return  # the config's own check names the bad size (config.mesh_dcn.data: got -1 ...)
  grid = math.prod(sizes)
  if grid != num_slices:
    raise UserError(f"--num_slices={num_slices}: config.mesh_dcn {config.mesh_dcn.to_dict()} "
                    f"spans {grid} slice(s); make the product of its sizes {num_slices}, e.g. "
                    f"--config.mesh_dcn.data={num_slices}")


def _run(f: types.SimpleNamespace, argv) -> int:
  spec = compile_targets.parse_target(f.target.value, f.num_devices.value, f.num_slices.value)
  config = f.config.value
  check_slices(config, spec.num_slices)
  if config.get("mode", "pretrain") != "pretrain" and f.methods.value:
    raise UserError(f"--methods: {config.mode} configs have no pre-training method; drop --methods")
  unknown = set(f.methods.value) - set(methods.METHODS)
  if unknown:
    raise UserError(f"--methods: unknown {sorted(unknown)}; use names from {list(methods.METHODS)}")
  cli.at_least(f.num_classes, 1, "classes of the probe / fine-tune head")
  if f.max_per_device_batch.value < 1 or f.fit_step.value < 1:
    raise UserError("--max_per_device_batch and --fit_step must be >= 1")
  if not 0 <= f.fit_tolerance.value < 1:
    raise UserError(f"--fit_tolerance: got {f.fit_tolerance.value}; use a share in [0, 1), e.g. 0.03")
  check_attention_target(config, spec.platform)  # --methods / --variants keep the attention
  cli.check_output_file(f.json.value, "json")
  cli.check_output_file(f.markdown.value, "markdown")
  _prepare_process(spec)
  with compile_targets.quiet_stderr():  # the CUDA plugin logs at import that there is no GPU
    import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)  # as training sets it
  target = compile_targets.make_target(spec)
  configs = methods.sweep(config, f.methods.value, f.variants.value)
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(argv), "target": spec.label, "versions": versions(spec.platform),
            "device_memory_gib": round(target.memory_bytes / GIB, 2),
            "memory_note": target.memory_note, "settings": []}
  start = time.perf_counter()
  for i, c in enumerate(configs):
    try:
      row = report_setting(c, target, fit=f.fit.value,
                           max_per_device_batch=f.max_per_device_batch.value,
                           fit_step=f.fit_step.value, fit_tolerance=f.fit_tolerance.value,
                           num_classes=f.num_classes.value)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # one failed setting, named
      if _is_cudnn_missing(e):  # raised while the state is laid out, before any compile
        raise cudnn_missing() from None
      row = {"mode": c.get("mode", "pretrain"), "method": c.get("method"),
             "variant": c.model.variant, "error": compile_targets._first_line(e)}  # pylint: disable=protected-access
    report["settings"].append(row)
    print(json.dumps(row), flush=True)
    elapsed = time.perf_counter() - start
    print(f"[{i + 1}/{len(configs)}] {row.get('method') or row['mode']} {row['variant']}: "
          f"total {(row.get('memory_gib') or {}).get('total', '–')} GiB; "
          f"{elapsed:.0f} s so far, about {elapsed / (i + 1) * (len(configs) - i - 1):.0f} s left",
          file=sys.stderr, flush=True)
  text = markdown(report)
  print(text, flush=True)
  cli.write_report(f.json.value, report, f.markdown.value, text)
  return cli.failed_settings_exit(report["settings"])


def main(argv=None) -> int:
  f = _define_flags()
  argv = list(argv if argv is not None else sys.argv)
  return cli.run(lambda: _run(f, argv),
                 {"config": "pr_mim_jax/configs/pretrain.py:variant=B/16", "target": "tpu:v5e:16x16"}, argv,
                 config_kinds=("pretrain", "linear_probe", "finetune"))


if __name__ == "__main__":
  sys.exit(main())
