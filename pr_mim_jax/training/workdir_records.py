"""What a run leaves in its workdir besides checkpoints: the resolved config and provenance."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
from etils import epath
from jax.experimental import multihost_utils
import numpy as np

from pr_mim_jax import cli
from pr_mim_jax.errors import UserError

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy",
            "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "clu")


def git_commit() -> str | None:
  """The commit of the source tree this package runs from (with '-dirty' if modified)."""
  src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
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
  (path / "config.json").write_text(config.to_json(indent=2, sort_keys=True))
  provenance = {
      "git_commit": git_commit(),
      "packages": package_versions(),
      "python": sys.version.split()[0],
      "argv": sys.argv,
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
  }
  (path / "provenance.json").write_text(json.dumps(provenance, indent=2))
