"""Command line: every entry point answers -h / --help / --helpfull; mistakes are one line."""

import importlib
import logging
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT
from pr_mim_jax import cli
from pr_mim_jax import log_filters
from pr_mim_jax import override_errors

ENTRY_POINTS = ("main", "interop.convert", "tools.benchmark", "tools.study", "tools.visualize_masks",
                "tools.gradient_study", "tools.input_benchmark", "tools.compile_report")


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", f"pr_mim_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_0_with_the_docstring_and_flags(module):
  proc = _run(module, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "error" not in proc.stderr.lower(), proc.stderr[-2000:]
  assert "python -m pr_mim_jax." + module in proc.stdout  # the usage line of its docstring
  own = importlib.import_module(f"pr_mim_jax.{module}").__doc__.strip().splitlines()[0]
  assert proc.stdout.startswith(own)  # its docstring first, and no library's (orbax has flags)
  assert "Orbax" not in proc.stdout
  assert "Flags:" in proc.stdout and "--" in proc.stdout.split("Flags:", 1)[1]
  assert "logtostderr" not in proc.stdout  # absl's own flags only with --helpfull


@pytest.mark.parametrize("flag", ["-h", "--helpshort", "--helpfull"])
def test_help_variants(flag):
  proc = _run("main", flag, "--config.bogus=1")  # help wins over any other argument
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--workdir" in proc.stdout
  assert ("logtostderr" in proc.stdout) == (flag == "--helpfull")


# ----------------------------------------------------------------------------------------
# User mistakes in flags and config overrides: one `error:` line naming the field and the fix.

CONFIG = "pr_mim_jax/configs/pretrain.py:dataset=shapes"


def _parse_error(monkeypatch, capsys, *args, config=CONFIG):
  """The stderr lines of cli.parse_flags on `args`, in-process, with a fresh FlagValues."""
  monkeypatch.chdir(ROOT)
  argv = ["prog", *([f"--config={config}"] if config else []), *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("num_processes", 0, "Processes.", flag_values=fv)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, {"config": CONFIG}, fv)
  assert e.value.code == 2
  out = capsys.readouterr()
  assert out.out == ""
  return out.err.splitlines()


@pytest.mark.parametrize("arg,line", [
    ("--config.optim.base_lrr=1e-3",
     "--config.optim.base_lrr: unknown config field optim.base_lrr; did you mean optim.base_lr?"),
    ("--config.optimm.base_lr=1",
     "--config.optimm.base_lr: unknown config field optimm.base_lr; did you mean optim.base_lr?"),
    ("--config.optimm.base_lrr=1",
     "--config.optimm.base_lrr: unknown config field optimm.base_lrr; did you mean optim.base_lr?"),
    ("--config.batch_size=abc", "--config.batch_size=abc: expected an integer"),
    ("--config.optim.base_lr=abc", "--config.optim.base_lr=abc: expected a number"),
    ("--num_processes=x", "--num_processes=x: expected an integer"),
    ("--bogus=1", "Unknown command line flag 'bogus' (see --helpfull)"),
    ("--config.model.variant.x=1", "--config.model.variant.x: config field model.variant is a "
     "str, not a group of fields; set it with --config.model.variant=VALUE"),
])
def test_flag_mistakes_are_one_line_with_the_fix(monkeypatch, capsys, arg, line):
  assert _parse_error(monkeypatch, capsys, arg) == [f"error: {line}"]


def test_unknown_field_without_close_match_lists_the_fields(monkeypatch, capsys):
  [line] = _parse_error(monkeypatch, capsys, "--config.optim.zzz=1")
  assert line.startswith("error: --config.optim.zzz: unknown config field optim.zzz; "
                         "config.optim has fields ")
  assert "base_lr, " in line and "helpfull" not in line


def test_group_given_a_value_names_its_fields(monkeypatch, capsys):
  [line] = _parse_error(monkeypatch, capsys, "--config.optim=1")
  assert line.startswith("error: --config.optim=1: optim is a group of fields (")
  assert "base_lr" in line and "--config.optim." in line and "helpfull" not in line


def test_override_without_config_file_says_which_flag(monkeypatch, capsys):
  assert _parse_error(monkeypatch, capsys, "--config.optim.base_lr=1", config=None) == [
      f"error: --config.optim.base_lr: a config override needs --config first, e.g. "
      f"--config={CONFIG}"]


def test_a_missing_config_file_is_one_line_naming_the_packaged_ones(monkeypatch, capsys):
  assert _parse_error(monkeypatch, capsys, config="pretrainn:method=mae") == [
      "error: --config=pretrainn: no such config file; give a path, or the name of a packaged "
      "config: pretrain, linear_probe, finetune, knn, study"]


@pytest.mark.parametrize("given", ["pretrain", "pretrain.py", "configs/pretrain.py",
                                   "pr_mim_jax/configs/pretrain.py"])
def test_packaged_config_names_work_from_any_directory(given, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  packaged = ROOT / "pr_mim_jax" / "configs" / "pretrain.py"
  assert cli.packaged_config(f"{given}:method=mae") == f"{packaged}:method=mae"
  assert cli.packaged_config(given) == str(packaged)


def test_a_file_that_exists_is_never_replaced(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "pretrain.py").write_text("")  # the user's own copy wins
  assert cli.packaged_config("configs/pretrain.py:x=1") == "configs/pretrain.py:x=1"
  for other in ("classify", "mine/pretrain.py", "nope.py"):  # shared defaults, other dirs
    assert cli.packaged_config(other) == other


def test_field_problem_walks_and_fixes_each_step():
  config = ml_collections.ConfigDict({"optim": {"base_lr": 1.0, "b1": 0.9}, "seed": 0})
  assert override_errors.field_problem(config, "optim.base_lr") is None
  assert override_errors.field_problem(config, "optim.base_lrr") == (
      "unknown config field optim.base_lrr; did you mean optim.base_lr?")
  assert override_errors.field_problem(config, "optimm.b1") == (
      "unknown config field optimm.b1; did you mean optim.b1?")
  assert override_errors.field_problem(config, "xyz") == (
      "unknown config field xyz; config has fields optim, seed")


def test_run_installs_the_log_filters():
  logger = logging.getLogger(log_filters.JAX_BACKEND_LOGGER)
  assert cli.run(lambda: 0, {}, ["prog"], flags.FlagValues()) == 0
  assert sum(isinstance(f, log_filters.DropMissingLibtpu) for f in logger.filters) == 1


def test_misspelt_field_end_to_end(tmp_path):
  """The item as a user meets it: python -m pr_mim_jax.main ... --config.optim.base_lrr=1e-3."""
  proc = _run("main", f"--config={CONFIG}", f"--workdir={tmp_path}/wd",
              "--config.optim.base_lrr=1e-3")
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      "error: --config.optim.base_lrr: unknown config field optim.base_lrr; "
      "did you mean optim.base_lr?"]
  assert not (tmp_path / "wd").exists()


def _config_flag_values():
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv)
  return fv


@pytest.mark.parametrize("file,arguments", [
    ("pr_mim_jax/configs/pretrain.py", ("method  (default 'pr_mim')", "variant  (default '')",
                             "dataset  (default 'imagenet2012')")),
    ("pr_mim_jax/configs/finetune.py", ("init  (default '')", "variant  (default '')")),
    ("pr_mim_jax/configs/knn.py", ("init  (default '')",)),
    ("pr_mim_jax/configs/study.py", ("setting  (default 'cpu')",)),
])
def test_help_with_a_config_file_prints_its_description_and_arguments(file, arguments,
                                                                      monkeypatch):
  monkeypatch.chdir(ROOT)
  text = cli.cli_help.usage(["prog", f"--config={file}:dataset=shapes", "--help"], full=False,
                            flag_values=_config_flag_values())
  assert f"Config file {file}:" in text
  assert "python -m pr_mim_jax." in text  # the file's own docstring, with its example command
  assert f"Arguments, as --config={file}:key=value,...:" in text
  for line in arguments:
    assert line in text


def test_help_without_a_config_file_says_how_to_see_one():
  text = cli.cli_help.usage(["prog", "--help"], full=False, flag_values=_config_flag_values())
  assert "Add --config=FILE to --help" in text
  missing = cli.cli_help.usage(["prog", "--config=nope.py", "-h"], full=False,
                               flag_values=_config_flag_values())
  assert "--config=nope.py: no such config file." in missing


# ----------------------------------------------------------------------------------------
# A config of the wrong kind: one line naming it and the kind of config the command takes.

@pytest.mark.parametrize("config,kind", [
    ("pr_mim_jax/configs/pretrain.py:dataset=shapes", "pretrain"),
    ("pr_mim_jax/configs/finetune.py", "finetune"), ("pr_mim_jax/configs/linear_probe.py", "linear_probe"),
    ("pr_mim_jax/configs/knn.py", "knn"), ("pr_mim_jax/configs/study.py", "study")])
def test_config_kind_is_the_mode_or_study(monkeypatch, config, kind):
  monkeypatch.chdir(ROOT)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv)
  fv(["prog", f"--config={config}"])
  assert cli.config_kind(fv["config"].value) == kind


def test_run_rejects_a_config_of_another_kind_before_main(monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  argv = ["prog", "--config=pr_mim_jax/configs/study.py"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, sys_argv=argv)
  with pytest.raises(SystemExit) as e:
    cli.run(lambda: pytest.fail("main ran"), {"config": CONFIG}, argv, fv,
            config_kinds=("pretrain", "finetune", "knn"))
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines() == [
      "error: --config=pr_mim_jax/configs/study.py is a study config (run by python -m "
      "pr_mim_jax.tools.study); this command takes a pretrain, finetune or knn config, "
      f"e.g. --config={CONFIG}"]


@pytest.mark.parametrize("module,args,config,takes", [
    ("main", ["--workdir={tmp}/w"], "study", "pretrain, linear_probe, finetune or knn"),
    ("tools.study", ["--workdir={tmp}/w"], "pretrain:dataset=shapes", "study"),
    ("tools.visualize_masks", ["--out={tmp}/w"], "finetune:dataset=shapes", "pretrain"),
    ("tools.benchmark", [], "study", "pretrain"),
    ("tools.gradient_study", ["--out={tmp}/w"], "knn", "pretrain"),
    ("tools.compile_report", ["--target=cpu"], "study", "pretrain, linear_probe or finetune"),
])
def test_each_command_takes_its_own_kind_of_config(tmp_path, module, args, config, takes):
  proc = _run(module, f"--config={config}", *(a.format(tmp=tmp_path) for a in args))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --config="), proc.stderr[-2000:]
  assert f"; this command takes a {takes} config, e.g. --config=" in lines[0]
  assert list(tmp_path.iterdir()) == []  # nothing created


def test_main_rejects_cudnn_attention_without_a_gpu(tmp_path):
  proc = _run("main", f"--config={CONFIG}", "--config.model.attention=cudnn",
              f"--workdir={tmp_path}/w")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: config.model.attention: 'cudnn' needs an NVIDIA GPU, and JAX runs on 'cpu' here; "
      "use 'xla' or 'einsum'"]
  assert list(tmp_path.iterdir()) == []


def test_the_error_line_is_one_write_so_background_logs_cannot_split_it(monkeypatch):
  """print() writes the text and the newline separately; a log line from orbax's threads
  landed between them in CI. The error must reach stderr as one complete line."""
  writes = []

  class Recorder:
    def write(self, text):
      writes.append(text)

    def flush(self):
      pass

  monkeypatch.setattr(sys, "stderr", Recorder())
  with pytest.raises(SystemExit) as exit_info:
    cli.fail("bad input")
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  assert writes == ["error: bad input\n"]
