"""Tests for compile_targets: target names, TPU slice shapes, the GPU description, and the
TPU compiler's out-of-memory message (no accelerator pieces needed)."""

import re
import types

import pytest

from pr_mim_jax.errors import UserError
from pr_mim_jax.tools import compile_targets as ct


@pytest.mark.parametrize("text,devices,slices,expected", [
    ("tpu:v5e:16x16", 0, 1, ("tpu", "v5e:16x16", 256, 1)),
    ("tpu:v6e:8x16", 0, 1, ("tpu", "v6e:8x16", 128, 1)),
    ("tpu:v5p:4x4x8", 0, 2, ("tpu", "v5p:4x4x8", 256, 2)),
    ("tpu:v4:2x2x1", 4, 1, ("tpu", "v4:2x2x1", 4, 1)),
    ("gpu:h100", 0, 1, ("gpu", "h100", 8, 1)),
    ("gpu:h200", 16, 1, ("gpu", "h200", 16, 1)),
    ("gpu:a100", 4, 1, ("gpu", "a100", 4, 1)),  # part of one host
    ("cpu", 0, 1, ("cpu", "cpu", 1, 1)),
])
def test_targets_parse(text, devices, slices, expected):
  spec = ct.parse_target(text, devices, slices)
  assert (spec.platform, spec.name, spec.num_devices, spec.num_slices) == expected


@pytest.mark.parametrize("text,devices,slices,flag", [
    ("tpu:v5e:4x4x4", 0, 1, "--target"),  # v5e slices are 2-D
    ("tpu:v5p:4x4", 0, 1, "--target"),
    ("tpu:v9:2x2", 0, 1, "--target"),
    ("tpu:v5e", 0, 1, "--target"),
    ("tpu:v5e:2x2", 8, 1, "--num_devices"),  # a 2x2 slice has 4 chips
    ("gpu:rtx", 0, 1, "--target"),
    ("gpu:h100", 12, 1, "--num_devices"),  # not whole 8-GPU hosts
    ("gpu:h100", 0, 2, "--num_slices"),
    ("tpu:v5e:2x2", 0, 0, "--num_slices"),
    ("h100", 0, 1, "--target"),
    # A negative count (the mesh's "all" is -1) failed later: a CPU target as a "list index
    # out of range" row, a GPU one as a CUDA plugin that "cannot describe this GPU".
    ("cpu", -1, 1, "--num_devices"),
    ("gpu:h100", -1, 1, "--num_devices"),
    # A v5e side over 16 chips (the pod's) aborted the process inside libtpu at compile time.
    ("tpu:v5e:16x32", 0, 1, "--target: a v5e slice has at most 16 chips along a side"),
    ("tpu:v5e:32x16", 0, 1, "--target"),
    ("tpu:v6e:16x32", 0, 1, "--target"),
])
def test_bad_targets_name_the_flag(text, devices, slices, flag):
  with pytest.raises(UserError, match=f"^{re.escape(flag)}"):
    ct.parse_target(text, devices, slices)


@pytest.mark.parametrize("gen,dims,wrap", [
    ("v5e", (16, 16), (True, True, False)),  # a full v5e pod is a 2-D torus
    ("v5e", (8, 16), (False, True, False)),
    ("v5e", (2, 2), (False, False, False)),
    ("v5p", (4, 4, 8), (True, True, True)),  # whole 4x4x4 cubes close into rings
    ("v5p", (2, 4, 4), (False, False, False)),
    ("v4", (4, 4, 4), (True, True, True)),
])
def test_tpu_wrap_follows_the_slice_shape(gen, dims, wrap):
  assert ct.tpu_wrap(gen, dims) == wrap


def test_gpu_description_carries_the_card():
  spec = ct.GPUS["h200"]
  text = ct.gpu_target_config(spec)
  fields = dict(re.findall(r"^\s*(\w+): (\S+)$", text, re.M))
  assert int(fields["device_memory_size"]) == spec.memory_bytes == 151_397_597_184
  assert int(fields["core_count"]) == 132
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert f'device_description_str: "{spec.name}"' in text
  assert text.count("{") == text.count("}")


@pytest.mark.parametrize("message,expected", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (144.00G) exceeds available HBM (15.75G).", int(15.75 * 2 ** 30)),
    ("Ran out of memory in memory space hbm. Used 20.51G of 95.74G hbm. Exceeded hbm capacity "
     "by 4.77G.", int(95.74 * 2 ** 30)),
    ("INTERNAL: something else", None),
])
def test_tpu_oom_limit(message, expected):
  assert ct.tpu_oom_limit(message) == expected


def test_gpu_memory_is_jax_preallocation(monkeypatch):
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert ct.gpu_memory_fraction() == 0.75
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  assert ct.gpu_memory_fraction() == 0.9
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1")  # the whole card
  assert ct.gpu_memory_fraction() == 1.0
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "lots")
  with pytest.raises(UserError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
    ct.gpu_memory_fraction()


def test_gpu_memory_follows_jaxs_current_variable_name(monkeypatch):
  # jaxlib reads XLA_CLIENT_MEM_FRACTION, and the older XLA_PYTHON_CLIENT_MEM_FRACTION only
  # without it; with both set it refuses to start.
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", ".5")
  assert ct.gpu_memory_fraction() == 0.5
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  with pytest.raises(UserError, match="are both set"):
    ct.gpu_memory_fraction()


@pytest.mark.parametrize("name,nominal_gib", [("a100", 80), ("h100", 80), ("h200", 141)])
def test_gpu_memory_is_the_cards_bytes(name, nominal_gib):
  """The table holds bytes as a card states them: a card sold as "80GB" has up to 80 GiB
  (2**30 bytes each), well above 80e9 bytes."""
  assert 0.97 * nominal_gib * ct.GIB < ct.GPUS[name].memory_bytes <= nominal_gib * ct.GIB


def test_gpu_description_carries_the_memory_budget():
  text = ct.gpu_target_config(ct.GPUS["h100"], memory_bytes=63_707_234_304)
  assert re.search(r"^  device_memory_size: 63707234304$", text, re.M)


def test_gpu_target_gives_each_device_jaxs_share_of_the_card(monkeypatch):
  seen = {}

  def fake_devices(spec, memory_bytes):
    seen["budget"] = memory_bytes
    return ["gpu"] * spec.num_devices

  monkeypatch.setattr(ct, "_gpu_devices", fake_devices)
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")
  target = ct.make_target(ct.parse_target("gpu:h100", 4))
  assert target.memory_bytes == seen["budget"] == 84_942_979_072 // 2
  assert len(target.devices) == 4 and "0.5 of the card" in target.memory_note


@pytest.mark.parametrize("gpus,topology", [(1, "1x1x1"), (4, "1x1x4"), (8, "1x1x8"),
                                           (16, "1x2x8")])
def test_gpus_are_laid_out_in_hosts_of_eight(monkeypatch, gpus, topology):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  asked = {}

  def fake_topology(**kwargs):
    asked.update(kwargs)
    return types.SimpleNamespace(devices=["gpu"] * gpus)

  monkeypatch.setattr(ct, "_installed", lambda module: True)
  monkeypatch.setattr(topologies, "get_topology_desc", fake_topology)
  spec = ct.parse_target("gpu:h100", gpus)
  devices = ct._gpu_devices(spec, 10 ** 9)  # pylint: disable=protected-access
  assert len(devices) == gpus and asked["topology"] == topology
  assert "device_memory_size: 1000000000" in asked["target_config"]


def test_cpu_devices_share_the_hosts_memory(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ct, "_host_memory", lambda: 24 * ct.GIB)
  monkeypatch.setattr(jax, "devices", lambda *a: ["cpu0", "cpu1", "cpu2"])
  target = ct.make_target(ct.TargetSpec("cpu", "cpu", 2))
  assert target.devices == ["cpu0", "cpu1"] and target.memory_bytes == 12 * ct.GIB


@pytest.mark.parametrize("gen,gib", [("v4", 32), ("v5e", 16), ("v5p", 95), ("v6e", 32)])
def test_tpu_memory_falls_back_to_the_published_gib(gen, gib):
  """A compiler that states no HBM limit (here: this host's, which refuses nothing) leaves
  Cloud TPU's published HBM per chip, in GiB."""
  import jax  # pylint: disable=g-import-not-at-top
  memory, note = ct._tpu_memory(jax.devices("cpu"), gen)  # pylint: disable=protected-access
  assert memory == gib * 2 ** 30 and "published" in note
