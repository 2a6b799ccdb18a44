"""Memory knobs (model.remat, model.scan_layers, train.grad_accum_steps) leave the update unchanged.

Tiny float32 model (conftest.TINY_OVERRIDES), PR-MIM unless stated, no warmup so step 0
moves the params. Tolerances: remat and scan rtol 1e-5 (same math, other fusion);
gradient accumulation rtol 1e-4 (sums in another order). Params after Adam steps are
compared with atol 1e-5 (the lr is 6.25e-4, so that is well under one step's move), except
where the first step's gradient is below 1e-6: the attention key bias has an exactly-zero
gradient (softmax ignores it), and Adam turns float noise there into a full lr step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.models import vit
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import config_validation
from pr_mim_jax.training import optim
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training.train_state import TrainState

NUM_TRAIN = 256


def _config(arg="dataset=shapes", **overrides):
  config = apply_overrides(load_config(arg), TINY_OVERRIDES)
  config.optim.warmup_epochs = 0.0
  return apply_overrides(config, overrides)


def _images(config, seed=0):
  size = config.model.image_size
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(config.batch_size, size, size, 3)).astype(np.float32))


def _run(config, params=None, steps=2):
  """Runs `steps` train steps from `params` (default: a fresh init); returns (states, losses)."""
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  total, warmup = optim.schedule_steps(config.optim, NUM_TRAIN, config.batch_size)
  schedule = optim.lr_schedule(optim.peak_lr(config.optim, config.batch_size), total, warmup)
  tx = optim.make_optimizer(config.optim, schedule)
  if params is None:
    params = pretrain.init_params(model, task.split, jax.random.key(0))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                     rng=jax.random.key_data(jax.random.key(1)))
  step_fn = jax.jit(functools.partial(train_step_lib.train_step, model=model, tx=tx, task=task,
                                      schedule=schedule))
  states, losses = [state], []
  for i in range(steps):
    state, metrics = step_fn(state, {"image": _images(config, i)})
    states.append(state)
    losses.append(float(metrics["loss"]))
  return states, losses


def _grads(config, params):
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  images = _images(config)
  masks = train_step_lib.step_masks(jax.random.key_data(jax.random.key(1)), 0, images.shape[0], task)
  fn = jax.jit(functools.partial(train_step_lib.loss_and_grads, model=model, task=task))
  return fn(params, images, masks)


def _assert_trees_close(got, want, rtol, atol=0.0):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _assert_params_close(got, want, grads, rtol):
  """Params after Adam steps; entries whose step-0 gradient is ~0 are skipped (see top)."""
  live = jax.tree.map(lambda g: np.abs(np.asarray(g)) > 1e-6, grads)
  _assert_trees_close(jax.tree.map(lambda x, m: np.asarray(x)[m], got, live),
                      jax.tree.map(lambda x, m: np.asarray(x)[m], want, live), rtol, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat,aggregator", [("full", "local_attention"),
                                               ("dots_saveable", "last_block")])
def test_remat_gives_the_same_update(remat, aggregator):
  base = _config(**{"reconstruction.aggregator": aggregator})
  knob = _config(**{"reconstruction.aggregator": aggregator, "model.remat": remat})
  params = _run(base, steps=0)[0][0].params
  loss0, _, grads0 = _grads(base, params)
  loss1, _, grads1 = _grads(knob, params)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  _assert_trees_close(grads1, grads0, rtol=1e-5, atol=1e-7)
  (states0, losses0), (states1, losses1) = _run(base, params), _run(knob, params)
  np.testing.assert_allclose(losses1, losses0, rtol=1e-5)
  _assert_params_close(states1[-1].params, states0[-1].params, grads0, rtol=1e-5)


@pytest.mark.slow
def test_remat_keeps_the_param_tree():
  params = _run(_config(), steps=0)[0][0].params
  remat = _run(_config(**{"model.remat": "full"}), steps=0)[0][0].params
  assert jax.tree.structure(remat) == jax.tree.structure(params)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["dataset=shapes"])
def test_scan_layers_gives_the_same_update(arg):
  base = _config(arg)
  knob = _config(arg, **{"model.scan_layers": True, "model.remat": "full"})
  params = _run(base, steps=0)[0][0].params
  scanned = vit.scan_params(params)
  assert "blocks" in scanned["encoder"] and "block0" not in scanned["encoder"]
  loss0, _, grads0 = _grads(base, params)
  loss1, _, grads1 = _grads(knob, scanned)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  _assert_trees_close(vit.unscan_params(grads1), grads0, rtol=1e-5, atol=1e-7)
  (states0, losses0), (states1, losses1) = _run(base, params), _run(knob, scanned)
  np.testing.assert_allclose(losses1, losses0, rtol=1e-5)
  _assert_params_close(vit.unscan_params(states1[-1].params), states0[-1].params, grads0,
                       rtol=1e-5)
  # The optimizer's params-shaped subtrees (Adam's mu, nu) convert too.
  assert (jax.tree.structure(vit.unscan_params(states1[-1].opt_state))
          == jax.tree.structure(states0[-1].opt_state))


@pytest.mark.slow
def test_scanned_init_matches_scan_params_layout():
  config = _config(**{"model.scan_layers": True})
  scanned = _run(config, steps=0)[0][0].params
  params = _run(_config(), steps=0)[0][0].params
  converted = vit.scan_params(params)
  assert jax.tree.structure(converted) == jax.tree.structure(scanned)
  assert jax.tree.map(jnp.shape, converted) == jax.tree.map(jnp.shape, scanned)
  blocks = scanned["encoder"]["blocks"]
  assert blocks["attn"]["qkv"]["kernel"].shape[0] == config.model.depth


@pytest.mark.slow
def test_scan_unscan_round_trip_is_exact():
  state = _run(_config(), steps=1)[0][-1]
  scanned = vit.scan_params(state)
  assert "blocks" in str(jax.tree.structure(scanned.opt_state))
  back = vit.unscan_params(scanned)
  _assert_trees_close(back, state, rtol=0)
  _assert_trees_close(vit.scan_params(back), scanned, rtol=0)
  # Abstract trees (shape + sharding) convert the same way.
  abstract = jax.eval_shape(lambda: state)
  assert jax.tree.map(jnp.shape, vit.scan_params(abstract)) == jax.tree.map(jnp.shape, scanned)


@pytest.mark.slow
@pytest.mark.parametrize("k,arg", [(2, "method=mae,dataset=shapes"), (4, "dataset=shapes")])
def test_grad_accumulation_gives_the_same_update(k, arg):
  base = _config(arg)
  knob = _config(arg, **{"train.grad_accum_steps": k})
  params = _run(base, steps=0)[0][0].params
  loss0, parts0, grads0 = _grads(base, params)
  loss1, parts1, grads1 = _grads(knob, params)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-4)
  _assert_trees_close(parts1, parts0, rtol=1e-4)
  _assert_trees_close(grads1, grads0, rtol=1e-4, atol=1e-7)
  (states0, losses0), (states1, losses1) = _run(base, params), _run(knob, params)
  np.testing.assert_allclose(losses1, losses0, rtol=1e-4)
  _assert_params_close(states1[-1].params, states0[-1].params, grads0, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("saved_scanned", [False, True])
def test_checkpoint_restores_across_layouts(tmp_path, saved_scanned):
  state = _run(_config(), steps=1)[0][-1]
  saved, want = (vit.scan_params(state), state) if saved_scanned else (state, vit.scan_params(state))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          jax.eval_shape(lambda: want))
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  try:
    ckpt.save(1, saved)
    ckpt.wait()
    with pytest.raises(checkpointing.CheckpointError, match="does not match"):
      ckpt.restore(abstract, 1)
    got = ckpt.restore(abstract, 1, relayouts=vit.CHECKPOINT_RELAYOUTS)
  finally:
    ckpt.close()
  _assert_trees_close(got, want, rtol=0)


@pytest.mark.parametrize("overrides,field", [
    ({"model.remat": "some"}, "config.model.remat"),
    ({"model.scan_layers": None}, "config.model.scan_layers"),
    ({"train.grad_accum_steps": 0}, "config.train.grad_accum_steps"),
    ({"train.grad_accum_steps": 3}, "config.train.grad_accum_steps"),
    ({"train.grad_accum_steps": 4, "batch_size": 20}, "config.train.grad_accum_steps"),
])
def test_invalid_knobs_are_rejected(overrides, field):
  config = _config()
  with config.unlocked():
    apply_overrides(config, overrides)
  with pytest.raises(UserError, match=field.replace(".", r"\.")):
    config_validation.validate_pretrain(config, 2)
