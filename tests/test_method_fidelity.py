"""What each method's assembled step scores, from the config to the loss, against NumPy.

A prediction head with a zero kernel and bias c predicts c for every token, so the loss is a
closed form of the targets: sum(w * mse(c, target)) / sum(w) over the scored tokens. The
scored set and weights are what tells `mae`, `partial` and `pr_mim` apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as ts

GRID, PATCH = 4, 4  # TINY_OVERRIDES: 16 px images, Ti/4


def _np_norm_pixel(images):
  """[B, H, W, 3] -> [B, L, p*p*3]: row-major patches, pixels (row, col, channel), each patch
  normalised by its mean and unbiased std with eps 1e-6 inside the root (MAE)."""
  b = images.shape[0]
  out = np.zeros((b, GRID * GRID, PATCH * PATCH * 3))
  for n in range(b):
    for t in range(GRID * GRID):
      r, c = divmod(t, GRID)
      v = images[n, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].astype(np.float64)
      v = v.reshape(-1)
      var = ((v - v.mean()) ** 2).sum() / (v.size - 1)
      out[n, t] = (v - v.mean()) / np.sqrt(var + 1e-6)
  return out


def _furthest_first(ids_vis, ids_dec):
  """True when every decoded patch is a furthest remaining masked patch (Euclidean) from the
  visible and earlier decoded ones, i.e. the decoded set came from furthest sampling."""
  rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
  kept = list(ids_vis)
  for p in ids_dec:
    rest = [t for t in range(GRID * GRID) if t not in kept]
    d = {t: min((rows[t] - rows[k]) ** 2 + (cols[t] - cols[k]) ** 2 for k in kept) for t in rest}
    if d[p] != max(d.values()):
      return False
    kept.append(p)
  return True


@pytest.mark.parametrize("method,weight,every", [
    ("mae", 1.0, False), ("partial", 1.0, False), ("pr_mim", 0.25, False),
    # The study's metric: every masked token once, weight 1, whatever the training weight.
    pytest.param("partial", 1.0, True, marks=pytest.mark.slow),
    pytest.param("pr_mim", 0.25, True, marks=pytest.mark.slow)])
def test_each_method_scores_its_tokens(method, weight, every):
  config = apply_overrides(load_config(f"method={method},dataset=shapes"), TINY_OVERRIDES)
  config.loss.thrown_loss_weight = weight
  assert config.loss.target == "norm_pixel"
  model, task = ts.model_from_config(config), ts.task_from_config(config)
  batch = 3
  masks = ts.step_masks(jax.random.key_data(jax.random.key(2)), 5, batch, task)
  params = jax.eval_shape(lambda r: pretrain.init_params(model, task.split, r), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), params)
  c = np.linspace(-1.5, 1.5, PATCH * PATCH * 3)
  params["decoder_pred"] = {"kernel": jnp.zeros_like(params["decoder_pred"]["kernel"]),
                            "bias": jnp.asarray(c, jnp.float32)}
  images = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
  loss, (preds, _) = jax.jit(lambda p: ts.loss_fn(p, model, jnp.asarray(images), masks, task,
                                                  every_masked_token=every))(params)

  vis, dec = np.asarray(masks.ids_vis), np.asarray(masks.ids_dec)
  assert vis.shape[1] == 4  # int(16 * 0.25) visible
  mse = ((c - _np_norm_pixel(images)) ** 2).mean(axis=-1)  # [B, L] per-patch loss
  total = weights = 0.0
  for b in range(batch):
    masked = sorted(set(range(16)) - set(vis[b]))
    if method == "mae":  # decodes and scores every masked patch
      assert sorted(dec[b]) == masked
      scored = {t: 1.0 for t in masked}
    elif method == "partial":  # 4 decoded (25% of 16) scored; the 8 thrown never, unless every
      assert len(dec[b]) == 4 and set(dec[b]) < set(masked)
      scored = {t: 1.0 for t in (masked if every else dec[b])}
    else:  # pr_mim: every masked patch, the 8 thrown ones with the thrown weight
      assert len(dec[b]) == 4 and _furthest_first(vis[b], dec[b])
      scored = {t: 1.0 if t in set(dec[b]) or every else weight for t in masked}
    total += sum(w * mse[b, t] for t, w in scored.items())
    weights += sum(scored.values())
  np.testing.assert_allclose(float(loss), total / weights, rtol=1e-5)
  assert (preds.throw is not None) == (method == "pr_mim")
