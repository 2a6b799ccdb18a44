"""The three pre-training methods and the config fields each one implies (docs/method.md).

`pr_mim_jax/configs/pretrain.py` expands `method=` with this table (the study builds one config
per method that way); the benchmark, the compile report and the gradient tool switch methods
on one config with `with_method` / `sweep`.
"""

import ml_collections

# method -> (throw_ratio, throw_strategy, thrown_reconstruction)
METHODS = {
    "mae": (0.0, "random", "none"),  # decode every masked token
    "partial": (0.5, "random", "none"),  # CrossMAE / VideoMAE V2 style: thrown tokens unsupervised
    "pr_mim": (0.5, "furthest", "progressive"),  # furthest sampling + progressive reconstruction
}


def with_method(config: ml_collections.ConfigDict, method: str,
                throw_ratio: float | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` switched to `method` (its default throw_ratio unless given)."""
  default_throw, strategy, reconstruction = METHODS[method]
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.method = method
    c.masking.throw_ratio = default_throw if throw_ratio is None else throw_ratio
    c.masking.throw_strategy = strategy
    c.reconstruction.thrown_reconstruction = reconstruction
  return c


def sweep(config: ml_collections.ConfigDict, method_names, variants) -> list:
  """One config per (variant, method); the config's own method / variant when a list is empty."""
  out = []
  for variant in variants or [config.model.variant]:
    for method in method_names or [None]:
      c = with_method(config, method) if method else config.copy_and_resolve_references()
      if variants:
        with c.unlocked():
          c.model.variant = variant
          c.model.width = c.model.depth = c.model.heads = 0  # all from the variant
      out.append(c)
  return out
