"""Logical axis names on params and activations; the mesh's rules (sharding.py) map them
to mesh axes."""

import flax.linen as nn


def partitioned(init, names):
  """An initializer whose params carry logical axis names (for the sharding rules)."""
  return nn.with_logical_partitioning(init, names)


def constrain(x, names):
  """Activation sharding by logical names (a no-op outside a mesh + rules context)."""
  return nn.with_logical_constraint(x, names)
