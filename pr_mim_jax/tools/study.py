r"""The paper's comparison at small scale: MAE vs partial reconstruction vs PR-MIM.

  python -m pr_mim_jax.tools.study --config=pr_mim_jax/configs/study.py:setting=cpu --workdir=workdirs/study_cpu

For every seed and method: pre-train on the embedded shapes dataset (same epochs, batch,
model), then score the encoder by k-NN, a linear probe and a short fine-tune, and measure
the reconstruction loss on ALL masked tokens of fixed test masks (partial reconstruction:
its decoder with every masked token as a query; MAE and PR-MIM: their own paths). Writes
study.md (table), study.png (plot) and results.jsonl to the workdir. Each finished stage
is recorded, so a rerun skips it and an interrupted study resumes. The workdir keeps the
settings it ran with (study_config.json): a rerun may add seeds or methods, and any other
changed setting is refused, since the recorded stages would be reported under it.
"""

import collections
import json
import logging
import sys
import time
import types

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from etils import epath
from flax import traverse_util

from pr_mim_jax import cli
from pr_mim_jax import log_filters
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.configs import pretrain as pretrain_defaults
from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify
from pr_mim_jax.method import flops
from pr_mim_jax.method import masking
from pr_mim_jax.method.methods import METHODS
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step as train_step_lib
from pr_mim_jax.training import trainer
from pr_mim_jax.training import workdir_records

ACCURACIES = (("knn_top1", "k-NN"), ("probe_top1", "linear probe"), ("finetune_top1", "fine-tune"))
STUDY_RECORD = "study_config.json"  # the settings a workdir's recorded stages were run with
ADDS_RUNS = ("seeds", "methods", "pr_mim_throw_ratios")  # a rerun may change these: new runs only
STAGES = ("pretrain", "reconstruction", "linear_probe", "finetune")  # per method and seed


def _define_flags() -> types.SimpleNamespace:
  return types.SimpleNamespace(
      config=cli.define_config_file("config", None, "pr_mim_jax/configs/study.py[:setting=...]",
                                    lock_config=True),
      workdir=flags.DEFINE_string("workdir", None, "Where runs, results and the table go."))


def _ints(text: str, field: str) -> list[int]:
  try:
    return [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise UserError(f"config.{field}: {text!r} is not a comma-separated list of integers") from None


def seeds(study) -> list[int]:
  """config.seeds as distinct integers >= 0; a UserError for none (nothing would run, and
  no table be written), a negative one (found only when its pre-training starts, after the
  seeds before it trained) or a repeated one (its runs would count twice in the spread)."""
  out = _ints(study.seeds, "seeds")
  if not out:
    raise UserError(f"config.seeds: {study.seeds!r} names no seed; use e.g. '0' or '0,1,2'")
  negative = [s for s in out if s < 0]
  if negative:
    raise UserError(f"config.seeds: {study.seeds!r} has negative seeds {negative}; use seeds >= 0")
  repeated = sorted({s for s in out if out.count(s) > 1})
  if repeated:
    raise UserError(f"config.seeds: {study.seeds!r} repeats {repeated}; name each seed once")
  return out


def runs(study) -> list[tuple[str, str, float]]:
  """(label, method, throw_ratio) of every pre-training setting."""
  out = []
  for m in [m.strip() for m in study.methods.split(",") if m.strip()]:
    if m not in METHODS:
      raise UserError(f"config.methods: unknown method {m!r}; use some of {sorted(METHODS)}")
    out.append((m, m, METHODS[m][0]))
  for text in [t.strip() for t in study.pr_mim_throw_ratios.split(",") if t.strip()]:
    try:
      throw = float(text)
    except ValueError:
      raise UserError(f"config.pr_mim_throw_ratios: {text!r} is not a number") from None
    out.append((f"pr_mim@{throw:g}", "pr_mim", throw))
  if not out:
    raise UserError("config.methods: no method to run; use e.g. 'mae,partial,pr_mim'")
  labels = [label for label, _, _ in out]
  repeated = sorted({l for l in labels if labels.count(l) > 1})
  if repeated:  # one label's runs would count twice, as if they were two seeds
    raise UserError(f"config.methods / config.pr_mim_throw_ratios: {repeated} named twice; "
                    "name each run once")
  return out


def _data(config, study):
  config.data.backend = study.backend
  config.data.shapes.update(study.shapes.to_dict())


def pretrain_config(study, method: str, throw: float, seed: int):
  c = pretrain_defaults.get_config(f"method={method},dataset=shapes")
  c.masking.throw_ratio = throw
  c.seed = seed
  c.batch_size = study.pretrain.batch_size
  for k in ("epochs", "warmup_epochs", "base_lr"):
    c.optim[k] = study.pretrain[k]
  c.model.update(study.model.to_dict())
  c.model.image_size = study.shapes.image_size
  _data(c, study)
  c.knn.train_examples, c.knn.test_examples = study.knn.train_examples, study.knn.test_examples
  c.train.image_every = c.train.checkpoint_every = 10 ** 9  # the last step is still saved
  return c


def eval_config(study, mode: str, init: str, seed: int):
  c = classify_config.get_config(mode, f"init={init},dataset=shapes")
  s = study[mode]
  c.seed = seed
  c.batch_size = s.batch_size
  for k in ("epochs", "warmup_epochs", "base_lr"):
    c.optim[k] = s[k]
  if mode == "finetune":
    c.optim.layer_decay, c.model.drop_path = s.layer_decay, s.drop_path
  _data(c, study)
  c.train.checkpoint_every = 10 ** 9
  c.train.eval_every = 10 ** 9  # evaluate once, at the end
  return c


def reconstruction_loss(config, workdir: str, num_examples: int, batch: int = 250) -> float:
  """Mean loss over every masked token of fixed test masks (same visible set for all methods)."""
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  mesh = sharding.mesh_from_config(config)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), max_to_keep=1 << 30)
  try:
    params, _ = ckpt.restore_subtree(("params",), sharding.replicated(mesh))
  finally:
    ckpt.close()
  images, _ = pipeline.labeled_arrays(config.data, config.data.eval_split,
                                      num_examples=num_examples, image_size=model.image_size)

  @jax.jit
  def batch_loss(params, images, rng):
    m = masking.make_masks(rng, images.shape[0], task.split, task.throw_strategy, task.grid,
                           task.num_stages)
    loss, _ = train_step_lib.loss_fn(params, model, images, m, task, every_masked_token=True)
    return loss * images.shape[0]

  total = 0.0
  for i, start in enumerate(range(0, len(images), batch)):
    chunk = images[start:start + batch]
    total += float(batch_loss(params, chunk, jax.random.PRNGKey(1000 + i)))
  return total / len(images)


def check_same_study(study, workdir: epath.Path) -> None:
  """Record the study's settings in a new workdir; refuse a rerun with other settings.

  Finished stages are keyed by method and seed only, so a rerun with, say, more epochs
  would report the old stages' numbers as the new settings'. Seeds and methods may change:
  they only add runs.
  """
  flat = traverse_util.flatten_dict(study.to_dict(), sep=".")  # {'pretrain.epochs': 8, ...}
  current = json.loads(json.dumps({k: v for k, v in flat.items()  # tuples as JSON reads them
                                   if k.split(".")[0] not in ADDS_RUNS}))
  path = workdir / STUDY_RECORD
  if not path.exists():
    workdir_records.write_whole(path, json.dumps(current, indent=1, sort_keys=True) + "\n")
    return
  recorded = _read_json(path.read_text(), str(path), "restore it, or start over in a new "
                        "--workdir (it decides which finished stages a rerun may reuse)")
  changed = [f"{k}: {recorded.get(k)!r} there, {current.get(k)!r} now"
             for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
  if changed:
    raise UserError(f"--workdir: {workdir} holds a study run with other settings "
                    f"({'; '.join(changed)}); its finished stages would be reported as this "
                    "one's. Use another --workdir, or the settings recorded in "
                    f"{path}")


def _read_json(text: str, what: str, fix: str):
  """json.loads, or a UserError naming the study record that is damaged and how to go on."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{what} is not JSON ({e.msg}); {fix}") from None


def _record(path: epath.Path, key: str, values: dict) -> None:
  """Adds one record to results.jsonl, rewriting it whole (write_whole), so that a kill
  leaves the old records or the new ones and never a torn line."""
  lines = [json.dumps(r) for r in _records(path)] + [json.dumps({"key": key, **values})]
  workdir_records.write_whole(path, "".join(line + "\n" for line in lines))


def _records(path: epath.Path) -> list[dict]:
  if not path.exists():
    return []
  return [_read_json(line, f"{path}, line {i},", "delete that line and rerun: its stage runs "
                     "again") for i, line in enumerate(path.read_text().splitlines(), 1)
          if line.strip()]


def _done(path: epath.Path) -> dict:
  """key -> record of every finished stage (the legs a signal stopped are not finished)."""
  return {r["key"]: r for r in _records(path) if not r.get("stopped")}


def _stopped_seconds(path: epath.Path) -> dict:
  """key -> seconds spent in the legs of a stage that a signal stopped, so that a resumed
  stage reports its whole time, not only its last leg's."""
  out = collections.defaultdict(float)
  for r in _records(path):
    if r.get("stopped"):
      out[r["key"]] += r["seconds"]
  return out


class Stopped(Exception):
  """A stage was stopped by a signal (its checkpoint is saved); the study ends there."""


class Diverged(Exception):
  """A stage's loss became NaN or inf (trainer.NonFiniteLossError); the study ends there."""


# Which study field holds each stage's peak lr, for the advice after a diverged stage.
LR_FIELDS = {"pretrain": "config.pretrain.base_lr", "linear_probe": "config.linear_probe.base_lr",
             "finetune": "config.finetune.base_lr"}


def finished(summary: dict, *keys) -> dict:
  """The values to record of a finished stage; Stopped if a signal cut it short."""
  if summary.get("stopped"):
    raise Stopped()
  return {k: summary[k] for k in keys}


def gflop_per_img(config) -> float:
  """Analytic fwd+bwd GFLOP per image of one pre-training step (method/flops.py)."""
  model = train_step_lib.model_from_config(config)
  task = train_step_lib.task_from_config(config)
  return flops.step_flops(model, task.split, task.reconstruct_thrown).total


def run_all(study, workdir: epath.Path) -> list[dict]:
  """Every (seed, setting) through pre-training and the three evaluations; resumable."""
  log = workdir / "results.jsonl"
  rows = []
  count = len(seeds(study)) * len(runs(study)) * len(STAGES)
  index = iter(range(1, count + 1))
  t_start = time.perf_counter()
  for seed in seeds(study):
    for label, method, throw in runs(study):
      base = workdir / f"{label}_seed{seed}"
      cfg = pretrain_config(study, method, throw, seed)
      done, before = _done(log), _stopped_seconds(log)
      row = {"label": label, "method": method, "throw_ratio": throw, "seed": seed,
             "gflop_per_img": gflop_per_img(cfg)}

      def stage(name, fn):
        key = f"{label}/{seed}/{name}"
        i = next(index)
        if key not in done:
          t0 = time.perf_counter()
          logging.info("study: stage %d of %d, %s (%.0f s into this run)", i, count, key,
                       t0 - t_start)  # the trainers' ETAs cover their own stage only
          try:
            values = fn()
          except Stopped:
            _record(log, key, {"stopped": True, "seconds": time.perf_counter() - t0})
            raise
          except trainer.NonFiniteLossError as e:
            raise Diverged(f"study stage {key}: loss is {e.loss} at step {e.step}, not saved; "
                           f"lower {LR_FIELDS[name]} and start over in a new --workdir (this "
                           "one keeps its settings)") from None
          values["seconds"] = time.perf_counter() - t0 + before[key]
          _record(log, key, values)
          done[key] = values
        return done[key]

      pre = stage("pretrain", lambda: finished(pretrain.train(cfg, str(base / "pretrain")),
                                               "loss", "knn_top1", "knn_top1_random_init"))
      rec = stage("reconstruction", lambda: {"recon_loss": reconstruction_loss(
          cfg, str(base / "pretrain"), study.reconstruction_examples)})
      probe = stage("linear_probe", lambda: finished(classify.train(
          eval_config(study, "linear_probe", str(base / "pretrain"), seed),
          str(base / "linear_probe")), "eval_top1"))
      ft = stage("finetune", lambda: finished(classify.train(
          eval_config(study, "finetune", str(base / "pretrain"), seed),
          str(base / "finetune")), "eval_top1"))
      row.update(knn_top1=pre["knn_top1"], knn_top1_random_init=pre["knn_top1_random_init"],
                 pretrain_loss=pre["loss"], recon_loss=rec["recon_loss"], probe_top1=probe["eval_top1"],
                 finetune_top1=ft["eval_top1"], pretrain_seconds=pre["seconds"],
                 total_seconds=sum(s["seconds"] for s in (pre, rec, probe, ft)))
      rows.append(row)
      write_outputs(study, workdir, rows)
  return rows


def _mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(rows: list[dict]) -> dict:
  """label -> metric -> (mean, std over seeds)."""
  by = collections.defaultdict(list)
  for r in rows:
    by[r["label"]].append(r)
  metrics = ("knn_top1", "probe_top1", "finetune_top1", "recon_loss", "gflop_per_img",
             "pretrain_seconds", "total_seconds", "knn_top1_random_init")
  return {label: {m: _mean_std([r[m] for r in rs]) for m in metrics} | {"seeds": len(rs)}
          for label, rs in by.items()}


def spread_verdicts(summary: dict) -> list[str]:
  """Per accuracy and the reconstruction loss: does the gap between the methods exceed the
  seed-to-seed spread (twice the mean std over seeds)?"""
  lines = []
  for key, name, scale, unit in [(k, n, 100, " points") for k, n in ACCURACIES] + [
      ("recon_loss", "reconstruction loss", 1, "")]:
    means = {k: v[key][0] for k, v in summary.items()}
    gap = scale * (max(means.values()) - min(means.values()))
    best = (min if key == "recon_loss" else max)(means, key=means.get)
    text = f"- {name}: best {best}, gap {gap:.{1 if scale == 100 else 4}f}{unit}"
    if min(v["seeds"] for v in summary.values()) < 2:
      lines.append(f"{text}; one seed only, so the seed-to-seed spread is unmeasured.")
    else:
      spread = scale * float(np.mean([v[key][1] for v in summary.values()]))
      verdict = "exceeds" if gap > 2 * spread else "does not exceed"
      lines.append(f"{text} {verdict} twice the mean seed std "
                   f"({spread:.{1 if scale == 100 else 4}f}{unit}).")
  return lines


def write_outputs(study, workdir: epath.Path, rows: list[dict]) -> None:
  summary = summarize(rows)
  pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
  lines = [f"Setting `{study.setting}`, {jax.devices()[0].device_kind}, seeds {study.seeds}; "
           "mean ± std over seeds (std 0 with one seed).", "",
           "| method | k-NN top-1 % | linear probe top-1 % | fine-tune top-1 % | recon loss "
           "(all masked) | GFLOP/img (pre-train fwd+bwd) | pre-train s | total s |",
           "|---|---|---|---|---|---|---|---|"]
  for label, s in summary.items():
    lines.append(f"| {label} | {pct(s['knn_top1'])} | {pct(s['probe_top1'])} | "
                 f"{pct(s['finetune_top1'])} | {s['recon_loss'][0]:.4f} ± {s['recon_loss'][1]:.4f} | "
                 f"{s['gflop_per_img'][0]:.3g} | {s['pretrain_seconds'][0]:.0f} | "
                 f"{s['total_seconds'][0]:.0f} |")
  chance = 100.0 / 12
  knn_init = np.mean([r["knn_top1_random_init"] for r in rows])
  lines += ["", f"Chance is {chance:.1f}%; k-NN of the randomly initialised encoder: "
            f"{100 * knn_init:.1f}%.", ""] + spread_verdicts(summary)
  (workdir / "study.md").write_text("\n".join(lines) + "\n")
  plot(summary, workdir / "study.png", study.setting)


def plot(summary: dict, path: epath.Path, setting: str = ""):
  """The table as bars with a title (setting, seeds); returns the (closed) figure."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = list(summary)
  x = np.arange(len(labels))
  fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), dpi=110)
  width = 0.8 / len(ACCURACIES)
  for i, (key, name) in enumerate(ACCURACIES):
    axes[0].bar(x + (i - 1) * width, [100 * summary[l][key][0] for l in labels], width,
                yerr=[100 * summary[l][key][1] for l in labels], capsize=3, label=name)
  axes[0].axhline(100 / 12, color="grey", linestyle="--", linewidth=1, label="chance")
  axes[0].set_ylabel("top-1 %")
  axes[0].legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))  # above
  panels = (("recon_loss", "recon loss, all masked tokens"), ("gflop_per_img", "GFLOP / image"),
            ("total_seconds", "wall time (s)"))
  for ax, (key, name) in zip(axes[1:], panels):
    ax.bar(x, [summary[l][key][0] for l in labels], yerr=[summary[l][key][1] for l in labels],
           capsize=3, color="tab:gray")
    ax.set_ylabel(name)
  for ax in axes:
    ax.set_xticks(x, labels, rotation=20, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
  counts = sorted({v["seeds"] for v in summary.values()})  # seeds per method
  fig.suptitle(f"MAE vs partial reconstruction vs PR-MIM on shapes"
               f"{f', setting {setting}' if setting else ''}: mean ± std over "
               f"{'/'.join(map(str, counts))} seed(s) per method", fontsize=10)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return fig


def check_eval_configs(study) -> None:
  """The linear probe's and the fine-tune's settings, checked as random-init runs of the
  study's encoder (the pre-trained one does not exist yet), so that a bad value stops the
  study before it trains rather than after the first pre-training."""
  for mode in ("linear_probe", "finetune"):
    c = eval_config(study, mode, "", 0)
    c.model.update({k: v for k, v in study.model.to_dict().items() if k in c.model})
    c.model.image_size = study.shapes.image_size
    try:
      classify.check_config(c)
    except UserError as e:  # it names the run's field (config.batch_size), not the study's
      raise UserError(f"the {mode} run (config.{mode}): {e}") from None


def check_study(study) -> None:
  """Every setting of the study, checked before anything trains or is written."""
  seeds(study)
  for label, method, throw in runs(study):
    try:
      pretrain.check_config(pretrain_config(study, method, throw, 0))
    except UserError as e:  # it names the run's field (config.optim.epochs), not the study's
      raise UserError(f"the {label} pre-training run (config.pretrain, config.model, "
                      f"config.shapes): {e}") from None
  check_eval_configs(study)
  if study.reconstruction_examples < 1:
    raise UserError(f"config.reconstruction_examples: got {study.reconstruction_examples}; "
                    "use an integer > 0 (test images for the loss over all masked tokens)")


def _run(f: types.SimpleNamespace) -> int:
  study = f.config.value
  check_study(study)
  workdir = cli.output_dir(f.workdir.value, "workdir")
  check_same_study(study, workdir)
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(lambda r: not log_filters.is_narration(r))
  try:
    run_all(study, workdir)
  except Stopped:
    logging.warning("study stopped by a signal; rerun the same command to resume")
    return 0
  except Diverged as e:
    cli.print_error(str(e))
    return 1
  print((workdir / "study.md").read_text())
  return 0


def main(argv=None) -> int:
  f = _define_flags()
  return cli.run(lambda: _run(f), {"config": "pr_mim_jax/configs/study.py:setting=cpu",
                                   "workdir": "workdirs/study_cpu"}, argv,
                 config_kinds=("study",),
                 interrupted="the finished stages and saved checkpoints are kept; rerun the "
                             "same command to resume")


if __name__ == "__main__":
  sys.exit(main())
