"""The step's static task: what a config masks, throws and reconstructs."""

import dataclasses

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


# --- The step: loss, gradients, update -----------------------------------------------------

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from pr_mim_jax.data import pixels  # noqa: E402
from pr_mim_jax.method import masking  # noqa: E402
from pr_mim_jax.models import mae  # noqa: E402
from pr_mim_jax.models import vit  # noqa: E402
from pr_mim_jax.training.train_state import TrainState  # noqa: E402


def test_task_and_model_from_config_carry_every_field():
  config = load_config("dataset=shapes,method=pr_mim")
  config.masking.throw_strategy = "furthest"
  config.loss.target = "hog"
  config.loss.thrown_loss_weight = 0.3
  config.reconstruction.num_stages = 2
  config.reconstruction.window = 5
  config.reconstruction.key_width = 32
  config.reconstruction.heads = 2
  config.reconstruction.aggregator = "interpolate"
  config.train.grad_accum_steps = 2
  task = train_step.task_from_config(config)
  patch = vit.parse_variant(config.model.variant).patch
  grid = config.model.image_size // patch
  assert (task.grid, task.patch) == (grid, patch)
  assert task.split == masking.token_split(grid * grid, config.masking.mask_ratio,
                                           config.masking.throw_ratio)
  assert task.split.n_throw > 0
  assert (task.throw_strategy, task.target, task.num_stages) == ("furthest", "hog", 2)
  assert task.reconstruct_thrown and task.thrown_loss_weight == 0.3
  assert task.grad_accum_steps == 2
  model = train_step.model_from_config(config)
  assert model.pred_dim == 108  # the head is sized for the HOG target
  assert (model.thrown_reconstruction, model.aggregator) == ("progressive", "interpolate")
  assert (model.num_stages, model.window, model.key_width, model.aggregator_heads) == (2, 5, 32, 2)


def _tiny(target="pixel"):
  model = mae.MaskedAutoencoder(vit.VitSpec(16, 1, 2, 4), 16, decoder_width=8, decoder_depth=1,
                                decoder_heads=2)
  task = train_step.Task(split=masking.token_split(16, 0.75, 0.25), grid=4, patch=4, target=target)
  masks = train_step.step_masks(jax.random.key_data(jax.random.key(1)), 4, 2, task)
  pix = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                          masks.ids_vis[:1], masks.ids_dec[:1])["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32),
                        __import__("flax").linen.unbox(shapes))
  return model, task, masks, pix, params


@pytest.mark.parametrize("target", ["pixel", "norm_pixel"])
def test_uint8_pixels_score_like_normalised_floats(target):
  # uint8 batches are normalised on the device; the targets must come from the normalised
  # image too (as MAE's loss, computed on the normalised input), not from raw 0..255 pixels.
  model, task, masks, pix, params = _tiny(target)
  fn = jax.jit(lambda x: train_step.loss_fn(params, model, x, masks, task)[0])
  from_uint8 = float(fn(jnp.asarray(pix)))
  from_float = float(fn(jnp.asarray(pixels.normalize(pix))))
  np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5)


@pytest.mark.slow
def test_train_step_uses_the_schedule_at_the_current_step():
  # Plain SGD: new params = params - lr(step) * grads, with lr(step) = 0.1 * (step + 1); a large
  # step, so the new params' norm differs measurably from the old one's.
  model, task, _, pix, params = _tiny()
  schedule = lambda s: 0.1 * (s + 1.0)  # noqa: E731
  tx = optax.sgd(schedule)
  state = TrainState(step=jnp.asarray(4, jnp.int32), params=params,
                     opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(jax.random.key(1)))
  state = state.replace(opt_state=jax.tree.map(
      lambda x: jnp.asarray(4, x.dtype) if getattr(x, "ndim", 1) == 0 else x, state.opt_state))
  new, metrics = jax.jit(lambda s, b: train_step.train_step(
      s, b, model=model, tx=tx, task=task, schedule=schedule))(state, {"image": jnp.asarray(pix)})
  masks = train_step.step_masks(state.rng, 4, 2, task)
  loss, _, grads = jax.jit(lambda p: train_step.loss_and_grads(
      p, jnp.asarray(pix), masks, model=model, task=task))(params)
  assert float(metrics["lr"]) == pytest.approx(0.5)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
  flat_g = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(flat_g), rtol=1e-5)
  for p0, g, p1 in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new.params)):
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p0) - 0.5 * np.asarray(g),
                               rtol=1e-5, atol=1e-7)
  flat_p = np.concatenate([np.ravel(p) for p in jax.tree.leaves(new.params)])
  old_norm = np.linalg.norm(np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)]))
  assert abs(np.linalg.norm(flat_p) - old_norm) > 1e-4 * old_norm  # not vacuous at rtol 1e-5
  np.testing.assert_allclose(float(metrics["param_norm"]), np.linalg.norm(flat_p), rtol=1e-5)
  assert int(new.step) == 5
  # The optimizer state moves on too: the schedule's step count (held in it) is now 5.
  counts = [int(x) for x in jax.tree.leaves(new.opt_state) if getattr(x, "ndim", 1) == 0]
  assert counts and all(c == 5 for c in counts), counts


def test_each_step_draws_its_own_masks_from_the_state_rng():
  """A pure function of (rng, step): the same step redraws the same masks, the next differs."""
  task = train_step.Task(split=masking.token_split(16, 0.75, 0.25), grid=4, patch=4)
  rng = jax.random.key_data(jax.random.key(5))
  ids = lambda step: np.asarray(train_step.step_masks(rng, step, 2, task).ids_vis)  # noqa: E731
  np.testing.assert_array_equal(ids(3), ids(3))
  assert not np.array_equal(ids(3), ids(4))


def test_micro_batch_j_holds_every_kth_example():
  # Strided, so each device's contiguous shard of the batch splits locally.
  x = np.arange(12).reshape(6, 2)
  out = np.asarray(train_step.micro_batches({"x": jnp.asarray(x)}, 3)["x"])
  assert out.shape == (3, 2, 2)
  for j in range(3):
    np.testing.assert_array_equal(out[j], x[j::3])


@pytest.mark.slow
def test_accumulated_loss_and_grads_are_the_mean_over_micro_batches():
  """k=2 micro-batches: the mean of the two halves' losses and grads, each half scored on its
  own (no scan, no micro_batches), which also equals the whole batch's."""
  model, task, _, _, params = _tiny()
  pix = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(4, 16, 16, 3)), jnp.uint8)
  masks = train_step.step_masks(jax.random.key_data(jax.random.key(3)), 0, 4, task)
  grad = jax.jit(jax.value_and_grad(
      lambda p, x, m: train_step.loss_fn(p, model, x, m, task)[0]))
  halves = [grad(params, pix[j::2], jax.tree.map(lambda a, j=j: a[j::2], masks)) for j in (0, 1)]
  whole_loss, whole_grads = grad(params, pix, masks)
  loss, parts, grads = jax.jit(lambda p: train_step.loss_and_grads(
      p, pix, masks, model=model, task=dataclasses.replace(task, grad_accum_steps=2)))(params)
  expected = 0.5 * (float(halves[0][0]) + float(halves[1][0]))
  assert abs(float(halves[0][0]) - float(halves[1][0])) > 1e-3 * expected  # not vacuous
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(whole_loss), rtol=1e-5)
  np.testing.assert_allclose(float(parts["loss_decoded"]), expected, rtol=1e-5)
  for g, g0, g1, gw in zip(*(jax.tree.leaves(t) for t in
                             (grads, halves[0][1], halves[1][1], whole_grads))):
    np.testing.assert_allclose(np.asarray(g), 0.5 * (np.asarray(g0) + np.asarray(g1)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(gw), rtol=1e-4, atol=1e-6)


def _fake_setup_run(monkeypatch, seen):
  """pretrain.train up to the loop: records the schedule and what trainer.run is given."""
  monkeypatch.setattr(pretrain, "jit_train_step", lambda model, tx, task, schedule, *args:
                      seen.update(schedule=schedule))

  def run(state, step_fn, batches, *, start_step, total_steps, peak_lr, **kwargs):
    seen.update(total_steps=total_steps, peak_lr=peak_lr)
    return state, {"step": start_step, "stopped": True, "loss": 1.0}
  monkeypatch.setattr(pretrain.trainer, "run", run)
  monkeypatch.setattr(pretrain.pipeline, "train_batches", lambda *args, **kwargs: iter(()))


@pytest.mark.slow
@pytest.mark.parametrize("total_steps,steps,warmup", [(0, 32, 4), (24, 24, 3)])
def test_the_run_takes_its_steps_and_peak_lr_from_epochs_and_batch(
    tiny_config, tmp_path, monkeypatch, caplog, total_steps, steps, warmup):
  """256 examples in batches of 16: 16 steps an epoch, 2 epochs of which 0.25 warm up (a
  train.total_steps override keeps that share); peak lr = base_lr 1e-2 * 16 / 256."""
  seen = {}
  _fake_setup_run(monkeypatch, seen)
  tiny_config.knn.enabled = False
  tiny_config.train.total_steps = total_steps
  with caplog.at_level("INFO"):
    pretrain.train(tiny_config, str(tmp_path / "run"))
  peak = 1e-2 * 16 / 256
  assert seen["total_steps"] == steps and seen["peak_lr"] == pytest.approx(peak)
  lr = lambda step: float(seen["schedule"](step))  # noqa: E731
  assert lr(0) == 0.0
  assert lr(warmup) == pytest.approx(peak)
  assert lr(warmup + (steps - warmup) / 2) == pytest.approx(peak / 2, rel=1e-5)
  assert lr(steps) == pytest.approx(0.0, abs=1e-9)
  assert any(f"{steps} steps ({warmup} warmup), peak lr 0.000625" in r.getMessage()
             for r in caplog.records)
