"""Tests for the Figure-4 gradient tool: the MAE reference, the measure and its outputs."""

import csv
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_OVERRIDES, apply_overrides, load_config, override_flags
from pr_mim_jax.method import masking
from pr_mim_jax.method import methods
from pr_mim_jax.tools import gradient_study
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as ts


@pytest.mark.slow
@pytest.mark.parametrize("strategy", masking.THROW_STRATEGIES)
def test_mae_reference_keeps_the_visible_set_and_decodes_every_masked_token(strategy):
  split = masking.token_split(64, 0.75, 0.5)
  rng = jax.random.key(3)
  masks = masking.make_masks(rng, 4, split, strategy, 8)
  ref = gradient_study.mae_masks(masks)
  np.testing.assert_array_equal(np.asarray(ref.ids_vis), np.asarray(masks.ids_vis))
  assert ref.ids_dec.shape == (4, 48) and ref.ids_throw.shape == (4, 0)
  for b in range(4):
    assert set(np.asarray(ref.ids_dec[b])) == set(range(64)) - set(np.asarray(masks.ids_vis[b]))
  # With random throwing it is exactly the mask MAE training draws from the same key.
  if strategy == "random":
    mae_masks = masking.make_masks(rng, 4, masking.token_split(64, 0.75), "random", 8)
    np.testing.assert_array_equal(np.asarray(ref.ids_dec), np.asarray(mae_masks.ids_dec))


def _probe_distance(setting):
  config = apply_overrides(load_config("dataset=shapes"), TINY_OVERRIDES)
  c = gradient_study.setting_config(config, setting)
  model, task = ts.model_from_config(c), ts.task_from_config(c)
  mae_c = methods.with_method(c, "mae")
  probe = gradient_study.make_probe(model, task, ts.model_from_config(mae_c), ts.task_from_config(mae_c))
  params = pretrain.init_params(model, task.split, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  dist, mae_norm, _ = probe(params, images, jax.random.key(2))
  return float(dist), float(mae_norm)


@pytest.mark.slow
def test_distance_is_zero_for_mae_and_positive_otherwise():
  dist, norm = _probe_distance("mae")
  assert dist == 0.0 and norm > 0
  for setting in ("partial", "pr_mim:interpolate", "pr_mim:last_block"):
    dist, norm = _probe_distance(setting)
    assert dist > 0 and norm > 0, setting


def test_a_setting_named_twice_is_refused():
  # It trained twice; the CSV held its rows twice and the final table listed it twice.
  config = load_config("dataset=shapes")
  gradient_study.check_settings(config, ["mae", "pr_mim:interpolate"])
  with pytest.raises(gradient_study.UserError,
                     match=re.escape("--settings: ['mae'] named twice; name each setting once")):
    gradient_study.check_settings(config, ["mae", "partial", "mae"])


@pytest.mark.parametrize("setting", ["simmim", "partial:interpolate", "pr_mim:mlp"])
def test_bad_setting_is_a_user_error(setting):
  with pytest.raises(gradient_study.UserError, match="--settings"):
    gradient_study.setting_config(load_config("dataset=shapes"), setting)


@pytest.mark.slow
def test_end_to_end_writes_table_csv_and_plot(tmp_path):
  out = tmp_path / "out"
  flags = override_flags(TINY_OVERRIDES) + [f"--config.data.data_dir={tmp_path}/tfds",
                                            "--config.data.backend=numpy"]
  proc = subprocess.run(
      [sys.executable, "-m", "pr_mim_jax.tools.gradient_study", "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes",
       f"--out={out}", "--settings=mae,partial,pr_mim:local_attention", "--steps=4", "--every=2",
       "--batches=2", "--probe_batch=4", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "gradient_distance.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["setting"], int(r["step"])) for r in rows] == [
      (s, t) for s in ("mae", "partial", "pr_mim:local_attention") for t in (0, 2, 4)]
  for r in rows:
    assert int(r["n"]) == 2
    assert (float(r["rel_mean"]) == 0) == (r["setting"] == "mae")
    assert float(r["noise_mean"]) > 0
  table = (out / "gradient_distance.md").read_text()
  assert "pr_mim:local_attention" in table and "k-NN top-1" in table
  assert (out / "gradient_distance.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flag,message", [
    ("--steps=-1", "--steps=-1: must be >= 0 (training steps per setting; 0 = from the config's "
     "epochs)"),
    ("--every=-2", "--every=-2: must be >= 0 (steps between measurements; 0 = steps / 8)"),
    ("--probe_batch=0", "--probe_batch=0: must be >= 1 (images per probe batch)"),
    # An empty list was an IndexError traceback, after --out was created.
    ("--settings=", "--settings: none given; use some of mae,partial,pr_mim:local_attention,"
     "pr_mim:interpolate,pr_mim:last_block"),
])
def test_bad_counts_are_one_error_line_before_training(tmp_path, flag, message):
  proc = subprocess.run([sys.executable, "-m", "pr_mim_jax.tools.gradient_study",
                         "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes",
                         f"--out={tmp_path}/out", flag], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: {message}"]
  assert list(tmp_path.iterdir()) == []


def test_more_probe_images_than_the_eval_split_is_one_error_line(tmp_path):
  # The tiny shapes test split has 64 images; 3 x 30 = 90 probe images cannot come from it.
  flags = override_flags(TINY_OVERRIDES) + [f"--config.data.data_dir={tmp_path}/tfds",
                                            "--config.data.backend=numpy"]
  proc = subprocess.run([sys.executable, "-m", "pr_mim_jax.tools.gradient_study",
                         "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes",
                         f"--out={tmp_path}/out", "--settings=mae", "--steps=1", "--batches=3",
                         "--probe_batch=30", *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --batches x --probe_batch: 3 x 30 = 90 probe images, but the 'test' split of "
      "'shapes' has 64; lower --batches or --probe_batch")


def test_the_plot_says_what_it_shows(tmp_path):
  # Without a title the picture did not say what the lines and bars are.
  rows = [{"setting": s, "step": t, "rel_mean": 0.5 + t, "rel_std": 0.1, "noise_mean": 0.7,
           "noise_std": 0.05, "n": 3} for s in ("mae", "partial") for t in (0, 4)]
  fig = gradient_study.plot(rows, tmp_path / "g.png")
  (ax,) = fig.axes
  assert "MAE" in ax.get_title() and "mean ± std over 3 probe batches" in ax.get_title()
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      "MAE batch-to-batch (yardstick)", "partial"]
  assert ax.get_xlabel() and ax.get_ylabel()
  assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_every_setting_is_checked_not_only_for_repeats():
  config = load_config("dataset=shapes")
  with pytest.raises(gradient_study.UserError, match="pr_mim:nonsense"):
    gradient_study.check_settings(config, ["mae", "pr_mim:nonsense"])
  with pytest.raises(gradient_study.UserError, match="^--settings: none given"):
    gradient_study.check_settings(config, [])
