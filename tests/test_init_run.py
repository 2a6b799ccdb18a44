"""What an evaluation takes from its init run: the architecture, MAE's fine-tuning
recipe for its size, and the encoder weights."""


import functools
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from eval_setup import eval_config, pretrain_config_json
from pr_mim_jax import cli
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.configs import knn as knn_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import init_run
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing


def recipe(config):
  return (config.optim.epochs, config.optim.base_lr, config.optim.layer_decay,
          config.model.drop_path)


# MAE's FINETUNE.md: ViT-B 100 epochs, blr 5e-4, layer decay 0.65, drop path 0.1; ViT-L and
# ViT-H 50 epochs, blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3.
MAE_RECIPES = [("B/16", (100.0, 5e-4, 0.65, 0.1)), ("L/16", (50.0, 1e-3, 0.75, 0.2)),
               ("H/14", (50.0, 1e-3, 0.75, 0.3))]


@pytest.mark.parametrize("variant,expected", MAE_RECIPES)
def test_finetune_defaults_are_maes(variant, expected):
  """Random init with variant= (the baseline) gets that size's recipe."""
  c = classify_config.get_config("finetune", f"variant={variant}")
  assert recipe(c) == (None,) * 4  # left to the model's size
  assert recipe(init_run.resolve_config(c)) == expected
  assert (c.batch_size, c.optim.warmup_epochs, c.optim.weight_decay, c.optim.b2) == (
      1024, 5.0, 0.05, 0.999)
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing) == (0.8, 1.0, 0.1)
  assert (c.data.augment, c.data.random_erase, c.head.pool, c.head.kind) == (
      "randaugment", 0.25, "gap", "linear")


@pytest.mark.parametrize("variant,expected", MAE_RECIPES)
def test_finetune_recipe_follows_the_pretrained_model(tmp_path, variant, expected):
  """Without variant=, the recipe is the init run's size's, not ViT-B's; a field set on the
  command line stays as set."""
  c = classify_config.get_config("finetune", f"init={pretrain_config_json(tmp_path, variant)}")
  resolved = init_run.resolve_config(c)
  assert (resolved.model.variant, recipe(resolved)) == (variant, expected)
  c.optim.base_lr = 2e-3
  assert recipe(init_run.resolve_config(c)) == (expected[0], 2e-3, *expected[2:])


def test_finetune_without_a_recipe_asks_for_the_fields(tmp_path):
  """MAE published no fine-tuning recipe for ViT-S: ImageNet scale stops and names the fields
  still empty; set, they pass. The demo scale, whose settings are its own, does not stop."""
  c = classify_config.get_config("finetune", f"init={pretrain_config_json(tmp_path, 'S/16')}")
  c.optim.base_lr = 1e-3
  with pytest.raises(UserError, match=r"^config.optim.epochs, config.optim.layer_decay, "
                     r"config.model.drop_path: .* this model is S/16; set them"):
    init_run.resolve_config(c)
  c.optim.epochs, c.optim.layer_decay, c.model.drop_path = 100.0, 0.75, 0.1
  assert recipe(init_run.resolve_config(c)) == (100.0, 1e-3, 0.75, 0.1)
  demo = classify_config.get_config("finetune", "variant=S/16,dataset=shapes")
  demo.model.image_size = 64
  assert recipe(init_run.resolve_config(demo)) == (5.0, 1e-3, 0.75, 0.1)


def test_architecture_set_to_the_pretrained_value_passes(tmp_path):
  """The ImageNet pre-training config stores width/depth/heads as 0 (from the variant): the
  value they stand for is the pre-trained one, and another value names it."""
  c = classify_config.get_config("linear_probe", f"init={pretrain_config_json(tmp_path, 'B/16')}")
  c.model.depth, c.model.width = 12, 768
  assert (init_run.resolve_model(c).depth, init_run.resolve_model(c).width) == (12, 768)
  c.model.depth = 6
  with pytest.raises(UserError, match=r"config.model.depth: 6 differs from the pre-trained "
                     r"model's 12 "):
    init_run.resolve_model(c)


def test_init_without_config_json_names_a_command_that_resolves(tmp_path):
  """The error's suggested `--config=pretrain` must name a real config from any directory."""
  with pytest.raises(UserError, match="has no config.json") as error:
    init_run.pretrained_config(str(tmp_path))
  suggested = str(error.value).split("--config=")[1].split()[0]
  assert os.path.isfile(cli.packaged_config(suggested)), suggested


@pytest.mark.parametrize("mode", ["finetune", "knn"])
def test_init_at_a_knn_workdir_is_one_line(tmp_path, mode):
  """A k-NN workdir has a config.json (with the model left empty) but no checkpoint: was a
  raw ValueError from parse_variant('')."""
  knn_dir = tmp_path / "knn"
  knn_dir.mkdir()
  (knn_dir / "config.json").write_text(
      knn_config.get_config("init=/runs/pre,dataset=shapes").to_json())
  config = (classify_config.get_config(mode, f"init={knn_dir},dataset=shapes")
            if mode == "finetune" else knn_config.get_config(f"init={knn_dir},dataset=shapes"))
  with pytest.raises(UserError, match=r"^config.init.workdir: .* k-NN evaluation's workdir, "
                     r"which holds no checkpoint; .*'/runs/pre'"):
    init_run.resolve_model(config)


@pytest.mark.parametrize("mode", ["linear_probe", "finetune"])
def test_init_at_a_probe_or_fine_tune_run_warns_that_it_is_no_pre_training_run(tmp_path, mode,
                                                                               caplog):
  """Its encoder is there (a fine-tuned one, for a fine-tune run), so it is used, but said."""
  recorded = eval_config(mode, "/runs/pre", **{"model.variant": "Ti/4"})
  (tmp_path / "config.json").write_text(recorded.to_json())
  probe = classify_config.get_config("linear_probe", f"init={tmp_path},dataset=shapes")
  with caplog.at_level("WARNING"):
    assert init_run.resolve_model(probe).variant == "Ti/4"
  assert (f"config.init.workdir: {tmp_path} is a {mode} run, not a pre-training run: its "
          "encoder as that run left it is the starting point (its own config.init.workdir: "
          "'/runs/pre')") in caplog.text
  caplog.clear()
  (tmp_path / "config.json").write_text(load_config("variant=Ti/4").to_json())
  with caplog.at_level("WARNING"):
    init_run.resolve_model(probe)
  assert "not a pre-training run" not in caplog.text


def test_init_config_json_without_a_model_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {"variant": ""}}))
  config = classify_config.get_config("linear_probe", f"init={tmp_path},dataset=shapes")
  with pytest.raises(UserError, match=r"^config.init.workdir: .* names no model"):
    init_run.resolve_model(config)



def test_init_config_json_that_is_not_json_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{")  # a run killed while writing it, say
  with pytest.raises(UserError, match=rf"^config.init.workdir: {tmp_path}/config.json is not "
                     r"valid JSON \("):
    init_run.pretrained_config(str(tmp_path))

def _encoder(value):
  return {"block0": {"w": np.full((2, 3), value, np.float32)},
          "block1": {"w": np.full((2, 3), value + 1, np.float32)},
          "norm": {"scale": np.full((3,), value, np.float32)}}


def test_the_encoder_is_read_from_init_step_in_the_model_s_layout(tmp_path):
  """init.step 0 is the step-0 checkpoint (a converted run), -1 the newest; scan_layers
  stacks the blocks."""
  init = tmp_path / "pre"
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(init)))
  for step in (0, 5):
    ckpt.save(step, {"params": {"encoder": _encoder(10.0 * step)}})
  ckpt.close()
  mesh = sharding.make_mesh()
  for step, want in ((0, 0.0), (-1, 50.0), (5, 50.0)):
    config = eval_config("finetune", str(init), **{"init.step": step})
    got = jax.tree.map(np.asarray, init_run.read_pretrained_encoder(config, mesh, False))
    jax.tree.map(np.testing.assert_array_equal, got, _encoder(want))
  scanned = init_run.read_pretrained_encoder(eval_config("finetune", str(init)), mesh, True)
  assert sorted(scanned) == ["blocks", "norm"]
  np.testing.assert_array_equal(np.asarray(scanned["blocks"]["w"]),
                                np.stack([np.full((2, 3), 50.0), np.full((2, 3), 51.0)]))


def test_a_finer_resolution_than_the_init_run_s_is_allowed_and_remembered(tmp_path):
  """Fine-tuning at 448 px from a 224 px run: allowed (position embeddings are interpolated
  from the init run's 14 x 14 grid, so that grid must be recorded)."""
  c = classify_config.get_config("finetune", f"init={pretrain_config_json(tmp_path, 'B/16')}")
  c.model.image_size = 448
  model = init_run.resolve_model(c)
  assert (model.image_size, model.pretrained_image_size) == (448, 224)


@pytest.mark.parametrize("mode", ["linear_probe", "knn"])
def test_a_weights_file_as_init_says_to_convert_it(tmp_path, mode):
  weights = tmp_path / "mae_pretrain_vit_base.pth"
  weights.write_bytes(b"PK\x03\x04")
  config = (knn_config.get_config if mode == "knn" else functools.partial(
      classify_config.get_config, mode))(f"init={weights},dataset=shapes")
  with pytest.raises(UserError, match=r"is a file, not a workdir; convert .* "
                     r"python -m pr_mim_jax.interop.convert --from=\S+\.pth --to=DIR, "
                     r"then init=DIR$"):
    init_run.resolve_model(config)


@pytest.mark.parametrize("mode", ["linear_probe", "finetune"])
def test_an_init_run_gives_its_resolution_unless_one_is_set(tmp_path, mode):
  """A run pre-trained at 96 px is probed and fine-tuned at 96 px (not MAE's 224, which
  would upsample its images and interpolate its position embeddings); a size set on the
  command line still wins."""
  pre = load_config("variant=S/16")
  pre.model.image_size = 96
  (tmp_path / "config.json").write_text(pre.to_json())
  c = classify_config.get_config(mode, f"init={tmp_path}")
  assert init_run.resolve_model(c).image_size == 96
  c.model.image_size = 128
  assert init_run.resolve_model(c).image_size == 128


def test_random_init_takes_maes_fixed_sincos_posembs_unless_set():
  """Without an init run, posemb '' means MAE's fixed 2-D sin-cos embeddings, as in
  pre-training; a value set on the command line stays."""
  c = classify_config.get_config("finetune", "variant=B/16")
  assert c.model.posemb == ""
  model = init_run.resolve_model(c)
  assert (model.posemb, model.pretrained_image_size) == ("sincos", model.image_size)
  c.model.posemb = "learned"
  assert init_run.resolve_model(c).posemb == "learned"
