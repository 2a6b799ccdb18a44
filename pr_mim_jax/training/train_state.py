"""The training state pytree: everything a step reads and writes, and nothing else."""

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar
  params: dict
  opt_state: object
  rng: jax.Array        # uint32 [2] raw key; per-step keys are fold_in(rng, step)


@flax.struct.dataclass
class ClassifierState:
  """Linear probing / fine-tuning state; `ema_params` is None unless an EMA is kept."""
  step: jax.Array       # int32 scalar
  params: dict          # {'encoder': ..., 'head': ...}
  batch_stats: dict     # BatchNorm statistics of the probe head ({} for a plain linear head)
  opt_state: object
  rng: jax.Array        # uint32 [2] raw key; per-step keys are fold_in(rng, step)
  ema_params: object = None
