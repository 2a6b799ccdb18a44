"""Command-line help: every entry point answers -h / --help / --helpshort / --helpfull."""

import subprocess
import sys

import pytest

from conftest import ROOT

ENTRY_POINTS = ("main", "convert", "benchmark", "study", "visualize_masks", "gradient_study",
                "input_benchmark", "compile_report")


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", f"pr_mim_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_0_with_the_docstring_and_flags(module):
  proc = _run(module, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "error" not in proc.stderr.lower(), proc.stderr[-2000:]
  assert "python -m pr_mim_jax." + module in proc.stdout  # the usage line of its docstring
  assert "Flags:" in proc.stdout and "--" in proc.stdout.split("Flags:", 1)[1]
  assert "logtostderr" not in proc.stdout  # absl's own flags only with --helpfull


@pytest.mark.parametrize("flag", ["-h", "--helpshort", "--helpfull"])
def test_help_variants(flag):
  proc = _run("main", flag, "--config.bogus=1")  # help wins over any other argument
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--workdir" in proc.stdout
  assert ("logtostderr" in proc.stdout) == (flag == "--helpfull")
