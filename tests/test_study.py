"""The small-scale study: every method through pre-training and three evaluations, resumable."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from conftest import ROOT
from pr_mim_jax.tools import study

TINY = {
    "methods": "mae,partial,pr_mim", "seeds": "0",
    "shapes.image_size": 16, "shapes.train_size": 128, "shapes.test_size": 48,
    "model.variant": "Ti/4", "model.width": 32, "model.depth": 2, "model.heads": 2,
    "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_heads": 2,
    "pretrain.batch_size": 32, "pretrain.epochs": 1.0, "pretrain.warmup_epochs": 0.25,
    "knn.train_examples": 64, "knn.test_examples": 32,
    "linear_probe.batch_size": 32, "linear_probe.epochs": 1.0, "linear_probe.warmup_epochs": 0.25,
    "finetune.batch_size": 32, "finetune.epochs": 1.0, "finetune.warmup_epochs": 0.25,
    "reconstruction_examples": 40,
}


def run_study(workdir, **extra):
  flags = [f"--config.{k}={v}" for k, v in dict(TINY, **extra).items()]
  return subprocess.run(
      [sys.executable, "-m", "pr_mim_jax.tools.study", "--config=pr_mim_jax/configs/study.py:setting=cpu",
       f"--workdir={workdir}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_study_writes_table_and_plot_then_resumes(tmp_path):
  first = run_study(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  table = (tmp_path / "study.md").read_text()
  for method in ("mae", "partial", "pr_mim"):
    assert f"| {method} |" in table
  assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  records = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert len(records) == 3 * 4  # pretrain, reconstruction, linear_probe, finetune per method
  by = {r["key"]: r for r in records}
  for method in ("mae", "partial", "pr_mim"):
    accs = [by[f"{method}/0/pretrain"]["knn_top1"], by[f"{method}/0/linear_probe"]["eval_top1"],
            by[f"{method}/0/finetune"]["eval_top1"]]
    for acc, n in zip(accs, (32, 48, 48)):  # exact counts over the k-NN and test examples
      assert acc * n == pytest.approx(round(acc * n), abs=1e-6), (method, acc)
    loss = by[f"{method}/0/reconstruction"]["recon_loss"]
    assert 0.0 < loss < 10.0  # norm-pixel targets: about 1 before training
    row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    assert row.split(" | ")[1:5] == [f"{100 * a:.1f} ± 0.0" for a in accs] + [f"{loss:.4f} ± 0.0000"]
  second = run_study(tmp_path)  # everything is recorded: nothing runs again
  assert second.returncode == 0, second.stderr[-3000:]
  assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(records)


def test_extra_throw_ratios_and_bad_methods():
  c = ml_collections.ConfigDict(dict(methods="mae,pr_mim", pr_mim_throw_ratios="0.25,0.625"))
  assert study.runs(c) == [("mae", "mae", 0.0), ("pr_mim", "pr_mim", 0.5),
                           ("pr_mim@0.25", "pr_mim", 0.25), ("pr_mim@0.625", "pr_mim", 0.625)]
  c.methods = "mae,beit"
  with pytest.raises(study.UserError, match="config.methods: unknown method 'beit'"):
    study.runs(c)


def test_spread_verdicts():
  summary = {"a": {"knn_top1": (0.30, 0.01), "probe_top1": (0.5, 0.05), "finetune_top1": (0.6, 0.0),
                   "recon_loss": (0.40, 0.002), "seeds": 3},
             "b": {"knn_top1": (0.20, 0.01), "probe_top1": (0.45, 0.05), "finetune_top1": (0.6, 0.0),
                   "recon_loss": (0.45, 0.004), "seeds": 3}}
  lines = study.spread_verdicts(summary)
  assert "gap 10.0 points exceeds" in lines[0]  # 10 points vs 2 x 1 point
  assert "gap 5.0 points does not exceed" in lines[1]  # 5 points vs 2 x 5 points
  assert "best a, gap 0.0500 exceeds twice the mean seed std (0.0030)" in lines[3]  # lower wins


def test_a_rerun_with_other_settings_is_refused_but_more_seeds_and_methods_are_not(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(tmp_path)
  first = study_config.get_config("setting=cpu")
  study.check_same_study(first, workdir)  # a new workdir: the settings are recorded
  assert json.loads((tmp_path / study.STUDY_RECORD).read_text())["pretrain.epochs"] == 2.0
  more = study_config.get_config("setting=cpu")
  more.seeds, more.methods, more.pr_mim_throw_ratios = "0,1,2", "mae,pr_mim", "0.25"
  study.check_same_study(more, workdir)  # only adds runs
  longer = study_config.get_config("setting=cpu")
  longer.pretrain.epochs = 4.0
  longer.finetune.drop_path = 0.2
  with pytest.raises(study.UserError) as e:
    study.check_same_study(longer, workdir)
  assert ("(finetune.drop_path: 0.1 there, 0.2 now; pretrain.epochs: 2.0 there, 4.0 now)"
          in str(e.value))
  gpu = study_config.get_config("setting=gpu")
  with pytest.raises(study.UserError, match="setting: 'cpu' there, 'gpu' now"):
    study.check_same_study(gpu, workdir)


@pytest.mark.parametrize("text,message", [
    ("", "config.seeds: '' names no seed; use e.g. '0' or '0,1,2'"),
    (" , ", "config.seeds: ' , ' names no seed"),
    ("0,1,0", "config.seeds: '0,1,0' repeats [0]; name each seed once"),
    ("0,x", "config.seeds: '0,x' is not a comma-separated list of integers"),
])
def test_no_seed_or_a_repeated_seed_is_one_error_line_before_anything_runs(tmp_path, text,
                                                                            message):
  # Without a seed the study trained nothing and then crashed reading a study.md it never
  # wrote; a repeated seed counted the same runs twice in the seed-to-seed spread.
  proc = run_study(tmp_path / "w", seeds=text)
  assert proc.returncode == 2, proc.stderr[-2000:]
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"error: {message}")
  assert not (tmp_path / "w").exists()


def test_seeds_parse_in_order():
  assert study.seeds(ml_collections.ConfigDict(dict(seeds="2, 0,1"))) == [2, 0, 1]


def test_the_plot_says_what_it_shows(tmp_path):
  # Without a title the picture said neither the setting nor what the error bars are.
  from etils import epath  # pylint: disable=g-import-not-at-top
  stats = {m: (0.1, 0.01) for m in ("knn_top1", "probe_top1", "finetune_top1", "recon_loss",
                                    "gflop_per_img", "pretrain_seconds", "total_seconds")}
  summary = {"mae": dict(stats, seeds=3), "pr_mim": dict(stats, seeds=3)}
  fig = study.plot(summary, epath.Path(tmp_path) / "s.png", "cpu")
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert "setting cpu" in title and "mean ± std over 3 seed(s)" in title
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
      "chance", "k-NN", "linear probe", "fine-tune"]
  assert all(ax.get_ylabel() for ax in fig.axes)
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("methods,ratios,repeated", [
    ("mae,partial,mae", "", "['mae']"),
    ("pr_mim", "0.25,0.250", "['pr_mim@0.25']"),
])
def test_a_run_named_twice_is_refused(methods, ratios, repeated):
  # Its rows counted twice in the summary: one seed then read as two, with zero spread.
  c = ml_collections.ConfigDict(dict(methods=methods, pr_mim_throw_ratios=ratios))
  with pytest.raises(study.UserError, match=re.escape(f"{repeated} named twice")):
    study.runs(c)
