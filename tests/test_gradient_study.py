"""Tests for the Figure-4 gradient tool: the MAE reference, the measure and its outputs."""

import csv
import json
import re
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
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
       f"--out={out}", "--settings=mae,partial,pr_mim:local_attention", "--steps=5", "--every=2",
       "--batches=2", "--probe_batch=4", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "gradient_distance.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["setting"], int(r["step"])) for r in rows] == [  # the last step, off every 2, too
      (s, t) for s in ("mae", "partial", "pr_mim:local_attention") for t in (0, 2, 4, 5)]
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
    # One probe batch has no batch-to-batch noise and no spread: the table read nan.
    ("--batches=1", "--batches=1: must be >= 2 (probe batches per measurement; the spread "
     "needs several)"),
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


@pytest.mark.parametrize("batches,probe_batch", [(3, 30), (5, 13)])
def test_more_probe_images_than_the_eval_split_is_one_error_line(tmp_path, batches, probe_batch):
  # The tiny shapes test split has 64 images; 3 x 30 = 90 or 5 x 13 = 65 cannot come from it.
  flags = override_flags(TINY_OVERRIDES) + [f"--config.data.data_dir={tmp_path}/tfds",
                                            "--config.data.backend=numpy"]
  proc = subprocess.run([sys.executable, "-m", "pr_mim_jax.tools.gradient_study",
                         "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes",
                         f"--out={tmp_path}/out", "--settings=mae", "--steps=1",
                         f"--batches={batches}", f"--probe_batch={probe_batch}", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --batches x --probe_batch: {batches} x {probe_batch} = {batches * probe_batch} "
      "probe images, but the 'test' split of "
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


def test_measure_is_the_relative_distance_and_the_batch_to_batch_noise_by_hand():
  # Four probe batches: distances 1..4 to g_MAE = (3, 4), (6, 8), (0, 10), (0, 20), split over
  # two params; ||g_MAE|| = 5, 10, 10, 20.
  g_mae = [np.array([3.0, 4.0]), np.array([6.0, 8.0]), np.array([0.0, 10.0]),
           np.array([0.0, 20.0])]
  calls = iter(range(4))

  def probe(params, images, rng):
    k = next(calls)
    return jnp.float32(k + 1), jnp.float32(np.linalg.norm(g_mae[k])), {
        "a": jnp.asarray(g_mae[k][:1]), "b": jnp.asarray(g_mae[k][1:])}

  m = gradient_study.measure(probe, None, [None] * 4, [None] * 4)
  rel = [1 / 5, 2 / 10, 3 / 10, 4 / 20]
  noise = [np.linalg.norm(g_mae[k] - g_mae[k - 1]) / np.linalg.norm(g_mae[k - 1])
           for k in (1, 2, 3)]  # 5/5, sqrt(40)/10, 10/10
  assert noise == pytest.approx([1.0, 40 ** 0.5 / 10, 1.0])
  assert m == pytest.approx({"rel_mean": statistics.mean(rel), "rel_std": statistics.stdev(rel),
                             "noise_mean": statistics.mean(noise),
                             "noise_std": statistics.stdev(noise), "n": 4})


def test_measure_with_two_batches_has_one_noise_sample_and_std_zero():
  def probe(params, images, r):  # distance r to g_MAE = (2 r)
    return jnp.float32(r), jnp.float32(2.0 * r), {"a": jnp.asarray([2.0 * r])}

  m = gradient_study.measure(probe, None, [None, None], [1.0, 3.0])  # g_MAE (2), then (6)
  assert m == pytest.approx({"rel_mean": 0.5, "rel_std": 0.0, "noise_mean": 2.0,
                             "noise_std": 0.0, "n": 2})


def _made_up_rows():
  settings = ("mae", "partial", "pr_mim:interpolate")
  return [{"setting": s, "step": t, "rel_mean": 0.0 if s == "mae" else 0.1 * (i + 1) + t / 100,
           "rel_std": 0.0 if s == "mae" else 0.01 * (i + 1), "noise_mean": 0.5 + t / 1000,
           "noise_std": 0.02 + i / 1000, "n": 3}
          for i, s in enumerate(settings) for t in (0, 5, 10)]


def test_the_csv_and_the_table_read_back_each_settings_numbers(tmp_path):
  rows = _made_up_rows()
  finals = [{"setting": "mae", "final_loss": 0.812345, "knn_top1": 0.4567, "seconds": 12.4},
            {"setting": "partial", "final_loss": 0.7, "knn_top1": None, "seconds": 9.6},
            {"setting": "pr_mim:interpolate", "final_loss": 0.65, "knn_top1": 0.5,
             "seconds": 3.0}]
  gradient_study.write_outputs(tmp_path, rows, finals)
  with open(tmp_path / "gradient_distance.csv") as f:
    back = list(csv.DictReader(f))
  assert [{k: type(r[k])(v) for k, v in b.items()} for r, b in zip(rows, back)] == rows
  lines = (tmp_path / "gradient_distance.md").read_text().splitlines()
  assert lines[0] == "| step | mae | partial | pr_mim:interpolate |"
  assert lines[2:5] == [  # mae: its batch-to-batch noise; the others: their distance to MAE
      "| 0 | 0.500 ± 0.020 (noise) | 0.200 ± 0.020 | 0.300 ± 0.030 |",
      "| 5 | 0.505 ± 0.020 (noise) | 0.250 ± 0.020 | 0.350 ± 0.030 |",
      "| 10 | 0.510 ± 0.020 (noise) | 0.300 ± 0.020 | 0.400 ± 0.030 |"]
  assert lines[-3:] == ["| mae | 0.8123 | 45.7% | 12 |", "| partial | 0.7000 | - | 10 |",
                        "| pr_mim:interpolate | 0.6500 | 50.0% | 3 |"]
  assert json.loads((tmp_path / "summary.json").read_text()) == {"rows": rows, "finals": finals}


def test_the_plot_draws_each_settings_line(tmp_path):
  from matplotlib import container  # pylint: disable=g-import-not-at-top
  rows = _made_up_rows()
  fig = gradient_study.plot(rows, tmp_path / "g.png")
  (ax,) = fig.axes
  lines = [c for c in ax.containers if isinstance(c, container.ErrorbarContainer)]
  assert [c.get_label() for c in lines] == ["MAE batch-to-batch (yardstick)", "partial",
                                            "pr_mim:interpolate"]
  for c, setting in zip(lines, ("mae", "partial", "pr_mim:interpolate")):
    key = "noise" if setting == "mae" else "rel"
    mine = [r for r in rows if r["setting"] == setting]
    data, _, (bars,) = c.lines
    assert list(data.get_xdata()) == [0, 5, 10]
    assert list(data.get_ydata()) == pytest.approx([r[f"{key}_mean"] for r in mine])
    assert [s[1][1] - s[0][1] for s in bars.get_segments()] == pytest.approx(
        [2 * r[f"{key}_std"] for r in mine])
    assert data.get_linestyle() == ("--" if setting == "mae" else "-")
  assert "mean ± std over 3 probe batches" in ax.get_title()


@pytest.mark.slow
def test_the_probe_measures_encoder_gradients_against_maes():
  """partial throws at random: its MAE reference is MAE's own mask from the same key, so
  ||g_MAE|| and g_MAE are those of the 'mae' setting's probe; the gradient is the encoder's."""
  config = apply_overrides(load_config("dataset=shapes"), TINY_OVERRIDES)
  probes = {}
  for setting in ("partial", "mae"):
    c = gradient_study.setting_config(config, setting)
    mae_c = methods.with_method(c, "mae")
    probes[setting] = gradient_study.make_probe(
        ts.model_from_config(c), ts.task_from_config(c), ts.model_from_config(mae_c),
        ts.task_from_config(mae_c))
  c = gradient_study.setting_config(config, "partial")
  params = pretrain.init_params(ts.model_from_config(c), ts.task_from_config(c).split,
                                jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  dist, norm, g = probes["partial"](params, images, jax.random.key(2))
  _, mae_norm, mae_g = probes["mae"](params, images, jax.random.key(2))
  assert jax.tree.structure(g) == jax.tree.structure(params["encoder"])
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
  assert float(norm) == pytest.approx(np.sqrt(sum((x ** 2).sum() for x in leaves)), rel=1e-5)
  assert float(norm) == pytest.approx(float(mae_norm), rel=1e-5)
  for a, b in zip(leaves, jax.tree.leaves(mae_g)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-7)
  assert 0 < float(dist) < 2 * float(norm)


def test_each_finished_setting_is_written_before_the_next_one_runs(tmp_path):
  """Ctrl-C during the second setting keeps the first one's rows; --every 0 is steps / 8."""
  code = ("import sys\n"
          "from pr_mim_jax.tools import gradient_study\n"
          "def run_setting(config, setting, steps, every, *_):\n"
          "  if setting == 'partial':\n"
          "    raise KeyboardInterrupt\n"
          "  rows = [{'setting': setting, 'step': t, 'rel_mean': 0.0, 'rel_std': 0.0,\n"
          "           'noise_mean': 0.5, 'noise_std': 0.1, 'n': 2} for t in (every, steps)]\n"
          "  return rows, {'setting': setting, 'final_loss': 1.0, 'knn_top1': None,\n"
          "                'seconds': 1.0}\n"
          "gradient_study.run_setting = run_setting\n"
          "sys.exit(gradient_study.main(sys.argv))\n")
  flags = override_flags(TINY_OVERRIDES) + [f"--config.data.data_dir={tmp_path}/tfds",
                                            "--config.data.backend=numpy"]
  proc = subprocess.run(
      [sys.executable, "-c", code, "--config=pr_mim_jax/configs/pretrain.py:dataset=shapes",
       f"--out={tmp_path}/out", "--settings=mae,partial", "--steps=16", "--batches=2",
       "--probe_batch=2", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 130, proc.stderr[-3000:]
  with open(tmp_path / "out" / "gradient_distance.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["setting"], int(r["step"])) for r in rows] == [("mae", 2), ("mae", 16)]
