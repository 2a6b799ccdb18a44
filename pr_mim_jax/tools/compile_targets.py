"""Compile-only devices: TPU slices and NVIDIA GPUs described, not present.

XLA compiles for hardware this host does not have when it is given a description of it:
libtpu describes any TPU slice by generation and topology, and the CUDA plugin takes a GPU
target description (rendered here from the table below). The devices that come back can
build a `Mesh`, and `jax.jit(...).trace(...).lower().compile()` then returns the real
compiled program with its memory analysis; nothing can run on them.

Targets are written `tpu:GEN:TOPOLOGY` (e.g. `tpu:v5e:16x16`, `tpu:v5p:4x4x8`),
`gpu:NAME` (e.g. `gpu:h100`) or `cpu` (this host's own devices).
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import tempfile

from pr_mim_jax.errors import UserError

GIB = 2 ** 30

TPU_EXTRA = "pip install -e '.[tpu-compile]'"
GPU_EXTRA = "pip install -e '.[gpu-compile]'"


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  libtpu_name: str  # the generation as libtpu's topology names spell it
  chip_config: str  # 'megacore': one device per chip (two TensorCores fused), else 'default'
  dims: int  # 2: a 2-D torus (AxB), 3: a 3-D torus (AxBxC)
  hbm_gib: float  # per chip, as Cloud TPU documents it; the compiler's own limit wins
  max_side: int | None = None  # most chips along one axis of a slice (None: not checked)


# Cloud TPU's published chip facts (HBM per chip; a v5e or v6e pod is 16x16 chips, and
# libtpu aborts the process, not raises, when asked to compile for a longer v5e side).
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", "megacore", 3, 32),
    "v5e": TpuGeneration("v5e", "default", 2, 16, max_side=16),
    "v5p": TpuGeneration("v5", "megacore", 3, 95),
    "v6e": TpuGeneration("v6e", "default", 2, 32, max_side=16),
}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """What XLA's GPU compiler needs to know about a card (its published data sheet)."""
  name: str  # the device_kind a real card reports
  compute_capability: tuple[int, int]
  sm_count: int
  memory_bytes: int
  memory_bandwidth: float  # bytes/s
  l2_bytes: int
  clock_ghz: float
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  fp32_units_per_sm: int


GPUS = {
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 85_100_068_864, 2.039e12, 40 << 20,
                    1.41, 167_936, 166_912, 64),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 84_942_979_072, 3.352e12, 50 << 20,
                    1.98, 233_472, 232_448, 128),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", (9, 0), 132, 151_397_597_184, 4.8e12, 50 << 20,
                    1.98, 233_472, 232_448, 128),
    "b200": GpuSpec("NVIDIA B200", (10, 0), 148, 191_514_411_008, 7.672e12, 126_500 << 10,
                    1.965, 233_472, 232_448, 128),
}

# JAX preallocates this share of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise; a step must fit in it.
JAX_GPU_MEM_FRACTION = 0.75
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  """A parsed --target: what to ask the compiler for (no devices yet)."""
  platform: str  # 'tpu' | 'gpu' | 'cpu'
  name: str  # 'v5e:16x16', 'h100', 'cpu'
  num_devices: int
  num_slices: int = 1

  @property
  def label(self) -> str:
    if self.platform == "tpu":
      slices = f" x{self.num_slices} slices" if self.num_slices > 1 else ""
      return f"TPU {self.name}{slices} ({self.num_devices} chips)"
    if self.platform == "gpu":
      return f"{self.num_devices}x {GPUS[self.name].name}"
    return f"{self.num_devices}x CPU"


@dataclasses.dataclass(frozen=True)
class Target:
  spec: TargetSpec
  devices: list
  memory_bytes: int  # per device, what a step may use
  memory_note: str  # where memory_bytes comes from
  compiler_options: dict


def _topology_dims(text: str, dims: int, gen: str) -> tuple[int, ...]:
  parts = text.split("x")
  if len(parts) != dims or not all(p.isdigit() and int(p) > 0 for p in parts):
    example = "16x16" if dims == 2 else "4x4x8"
    raise UserError(f"--target: {gen} slices are {dims}-D, like tpu:{gen}:{example}; got {text!r}")
  side = TPU_GENERATIONS[gen].max_side
  if side and max(int(p) for p in parts) > side:
    raise UserError(f"--target: a {gen} slice has at most {side} chips along a side (a full pod "
                    f"is {side}x{side}); got {text!r}; for more chips, join slices with "
                    "--num_slices")
  return tuple(int(p) for p in parts)


def parse_target(text: str, num_devices: int = 0, num_slices: int = 1) -> TargetSpec:
  """'tpu:v5e:16x16' | 'gpu:h100' | 'cpu' -> TargetSpec; a UserError names what is wrong."""
  kind, _, rest = text.partition(":")
  if num_devices < 0:  # not the mesh's -1: a count, or 0 for the target's own
    raise UserError(f"--num_devices: got {num_devices}; use a device count, or leave it unset "
                    "for the target's default (GPUs 8, CPU 1, TPUs their topology's chips)")
  if num_slices < 1:
    raise UserError(f"--num_slices: got {num_slices}; use 1 or more")
  if kind == "tpu":
    gen, _, topology = rest.partition(":")
    if gen not in TPU_GENERATIONS or not topology:
      raise UserError(f"--target: {text!r} is not a TPU slice; use tpu:GEN:TOPOLOGY with GEN in "
                      f"{sorted(TPU_GENERATIONS)}, e.g. tpu:v5e:16x16 or tpu:v5p:4x4x8")
    dims = _topology_dims(topology, TPU_GENERATIONS[gen].dims, gen)
    if num_devices and num_devices != math.prod(dims) * num_slices:
      raise UserError(f"--num_devices: tpu:{gen}:{topology} x {num_slices} slice(s) has "
                      f"{math.prod(dims) * num_slices} chips; leave --num_devices unset for TPUs")
    return TargetSpec("tpu", f"{gen}:{topology}", math.prod(dims) * num_slices, num_slices)
  if num_slices != 1:
    raise UserError("--num_slices: only TPU targets have slices; leave it at 1")
  if kind == "gpu":
    if rest not in GPUS:
      raise UserError(f"--target: unknown GPU {rest!r}; use one of "
                      f"{', '.join('gpu:' + g for g in GPUS)}")
    n = num_devices or GPUS_PER_HOST
    if n > GPUS_PER_HOST and n % GPUS_PER_HOST:
      raise UserError(f"--num_devices: {n} GPUs do not fill whole {GPUS_PER_HOST}-GPU hosts; use "
                      f"at most {GPUS_PER_HOST}, or a multiple of it")
    return TargetSpec("gpu", rest, n)
  if kind == "cpu" and not rest:
    return TargetSpec("cpu", "cpu", num_devices or 1)
  raise UserError(f"--target: {text!r} is not a target; use tpu:GEN:TOPOLOGY (e.g. tpu:v5e:16x16), "
                  "gpu:NAME (e.g. gpu:h100) or cpu")


def tpu_wrap(gen: str, dims: tuple[int, ...]) -> tuple[bool, ...]:
  """Which axes of a slice close into a ring (Cloud TPU's slice shapes): a 2-D generation's
  axis of 16 chips (a full pod side); all axes of a 3-D slice made of whole 4x4x4 cubes."""
  if TPU_GENERATIONS[gen].dims == 2:
    return tuple(d == 16 for d in dims) + (False,)
  cubes = all(d % 4 == 0 for d in dims)
  return (cubes,) * 3


def gpu_target_config(spec: GpuSpec, memory_bytes: int | None = None) -> str:
  """The GPU as XLA's GpuTargetConfigProto text, the fields the compiler reads.

  `memory_bytes` replaces the card's memory size: XLA's scheduler spends free memory on
  overlapping collectives with compute, up to this budget, as it does on a real card up to
  what JAX's allocator holds.
  """
  major, minor = spec.compute_capability
  info = {
      "threads_per_block_limit": 1024, "threads_per_warp": 32,
      "shared_memory_per_block": 49152, "shared_memory_per_core": spec.shared_memory_per_sm,
      "threads_per_core_limit": 2048, "core_count": spec.sm_count,
      "fpus_per_core": spec.fp32_units_per_sm, "block_dim_limit_x": 2 ** 31 - 1,
      "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
      "memory_bandwidth": int(spec.memory_bandwidth), "l2_cache_size": spec.l2_bytes,
      "clock_rate_ghz": spec.clock_ghz, "device_memory_size": memory_bytes or spec.memory_bytes,
      "shared_memory_per_block_optin": spec.shared_memory_per_block_optin,
      "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
  }
  lines = ["gpu_device_info {"] + [f"  {k}: {v}" for k, v in info.items()]
  lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}",
            'platform_name: "CUDA"', "dnn_version_info { major: 9 minor: 8 }",
            f'device_description_str: "{spec.name}"']
  return "\n".join(lines) + "\n"


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def _tpu_devices(spec: TargetSpec) -> list:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not _installed("libtpu"):
    raise UserError(f"--target={spec.platform}:{spec.name} needs libtpu, which is not installed; "
                    f"in a separate environment from the GPU one run: {TPU_EXTRA}")
  gen, topology = spec.name.split(":")
  g = TPU_GENERATIONS[gen]
  dims = tuple(int(d) for d in topology.split("x"))
  try:
    with quiet_stderr():  # libtpu logs that this host is no TPU VM; we know
      topo = topologies.get_topology_desc(
          topology_name=f"{g.libtpu_name}:{topology}", platform="tpu",
          chip_config_name=g.chip_config, chips_per_host_bounds=(2, 2, 1),
          num_slices=spec.num_slices, wrap=tpu_wrap(gen, dims))
  except Exception as e:  # pylint: disable=broad-except  # libtpu's refusal, as one line
    raise UserError(f"--target=tpu:{spec.name}: libtpu refused this slice ({_first_line(e)}); "
                    "check the topology against Cloud TPU's slice shapes") from None
  return list(topo.devices)


@contextlib.contextmanager
def quiet_stderr():
  """Route file descriptor 2 (where native libraries log) to a discarded file for a while."""
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def _gpu_devices(spec: TargetSpec, memory_bytes: int) -> list:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not _installed("jax_plugins.xla_cuda12") and not _installed("jax_plugins.xla_cuda13"):
    raise UserError(f"--target=gpu:{spec.name} needs the CUDA plugin for this jax, which is not "
                    f"installed; in a separate environment from the TPU one run: {GPU_EXTRA}")
  hosts, per_host = max(1, spec.num_devices // GPUS_PER_HOST), min(spec.num_devices, GPUS_PER_HOST)
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=gpu_target_config(GPUS[spec.name],
                                                                        memory_bytes),
                                        topology=f"1x{hosts}x{per_host}")
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--target=gpu:{spec.name}: the installed CUDA plugin cannot describe this GPU "
                    f"({_first_line(e)})") from None
  return list(topo.devices)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


HBM_LIMIT = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)|of ([\d.]+)([KMGT]) hbm")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def tpu_oom_limit(message: str) -> int | None:
  """The HBM limit (bytes) a TPU compiler's out-of-memory error states, if it states one."""
  m = HBM_LIMIT.search(message)
  if not m:
    return None
  value, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
  return int(float(value) * _UNITS[unit])


def _tpu_memory(devices, gen: str) -> tuple[int, str]:
  """The compiler's own HBM limit, read from its refusal of a program 4x the chip's size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("d",))
  n = int(4 * TPU_GENERATIONS[gen].hbm_gib * GIB) // 4 // 1024
  big = jax.ShapeDtypeStruct((n, 1024), jnp.float32,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  try:
    jax.jit(lambda x: jnp.sin(x) + jnp.cos(x[::-1])).trace(big).lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    limit = tpu_oom_limit(str(e))
    if limit:
      return limit, "the TPU compiler's HBM limit"
  return int(TPU_GENERATIONS[gen].hbm_gib * GIB), "Cloud TPU's published HBM per chip"


def _host_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# JAX's preallocation share, read as jaxlib reads it: the current name, else the older one.
FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX will hand out (its preallocation)."""
  given = {name: os.environ[name] for name in FRACTION_VARS if os.environ.get(name)}
  if len(given) > 1:
    raise UserError(f"{' and '.join(FRACTION_VARS)} are both set, which JAX refuses; unset "
                    f"{FRACTION_VARS[1]}, the older name")
  name, text = next(iter(given.items()), (FRACTION_VARS[1], str(JAX_GPU_MEM_FRACTION)))
  try:
    fraction = float(text)
  except ValueError:
    fraction = -1.0
  if not 0 < fraction <= 1:
    raise UserError(f"{name}={text!r}: use a number in (0, 1], e.g. .75")
  return fraction


def make_target(spec: TargetSpec) -> Target:
  """Compile-only devices for `spec`, their usable memory and the compiler options to use."""
  import jax  # pylint: disable=g-import-not-at-top
  with quiet_stderr():  # backend start-up: the CUDA plugin logs that this host has no GPU
    jax.devices("cpu")
  if spec.platform == "tpu":
    devices = _tpu_devices(spec)
    memory, note = _tpu_memory(devices, spec.name.split(":")[0])
    return Target(spec, devices, memory, note, {})
  if spec.platform == "gpu":
    fraction = gpu_memory_fraction()
    memory = int(GPUS[spec.name].memory_bytes * fraction)
    # No device means no autotuning; the Triton GEMM emitter then fails on some ViT shapes
    # ("Couldn't find output tile sizes"), so GEMMs go to cuBLAS.
    return Target(spec, _gpu_devices(spec, memory), memory,
                  f"JAX's preallocation, {fraction:g} of the card ({' / '.join(FRACTION_VARS)})",
                  {"xla_gpu_enable_triton_gemm": False})
  devices = jax.devices("cpu")
  if len(devices) < spec.num_devices:
    raise UserError(f"--num_devices: this host has {len(devices)} CPU device(s), not "
                    f"{spec.num_devices}; the command sets that count itself when run as a program")
  return Target(spec, devices[:spec.num_devices], _host_memory() // spec.num_devices,
                "this host's memory, shared by its devices", {})
