"""The small-scale study: every method through pre-training and three evaluations, resumable."""

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import ROOT, without_tensorflow
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
  """The study CLI, without TensorFlow, tfds or clu (as on the GPU machines it is sized for)."""
  flags = [f"--config.{k}={v}" for k, v in dict(TINY, **extra).items()]
  return subprocess.run(
      [sys.executable, "-m", "pr_mim_jax.tools.study",
       "--config=pr_mim_jax/configs/study.py:setting=cpu", f"--workdir={workdir}", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=without_tensorflow(pathlib.Path(workdir).parent / "without_tensorflow"))


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
    # A negative seed stopped the study only when its pre-training began, after every
    # earlier seed had trained, and left its run folder behind.
    ("0,-3", "config.seeds: '0,-3' has negative seeds [-3]; use seeds >= 0"),
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


def test_the_table_gives_three_significant_digits_of_a_small_models_gflop(tmp_path):
  # A tiny model's 0.012345 GFLOP/img was stored rounded to 0.012 (3 decimals), 3% off, and
  # the methods' ratio in the table with it.
  from etils import epath  # pylint: disable=g-import-not-at-top
  rows = [{"label": label, "seed": seed, "knn_top1": 0.1, "probe_top1": 0.1,
           "finetune_top1": 0.1, "recon_loss": 0.4, "gflop_per_img": gflop,
           "pretrain_seconds": 9.0, "total_seconds": 20.0, "knn_top1_random_init": 0.09}
          for label, gflop in (("mae", 0.012345), ("pr_mim", 0.0104)) for seed in (0, 1)]
  study.write_outputs(ml_collections.ConfigDict(dict(setting="cpu", seeds="0,1")),
                      epath.Path(tmp_path), rows)
  table = (tmp_path / "study.md").read_text()
  assert "| 0.4000 ± 0.0000 | 0.0123 | 9 | 20 |" in table
  assert "| 0.4000 ± 0.0000 | 0.0104 | 9 | 20 |" in table


def test_the_legend_covers_no_accuracy_bar(tmp_path):
  """Bars of about one height, as the CPU study gave: the legend box overlaps none of them."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  def method(*accuracies):
    return dict(zip(("knn_top1", "probe_top1", "finetune_top1"), accuracies),
                recon_loss=(0.4, 0.01), gflop_per_img=(0.1, 0.0), pretrain_seconds=(9.0, 1.0),
                total_seconds=(20.0, 2.0), seeds=3)
  summary = {"mae": method((0.094, 0.01), (0.096, 0.004), (0.097, 0.007)),  # the CPU study's
             "partial": method((0.102, 0.008), (0.096, 0.004), (0.091, 0.008)),
             "pr_mim": method((0.094, 0.007), (0.104, 0.007), (0.091, 0.007))}
  fig = study.plot(summary, epath.Path(tmp_path) / "s.png", "cpu")
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  renderer = backend_agg.FigureCanvasAgg(fig).get_renderer()  # plot() closed its own canvas
  legend = fig.axes[0].get_legend().get_window_extent(renderer)
  bars = [p.get_window_extent(renderer) for p in fig.axes[0].patches]
  assert len(bars) == 9
  assert not [b for b in bars if b.overlaps(legend)]


@pytest.mark.parametrize("methods,ratios,repeated", [
    ("mae,partial,mae", "", "['mae']"),
    ("pr_mim", "0.25,0.250", "['pr_mim@0.25']"),
])
def test_a_run_named_twice_is_refused(methods, ratios, repeated):
  # Its rows counted twice in the summary: one seed then read as two, with zero spread.
  c = ml_collections.ConfigDict(dict(methods=methods, pr_mim_throw_ratios=ratios))
  with pytest.raises(study.UserError, match=re.escape(f"{repeated} named twice")):
    study.runs(c)


@pytest.mark.parametrize("field,value,message", [
    ("reconstruction_examples", 0, "config.reconstruction_examples: got 0; use an integer > 0"),
    ("linear_probe.batch_size", 0, "the linear_probe run (config.linear_probe): config.batch_size: "
     "got 0"),
    ("finetune.epochs", -1.0, "the finetune run (config.finetune): config.optim.epochs: got -1.0"),
    ("pretrain.epochs", 0.0, "the mae pre-training run (config.pretrain, config.model, "
     "config.shapes): config.optim.epochs: got 0.0"),
])
def test_every_setting_is_checked_before_anything_trains(field, value, message):
  # The evaluations' settings and the reconstruction size were first read after the first
  # method's pre-training, so a typo there cost a whole pre-training before its error.
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  c = study_config.get_config("setting=cpu")
  study.check_study(c)  # the shipped settings pass
  group, _, name = field.rpartition(".")
  (c[group] if group else c)[name] = value
  with pytest.raises(study.UserError, match=re.escape(message)):
    study.check_study(c)


class _Clock:
  """A perf_counter that the fake stages move forward."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _fake_stages(monkeypatch, clock, pretrain_fn):
  monkeypatch.setattr(study.time, "perf_counter", clock)
  monkeypatch.setattr(study, "gflop_per_img", lambda cfg: 0.012345)
  monkeypatch.setattr(study, "write_outputs", lambda *a: None)
  monkeypatch.setattr(study.pretrain, "train", pretrain_fn)
  monkeypatch.setattr(study, "reconstruction_loss", lambda *a: 0.5)

  def evaluate(config, workdir):
    clock.now += 5.0
    return {"eval_top1": 0.25}

  monkeypatch.setattr(study.classify, "train", evaluate)


def _one_run_study():
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  c = study_config.get_config("setting=cpu")
  c.methods = "mae"
  return c


def test_a_resumed_stage_reports_the_time_of_every_leg(tmp_path, monkeypatch):
  # A stage stopped by a signal and resumed reported only its last leg's seconds, so the
  # table's wall times understated whichever method had been interrupted.
  from etils import epath  # pylint: disable=g-import-not-at-top
  clock, legs = _Clock(), iter([(30.0, True), (70.0, False)])

  def pretrain_train(config, workdir):
    seconds, stopped = next(legs)
    clock.now += seconds
    return {"stopped": stopped, "loss": 0.3, "knn_top1": 0.1, "knn_top1_random_init": 0.05}

  _fake_stages(monkeypatch, clock, pretrain_train)
  workdir = epath.Path(tmp_path)
  with pytest.raises(study.Stopped):
    study.run_all(_one_run_study(), workdir)
  (row,) = study.run_all(_one_run_study(), workdir)
  assert row["pretrain_seconds"] == 30.0 + 70.0
  assert row["gflop_per_img"] == 0.012345  # kept whole; the table rounds
  assert row["total_seconds"] == 30.0 + 70.0 + 0.0 + 5.0 + 5.0  # recon, probe, fine-tune
  third = study.run_all(_one_run_study(), workdir)  # finished: read back, nothing runs
  assert third[0]["pretrain_seconds"] == 100.0


def test_the_log_counts_the_stages(tmp_path, monkeypatch, caplog):
  # The trainers' ETAs covered one stage each: nothing said how far the study had come.
  from etils import epath  # pylint: disable=g-import-not-at-top
  clock = _Clock()
  _fake_stages(monkeypatch, clock, lambda config, workdir: {
      "loss": 0.3, "knn_top1": 0.1, "knn_top1_random_init": 0.05})
  c = _one_run_study()
  c.seeds = "0,1"
  with caplog.at_level("INFO"):
    study.run_all(c, epath.Path(tmp_path))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study: stage")]
  assert len(lines) == 2 * 4
  assert lines[0] == "study: stage 1 of 8, mae/0/pretrain (0 s into this run)"
  assert lines[-1] == "study: stage 8 of 8, mae/1/finetune (15 s into this run)"  # 3 x 5 s


def test_a_diverged_stage_is_one_error_line_naming_the_study_field(tmp_path, monkeypatch):
  # A NaN loss was a raw NonFiniteLossError traceback, whose advice named the run's
  # config.optim.base_lr rather than the study's field.
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import trainer  # pylint: disable=g-import-not-at-top

  def pretrain_train(config, workdir):
    raise trainer.NonFiniteLossError("loss is nan at step 3: ... lower config.optim.base_lr, "
                                     "... then rerun to resume", loss=float("nan"), step=3)

  _fake_stages(monkeypatch, _Clock(), pretrain_train)
  with pytest.raises(study.Diverged, match=re.escape(
      "study stage mae/0/pretrain: loss is nan at step 3, not saved; lower "
      "config.pretrain.base_lr and start over in a new --workdir (this one keeps its "
      "settings)")) as err:
    study.run_all(_one_run_study(), epath.Path(tmp_path))
  assert "optim" not in str(err.value) and "resume" not in str(err.value)  # not the run's advice
  assert not (tmp_path / "results.jsonl").exists()  # nothing recorded as finished


@pytest.mark.parametrize("raised, code, last_line", [
    # Outside the trainer's stop handler (compiling, evaluating) Ctrl-C printed only
    # "interrupted (Ctrl-C)", without saying that the study resumes.
    ("KeyboardInterrupt", 130, "error: interrupted (Ctrl-C); the finished stages and saved "
     "checkpoints are kept; rerun the same command to resume"),
    ("study.Stopped()", 0, None),
    # A diverged stage ends the study with its one line and exit code 1, nothing printed after.
    ("study.Diverged('the mae pre-training run diverged at step 3')", 1,
     "error: the mae pre-training run diverged at step 3"),
])
def test_a_stop_before_or_during_training_says_how_to_go_on(tmp_path, raised, code, last_line):
  program = ("import sys\n"
             "from pr_mim_jax.tools import study\n"
             "def stop(*_):\n"
             f"  raise {raised}\n"
             "study.run_all = stop\n"
             f"sys.exit(study.main(['study', '--config=pr_mim_jax/configs/study.py', "
             f"'--workdir={tmp_path}/w']))\n")
  proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == code, proc.stderr[-2000:]
  if last_line:
    assert proc.stderr.strip().splitlines()[-1] == last_line
  else:
    assert "study stopped by a signal; rerun the same command to resume" in proc.stderr


def test_the_gpu_setting_sizes_are_the_documented_ones():
  """docs/evaluation.md, "The GPU setting": k-NN on 5,000 / 1,000 images and the
  reconstruction loss on 1,000 test images (500 in cpu)."""
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  gpu, cpu = study_config.get_config("setting=gpu"), study_config.get_config("setting=cpu")
  assert (gpu.knn.train_examples, gpu.knn.test_examples) == (5000, 1000)
  assert (gpu.reconstruction_examples, cpu.reconstruction_examples) == (1000, 500)
  text = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
  assert ("k-NN uses 5,000 / 1,000 images, and its reconstruction loss "
          "(`reconstruction_examples`) is the mean over all masked tokens of the first 1,000 "
          "test images, against 500 in `cpu`") in text


def test_a_record_cut_by_a_full_disk_leaves_the_earlier_records_whole(tmp_path, monkeypatch):
  from etils import epath  # pylint: disable=g-import-not-at-top
  log = epath.Path(tmp_path) / "results.jsonl"
  record = study._record  # pylint: disable=protected-access
  record(log, "mae/0/pretrain", {"loss": 0.5, "seconds": 3.0})
  before = log.read_text()

  def torn_write(path, text, *args, **kwargs):
    with open(path, "w") as f:
      f.write(text[:len(text) // 2])
    raise OSError("No space left on device")

  monkeypatch.setattr(epath.Path, "write_text", torn_write)
  with pytest.raises(OSError, match="No space"):
    record(log, "mae/0/recon", {"recon_loss": 0.4})
  assert log.read_text() == before
  assert json.loads(before) == {"key": "mae/0/pretrain", "loss": 0.5, "seconds": 3.0}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no half copy left


def test_a_damaged_study_record_is_one_error_line_naming_it(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(tmp_path)
  (workdir / "results.jsonl").write_text('{"key": "mae/0/pretrain", "seconds": 3.0}\n'
                                         '{"key": "mae/0/reconstr\n')
  with pytest.raises(study.UserError, match=r"results.jsonl, line 2, is not JSON .*; delete "
                     r"that line and rerun: its stage runs again$"):
    study._done(workdir / "results.jsonl")  # pylint: disable=protected-access
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  config = study_config.get_config("setting=cpu")
  (workdir / study.STUDY_RECORD).write_text("")
  with pytest.raises(study.UserError, match=r"study_config.json is not JSON .*; restore it, or "
                     r"start over in a new --workdir"):
    study.check_same_study(config, workdir)


@pytest.mark.parametrize("text", ["-1", "2,-1,3"])
def test_seed_minus_one_is_refused_and_seed_zero_is_not(text):
  with pytest.raises(study.UserError, match=re.escape("has negative seeds [-1]")):
    study.seeds(ml_collections.ConfigDict({"seeds": text}))
  assert study.seeds(ml_collections.ConfigDict({"seeds": "0"})) == [0]


def test_blank_lines_in_the_results_are_skipped(tmp_path):
  """A line deleted by hand (as the damaged-line advice says) can leave an empty one."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  log = epath.Path(tmp_path) / "results.jsonl"
  log.write_text('{"key": "mae/0/pretrain", "seconds": 3.0}\n\n  \n'
                 '{"key": "mae/0/reconstruction", "seconds": 1.0}\n')
  done = study._done(log)  # pylint: disable=protected-access
  assert sorted(done) == ["mae/0/pretrain", "mae/0/reconstruction"]


def test_a_study_stopped_three_times_counts_every_leg_and_its_stage_numbers(tmp_path,
                                                                            monkeypatch,
                                                                            caplog):
  """Two runs, one seed (8 stages); the clock does not start at 0. mae's pre-training is
  stopped after 10 s and 20 s and then takes 40 s; partial's is stopped after 7 s and then
  takes 8 s. Each rerun counts the stages from the study's first, and its seconds from its
  own start."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  clock = _Clock()
  clock.now = 1000.0
  legs = {"mae": [(10.0, True), (20.0, True), (40.0, False)], "partial": [(7.0, True),
                                                                          (8.0, False)]}

  def pretrain_train(config, workdir):
    seconds, stopped = legs[os.path.basename(os.path.dirname(workdir)).split("_")[0]].pop(0)
    clock.now += seconds
    return {"stopped": stopped, "loss": 0.3, "knn_top1": 0.1, "knn_top1_random_init": 0.05}

  _fake_stages(monkeypatch, clock, pretrain_train)
  c = _one_run_study()
  c.methods = "mae,partial"
  workdir = epath.Path(tmp_path)
  for _ in range(3):
    with pytest.raises(study.Stopped):
      study.run_all(c, workdir)
  with caplog.at_level("INFO"):
    rows = study.run_all(c, workdir)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study: stage")]
  assert lines == ["study: stage 5 of 8, partial/0/pretrain (0 s into this run)",
                   "study: stage 6 of 8, partial/0/reconstruction (8 s into this run)",
                   "study: stage 7 of 8, partial/0/linear_probe (8 s into this run)",
                   "study: stage 8 of 8, partial/0/finetune (13 s into this run)"]
  records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  assert [r["seconds"] for r in records if r.get("stopped")] == [10.0, 20.0, 7.0]
  assert [(r["label"], r["pretrain_seconds"], r["total_seconds"]) for r in rows] == [
      ("mae", 70.0, 80.0), ("partial", 15.0, 25.0)]


@pytest.mark.parametrize("mode", ["linear_probe", "finetune"])
def test_a_diverged_evaluation_names_its_own_lr_field(tmp_path, monkeypatch, mode):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import trainer  # pylint: disable=g-import-not-at-top
  _fake_stages(monkeypatch, _Clock(), lambda config, workdir: {
      "loss": 0.3, "knn_top1": 0.1, "knn_top1_random_init": 0.05})

  def evaluate(config, workdir):
    if config.mode == mode:
      raise trainer.NonFiniteLossError("loss is inf", loss=float("inf"), step=7)
    return {"eval_top1": 0.25}

  monkeypatch.setattr(study.classify, "train", evaluate)
  with pytest.raises(study.Diverged, match=re.escape(
      f"study stage mae/0/{mode}: loss is inf at step 7, not saved; lower "
      f"config.{mode}.base_lr and start over")):
    study.run_all(_one_run_study(), epath.Path(tmp_path))


# Made-up per-seed results: each metric has its own values, so a column, a method or a seed
# put in the wrong place changes what the tables and the verdicts say.
SEED_RESULTS = {  # label -> seed -> (knn, probe, finetune, recon, gflop, pre s, total s, knn init)
    "mae": {0: (0.20, 0.30, 0.40, 0.50, 0.012, 10.0, 40.0, 0.09),
            1: (0.22, 0.33, 0.47, 0.52, 0.012, 12.0, 44.0, 0.10),
            2: (0.30, 0.36, 0.41, 0.57, 0.012, 17.0, 49.0, 0.11)},
    "pr_mim": {0: (0.25, 0.35, 0.45, 0.60, 0.009, 7.0, 30.0, 0.08),
               1: (0.29, 0.31, 0.50, 0.61, 0.009, 9.0, 35.0, 0.12),
               2: (0.27, 0.39, 0.43, 0.66, 0.009, 8.0, 33.0, 0.09)},
    "pr_mim@0.25": {0: (0.10, 0.15, 0.20, 0.70, 0.010, 8.0, 31.0, 0.07),
                    1: (0.14, 0.19, 0.28, 0.74, 0.010, 9.0, 32.0, 0.08)},
}
METRICS = ("knn_top1", "probe_top1", "finetune_top1", "recon_loss", "gflop_per_img",
           "pretrain_seconds", "total_seconds", "knn_top1_random_init")


def _made_up_rows():
  return [{"label": label, "method": label.split("@")[0], "seed": seed,
           **dict(zip(METRICS, values))}
          for label, by_seed in SEED_RESULTS.items() for seed, values in by_seed.items()]


def test_the_summary_is_the_mean_and_the_sample_std_over_each_runs_seeds():
  summary = study.summarize(_made_up_rows())
  assert list(summary) == ["mae", "pr_mim", "pr_mim@0.25"]  # pr_mim@0.25 is not pr_mim
  for label, by_seed in SEED_RESULTS.items():
    assert summary[label]["seeds"] == len(by_seed)
    for i, metric in enumerate(METRICS):
      values = [v[i] for v in by_seed.values()]
      mean, std = summary[label][metric]
      assert mean == pytest.approx(statistics.mean(values), abs=1e-12), (label, metric)
      assert std == pytest.approx(statistics.stdev(values), abs=1e-12), (label, metric)


def test_one_seed_has_std_zero():
  rows = [r for r in _made_up_rows() if r["seed"] == 0]
  summary = study.summarize(rows)
  assert summary["mae"]["knn_top1"] == (0.20, 0.0) and summary["mae"]["seeds"] == 1


def _table_rows(text):
  """study.md's table as {method: {column header: cell}}."""
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return {cells[0]: dict(zip(header, cells)) for cells in
          ([c.strip() for c in l.strip("|").split("|")] for l in lines[1:])}


def test_the_table_reads_back_each_methods_mean_and_std(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  study.write_outputs(ml_collections.ConfigDict(dict(setting="cpu", seeds="0,1,2")),
                      epath.Path(tmp_path), _made_up_rows())
  text = (tmp_path / "study.md").read_text()
  table = _table_rows(text)
  assert list(table) == list(SEED_RESULTS)
  for label, by_seed in SEED_RESULTS.items():
    column = lambda i: [v[i] for v in by_seed.values()]  # noqa: E731
    pct = lambda i: (f"{100 * statistics.mean(column(i)):.1f} ± "  # noqa: E731
                     f"{100 * statistics.stdev(column(i)):.1f}")
    row = table[label]
    assert row["k-NN top-1 %"] == pct(0)
    assert row["linear probe top-1 %"] == pct(1)
    assert row["fine-tune top-1 %"] == pct(2)
    assert row["recon loss (all masked)"] == (f"{statistics.mean(column(3)):.4f} ± "
                                              f"{statistics.stdev(column(3)):.4f}")
    assert row["pre-train s"] == f"{statistics.mean(column(5)):.0f}"
    assert row["total s"] == f"{statistics.mean(column(6)):.0f}"
  assert table["mae"]["linear probe top-1 %"] == "33.0 ± 3.0"  # by hand: 0.30, 0.33, 0.36
  assert table["mae"]["pre-train s"] == "13" and table["mae"]["total s"] == "44"
  knn_init = statistics.mean(v[7] for s in SEED_RESULTS.values() for v in s.values())
  assert (f"Chance is 8.3%; k-NN of the randomly initialised encoder: {100 * knn_init:.1f}%."
          in text)


def _summary(**stats):
  """{label: (mean, std)} of every accuracy and the reconstruction loss -> a summary."""
  seeds = stats.pop("seeds", 3)
  return {label: {m: ms for m in ("knn_top1", "probe_top1", "finetune_top1", "recon_loss")}
          | {"seeds": seeds} for label, ms in stats.items()}


@pytest.mark.parametrize("a,b,verdict,gap,spread", [
    # gap 3 points against std 2 points: more than one std, less than two.
    ((0.50, 0.02), (0.47, 0.02), "does not exceed", "3.0", "2.0"),
    # std 1 and 5 points: the mean std is 3 (the larger one would be 5), and 8 > 2 x 3.
    ((0.50, 0.01), (0.42, 0.05), "exceeds", "8.0", "3.0"),
    # a gap of exactly twice the spread does not exceed it (numbers exact in binary).
    ((0.50, 0.125), (0.25, 0.125), "does not exceed", "25.0", "12.5"),
])
def test_a_verdict_compares_the_gap_with_twice_the_mean_std(a, b, verdict, gap, spread):
  line = study.spread_verdicts(_summary(a=a, b=b))[0]
  assert line == (f"- k-NN: best a, gap {gap} points {verdict} twice the mean seed std "
                  f"({spread} points).")


def test_a_verdict_uses_each_metrics_own_spread():
  summary = _summary(a=(0.50, 0.04), b=(0.40, 0.04))  # 10 > 2 x 4 points
  summary["a"]["probe_top1"], summary["b"]["probe_top1"] = (0.50, 0.06), (0.40, 0.06)
  summary["a"]["finetune_top1"], summary["b"]["finetune_top1"] = (0.3, 0.0), (0.9, 0.0)
  summary["a"]["recon_loss"], summary["b"]["recon_loss"] = (0.6, 0.01), (0.61, 0.01)
  knn, probe, finetune, recon = study.spread_verdicts(summary)
  assert "gap 10.0 points exceeds twice the mean seed std (4.0 points)" in knn
  assert "gap 10.0 points does not exceed twice the mean seed std (6.0 points)" in probe
  assert finetune.startswith("- fine-tune: best b, gap 60.0 points exceeds")
  assert recon == ("- reconstruction loss: best a, gap 0.0100 does not exceed twice the mean "
                   "seed std (0.0100).")


def test_a_method_with_one_seed_leaves_the_spread_unmeasured():
  summary = _summary(a=(0.50, 0.01), b=(0.40, 0.0))
  summary["b"]["seeds"] = 1  # e.g. a method added with one seed to a three-seed study
  lines = study.spread_verdicts(summary)
  assert lines[0] == ("- k-NN: best a, gap 10.0 points; one seed only, so the seed-to-seed "
                      "spread is unmeasured.")
  assert all(l.endswith("; one seed only, so the seed-to-seed spread is unmeasured.")
             for l in lines)


def test_the_plot_draws_each_methods_numbers(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  summary = study.summarize(_made_up_rows())
  fig = study.plot(summary, epath.Path(tmp_path) / "s.png", "cpu")
  labels = list(SEED_RESULTS)
  accuracy, recon, gflop, seconds = fig.axes
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert "mean ± std over 2/3 seed(s) per method" in title
  (chance,) = [l for l in accuracy.get_lines() if l.get_label() == "chance"]
  assert list(chance.get_ydata()) == pytest.approx([100 / 12] * 2)
  from matplotlib import container as mpl_container  # pylint: disable=g-import-not-at-top
  bars = [c for c in accuracy.containers if isinstance(c, mpl_container.BarContainer)]
  assert len(bars) == 3  # one per accuracy, in legend order
  for container, metric in zip(bars, ("knn_top1", "probe_top1", "finetune_top1")):
    assert [t.get_text() for t in accuracy.get_xticklabels()] == labels
    centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
    assert [labels[int(round(c))] for c in centres] == labels  # each bar over its method
    for patch, label in zip(container.patches, labels):
      assert patch.get_height() == pytest.approx(100 * summary[label][metric][0])
    segments = container.errorbar.lines[2][0].get_segments()  # one vertical bar per method
    for seg, label in zip(segments, labels):
      assert abs(seg[1][1] - seg[0][1]) == pytest.approx(2 * 100 * summary[label][metric][1])
  for ax, metric, name in ((recon, "recon_loss", "recon loss"), (gflop, "gflop_per_img", "GFLOP"),
                           (seconds, "total_seconds", "wall time")):
    assert name in ax.get_ylabel()
    assert [p.get_height() for p in ax.patches] == pytest.approx(
        [summary[l][metric][0] for l in labels])


def _recording_stages(monkeypatch, seen):
  """Fake stages whose results name the run (label via the workdir, seed via the config), so
  that a result filed under the wrong run, seed or column shows; each takes its own time."""
  clock = _Clock()
  monkeypatch.setattr(study.time, "perf_counter", clock)
  monkeypatch.setattr(study, "gflop_per_img", lambda cfg: 0.01)
  monkeypatch.setattr(study, "write_outputs", lambda *a: None)

  def run_of(workdir):  # .../pr_mim@0.25_seed3/pretrain -> pr_mim@0.25
    return os.path.basename(os.path.dirname(workdir)).rsplit("_seed", 1)[0]

  code = {"mae": 0.1, "pr_mim": 0.2, "pr_mim@0.25": 0.3}

  def pretrain_train(config, workdir):
    seen.append(("pretrain", run_of(workdir), config.seed, config.masking.throw_ratio,
                 config.optim.base_lr))
    base = code[run_of(workdir)] + config.seed / 100
    clock.now += 10.0
    return {"loss": base + 0.001, "knn_top1": base + 0.002, "knn_top1_random_init": base + 0.003}

  def evaluate(config, workdir):
    seen.append((config.mode, run_of(workdir), config.seed, config.optim.epochs,
                 config.optim.base_lr, config.optim.get("layer_decay"),
                 config.model.get("drop_path")))
    base = code[run_of(workdir)] + config.seed / 100
    clock.now += 5.0 if config.mode == "linear_probe" else 7.0
    return {"eval_top1": base + (0.004 if config.mode == "linear_probe" else 0.005)}

  def recon(config, workdir, num_examples):
    clock.now += 2.0
    return code[run_of(workdir)] + config.seed / 100 + 0.006

  monkeypatch.setattr(study.pretrain, "train", pretrain_train)
  monkeypatch.setattr(study.classify, "train", evaluate)
  monkeypatch.setattr(study, "reconstruction_loss", recon)


def test_each_row_holds_its_own_runs_results(tmp_path, monkeypatch):
  from etils import epath  # pylint: disable=g-import-not-at-top
  seen = []
  _recording_stages(monkeypatch, seen)
  c = _one_run_study()
  c.methods, c.pr_mim_throw_ratios, c.seeds = "mae,pr_mim", "0.25", "3,5"
  c.pretrain.base_lr, c.linear_probe.epochs, c.finetune.epochs = 2e-3, 3.0, 1.5
  c.finetune.layer_decay, c.finetune.drop_path = 0.65, 0.05
  rows = study.run_all(c, epath.Path(tmp_path))
  code = {"mae": 0.1, "pr_mim": 0.2, "pr_mim@0.25": 0.3}
  assert [(r["label"], r["method"], r["throw_ratio"], r["seed"]) for r in rows] == [
      (l, l.split("@")[0], t, s) for s in (3, 5)
      for l, t in (("mae", 0.0), ("pr_mim", 0.5), ("pr_mim@0.25", 0.25))]
  for r in rows:
    base = code[r["label"]] + r["seed"] / 100
    assert (r["pretrain_loss"], r["knn_top1"], r["knn_top1_random_init"], r["probe_top1"],
            r["finetune_top1"], r["recon_loss"]) == pytest.approx(
                (base + 0.001, base + 0.002, base + 0.003, base + 0.004, base + 0.005,
                 base + 0.006))
    assert (r["pretrain_seconds"], r["total_seconds"]) == (10.0, 10.0 + 2.0 + 5.0 + 7.0)
  assert [s for s in seen if s[0] == "pretrain"] == [
      ("pretrain", l, s, t, 2e-3) for s in (3, 5)
      for l, t in (("mae", 0.0), ("pr_mim", 0.5), ("pr_mim@0.25", 0.25))]
  for s in seen:
    if s[0] == "linear_probe":
      assert s[3:5] == (3.0, c.linear_probe.base_lr)
    elif s[0] == "finetune":
      assert s[3:] == (1.5, 1e-3, 0.65, 0.05)
  assert len(seen) == 2 * 3 * 3  # pre-training and two evaluations per run and seed


def test_the_reconstruction_loss_is_the_mean_over_images_with_every_masked_token(
    tmp_path, monkeypatch):
  """Chunks of 3, 3 and 1 images: the mean over images weighs the last chunk 1/7, not 1/3."""
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  images = np.arange(7, dtype=np.float32)[:, None, None, None] * np.ones((1, 16, 16, 3),
                                                                         np.float32)
  flags_seen = []

  def loss_fn(params, model, chunk, masks, task, every_masked_token=False):
    flags_seen.append(every_masked_token)
    return chunk.mean(), {}  # per-image loss = the image's index

  class Checkpointer:
    def __init__(self, *a, **k):
      pass

    def restore_subtree(self, *a):
      return {}, None

    def close(self):
      pass

  monkeypatch.setattr(study.checkpointing, "Checkpointer", Checkpointer)
  monkeypatch.setattr(study.pipeline, "labeled_arrays", lambda *a, **k: (images, None))
  monkeypatch.setattr(study.train_step_lib, "loss_fn", loss_fn)
  c = study_config.get_config("setting=cpu")
  c.shapes.image_size, c.model.variant = 16, "Ti/4"
  config = study.pretrain_config(c, "partial", 0.5, 0)
  loss = study.reconstruction_loss(config, str(tmp_path), 7, batch=3)
  assert loss == pytest.approx(statistics.mean(range(7)))  # 3.0; the chunks' mean is 11/3
  assert flags_seen and all(flags_seen)


@pytest.mark.parametrize("setting", ["cpu", "gpu"])
def test_every_run_reads_the_studys_shapes_from_memory(setting):
  """No TensorFlow needed (the module's promise): every run reads the in-memory source, at
  the study's image size and split sizes."""
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  c = study_config.get_config(f"setting={setting}")
  c.shapes.image_size, c.shapes.train_size = 32, 1000
  configs = [study.pretrain_config(c, "pr_mim", 0.5, 0),
             *(study.eval_config(c, mode, "w", 0) for mode in ("linear_probe", "finetune"))]
  for run in configs:
    assert run.data.backend == "numpy"
    assert (run.data.shapes.image_size, run.data.shapes.train_size) == (32, 1000)
  assert configs[0].model.image_size == 32
