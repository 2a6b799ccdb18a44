"""Whether a LARS linear probe's schedule can move its head at all.

LARS scales each weight matrix's step to lr x trust x |w|, whatever the gradient's size, so
the schedule alone bounds how far the head can travel from its random init. MAE's
linear-scaling rule (peak = base_lr x batch / 256) makes that bound tiny on a small batch
and a short run, and the probe then measures its init, not the features.
"""

import math

import jax
import numpy as np

from pr_mim_jax.training import optim

MAE_PROBE_PEAK_LR = 6.4  # MAE's probe: base lr 0.1 x batch 16384 / 256


def lars_reach(schedule, total_steps: int, momentum: float,
               trust: float = optim.LARS_TRUST) -> float:
  """R = trust * sum_t lr_t * (1 - momentum^(t+1)) / (1 - momentum): LARS moves a weight
  matrix by lr_t * trust * |w| per unit of momentum buffer, whatever the gradient's size, so
  over the run the head moves about (e^R - 1) x its initial norm at most."""
  steps = np.arange(total_steps)
  lrs = np.asarray(jax.device_get(schedule(steps)), np.float64)  # [T]
  return float(trust * np.sum(lrs * (1.0 - momentum ** (steps + 1.0)) / (1.0 - momentum)))


def probe_lr_warning(config, schedule, total_steps: int, peak: float) -> str:
  """'' unless the LARS probe's head can move less than its own initial norm over the run
  (e^R - 1 < 1, lars_reach): it then stays near its random init, and the accuracy measures
  that init rather than the features. MAE's linear-scaling rule shrinks its peak lr 6.4 to
  0.1 x batch / 256 at a small batch, which does this on small datasets."""
  if config.optim.optimizer != "lars":
    return ""
  reach = lars_reach(schedule, total_steps, config.optim.get("momentum", 0.9))
  if reach >= math.log(2.0):  # e^R - 1 >= 1 (and no overflow for a long run's large R)
    return ""
  keep_base = MAE_PROBE_PEAK_LR * 256 / config.batch_size  # base lr giving MAE's peak
  advice = ["set more config.train.total_steps" if config.train.total_steps else
            "raise config.optim.epochs"]
  if config.optim.base_lr < keep_base:
    advice.insert(0, f"raise config.optim.base_lr (--config.optim.base_lr={keep_base:g} gives "
                     f"MAE's peak lr {MAE_PROBE_PEAK_LR:g} at batch {config.batch_size})")
  return (f"the LARS probe can move its head by at most {100 * math.expm1(reach):.3g}% of "
          f"its initial norm in {total_steps} steps at peak lr {peak:.3g}; it stays near its "
          f"random init, so its accuracy says little about the features: {' or '.join(advice)}")
