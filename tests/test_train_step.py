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


# --- Mutation-audit additions ----------------------------------------------------------------

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
                     opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(1)))
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
