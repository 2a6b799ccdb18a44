"""Mesh, logical-axis rules and sharding trees (MaxText-style naming).

Modules name their params and activations with logical axes ('batch', 'tokens',
'embed', 'mlp', 'heads', 'kv'); a rule table maps those to the mesh axes
('data', 'fsdp', 'tensor'). The batch is sharded over data x fsdp.

The mesh and the rules come from the config (`config.mesh`, `config.mesh_dcn`,
`config.sharding_rules`): all devices on 'data' is pure data parallelism, fsdp > 1 shards
params and optimizer state (ZeRO-3), tensor > 1 shards heads and MLP.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pr_mim_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES = ("batch", "tokens", "embed", "mlp", "heads", "kv")

# Pure data parallelism: only the batch is split; params are replicated.
DATA_PARALLEL_RULES = (
    ("batch", BATCH_AXES),
    ("tokens", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
)


def make_mesh(devices=None) -> Mesh:
  """All devices on the 'data' axis."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1, 1, 1), MESH_AXES)


def mesh_shapes(config, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici_shape, dcn_shape) over MESH_AXES; a -1 in config.mesh takes the devices left.

  The full mesh shape is ici * dcn per axis; config.mesh_dcn is the slice grid.
  """
  dcn = tuple(int(config.mesh_dcn[a]) for a in MESH_AXES)
  ici = [int(config.mesh[a]) for a in MESH_AXES]
  per_slice, rest = divmod(num_devices, math.prod(dcn))
  if rest:
    raise UserError(f"config.mesh_dcn: {dict(zip(MESH_AXES, dcn))} needs a multiple of "
                    f"{math.prod(dcn)} devices, got {num_devices}; change config.mesh_dcn")
  if -1 in ici:
    known = math.prod(n for n in ici if n != -1)
    if per_slice % known:
      raise UserError(f"config.mesh: {dict(zip(MESH_AXES, ici))} cannot fill {per_slice} "
                      f"devices per slice; use sizes whose product divides {per_slice}")
    ici[ici.index(-1)] = per_slice // known
  if math.prod(ici) != per_slice:
    raise UserError(f"config.mesh: {dict(zip(MESH_AXES, ici))} has {math.prod(ici)} devices but "
                    f"there are {per_slice} per slice ({num_devices} in all); make the product "
                    "match or set one axis to -1")
  return tuple(ici), dcn


def device_grid(config, devices=None) -> np.ndarray:
  """The devices as a [data, fsdp, tensor] array laid out per config.mesh / mesh_dcn."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = mesh_shapes(config, len(devices))
  if math.prod(dcn) > 1:  # multi-slice: ICI axes inside a slice, DCN axes across slices
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  try:
    return mesh_utils.create_device_mesh(ici, devices)
  except (ValueError, NotImplementedError, AssertionError):  # e.g. unusual device kinds
    return np.asarray(devices, dtype=object).reshape(ici)


def mesh_from_config(config, devices=None) -> Mesh:
  """Mesh with axes ('data', 'fsdp', 'tensor') from config.mesh and config.mesh_dcn."""
  return Mesh(device_grid(config, devices), MESH_AXES)


def rules_from_config(config) -> tuple:
  """Flax logical axis rules from config.sharding_rules ('a,b' -> ('a', 'b'), '' -> None)."""
  rules = []
  for logical in LOGICAL_AXES:
    axes = tuple(a.strip() for a in config.sharding_rules[logical].split(",") if a.strip())
    rules.append((logical, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def to_host(tree):
  """Global arrays -> NumPy on every process (an all-gather when they span processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(boxed_params, mesh: Mesh, rules):
  """Shardings for params created with logical partitioning metadata (boxed, abstract ok)."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(abstract_opt_state, abstract_params, params_sharding, mesh: Mesh):
  """Every params-shaped subtree of the optimizer state (Adam's mu, nu) follows the
  params' shardings; everything else (step counts) is replicated."""
  params_def = jax.tree.structure(abstract_params)
  is_params_like = lambda node: jax.tree.structure(node) == params_def
  return jax.tree.map(
      lambda node: params_sharding if is_params_like(node) else replicated(mesh),
      abstract_opt_state, is_leaf=is_params_like)


def check_divisible(abstract_params, params_sharding) -> None:
  """UserError naming the param when a sharded dimension does not split evenly."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  for (path, leaf), s in zip(flat, jax.tree.leaves(params_sharding)):
    for dim, axes in zip(leaf.shape, tuple(s.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(s.mesh.shape[a] for a in axes)
      if dim % ways:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise UserError(f"config.mesh: param {name} of shape {leaf.shape} cannot be split "
                        f"{ways} ways over {axes} (config.sharding_rules); change config.mesh "
                        "or the model sizes")
