"""Checksums of a state's arrays, computed where the arrays live, for verified checkpoints.

Per array: the sum over its elements of a 32-bit mix of (the element's bits, its flat
index), in uint32 arithmetic. Integer addition modulo 2^32 is exactly associative, so the
value does not depend on how the array is sharded or on the reduction order: every process
computes its shards' part on its own devices, XLA sums the parts, and all processes get the
same number, which makes the verdict collective. A changed, zeroed or moved byte changes the
sum except with probability about 2^-32. Not a cryptographic hash; it catches bit rot and
torn writes, not tampering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "mix32-sum-v1"  # stored beside the values; a future change of algorithm reads it


def _words(x: jax.Array) -> jax.Array:
  """Any array -> uint32 of the same shape: its bits, one word per element (8-byte dtypes add
  a trailing axis of 2, as NumPy's little-endian view)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(words: jax.Array, index: jax.Array) -> jax.Array:
  """Each uint32 word mixed with its flat position (murmur3's finaliser)."""
  h = words ^ (index * jnp.uint32(0x9E3779B1))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
  words = _words(x)  # [*shape] uint32
  # The row-major flat index from per-axis iotas: elementwise, so every shard computes its
  # own part in place, whatever the sharding (a reshape to 1-D could move data).
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.sum(_mix(words, index), dtype=jnp.uint32)  # [] uint32


_checksum_jit = jax.jit(_checksum)  # per leaf: a model's repeated blocks share compiles


def _one_at_a_time(x: jax.Array) -> bool:
  """XLA:CPU deadlocks when many small programs with collectives (the sum of an array
  sharded over several CPU devices) are in flight at once: some devices' threads wait in
  one program's all-reduce for a device that is in another's. There each sum is awaited
  before the next is dispatched (XLA:CPU runs such small programs as it dispatches them,
  so this costs next to nothing)."""
  devices = x.sharding.device_set
  return len(devices) > 1 and next(iter(devices)).platform == "cpu"


def start(tree) -> dict[str, jax.Array]:
  """Dispatches the checksums of every array leaf of `tree`; returns {path: uint32 []}
  without waiting (except on several CPU devices, `_one_at_a_time`), so the work queues
  behind the step that made the arrays and overlaps whatever the host does next. `values`
  reads them."""
  sums = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, jax.Array):
      sums[jax.tree_util.keystr(p, simple=True, separator="/")] = total = _checksum_jit(x)
      if _one_at_a_time(x):
        total.block_until_ready()
  return sums


def values(pending: dict[str, jax.Array]) -> dict[str, int]:
  """{path: checksum as a Python int}: waits for `start`'s results (a few bytes)."""
  return {k: int(v) for k, v in jax.device_get(pending).items()}


def of_numpy(x: np.ndarray) -> int:
  """The same checksum in NumPy, for one host array (tests, tools)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32).reshape(-1)
  else:
    size = x.dtype.itemsize
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[size]
    words = np.ascontiguousarray(x).view(view).astype(np.uint32).reshape(-1)
  with np.errstate(over="ignore"):
    h = words ^ (np.arange(words.size, dtype=np.uint64).astype(np.uint32) * np.uint32(0x9E3779B1))
    h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
    h = h ^ (h >> np.uint32(16))
  return int(h.sum(dtype=np.uint32))
