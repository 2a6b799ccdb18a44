"""The step's static task: what a config masks, throws and reconstructs."""

import jax
import numpy as np
import pytest

from conftest import load_config
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step


@pytest.mark.parametrize("strategy", ["furthest", "random"])
def test_partial_ignores_num_stages_it_does_not_use(strategy):
  # Partial reconstruction never reconstructs thrown tokens, so reconstruction.num_stages
  # (kept, e.g., from a PR-MIM study setting) used to pass validation and then raise at the
  # first step when it exceeded the thrown-token count.
  config = load_config("dataset=shapes,method=partial")
  config.masking.throw_strategy = strategy
  config.reconstruction.num_stages = 1000  # far above the 98 thrown tokens of B/16 at 224
  config.knn.enabled = False
  pretrain.check_config(config)
  task = train_step.task_from_config(config)
  masks = train_step.step_masks(jax.random.key(0), 3, 2, task)
  config.reconstruction.num_stages = 1
  expected = train_step.step_masks(jax.random.key(0), 3, 2, train_step.task_from_config(config))
  for x, y in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
