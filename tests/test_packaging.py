"""The package stands alone: every import is declared, and a built wheel runs from anywhere."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
import pytest

from conftest import ROOT
from pr_mim_jax.data import sources

PACKAGE = ROOT / "pr_mim_jax"
# Distributions of optional modules whose import name says nothing of them, when absent.
NOT_INSTALLED_NAMES = {"nvidia": ["nvidia-dali-cuda120"]}


def _declared() -> set[str]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values()
                                     for s in extra]
  return {re.split(r"[\[<>=~!; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def _third_party_imports() -> set[str]:
  names = set()
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names.add(node.module.split(".")[0])
  return {n for n in names if n not in sys.stdlib_module_names and n != "pr_mim_jax"}


def test_every_imported_distribution_is_declared():
  by_module = importlib.metadata.packages_distributions()
  declared = _declared()
  missing = {}
  for module in sorted(_third_party_imports()):
    default = NOT_INSTALLED_NAMES.get(module, [module])  # an optional module that is absent
    dists = {d.lower().replace("_", "-") for d in by_module.get(module, default)}
    if not dists & declared:
      missing[module] = sorted(dists)
  assert not missing, f"imported but not in pyproject.toml: {missing}"


def _requirement(line: str) -> tuple[str, str]:
  """'etils[epath]>=1.9.1  # why' -> ('etils', '[epath]>=1.9.1')."""
  spec = line.split("#")[0].replace(" ", "")
  name = re.split(r"[\[<>=~!;]", spec, maxsplit=1)[0]
  return name.lower().replace("_", "-"), spec[len(name):]


def _lines(path) -> list[str]:
  return [l for l in path.read_text().splitlines() if l.split("#")[0].strip()]


def test_requirements_txt_matches_pyproject():
  """The README installs requirements.txt, pip installs pyproject: same packages, same bounds."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  specs = project["dependencies"] + project["optional-dependencies"]["data"] + \
      project["optional-dependencies"]["test"]
  assert dict(map(_requirement, specs)) == \
      dict(map(_requirement, _lines(ROOT / "requirements.txt")))


def test_lowest_versions_pin_every_floor():
  """.ci/lowest-versions.txt (which CI tests) pins each requirement at its floor's release."""
  pins = dict(_requirement(l) for l in _lines(ROOT / ".ci" / "lowest-versions.txt"))
  for name, spec in map(_requirement, _lines(ROOT / "requirements.txt")):
    floor = re.search(r">=([\d.]+)", spec)
    assert floor and "<" not in spec, f"{name}{spec}: give a floor and no ceiling"
    pinned = pins.get(name, "").removeprefix("==")
    assert re.fullmatch(r"[\d.]+", pinned), f"{name}: pin it in .ci/lowest-versions.txt"
    release = floor.group(1).split(".")
    assert pinned.split(".")[:len(release)] == release, f"{name}: floor {floor.group(1)}, " \
        f"lowest tested {pinned}: move one to the other"



# Marker environments -> the TensorFlow distribution that has wheels there. pip download on
# 2026-12-07 (Python 3.11): tensorflow-cpu >= 2.20 has none for macOS or Linux on aarch64,
# tensorflow has both, and the rest of requirements.txt resolves on both with it.
TENSORFLOW_WHEELS = {("linux", "x86_64"): "tensorflow-cpu", ("linux", "aarch64"): "tensorflow",
                     ("darwin", "arm64"): "tensorflow"}


@pytest.mark.parametrize("system,machine", TENSORFLOW_WHEELS)
def test_each_platform_installs_the_one_tensorflow_it_has_wheels_for(system, machine):
  """requirements.txt's markers pick exactly one TensorFlow per platform, and the install hint
  of a run without TensorFlow names the same one; nothing else depends on the platform."""
  env = {"sys_platform": system, "platform_machine": machine}
  requirements = [Requirement(l.split("#")[0]) for l in _lines(ROOT / "requirements.txt")]
  picked = {r.name for r in requirements if r.marker is None or r.marker.evaluate(env)}
  want = TENSORFLOW_WHEELS[(system, machine)]
  assert picked & {"tensorflow", "tensorflow-cpu"} == {want}
  assert [r.name for r in requirements if r.marker] == ["tensorflow-cpu", "tensorflow"]
  assert sources.tensorflow_distribution(system, machine) == want

@pytest.mark.slow
def test_a_built_wheel_runs_every_config_from_another_directory(tmp_path):
  """pip wheel of a copy of the tree, unpacked onto PYTHONPATH, run outside the source tree."""
  src = tmp_path / "src"
  shutil.copytree(PACKAGE, src / "pr_mim_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True,
                 timeout=300)
  (wheel,) = (tmp_path / "dist").glob("pr_mim_jax-*.whl")
  site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
  with zipfile.ZipFile(wheel) as z:
    assert "pr_mim_jax/configs/pretrain.py" in z.namelist()
    z.extractall(site)
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                                     capture_output=True, text=True, timeout=300, check=False)
  code = ("import pr_mim_jax, pr_mim_jax.tools.study as s, pr_mim_jax.interop.convert as c;"
          "from pr_mim_jax.configs import study;"
          "print(pr_mim_jax.__file__); print(c.default_config().method);"
          "print(s.pretrain_config(study.get_config('setting=cpu'), 'pr_mim', 0.5, 0)"
          ".masking.throw_ratio)")
  proc = run("-c", code)
  assert proc.returncode == 0, proc.stderr[-2000:]
  where, method, throw = proc.stdout.split()
  assert where.startswith(str(site)) and method == "mae" and float(throw) == 0.5
  for job in ("pretrain", "linear_probe", "finetune", "knn", "study"):
    module = "tools.study" if job == "study" else "main"
    proc = run("-m", f"pr_mim_jax.{module}", f"--config={job}", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Config file {site / 'pr_mim_jax' / 'configs' / job}.py:" in proc.stdout
