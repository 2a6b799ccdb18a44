"""What a run leaves in its workdir besides checkpoints: the resolved config and provenance."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
from etils import epath

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
  """Creates the workdir and writes, then removes, a probe file in it (every process: each
  writes its own checkpoint shards), so that a workdir that cannot take checkpoints fails
  at once, in one line, before anything compiles or changes."""
  path = epath.Path(workdir)
  probe = path / f".write_probe.{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--workdir {workdir} is not writable ({e.strerror or e}). Nothing in it "
                    "was changed: make it writable, or point --workdir elsewhere; rerunning "
                    "then resumes from its newest checkpoint, if it has one.") from e


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
