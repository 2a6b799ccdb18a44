"""The k-NN evaluation mode: its accuracy against the pre-training monitor, exact features,
and a workdir of its own."""


import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import apply_overrides, load_config
from eval_setup import DATA, PRETRAIN, SIZE, pretrained  # pylint: disable=unused-import (a fixture)
from pr_mim_jax.configs import knn as knn_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import knn_eval
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib


@pytest.mark.slow
def test_knn_mode_matches_the_pretraining_monitor(pretrained, tmp_path):
  """pr_mim_jax/configs/knn.py streams features through a bare encoder; the monitor uses the
  MAE model on in-memory arrays. Both must give the same accuracy."""
  config = apply_overrides(knn_config.get_config(f"init={pretrained},dataset=shapes"), {
      **DATA, "knn.train_examples": 200, "knn.test_examples": 50, "knn.batch_size": 32, "knn.k": 5})
  got = knn_eval.knn_eval(config, str(tmp_path / "knn"))["knn_top1"]
  pre = apply_overrides(load_config("method=pr_mim,dataset=shapes"), PRETRAIN)
  pre.knn.train_examples, pre.knn.test_examples, pre.knn.k = 200, 50, 5
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(pretrained))
  try:
    params, _ = ckpt.restore_subtree(("params",), sharding.replicated(sharding.make_mesh()))
  finally:
    ckpt.close()
  want = pretrain.KnnMonitor(pre, train_step_lib.model_from_config(pre)).accuracy(params)
  assert got == pytest.approx(want, abs=1 / 50 + 1e-9)  # at most one float-tie flip
  with open(tmp_path / "knn" / "metrics.jsonl") as f:
    assert json.loads(f.readline())["knn_top1"] == pytest.approx(got)
  # config.json records the architecture evaluated (PRETRAIN's), not the '' / 0 left empty.
  recorded = json.loads((tmp_path / "knn" / "config.json").read_text())["model"]
  assert (recorded["variant"], recorded["width"], recorded["depth"], recorded["image_size"]) == (
      "Ti/4", 32, 2, SIZE)


def test_knn_image_size_off_the_patch_grid_is_one_line(tmp_path):
  # Checked once the model is resolved against the init run (Ti/4 here): was a traceback
  # after the data was read.
  (tmp_path / "config.json").write_text(
      apply_overrides(load_config("method=pr_mim,dataset=shapes"), PRETRAIN).to_json())
  config = apply_overrides(knn_config.get_config(f"init={tmp_path},dataset=shapes"),
                           {**DATA, "model.image_size": 34})
  with pytest.raises(UserError, match="^config.model.image_size: 34 is not divisible"):
    knn_eval.check_knn_config(config)


@pytest.mark.slow
def test_knn_reads_a_scanned_checkpoint(pretrained, tmp_path):
  """The same weights saved with stacked blocks (scan_layers=True) give the same k-NN."""
  scanned = tmp_path / "scanned"
  scanned.mkdir()
  config = json.loads(open(os.path.join(pretrained, "config.json")).read())
  config["model"]["scan_layers"] = True
  (scanned / "config.json").write_text(json.dumps(config))
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(pretrained))
  try:
    params, step = ckpt.restore_subtree(("params",), sharding.replicated(sharding.make_mesh()))
  finally:
    ckpt.close()
  checkpointing.write_checkpoint(str(scanned), step, {"params": vit.scan_params(params)})
  knn = {"knn.train_examples": 100, "knn.test_examples": 50, "knn.batch_size": 32, "knn.k": 5}
  tops = [knn_eval.knn_eval(apply_overrides(knn_config.get_config(f"init={init},dataset=shapes"),
                                            {**DATA, **knn}), str(tmp_path / name))["knn_top1"]
          for name, init in (("plain", pretrained), ("from_scanned", scanned))]
  assert tops[0] == tops[1]


@pytest.mark.parametrize("held", ["pretrain", "linear_probe", "checkpoints_only"])
def test_knn_refuses_a_workdir_holding_another_run_and_leaves_its_record(tmp_path, held):
  """--workdir = the run to evaluate (instead of init=) must not replace its config.json."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "6").mkdir(parents=True)
  record = json.dumps({"mode": held, "model": {"variant": "Ti/4"}})
  if held != "checkpoints_only":
    (workdir / "config.json").write_text(record)
  config = knn_config.get_config(f"init={workdir},dataset=shapes")
  with pytest.raises(UserError, match=r"--workdir: .* holds .*init=.* and a new --workdir"):
    knn_eval.knn_eval(config, str(workdir))
  if held != "checkpoints_only":
    assert (workdir / "config.json").read_text() == record
  assert sorted(p.name for p in workdir.iterdir()) == (
      ["checkpoints"] + (["config.json"] if held != "checkpoints_only" else []))


@pytest.mark.parametrize("record,what", [
    ("{not json", "another run (config.json)"),  # a damaged record is no k-NN's either
    ("[]", "another run (config.json)"),  # JSON, but no mapping with a mode
    (json.dumps({"model": {"variant": "Ti/4"}}), "a pretrain run (config.json)"),  # no mode:
    # written before config.mode existed, by pre-training
    (json.dumps({"mode": "finetune"}), "a finetune run (config.json)"),
])
def test_knn_refuses_a_workdir_whose_config_json_is_not_a_knn_runs(tmp_path, record, what):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(record)
  with pytest.raises(UserError) as err:
    knn_eval.check_knn_workdir(str(workdir))
  assert str(err.value) == (f"--workdir: {workdir} holds {what}, whose config.json a k-NN "
                            f"evaluation would replace; evaluate it with init={workdir} and a "
                            "new --workdir")
  assert (workdir / "config.json").read_text() == record


def test_knn_names_the_run_and_its_checkpoints_in_a_workdir_holding_both(tmp_path):
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps({"mode": "linear_probe"}))
  with pytest.raises(UserError, match=r" holds a linear_probe run \(checkpoints\), whose "):
    knn_eval.check_knn_workdir(str(tmp_path))
  knn_eval.check_knn_workdir(str(tmp_path / "new"))  # a new workdir passes
  (tmp_path / "knn").mkdir()
  (tmp_path / "knn" / "config.json").write_text(json.dumps({"mode": "knn"}))
  knn_eval.check_knn_workdir(str(tmp_path / "knn"))  # and a k-NN's own


def _checked_model(**fields):
  """A tiny encoder's checked model config, as knn_eval takes it (`checked=`)."""
  return ml_collections.ConfigDict({"variant": "Ti/4", "width": 8, "depth": 1, "heads": 1,
                                    "image_size": 8, "posemb": "sincos",
                                    "compute_dtype": "float32", **fields})


def test_knn_reruns_in_its_own_workdir(tmp_path, monkeypatch):
  monkeypatch.setattr(knn_eval, "split_features", lambda encoder, params, data, split, *args: (
      np.eye(2, dtype=np.float32), np.array([0, 1])))
  monkeypatch.setattr(knn_eval.init_run, "read_pretrained_encoder", lambda *args: {})
  monkeypatch.setattr(knn_eval.posemb_lib, "adapt_encoder_params", lambda params, grid: params)
  config = apply_overrides(knn_config.get_config("init=/nowhere,dataset=shapes"), {"knn.k": 1})
  model = _checked_model()
  for _ in range(2):
    assert knn_eval.knn_eval(config, str(tmp_path / "knn"), checked=model)["knn_top1"] == 1.0
  assert json.loads((tmp_path / "knn" / "config.json").read_text())["mode"] == "knn"


def test_knn_on_fewer_train_images_than_k_votes_with_all_and_says_so(tmp_path, monkeypatch,
                                                                   caplog):
  """3 train images and knn.k=5: the vote uses all 3, and the log and metrics say k=3, not 5."""
  feats = {"train": (np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], np.float32),
                     np.array([0, 0, 1])),
           "test": (np.array([[1.0, 0.05]], np.float32), np.array([0]))}
  monkeypatch.setattr(knn_eval, "split_features",
                      lambda encoder, params, data, split, *args: feats[split])
  monkeypatch.setattr(knn_eval.init_run, "read_pretrained_encoder", lambda *args: {})
  monkeypatch.setattr(knn_eval.posemb_lib, "adapt_encoder_params", lambda params, grid: params)
  config = apply_overrides(knn_config.get_config("init=/nowhere,dataset=shapes"), {
      "knn.k": 5, "knn.train_examples": 10, "data.train_split": "train",
      "data.eval_split": "test"})
  model = _checked_model()
  with caplog.at_level("INFO"):
    result = knn_eval.knn_eval(config, str(tmp_path / "knn"), checked=model)
  assert result["knn_top1"] == 1.0
  row = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text())
  assert (row["k"], row["train_examples"]) == (3, 3)
  assert "only 3 images, so k=3 (knn.k=5)" in caplog.text and "k-NN top-1 (k=3," in caplog.text


class _MeanEncoder:
  """Stands in for vit.Encoder: two tokens per image, both its mean input value."""
  image_size = 8

  def apply(self, variables, x):
    mean = x.reshape(x.shape[0], -1).mean(axis=1)
    return jnp.broadcast_to(mean[:, None, None], (x.shape[0], 2, 1))


def test_knn_features_leave_out_the_padding_of_the_last_batch(monkeypatch):
  """Two batches of 4, the second holding 2 real examples and 2 of padding: 6 features, in
  order, each of its own image."""
  def batches(*args, **kwargs):
    for labels, mask in (([0, 1, 2, 3], [1, 1, 1, 1]), ([4, 5, 0, 0], [1, 1, 0, 0])):
      images = np.stack([np.full((8, 8, 3), 20.0 * (i + 1), np.float32)
                         for i in labels]) * np.asarray(mask, np.float32)[:, None, None, None]
      yield {"image": images, "label": np.asarray(labels, np.int32),
             "mask": np.asarray(mask, np.float32)}

  monkeypatch.setattr(knn_eval.pipeline, "eval_batches", batches)
  config = knn_config.get_config("init=/runs/pre,dataset=shapes")
  feats, labels = knn_eval.split_features(_MeanEncoder(), {}, config.data, "test", None, config,
                                         sharding.make_mesh())
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5])
  assert feats.shape == (6, 1) and np.all(np.diff(feats[:, 0]) > 0)


@pytest.mark.parametrize("temperature,top1", [(10.0, 1.0), (0.07, 0.0)])
def test_knn_embeds_each_split_to_its_own_size_and_votes_at_the_config_s_temperature(
    tmp_path, monkeypatch, temperature, top1):
  """knn.train_examples of data.train_split are the neighbours and knn.test_examples of
  data.eval_split the queries; the encoder's posembs are resized to the evaluated grid
  (16 px / patch 4 = 4). At T=10 two neighbours of class 1 at similarity 0.9 outvote one of
  class 0 at 1.0 (2 e^0.09 > e^0.1); at DINO's T=0.07 class 0 wins (e^(0.1/0.07) > 2)."""
  near = np.array([[1.0, 0.0]], np.float32)
  at_09 = np.array([[0.9, np.sqrt(1 - 0.81)]], np.float32)
  feats = {"tr": (np.concatenate([near, at_09, at_09]), np.array([0, 1, 1])),
           "te": (near, np.array([1]))}
  calls, grids = [], []
  monkeypatch.setattr(knn_eval, "split_features", lambda encoder, params, data, split, n, *a: (
      calls.append((split, n)) or feats[split]))
  monkeypatch.setattr(knn_eval.init_run, "read_pretrained_encoder", lambda *args: {})
  monkeypatch.setattr(knn_eval.posemb_lib, "adapt_encoder_params",
                      lambda params, grid: grids.append(grid) or params)
  config = apply_overrides(knn_config.get_config("init=/nowhere,dataset=shapes"), {
      "knn.k": 3, "knn.temperature": temperature, "knn.train_examples": 30, "knn.test_examples": 7,
      "data.train_split": "tr", "data.eval_split": "te"})
  model = _checked_model(image_size=16, pretrained_image_size=8)
  assert knn_eval.knn_eval(config, str(tmp_path / "knn"), checked=model)["knn_top1"] == top1
  assert calls == [("tr", 30), ("te", 7)] and grids == [4]
  row = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text())
  assert (row["k"], row["train_examples"], row["test_examples"]) == (3, 3, 1)


class _ClsEncoder:
  """Stands in for vit.Encoder: a cls token of twice the image's mean value m, then two patch
  tokens of -m. The cls feature rises with m, the patch mean falls, and a mean that wrongly
  took the cls token in is 0 for every image."""
  image_size = 8

  def apply(self, variables, x):
    mean = x.reshape(x.shape[0], -1).mean(axis=1)[:, None, None]  # [B, 1, 1]
    return jnp.concatenate([2 * mean, -mean, -mean], axis=1)  # [B, 3, 1]


@pytest.mark.parametrize("feature,sign", [("cls", 1), ("mean", -1)])
def test_knn_features_are_the_configured_pooling(monkeypatch, feature, sign):
  def batches(*args, **kwargs):
    images = np.stack([np.full((8, 8, 3), 40.0 * (i + 1), np.float32) for i in range(3)])
    yield {"image": images, "label": np.arange(3, dtype=np.int32),
           "mask": np.ones(3, np.float32)}

  monkeypatch.setattr(knn_eval.pipeline, "eval_batches", batches)
  config = knn_config.get_config("init=/runs/pre,dataset=shapes")
  config.knn.feature = feature
  feats, _ = knn_eval.split_features(_ClsEncoder(), {}, config.data, "test", None, config,
                                     sharding.make_mesh())
  assert np.all(sign * np.diff(feats[:, 0]) > 0)
