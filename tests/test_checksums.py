"""Array checksums: an independent NumPy reference, any sharding gives the same value, and
single damaged bytes are caught."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import run_with_fake_devices
from pr_mim_jax.training import checksums


def _reference(x: np.ndarray) -> int:
  """Written out element by element in plain Python integers."""
  words = []
  for v in np.asarray(x).reshape(-1):
    raw = np.asarray(v).tobytes()  # little-endian element bytes
    if len(raw) <= 4:
      words.append(int.from_bytes(raw, "little"))
    else:
      words += [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
  total, m = 0, 0xFFFFFFFF
  for i, w in enumerate(words):
    h = w ^ ((i * 0x9E3779B1) & m)
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & m
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & m
    total = (total + (h ^ (h >> 16))) & m
  return total


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8, ml_dtypes.bfloat16, np.bool_])
def test_device_numpy_and_python_agree(dtype):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(5, 7, 3)) * 50).astype(dtype)
  want = _reference(x)
  assert checksums.of_numpy(x) == want
  assert checksums.values(checksums.start({"a": {"b": jnp.asarray(x)}})) == {"a/b": want}


def test_same_value_under_any_sharding():
  """4 fake CPU devices: replicated, split by rows, by columns, over two axes."""
  proc = run_with_fake_devices("""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pr_mim_jax.training import checksums
x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
got = {checksums.values(checksums.start([jax.device_put(x, NamedSharding(mesh, s))]))["0"]
       for s in (P(), P("a"), P(None, "b"), P("a", "b"), P(("a", "b")))}
print("SUMS", sorted(got), checksums.of_numpy(x))
""", devices=4, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("SUMS")][-1]
  want = _reference(np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32))
  assert line.split(" ", 1)[1] == f"[{want}] {want}"  # one value, NumPy's too


def test_one_changed_byte_or_a_swap_changes_the_sum():
  x = np.random.default_rng(2).normal(size=(64, 64)).astype(np.float32)
  base = checksums.of_numpy(x)
  for flat_byte in (0, 1000, x.nbytes - 1):
    damaged = x.copy().view(np.uint8).reshape(-1)
    damaged[flat_byte] ^= 0x10
    assert checksums.of_numpy(damaged.view(np.float32)) != base
  zeroed = x.copy()
  zeroed.reshape(-1)[100:116] = 0  # 64 bytes, as the torn-write test
  assert checksums.of_numpy(zeroed) != base
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # the same values, moved
  assert checksums.of_numpy(swapped) != base


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_numpy_eight_byte_elements_hash_both_words(dtype):
  """8-byte elements are two little-endian words each: the high word counts too."""
  x = (np.random.default_rng(3).normal(size=(4, 5)) * 1e6).astype(dtype)
  assert checksums.of_numpy(x) == _reference(x)
  high = x.copy()
  high.view(np.uint32).reshape(-1)[1] ^= 0x100  # a bit of the first element's high word
  assert checksums.of_numpy(high) != checksums.of_numpy(x)


def test_start_covers_every_array_leaf_and_typed_keys():
  """Every jax.Array leaf gets its own path; a typed PRNG key is hashed as its key data."""
  import jax  # pylint: disable=g-import-not-at-top
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1, 2, 3], np.int32)
  key = jax.random.key(7)
  tree = {"a": jnp.asarray(a), "b": [jnp.asarray(b), jnp.asarray(a + 1)], "rng": key,
          "host": np.ones(3)}  # not a jax.Array: not checksummed
  got = checksums.values(checksums.start(tree))
  assert got == {"a": _reference(a), "b/0": _reference(b), "b/1": _reference(a + 1),
                 "rng": _reference(np.asarray(jax.random.key_data(key)))}


@pytest.mark.slow  # about 7 s: a subprocess with 4 fake devices
def test_fsdp_train_state_on_several_cpu_devices_does_not_deadlock():
  """An FSDP train state on 4 fake CPU devices (175 arrays, most sharded): dispatched all at
  once, the sums' all-reduces deadlocked XLA:CPU, which aborted the first checkpoint save
  of `--config.mesh.data=1 --config.mesh.fsdp=-1` after 60 s. Each sum also equals the
  NumPy checksum of the gathered array."""
  proc = run_with_fake_devices("""
import sys
import flax.linen as nn
import jax
import numpy as np
jax.config.update("jax_threefry_partitionable", True)
sys.path.insert(0, "tests")
from conftest import TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checksums, optim, pretrain
from pr_mim_jax.training import train_step as train_step_lib
c = apply_overrides(load_config(), TINY_OVERRIDES)
c.mesh.update(dict(data=1, fsdp=-1))
mesh, rules = sharding.mesh_from_config(c), sharding.rules_from_config(c)
tx = optim.make_optimizer(c.optim, optim.lr_schedule(1e-3, 10, 1))
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  state, _ = pretrain.create_state(train_step_lib.model_from_config(c), tx,
                                   train_step_lib.task_from_config(c).split, c.seed, mesh, rules)
  got = checksums.values(checksums.start(state))
leaves = {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
sharded = sum(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated
              for x in leaves.values())
want = {k: checksums.of_numpy(np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
    x.dtype, jax.dtypes.prng_key) else x)) for k, x in leaves.items()}
print("RESULT", len(got), sharded, got == want)
""", devices=4, timeout=150)
  assert proc.returncode == 0, proc.stderr[-2000:]
  n, sharded, equal = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1].split()[1:]
  assert int(n) > 100 and int(sharded) > 50 and equal == "True"
