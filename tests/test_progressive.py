"""Tests for progressive reconstruction of thrown tokens and the decoder paths around it."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from pr_mim_jax import patch_tokens
from pr_mim_jax.method import masking
from pr_mim_jax.method import targets
from pr_mim_jax.models import mae
from pr_mim_jax.models import progressive
from pr_mim_jax.models import vit
from pr_mim_jax.training import train_step as ts

IMAGE, PATCH, GRID = 16, 4, 4  # 16 patches
SPLIT = masking.token_split(16, 0.75, 0.5)  # 4 visible, 4 decoded, 8 thrown


def _np_params(module, *args, seed=0, scale=0.3):
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def tiny_model(decoder="self_attention", aggregator="local_attention", num_stages=1, **kw):
  return mae.MaskedAutoencoder(
      vit.VitSpec(16, 1, 2, PATCH), IMAGE, decoder_width=8, decoder_depth=2, decoder_heads=2,
      decoder=decoder, thrown_reconstruction="progressive", aggregator=aggregator,
      num_stages=num_stages, key_width=4, aggregator_heads=2, **kw)


def _inputs(seed=0, batch=2, split=SPLIT, strategy="random"):
  images = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, IMAGE, IMAGE, 3)), jnp.float32)
  masks = masking.make_masks(jax.random.key(seed), batch, split, strategy, GRID)
  return images, masks


# ----------------------------------------------------------------------------------------
# The neighbourhood table.

def test_neighbourhood_hand_case():
  index, on_grid = progressive.neighbourhood(3, 3)
  assert index.shape == (9, 9) and on_grid.shape == (9, 9)
  np.testing.assert_array_equal(index[4], np.arange(9))  # the centre sees the whole grid
  assert on_grid[4].all()
  # Corner 0: only offsets (0,0) (0,+1) (+1,0) (+1,+1) are on the grid: patches 0, 1, 3, 4.
  np.testing.assert_array_equal(np.flatnonzero(on_grid[0]), [4, 5, 7, 8])
  np.testing.assert_array_equal(index[0][on_grid[0]], [0, 1, 3, 4])
  # Bottom-right corner 8: offsets (-1,-1) (-1,0) (0,-1) (0,0): patches 4, 5, 7, 8.
  np.testing.assert_array_equal(index[8][on_grid[8]], [4, 5, 7, 8])
  index1, on1 = progressive.neighbourhood(3, 1)
  np.testing.assert_array_equal(index1[:, 0], np.arange(9))
  assert on1.all()


def test_neighbourhood_matches_brute_force():
  grid, window = 5, 5
  index, on_grid = progressive.neighbourhood(grid, window)
  for t in range(grid * grid):
    r, c = divmod(t, grid)
    expected = {rr * grid + cc for rr in range(r - 2, r + 3) for cc in range(c - 2, c + 3)
                if 0 <= rr < grid and 0 <= cc < grid}
    assert set(index[t][on_grid[t]]) == expected


# ----------------------------------------------------------------------------------------
# One aggregation stage against a NumPy re-implementation.

def _np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_aggregate(p, canvas, known, glob, queries, ids, grid, window, kind, heads):
  """Loops over examples, thrown tokens, heads and box positions."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, n = ids.shape
  d = canvas.shape[-1]
  r0 = window // 2
  out = np.zeros((b, n, d))
  for bi in range(b):
    for i in range(n):
      row, col = divmod(int(ids[bi, i]), grid)
      feats, valid = [], []
      for dr in range(window):
        for dc in range(window):
          rr, cc = row + dr - r0, col + dc - r0
          on = 0 <= rr < grid and 0 <= cc < grid
          feats.append(canvas[bi, rr * grid + cc] if on else np.zeros(d))
          valid.append(on and bool(known[bi, rr * grid + cc]))
      feats.append(glob[bi])
      valid.append(True)
      feats, valid = np.stack(feats), np.array(valid)
      if kind == "interpolate":
        w = _np_softmax(np.where(valid, p["offset_logit"], -np.inf))
        out[bi, i] = w @ feats
        continue
      kw = p["query"]["kernel"].shape[1]
      hd, vd = kw // heads, d // heads
      q = queries[bi, i] @ p["query"]["kernel"] + p["query"]["bias"]
      k = feats @ p["key"]["kernel"] + p["key"]["bias"] + p["offset_key"]
      mixed = np.zeros(d)
      for h in range(heads):
        logits = k[:, h * hd:(h + 1) * hd] @ q[h * hd:(h + 1) * hd] / np.sqrt(hd)
        w = _np_softmax(np.where(valid, logits, -np.inf))
        mixed[h * vd:(h + 1) * vd] = w @ feats[:, h * vd:(h + 1) * vd]
      hidden = (mixed + queries[bi, i]) @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
      hidden = 0.5 * hidden * (1 + special.erf(hidden / np.sqrt(2)))
      out[bi, i] = mixed + hidden @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("kind,window", [("interpolate", 3), ("local_attention", 3),
                                         ("local_attention", 5)])
def test_aggregator_matches_numpy(kind, window):
  grid, d, b, n = 5, 8, 2, 6
  rng = np.random.default_rng(1)
  canvas = rng.normal(size=(b, grid * grid, d)).astype(np.float32)
  known = rng.random((b, grid * grid)) < 0.4
  glob = rng.normal(size=(b, d)).astype(np.float32)
  queries = rng.normal(size=(b, n, d)).astype(np.float32)
  ids = np.stack([rng.permutation(grid * grid)[:n] for _ in range(b)]).astype(np.int32)
  module = progressive.LocalAggregator(grid, window, kind, key_width=4, heads=2)
  args = tuple(jnp.asarray(a) for a in (canvas, known, glob, queries, ids))
  params = _np_params(module, *args, seed=2)
  out = jax.jit(lambda p: module.apply({"params": p}, *args))(params)
  ref = np_aggregate(params, canvas, known, glob, queries, ids, grid, window, kind, 2)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


def test_empty_box_falls_back_to_the_global_feature():
  grid, d = 4, 8
  rng = np.random.default_rng(3)
  canvas = jnp.asarray(rng.normal(size=(1, 16, d)), jnp.float32)
  glob = jnp.asarray(rng.normal(size=(1, d)), jnp.float32)
  known = jnp.zeros((1, 16), bool)  # nothing reconstructed yet anywhere
  ids = jnp.asarray([[0, 5, 15]], jnp.int32)
  queries = jnp.zeros((1, 3, d))
  module = progressive.LocalAggregator(grid, 3, "interpolate")
  params = _np_params(module, canvas, known, glob, queries, ids)
  out = module.apply({"params": params}, canvas, known, glob, queries, ids)
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(glob[:, None], (1, 3, d)), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# The decoder path: decoded predictions never depend on thrown tokens.

AGGREGATOR_DECODERS = [(a, d) for a in progressive.AGGREGATORS for d in mae.DECODERS]


@pytest.mark.slow
@pytest.mark.parametrize("aggregator,decoder", AGGREGATOR_DECODERS)
def test_decoded_predictions_ignore_thrown_queries(aggregator, decoder):
  model = tiny_model(decoder, aggregator)
  images, m = _inputs()
  params = _np_params(model, images, m.ids_vis, m.ids_dec, m.ids_throw)
  queries = jax.random.normal(jax.random.key(4), (2, SPLIT.n_throw, 8))  # [B, n_throw, D]

  def preds(q):
    return model.apply({"params": params}, images, m.ids_vis, m.ids_dec, m.ids_throw, q)

  g_dec = jax.jit(jax.grad(lambda q: jnp.sum(preds(q).dec ** 2)))(queries)
  g_throw = jax.jit(jax.grad(lambda q: jnp.sum(preds(q).throw ** 2)))(queries)
  assert g_dec.shape == (2, SPLIT.n_throw, 8)
  np.testing.assert_array_equal(np.asarray(g_dec), 0.0)
  # ... while the thrown predictions use them, every one of them (interpolate's weights
  # come from the box offsets alone, so its queries carry nothing by design).
  used = np.abs(np.asarray(g_throw)).sum(-1) > 0
  assert used.all() if aggregator != "interpolate" else not used.any()


@pytest.mark.slow
@pytest.mark.parametrize("aggregator,decoder", AGGREGATOR_DECODERS)
def test_thrown_tokens_receive_gradient(aggregator, decoder):
  model = tiny_model(decoder, aggregator)
  images, m = _inputs(seed=1)
  params = _np_params(model, images, m.ids_vis, m.ids_dec, m.ids_throw)
  task = ts.Task(SPLIT, GRID, PATCH, reconstruct_thrown=True, target="pixel")

  def thrown_loss(p):
    return ts.loss_fn(p, model, images, m, task)[1][1]["loss_thrown"]

  grads = jax.jit(jax.grad(thrown_loss))(params)
  norm = lambda t: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t)))  # noqa: E731
  assert norm(grads["encoder"]) > 0  # thrown tokens train the encoder...
  assert norm(grads["decoder_pred"]) > 0  # ... and the shared head
  assert norm(grads["mask_token"]) > 0
  if aggregator != "last_block":
    assert norm(grads["thrown"]) > 0


@pytest.mark.slow
def test_later_stages_see_earlier_stages_only():
  model = tiny_model(aggregator="local_attention", num_stages=2)
  images, m = _inputs(seed=2, strategy="furthest")
  params = _np_params(model, images, m.ids_vis, m.ids_dec, m.ids_throw)
  first, _ = progressive.stage_sizes(SPLIT.n_throw, 2)
  queries = jax.random.normal(jax.random.key(5), (2, SPLIT.n_throw, 8))

  def throw_preds(q):
    return model.apply({"params": params}, images, m.ids_vis, m.ids_dec, m.ids_throw, q).throw

  jac = jax.jit(jax.jacobian(lambda q: jnp.sum(throw_preds(q), -1)))(queries)  # [B, n, B, n, D]
  dep = np.abs(np.asarray(jac)).sum(-1)[np.arange(2), :, np.arange(2), :] > 0  # [B, out, in]
  ids = np.asarray(m.ids_throw)
  for b in range(2):
    for j in range(SPLIT.n_throw):
      for i in range(SPLIT.n_throw):
        (rj, cj), (ri, ci) = divmod(int(ids[b, j]), GRID), divmod(int(ids[b, i]), GRID)
        in_box = max(abs(rj - ri), abs(cj - ci)) <= 1
        # A token depends on its own query, and on an earlier stage's token in its box.
        expected = i == j or (j >= first and i < first and in_box)
        assert dep[b, j, i] == expected, (b, j, i)


# ----------------------------------------------------------------------------------------
# The loss: sum(w * l) / sum(w) over decoded (w = 1) and thrown (w = thrown_loss_weight).

@pytest.mark.slow
@pytest.mark.parametrize("weight", [1.0, 2.5, 0.0])
def test_loss_hand_reference(weight):
  model = tiny_model(aggregator="interpolate")
  images, m = _inputs(seed=3)
  params = _np_params(model, images, m.ids_vis, m.ids_dec, m.ids_throw)
  # A head that predicts the constant c for every patch makes the loss a closed form.
  c = np.linspace(-1, 1, PATCH * PATCH * 3).astype(np.float32)
  params = dict(params, decoder_pred={"kernel": jnp.zeros_like(params["decoder_pred"]["kernel"]),
                                      "bias": jnp.asarray(c)})
  task = ts.Task(SPLIT, GRID, PATCH, target="pixel", reconstruct_thrown=True,
                 thrown_loss_weight=weight)
  loss, (_, parts) = jax.jit(lambda p: ts.loss_fn(p, model, images, m, task))(params)

  x = np.asarray(images, np.float64)
  total, weights = 0.0, 0.0
  for b in range(2):
    for ids, w in ((np.asarray(m.ids_dec[b]), 1.0), (np.asarray(m.ids_throw[b]), weight)):
      for t in ids:
        r, col = divmod(int(t), GRID)
        patch = x[b, r * PATCH:(r + 1) * PATCH, col * PATCH:(col + 1) * PATCH].reshape(-1)
        total += w * np.mean((c - patch) ** 2)
        weights += w
  np.testing.assert_allclose(float(loss), total / weights, rtol=1e-5)
  assert set(parts) == {"loss_decoded", "loss_thrown"}


@pytest.mark.slow
def test_partial_loss_ignores_thrown_tokens():
  model = mae.MaskedAutoencoder(vit.VitSpec(16, 1, 2, PATCH), IMAGE, decoder_width=8,
                                decoder_depth=1, decoder_heads=2)
  images, m = _inputs(seed=4)
  params = _np_params(model, images, m.ids_vis, m.ids_dec)
  task = ts.Task(SPLIT, GRID, PATCH, target="pixel")
  loss_fn = jax.jit(lambda x: ts.loss_fn(params, model, x, m, task))
  loss, (preds, parts) = loss_fn(images)
  assert preds.throw is None and set(parts) == {"loss_decoded"}
  # The encoder never sees thrown patches and the loss never scores them, so changing
  # their pixels leaves the loss exactly unchanged.
  patches = patch_tokens.patchify(images, PATCH)
  rows = jnp.arange(2)[:, None]
  noisy = patch_tokens.unpatchify(patches.at[rows, m.ids_throw].add(5.0), PATCH)
  loss2, _ = loss_fn(noisy)
  np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# CrossMAE's decoder: decoded queries attend to encoder features only.

@pytest.mark.slow
@pytest.mark.parametrize("decoder,independent", [("cross_attention", True),
                                                 ("self_attention", False)])
def test_cross_attention_queries_do_not_see_each_other(decoder, independent):
  model = mae.MaskedAutoencoder(vit.VitSpec(16, 1, 2, PATCH), IMAGE, decoder_width=8,
                                decoder_depth=2, decoder_heads=2, decoder=decoder)
  images, m = _inputs(seed=5)
  params = _np_params(model, images, m.ids_vis, m.ids_dec)
  fwd = jax.jit(lambda d: model.apply({"params": params}, images, m.ids_vis, d).dec)
  base = np.asarray(fwd(m.ids_dec))
  moved = m.ids_dec.at[:, 0].set(m.ids_throw[:, 0])  # move one query to another masked patch
  out = np.asarray(fwd(moved))
  assert not np.allclose(out[:, 0], base[:, 0])
  assert np.allclose(out[:, 1:], base[:, 1:], atol=1e-6) == independent


@pytest.mark.slow
def test_cross_attention_block_matches_numpy():
  block = vit.Block(heads=2)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  p = _np_params(block, x, ctx)
  out = np.asarray(block.apply({"params": p}, x, ctx))
  pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

  def ln(v, q):
    mu = v.mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * q["scale"] + q["bias"]

  xq, xc = ln(np.asarray(x, np.float64), pn["norm1"]), ln(np.asarray(ctx, np.float64), pn["norm1"])
  k3 = pn["attn"]["qkv"]["kernel"]  # [D, 3, H, hd]
  b3 = pn["attn"]["qkv"]["bias"]
  q = np.einsum("bnd,dhk->bhnk", xq, k3[:, 0]) + b3[0][None, :, None]
  k = np.einsum("bnd,dhk->bhnk", xc, k3[:, 1]) + b3[1][None, :, None]
  v = np.einsum("bnd,dhk->bhnk", xc, k3[:, 2]) + b3[2][None, :, None]
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(4)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  o = np.einsum("bhnk,hkd->bnd", attn @ v, pn["attn"]["proj"]["kernel"]) + pn["attn"]["proj"]["bias"]
  y = np.asarray(x, np.float64) + o
  h = ln(y, pn["norm2"]) @ pn["mlp"]["fc1"]["kernel"] + pn["mlp"]["fc1"]["bias"]
  h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
  ref = y + h @ pn["mlp"]["fc2"]["kernel"] + pn["mlp"]["fc2"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Every method x target x decoder trains.

@functools.lru_cache(maxsize=None)
def _trained_losses(method, target, decoder):
  from conftest import TINY_OVERRIDES, apply_overrides, load_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import optim, pretrain  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training.train_state import TrainState  # pylint: disable=g-import-not-at-top
  c = apply_overrides(load_config(f"method={method},dataset=shapes"), TINY_OVERRIDES)
  c.model.decoder_depth = 1
  c.model.decoder = decoder
  c.loss.target = target
  model, task = ts.model_from_config(c), ts.task_from_config(c)
  params = pretrain.init_params(model, task.split, jax.random.key(0))
  tx = optim.make_optimizer(c.optim, lambda s: 3e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                     rng=jax.random.key_data(jax.random.key(1)))
  step = jax.jit(functools.partial(ts.train_step, model=model, tx=tx, task=task,
                                   schedule=lambda s: 3e-3))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
  losses = []
  for _ in range(12):
    state, metrics = step(state, {"image": images})
    losses.append(float(metrics["loss"]))
  return losses, set(metrics)


# Every pair of (method, target, decoder) values occurs in some row: 9 compiles instead of the
# 18 of the full product, which cost about 10 CPU-minutes of CI. Checked below.
PAIRWISE = [("mae", "pixel", "self_attention"), ("mae", "norm_pixel", "cross_attention"),
            ("mae", "hog", "self_attention"), ("partial", "pixel", "cross_attention"),
            ("partial", "norm_pixel", "self_attention"), ("partial", "hog", "cross_attention"),
            ("pr_mim", "pixel", "self_attention"), ("pr_mim", "norm_pixel", "cross_attention"),
            ("pr_mim", "hog", "cross_attention")]


def test_pairwise_rows_cover_every_pair():
  values = (("mae", "partial", "pr_mim"), targets.TARGETS, mae.DECODERS)
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert {(r[i], r[j]) for r in PAIRWISE} == {(a, b) for a in values[i] for b in values[j]}


@pytest.mark.slow
@pytest.mark.parametrize("method,target,decoder", PAIRWISE)
def test_every_pair_of_settings_trains(method, target, decoder):
  losses, names = _trained_losses(method, target, decoder)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert ("loss_thrown" in names) == (method == "pr_mim")


def test_fresh_aggregators_start_as_plain_averages():
  """At init an `interpolate` stage is the unweighted mean of the known box neighbours and the
  global feature (zero offset logits), and a `local_attention` stage adds nothing to its
  attention average (zero-initialized residual MLP): with an empty box it returns glob."""
  grid, d = 4, 8
  rng = np.random.default_rng(4)
  canvas = rng.normal(size=(1, 16, d)).astype(np.float32)
  glob = rng.normal(size=(1, d)).astype(np.float32)
  known = rng.random((1, 16)) < 0.5
  ids = np.asarray([[0, 5, 10, 15]], np.int32)
  queries = rng.normal(size=(1, 4, d)).astype(np.float32)
  args = tuple(jnp.asarray(a) for a in (canvas, known, glob, queries, ids))
  interp = progressive.LocalAggregator(grid, 3, "interpolate")
  out = interp.apply(interp.init(jax.random.key(0), *args), *args)
  ref = []
  for i in ids[0]:
    r, c = divmod(int(i), grid)
    box = [rr * grid + cc for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
           if 0 <= rr < grid and 0 <= cc < grid and known[0, rr * grid + cc]]
    ref.append(np.concatenate([canvas[0, box], glob], axis=0).mean(0))
  np.testing.assert_allclose(np.asarray(out)[0], np.stack(ref), rtol=1e-5, atol=1e-6)

  empty = (args[0], jnp.zeros((1, 16), bool)) + args[2:]
  attn = progressive.LocalAggregator(grid, 3, "local_attention", key_width=4, heads=2)
  out = attn.apply(attn.init(jax.random.key(0), *empty), *empty)
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(glob[:, None], (1, 4, d)),
                             rtol=1e-6, atol=1e-6)


def test_bf16_aggregator_weights_sum_to_one():
  """Under bf16 compute the aggregation softmax still runs in float32: on a constant canvas
  (glob included) every output is that constant, exactly (a bf16 softmax is off by a bf16
  step on some tokens)."""
  grid, d, n = 8, 8, 64
  rng = np.random.default_rng(5)
  canvas = jnp.ones((2, grid * grid, d), jnp.bfloat16)
  glob = jnp.ones((2, d), jnp.bfloat16)
  known = jnp.asarray(rng.random((2, grid * grid)) < 0.7)
  ids = jnp.asarray(np.stack([rng.permutation(grid * grid)[:n] for _ in range(2)]), jnp.int32)
  queries = jnp.asarray(3 * rng.normal(size=(2, n, d)), jnp.bfloat16)
  module = progressive.LocalAggregator(grid, 5, "local_attention", key_width=8, heads=2,
                                       dtype=jnp.bfloat16)
  args = (canvas, known, glob, queries, ids)
  params = _np_params(module, *args, seed=5, scale=3.0)
  params["mlp_out"] = jax.tree.map(jnp.zeros_like, params["mlp_out"])  # only the average
  out = jax.jit(module.apply)({"params": params}, *args)  # [2, n, d]
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), 1.0)


@pytest.mark.parametrize("aggregator", ["local_attention", "last_block"])
def test_bf16_compute_gives_float32_thrown_predictions(aggregator):
  # The loss reads both prediction sets in float32, the thrown ones included.
  model = tiny_model(aggregator=aggregator, dtype=jnp.bfloat16)
  images, masks = _inputs(seed=8)
  args = (images, masks.ids_vis, masks.ids_dec, masks.ids_throw)
  params = _np_params(model, *args, seed=8)
  preds = jax.jit(lambda p: model.apply({"params": p}, *args))(params)
  assert preds.dec.dtype == jnp.float32 and preds.throw.dtype == jnp.float32
  assert preds.throw.shape == (2, SPLIT.n_throw, PATCH * PATCH * 3)
