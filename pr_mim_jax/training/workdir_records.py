"""What a run leaves in its workdir besides checkpoints: the resolved config and provenance."""

import importlib.metadata
import json
import logging
import os
import subprocess
import sys

import jax
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils
import numpy as np

from pr_mim_jax import cli
from pr_mim_jax.errors import UserError
from pr_mim_jax.errors import naming

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy",
            "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "clu")


def git_commit() -> str | None:
  """The commit of the source tree this package runs from (with '-dirty' if modified).

  None unless the package sits at the top of its own checkout: an installed copy inside
  another project's repository (say its .venv) must not record that project's commit.
  """
  src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package folder
  try:
    top, commit = subprocess.run(["git", "-C", src, "rev-parse", "--show-toplevel", "HEAD"],
                                 capture_output=True, text=True, check=True,
                                 timeout=10).stdout.split()
    if os.path.realpath(top) != os.path.realpath(os.path.dirname(src)):
      return None
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def package_versions() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def check_writable(workdir: str) -> None:
  """Creates the workdir and writes, then removes, a probe file in it on every process (each
  writes its own checkpoint shards), so that a workdir that cannot take checkpoints fails
  at once, in one line, before anything compiles. The processes agree on the verdict, so
  that none waits at a collective for one that stopped here."""
  path = epath.Path(workdir)
  probe = path / f".write_probe.{jax.process_index()}"
  cause = None
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # OSError, or a remote store's own
    text = (str(e).strip().splitlines() or [""])[0][:200]
    cause = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {text}"
  failed = [cause is not None]
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.asarray(failed)).ravel().tolist()
  if any(failed):
    cli.check_not_a_file(path, "workdir")
    where = (f"({cause})" if cause is not None else "from process(es) "
             f"{', '.join(str(i) for i, f in enumerate(failed) if f)}")
    raise UserError(f"--workdir {workdir} is not writable {where}. No checkpoint was touched: "
                    "make it writable, or point --workdir elsewhere; rerunning then resumes "
                    "from its newest checkpoint, if it has one.")


def write_records(workdir: str, config) -> None:
  """config.json (resolved config) and provenance.json; process 0 only."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  write_whole(path / "config.json", config.to_json(indent=2, sort_keys=True))
  provenance = {
      "git_commit": git_commit(),
      "packages": package_versions(),
      "python": sys.version.split()[0],
      "argv": sys.argv,
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
  }
  write_whole(path / "provenance.json", json.dumps(provenance, indent=2))


def write_whole(path: epath.Path, text: str) -> None:
  """Writes `text` aside and renames it over `path`: a kill leaves the old file or the new one,
  never a torn one (config.json decides what a resume accepts)."""
  tmp = path.parent / (path.name + ".tmp")
  try:
    with naming(path):
      tmp.write_text(text)
  except OSError:  # e.g. a full disk: leave no half-written copy behind either
    if tmp.exists():
      tmp.unlink()
    raise
  tmp.replace(path)


def _fixed(key: str, fixed) -> bool:
  return any(key == f or key.startswith(f + ".") for f in fixed)


def config_changes(recorded: dict, config: dict) -> list[tuple[str, object, object]]:
  """(field, recorded value, new value) of every field both configs have and differ in."""
  old = traverse_util.flatten_dict(recorded, sep=".")  # {'optim.base_lr': ..., ...}
  new = traverse_util.flatten_dict(config, sep=".")
  return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def _moved_folder(key: str, old, new) -> bool:
  """A folder dataset read from another path: the same images, moved (allowed)."""
  return (key == "data.dataset" and isinstance(old, str) and isinstance(new, str)
          and old.startswith("folder:") and new.startswith("folder:"))


def check_run_kind(workdir: str, config) -> None:
  """A UserError when `workdir` holds another kind of run (its config.json's mode), before
  this run appends to its log or resumes: e.g. a probe given its init run as --workdir."""
  path = epath.Path(workdir) / "config.json"
  try:
    recorded = json.loads(path.read_text()) if path.exists() else {}
  except ValueError:
    return  # check_resume_config names it
  if not isinstance(recorded, dict):
    return
  old, new = recorded.get("mode", "pretrain"), config.get("mode", "pretrain")
  if recorded and old != new:
    start = ", and init= at the run to start from" if new in ("linear_probe", "finetune") else ""
    raise UserError(f"config.mode: --workdir {workdir} holds a {old!r} run (its config.json), "
                    f"and this is a {new!r} run; point --workdir at a new folder{start}")


def check_resume_config(workdir: str, config, step: int, fixed: tuple[str, ...]) -> None:
  """Compares `config` with the config.json of the run about to resume from `step`.

  `fixed`: the fields (or groups, e.g. 'masking') that shaped what the finished steps
  trained on. A resumed run that changed one would silently stop continuing the steps in
  its checkpoints, and config.json would misdescribe them: a UserError naming the field
  and both values. Any other change (learning rate, epochs, logging, memory knobs, mesh)
  is allowed and named in one warning, since config.json will then hold the new values.
  Step 0 (a converted workdir) has trained nothing, so any config may start from it.
  """
  path = epath.Path(workdir) / "config.json"
  if step <= 0 or not path.exists():
    return
  try:
    recorded = json.loads(path.read_text())
  except ValueError:
    recorded = None
  if not isinstance(recorded, dict):
    logging.warning("%s holds no JSON object; resuming without comparing the config", path)
    return
  changes = config_changes(recorded, json.loads(config.to_json()))
  refused = [c for c in changes if _fixed(c[0], fixed) and not _moved_folder(*c)]
  if refused:
    key, old, new = refused[0]
    also = ", ".join(f"config.{k} {o!r} -> {n!r}" for k, o, n in refused[1:])
    hint = (" (to fit fewer devices, keep it and raise train.grad_accum_steps)"
            if key == "batch_size" and "grad_accum_steps" in recorded.get("train", {})
            else "")
    raise UserError(
        f"config.{key}: {old!r} in {path}, {new!r} now{f' (also {also})' if also else ''}; "
        f"the checkpoints (step {step}) were trained with the recorded value, and a resumed "
        f"run keeps what shaped its steps ({', '.join(fixed)}). Pass --config.{key}={old}"
        f"{hint}, or point --workdir elsewhere for a new run")
  if changes:
    logging.warning("Resuming from step %d with a changed config (steps 1-%d used the old "
                    "values; config.json will hold the new ones): %s", step, step,
                    ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changes))


def drop_metrics_after(workdir: str, step: int) -> None:
  """Removes the rows of metrics.jsonl past `step`, the step this run resumes from (process 0).

  They were logged by an earlier run after its last checkpoint, for states that were lost
  (a kill or crash before the next save, or a fallback past a damaged checkpoint); the
  resumed run logs those steps again, and both copies would read as one zig-zag curve.
  A torn last line goes too, or the next row would be appended onto it."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get("step", 0) <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return
  write_whole(path, "".join(line + "\n" for line in kept))
  logging.warning("metrics.jsonl: dropped %d rows logged past step %d, the step this run "
                  "resumes from (their states were never saved); those steps are logged "
                  "again", len(lines) - len(kept), step)
