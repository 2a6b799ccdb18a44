"""The training state pytree: everything a step reads and writes, and nothing else."""

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar
  params: dict
  opt_state: object
  rng: jax.Array        # uint32 [2] raw key; per-step keys are fold_in(rng, step)
