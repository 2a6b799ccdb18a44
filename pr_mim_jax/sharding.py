"""Mesh, logical-axis rules and sharding trees (MaxText-style naming).

Modules name their params and activations with logical axes ('batch', 'tokens',
'embed', 'mlp', 'heads', 'kv'); a rule table maps those to the mesh axes
('data', 'fsdp', 'tensor'). The batch is sharded over data x fsdp.
"""

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

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


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


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
