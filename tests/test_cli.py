"""Command line: every entry point answers -h / --help / --helpfull; mistakes are one line."""

import errno
import importlib
import logging
import os
import stat
import subprocess
import sys
import threading

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
    ("--config.model.scan_layers=maybe", "--config.model.scan_layers=maybe: expected true or false"),
    ("--noconfig.model.scan_layerss", "--config.model.scan_layerss: unknown config field "
     "model.scan_layerss; did you mean model.scan_layers?"),
    # Not an override: 'optim' is no config flag.
    ("--optim.base_lr=1e-3", "Unknown command line flag 'optim.base_lr' (see --helpfull)"),
    # difflib's default cut-off (0.6): 'warmup' is close enough to 'warmup_epochs' ...
    ("--config.optim.warmup=5",
     "--config.optim.warmup: unknown config field optim.warmup; did you mean optim.warmup_epochs?"),
    ("--config.optim.Base_lr=1",  # field names are case-sensitive
     "--config.optim.Base_lr: unknown config field optim.Base_lr; did you mean optim.base_lr?"),
    ("--config.knn.enable=false",
     "--config.knn.enable: unknown config field knn.enable; did you mean knn.enabled?"),
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


@pytest.mark.parametrize("hint,line", [
    ("", "error: interrupted (Ctrl-C)"),
    ("rerun to resume", "error: interrupted (Ctrl-C); rerun to resume")])
def test_ctrl_c_outside_the_training_steps_is_one_line_and_exit_130(capsys, hint, line):
  def interrupted():
    raise KeyboardInterrupt
  assert cli.run(interrupted, {}, ["prog"], flags.FlagValues(), interrupted=hint) == 130
  assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_anywhere_in_a_run_is_one_line_naming_the_file(capsys, tmp_path):
  """A write the disk refuses (here config.json, written aside through a link to /dev/full,
  which answers every write with ENOSPC) ends the command with one line, exit 2; the file
  written aside is gone and nothing at config.json is torn."""
  from pr_mim_jax.training import workdir_records  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json.tmp").symlink_to("/dev/full")
  config = ml_collections.ConfigDict({"seed": 0})
  with pytest.raises(SystemExit) as e:
    cli.run(lambda: workdir_records.write_records(str(tmp_path), config), {}, ["prog"],
            flags.FlagValues())
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"error: writing {tmp_path}/config.json failed: No space left on device (the disk is "
      "full, or a quota or file-size limit was hit); free space, then rerun the same command: "
      "pre-training, fine-tuning and study runs go on from their last complete checkpoint, "
      "which is untouched")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("error, line", [
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "error: a write failed: Disk quota exceeded"),
    (OSError(errno.EFBIG, "File too large", "/w/m.jsonl"),
     "error: writing /w/m.jsonl failed: File too large"),
])
def test_a_quota_or_file_size_limit_is_the_same_line(capsys, error, line):
  def refused():
    raise error
  with pytest.raises(SystemExit) as e:
    cli.run(refused, {}, ["prog"], flags.FlagValues())
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith(line + " (the disk is full, or a quota")


def test_other_os_errors_are_not_called_a_full_disk():
  """A missing file or a refused permission is a different fault (or a defect): it is raised
  as it was, never reported as a full disk."""
  def missing():
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")
  with pytest.raises(FileNotFoundError):
    cli.run(missing, {}, ["prog"], flags.FlagValues())


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


# ----------------------------------------------------------------------------------------
# Arguments absl would drop silently, and config files ml_collections cannot load.

@pytest.mark.parametrize("args,line", [
    # absl takes 'false' as a positional argument and sets the boolean True.
    (["--config.knn.enabled", "false"], "unexpected argument 'false': --config.knn.enabled takes "
     "no separate value; write --config.knn.enabled=false"),
    (["config.optim.base_lr=5"],
     "unexpected argument 'config.optim.base_lr=5': did you mean --config.optim.base_lr=5?"),
    (["num_processes=2"], "unexpected argument 'num_processes=2': did you mean --num_processes=2?"),
    (["oops"], "unexpected argument 'oops': this command takes only flags; give a value as "
     "--flag=value (see --help)"),
    (["--noconfig.knn.enabled", "true"], "unexpected argument 'true': --noconfig.knn.enabled "
     "takes no separate value; write --noconfig.knn.enabled alone"),
])
def test_a_positional_argument_is_an_error_not_dropped(monkeypatch, capsys, args, line):
  assert _parse_error(monkeypatch, capsys, *args) == [f"error: {line}"]


def test_a_bare_word_in_a_flagfile_is_an_error_too(monkeypatch, capsys, tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--config.seed=3\nstray\n")
  assert _parse_error(monkeypatch, capsys, f"--flagfile={flagfile}") == [
      "error: unexpected argument 'stray': this command takes only flags; give a value as "
      "--flag=value (see --help)"]


def _user_config(tmp_path, body: str) -> str:
  path = tmp_path / "mine.py"
  path.write_text("import ml_collections\n\n" + body)
  return str(path)


@pytest.mark.parametrize("body,arg,overrides,why", [
    ("def get_config():\n  open('/nonexistent/labels.txt')\n", "", [],
     "cannot load it: [Errno 2] No such file or directory: '/nonexistent/labels.txt'"),
    ("def get_config():\n  open('/nonexistent/labels.txt')\n", "", ["--config.x=1"],
     "cannot load it: [Errno 2] No such file or directory: '/nonexistent/labels.txt'"),
    ("def get_config():\n  return int('abc')\n", "", [],
     "cannot load it: ValueError: invalid literal for int() with base 10: 'abc'"),
    ("def get_config():\n  return ml_collections.ConfigDict()\n", ":a=1", [],
     "cannot load it: TypeError: get_config() takes 0 positional arguments but 1 was given"),
    ("def get_config():\n  ml_collections.ConfigDict()\n", "", [],
     "its get_config() returned None (a missing return statement?)"),
])
def test_a_config_file_that_fails_to_load_is_one_line_naming_it(monkeypatch, capsys, tmp_path,
                                                                body, arg, overrides, why):
  config = _user_config(tmp_path, body) + arg
  lines = _parse_error(monkeypatch, capsys, *overrides, config=config)
  assert lines[-1] == f"error: --config={config}: {why}"
  assert all(line.startswith("WARNING") for line in lines[:-1])  # ml_collections' own, for None


def test_a_workdirs_config_json_as_config_says_what_to_give(monkeypatch, capsys, tmp_path):
  record = tmp_path / "config.json"
  record.write_text('{"mode": "pretrain", "init": null}')  # ml_collections would exec this
  assert _parse_error(monkeypatch, capsys, config=str(record)) == [
      f"error: --config={record}: a .json file is a run's record, not a config file; give a "
      "config file such as pr_mim_jax/configs/pretrain.py with --config.FIELD=VALUE overrides "
      "(convert prints those of a converted workdir), or init=WORKDIR for probing, "
      "fine-tuning and k-NN"]


def test_the_shared_classify_defaults_are_not_a_runnable_config(monkeypatch, capsys):
  assert _parse_error(monkeypatch, capsys, config="pr_mim_jax/configs/classify.py") == [
      "error: --config=pr_mim_jax/configs/classify.py: cannot load it: TypeError: get_config() "
      "missing 1 required positional argument: 'mode'"]


@pytest.mark.parametrize("config", ["", ":method=mae"])
def test_an_empty_config_path_is_one_line(monkeypatch, capsys, config):
  assert _parse_error(monkeypatch, capsys, f"--config={config}", config=None) == [
      "error: --config=: no such config file; give a path, or the name of a packaged "
      "config: pretrain, linear_probe, finetune, knn, study"]


def test_single_dash_config_names_a_packaged_config_too(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  argv = ["prog", "-config=pretrain:method=mae", "-config.optim.base_lr=0.5"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, sys_argv=argv)
  cli.parse_flags(argv, {"config": CONFIG}, fv)
  assert fv["config"].value.method == "mae" and fv["config"].value.optim.base_lr == 0.5



def test_config_given_as_a_separate_word_names_a_packaged_config_too(monkeypatch, capsys,
                                                                      tmp_path):
  """absl takes `--config pretrain` as well as `--config=pretrain`: the name resolves and a
  missing file is the same one line either way."""
  monkeypatch.chdir(tmp_path)  # no configs/ here
  argv = ["prog", "--config", "pretrain:method=mae", "--config.optim.base_lr=0.5"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, sys_argv=argv)
  cli.parse_flags(argv, {"config": CONFIG}, fv)
  assert fv["config"].value.method == "mae" and fv["config"].value.optim.base_lr == 0.5
  assert _parse_error(monkeypatch, capsys, "--config", "pretrainn:method=mae", config=None) == [
      "error: --config=pretrainn: no such config file; give a path, or the name of a packaged "
      "config: pretrain, linear_probe, finetune, knn, study"]

# ----------------------------------------------------------------------------------------
# Helpers of every command.

def test_a_required_flag_left_out_is_named_with_an_example(monkeypatch, capsys):
  assert _parse_error(monkeypatch, capsys, config=None) == [
      f"error: --config is required, e.g. --config={CONFIG}"]


def test_a_path_flag_starting_with_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
  """The shell expands no ~ after `--workdir=`: left alone it made a folder named '~' in the
  current one, and a later --workdir=$HOME/run started afresh instead of resuming."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("HOME", str(tmp_path))
  argv = ["prog", f"--config={CONFIG}", "--workdir=~/runs/a", "--json=~", "--out=a~/b"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  for name in ("workdir", "json", "out"):
    flags.DEFINE_string(name, None, "A path.", flag_values=fv)
  cli.parse_flags(argv, {"config": CONFIG, "workdir": "workdirs/demo"}, fv)
  assert (fv.workdir, fv.json, fv.out) == (f"{tmp_path}/runs/a", str(tmp_path), "a~/b")
  assert fv.config.data.dataset == "shapes"  # the config is no string: left as it is


def test_an_init_run_starting_with_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
  from pr_mim_jax.configs import knn as knn_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.evaluation import knn_eval  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HOME", str(tmp_path))
  main, _ = _stub_main(monkeypatch, knn_config.get_config("init=~/runs/demo"), tmp_path / "knn")

  def check_knn_config(config):
    raise cli.UserError(f"checked with init.workdir={config.init.workdir}")

  monkeypatch.setattr(knn_eval, "check_knn_config", check_knn_config)
  with pytest.raises(cli.UserError) as e:
    main._run()  # pylint: disable=protected-access
  assert str(e.value) == f"checked with init.workdir={tmp_path}/runs/demo"


def test_the_last_of_repeated_flags_wins_as_in_absl():
  assert cli.cli_help.argument_of(["--config=a", "--x=1", "--config", "b"], "config") == "b"
  assert cli.cli_help.argument_of(["--config=a", "--config=b"], "config") == "b"
  assert cli.cli_help.argument_of(["--configs=a"], "config") is None


def test_short_help_points_at_helpfull_and_full_help_does_not():
  fv = _config_flag_values()
  assert "(--helpfull also lists" in cli.cli_help.usage(["prog"], full=False, flag_values=fv)
  assert "(--helpfull also lists" not in cli.cli_help.usage(["prog"], full=True, flag_values=fv)


def test_a_config_without_mode_is_pretrain_unless_it_is_the_study():
  assert cli.config_kind(ml_collections.ConfigDict({"seed": 0})) == "pretrain"
  assert cli.config_kind(ml_collections.ConfigDict({"methods": [], "setting": "cpu"})) == "study"
  assert cli.config_kind(ml_collections.ConfigDict({"mode": "knn", "methods": [],
                                                    "setting": "cpu"})) == "knn"


def test_at_least_accepts_the_minimum_and_names_the_flag_below_it():
  fv = flags.FlagValues()
  steps = flags.DEFINE_integer("steps", 1, "Steps.", flag_values=fv)
  fv(["prog"])
  assert cli.at_least(steps, 1, "timed steps") == 1
  fv(["prog", "--steps=0"])
  with pytest.raises(cli.UserError, match=r"^--steps=0: must be >= 1 \(timed steps\)$"):
    cli.at_least(steps, 1, "timed steps")


def test_output_dir_refuses_a_file_and_creates_a_directory(tmp_path):
  (tmp_path / "f").write_text("")
  with pytest.raises(cli.UserError, match=r"^--out=.*/f is a file, not a directory"):
    cli.output_dir(str(tmp_path / "f"), "out")
  assert cli.output_dir(str(tmp_path / "a" / "b"), "out").is_dir()


def test_write_report_writes_json_and_markdown_and_skips_empty_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cli.write_report(str(tmp_path / "r.json"), {"a": 1}, str(tmp_path / "r.md"), "# t\n")
  assert (tmp_path / "r.json").read_text() == '{\n "a": 1\n}\n'
  assert (tmp_path / "r.md").read_text() == "# t\n"
  cli.write_report("", {"a": 1}, "", "x")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def _stub_main(monkeypatch, config, workdir):
  """pr_mim_jax.main with `config` and `workdir` as its flags, without jax.distributed, log
  handlers or a run log: returns the module and the list of workdirs run_log.attach got."""
  import types  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from pr_mim_jax import main, run_log  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  value = types.SimpleNamespace
  monkeypatch.setattr(main, "_CONFIG", value(value=config))
  monkeypatch.setattr(main, "_WORKDIR", value(value=str(workdir)))
  for name in ("_COORDINATOR", "_NUM_PROCESSES", "_PROCESS_ID"):
    monkeypatch.setattr(main, name, value(value=None))
  monkeypatch.setattr(distributed, "initialize", lambda *unused: None)
  attached = []
  monkeypatch.setattr(run_log, "attach", attached.append)
  monkeypatch.setattr(absl_logging, "use_absl_handler", lambda: None)
  monkeypatch.setattr(absl_logging, "set_verbosity", lambda level: None)
  monkeypatch.setattr(absl_logging, "get_absl_handler", logging.Handler)
  return main, attached


def test_check_output_file_passes_a_writable_path_and_no_path(tmp_path):
  cli.check_output_file("", "json")
  cli.check_output_file(str(tmp_path / "new.json"), "json")
  (tmp_path / "old.json").write_text("x")
  cli.check_output_file(str(tmp_path / "old.json"), "json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # it creates nothing


def test_a_folder_in_the_way_of_the_part_file_is_one_error_line(tmp_path):
  (tmp_path / "r.json.partial").mkdir()
  with pytest.raises(cli.UserError, match=r"^--json: cannot write .*r.json: Is a directory$"):
    cli.write_text(str(tmp_path / "r.json"), "{}", "json")
  assert (tmp_path / "r.json.partial").is_dir() and not (tmp_path / "r.json").exists()


def test_a_report_goes_into_a_pipe_and_through_a_symlink(tmp_path):
  """Not renamed over: a pipe (as /dev/stdout can be) keeps its reader, a link its target."""
  pipe = tmp_path / "pipe"
  os.mkfifo(pipe)
  got = []
  reader = threading.Thread(target=lambda: got.append(pipe.read_text()), daemon=True)
  reader.start()
  cli.check_output_file(str(pipe), "json")
  cli.write_text(str(pipe), "{}\n", "json")
  reader.join(timeout=10)
  assert got == ["{}\n"] and stat.S_ISFIFO(os.stat(pipe).st_mode)
  real, link = tmp_path / "real.json", tmp_path / "link.json"
  real.write_text("an earlier report")
  link.symlink_to(real)
  cli.check_output_file(str(link), "json")
  cli.write_text(str(link), "new", "json")
  assert link.is_symlink() and real.read_text() == "new"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "real.json"]


def test_a_report_write_that_fails_halfway_leaves_the_old_report_whole(tmp_path, monkeypatch):
  """A full disk mid-write: the earlier report stays as it was, and no part-file is left."""
  report = tmp_path / "report.json"
  report.write_text("an earlier run's report")

  class FullDisk:
    """open() whose file takes 5 characters, then fails as a full disk does."""
    def __init__(self, path, mode="r"):
      self.f = open(path, mode)  # pylint: disable=unspecified-encoding
    def __enter__(self):
      return self
    def __exit__(self, *unused):
      self.f.close()
    def write(self, text):
      self.f.write(text[:5])
      self.f.flush()
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(cli, "open", FullDisk, raising=False)
  with pytest.raises(cli.UserError, match=r"^--json: cannot write .*: No space left on device$"):
    cli.write_text(str(report), "{}" * 100, "json")
  assert report.read_text() == "an earlier run's report"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_main_exits_1_on_a_non_finite_loss(monkeypatch, tmp_path, capsys):
  """docs/faults.md: a diverged run ends with one error line and exit code 1 (not 0, not 2)."""
  from pr_mim_jax.configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import pretrain, trainer  # pylint: disable=g-import-not-at-top

  def diverge(*unused):
    raise trainer.NonFiniteLossError("loss is nan at step 3")

  main, _ = _stub_main(monkeypatch, pretrain_config.get_config("dataset=shapes"), tmp_path)
  monkeypatch.setattr(pretrain, "check_config", lambda config: None)
  monkeypatch.setattr(pretrain, "train", diverge)
  assert main._run() == 1  # pylint: disable=protected-access
  assert capsys.readouterr().err.splitlines()[-1] == "error: loss is nan at step 3"


@pytest.mark.parametrize("mode,error", [
    ("knn", r"^--workdir: .* holds a pretrain run \(checkpoints\), whose config\.json a k-NN "),
    ("linear_probe", r"^config\.mode: --workdir .* holds a 'pretrain' run \(its config\.json\)")])
def test_an_evaluation_into_its_init_run_is_refused_before_its_log_is_touched(
    monkeypatch, tmp_path, mode, error):
  """--workdir = the run to evaluate: refused before run_log.attach would append the
  evaluation's lines to that run's log.txt (k-NN by the checkpoints a k-NN run never writes,
  a probe by the run's config.json)."""
  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.configs import classify as classify_config
  from pr_mim_jax.configs import knn as knn_config
  from pr_mim_jax.configs import pretrain as pretrain_config
  from pr_mim_jax.evaluation import classify, knn_eval
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  (tmp_path / "config.json").write_text(pretrain_config.get_config("dataset=shapes").to_json())
  (tmp_path / "log.txt").write_text("pre-training log\n")
  config = (knn_config.get_config(f"init={tmp_path}") if mode == "knn" else
            classify_config.get_config(mode, f"init={tmp_path},dataset=shapes"))
  main, attached = _stub_main(monkeypatch, config, tmp_path)
  for module, check, run in ((knn_eval, "check_knn_config", "knn_eval"),
                             (classify, "check_config", "train")):
    monkeypatch.setattr(module, check, lambda config: None)
    monkeypatch.setattr(module, run, lambda *unused: pytest.fail("the evaluation ran"))
  with pytest.raises(cli.UserError, match=error):
    main._run()  # pylint: disable=protected-access
  assert not attached
  assert (tmp_path / "log.txt").read_text() == "pre-training log\n"


def test_a_read_only_report_folder_file_or_pipe_is_refused(tmp_path, monkeypatch):
  """os.access stands in for the permissions (root may write anything): a report that would
  be renamed into a read-only folder, over a read-only file, or into a read-only pipe."""
  denied = set()
  access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
      os.path.realpath(p) not in denied and access(p, mode, **kw)))
  folder, old, pipe = tmp_path / "ro", tmp_path / "old.json", tmp_path / "pipe"
  folder.mkdir()
  old.write_text("x")
  os.mkfifo(pipe)
  for denied_path, path in ((folder, folder / "r.json"), (old, old), (pipe, pipe)):
    denied = {os.path.realpath(denied_path)}
    with pytest.raises(cli.UserError) as err:
      cli.check_output_file(str(path), "json")
    assert str(err.value) == f"--json: cannot write {path}: Permission denied"
  cli.check_output_file(str(tmp_path / "new.json"), "json")  # the folder itself is writable
  denied = {os.path.realpath(tmp_path), os.path.realpath(os.getcwd())}
  cli.check_output_file("", "json")  # no file asked for: nothing is checked


def test_a_link_into_a_missing_folder_is_refused_where_it_points(tmp_path):
  """The report is written where the link points: that folder must exist, not the link's."""
  link = tmp_path / "link.json"
  link.symlink_to(tmp_path / "gone" / "r.json")
  with pytest.raises(cli.UserError) as err:
    cli.check_output_file(str(link), "markdown")
  assert str(err.value) == (f"--markdown: cannot write {link}: No such directory "
                            f"{os.path.realpath(tmp_path)}/gone")
  with pytest.raises(cli.UserError, match=r"^--markdown: cannot write .*link.json: "):
    cli.write_text(str(link), "x", "markdown")


# ----------------------------------------------------------------------------------------
# More of what a user types wrong, each as its full error line.

def test_a_far_misspelling_lists_the_fields_rather_than_guess(monkeypatch, capsys):
  # ... 'lr' is not close to 'base_lr' (ratio 4/9): no guess, the group's fields instead.
  [line] = _parse_error(monkeypatch, capsys, "--config.optim.lr=1")
  assert line.startswith("error: --config.optim.lr: unknown config field optim.lr; config.optim "
                         "has fields b1, b2, base_lr, ")
  assert "did you mean" not in line


def test_a_negated_override_without_config_says_which_flag(monkeypatch, capsys):
  assert _parse_error(monkeypatch, capsys, "--noconfig.knn.enabled", config=None) == [
      f"error: --noconfig.knn.enabled: a config override needs --config first, e.g. "
      f"--config={CONFIG}"]


def test_a_directory_as_config_is_one_line(monkeypatch, capsys, tmp_path):
  assert _parse_error(monkeypatch, capsys, config=str(tmp_path)) == [
      f"error: --config={tmp_path}: no such config file; give a path, or the name of a packaged "
      "config: pretrain, linear_probe, finetune, knn, study"]


def test_an_empty_required_flag_is_refused_like_a_missing_one(monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  argv = ["prog", f"--config={CONFIG}", "--workdir="]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Workdir.", flag_values=fv)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, {"config": CONFIG, "workdir": "workdirs/demo"}, fv)
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: --workdir is required, e.g. --workdir=workdirs/demo\n"


def test_a_report_path_that_is_a_directory_is_refused_before_the_run(tmp_path):
  with pytest.raises(cli.UserError) as e:
    cli.check_output_file(str(tmp_path), "json")
  assert str(e.value) == f"--json: cannot write {tmp_path}: Is a directory"


def test_a_report_tool_fails_only_when_every_setting_failed(capsys):
  assert cli.failed_settings_exit([]) == 0
  assert cli.failed_settings_exit([{"error": "OOM"}, {"step_ms": 3.0}]) == 0
  assert capsys.readouterr().err == ""
  assert cli.failed_settings_exit([{"error": "OOM"}, {"error": "bad mesh"}]) == 1
  assert capsys.readouterr().err == ("error: all 2 settings failed, the last with: bad mesh; the "
                                     "report names each one's error\n")


def test_only_a_config_with_methods_and_setting_is_the_study():
  methods_only = ml_collections.ConfigDict({"methods": "mae,pr_mim", "batch_size": 8})
  assert cli.config_kind(methods_only) == "pretrain"  # no `setting`: a pretraining config
  study = ml_collections.ConfigDict({"methods": "mae,pr_mim", "setting": "tiny"})
  assert cli.config_kind(study) == "study"


def test_a_value_for_a_group_shows_the_first_field_to_set(monkeypatch, capsys):
  assert _parse_error(monkeypatch, capsys, "--config.mesh_dcn=2") == [
      "error: --config.mesh_dcn=2: mesh_dcn is a group of fields (data, fsdp, tensor); set them "
      "one at a time, e.g. --config.mesh_dcn.data=VALUE"]


def test_main_refuses_a_workdir_that_is_a_file_before_the_run(monkeypatch, tmp_path):
  """A file given as --workdir: one UserError line naming it, before the run log is attached
  or anything compiles."""
  from pr_mim_jax.configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "notes.txt"
  workdir.write_text("not a run")
  main, attached = _stub_main(monkeypatch, pretrain_config.get_config("dataset=shapes"), workdir)
  monkeypatch.setattr(pretrain, "check_config", lambda config: None)
  monkeypatch.setattr(pretrain, "train", lambda *unused: pytest.fail("pre-training ran"))
  with pytest.raises(cli.UserError) as e:
    main._run()  # pylint: disable=protected-access
  assert str(e.value) == (f"--workdir={workdir} is a file, not a directory: choose a directory "
                          "(a new path, or an existing directory)")
  assert not attached and workdir.read_text() == "not a run"


def test_ctrl_c_in_main_says_the_checkpoints_are_kept_and_how_to_resume(monkeypatch, capsys):
  from pr_mim_jax import main  # pylint: disable=g-import-not-at-top

  def interrupted():
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, "parse_flags", lambda *unused: None)
  monkeypatch.setattr(cli, "check_config_kind", lambda *unused: None)
  monkeypatch.setattr(main, "_run", interrupted)
  assert main.main(["prog"]) == 130
  assert capsys.readouterr().err == ("error: interrupted (Ctrl-C); the checkpoints already saved "
                                     "are kept; rerun the same command to resume\n")


def test_a_config_json_with_config_arguments_is_refused_the_same_way(monkeypatch, capsys,
                                                                    tmp_path):
  record = tmp_path / "config.json"
  record.write_text('{"mode": "pretrain", "init": null}')
  [line] = _parse_error(monkeypatch, capsys, config=f"{record}:dataset=shapes")
  assert line.startswith(f"error: --config={record}:dataset=shapes: a .json file is a run's "
                         "record, not a config file; give a config file such as ")


def test_a_flagfile_that_cannot_be_opened_is_one_line(monkeypatch, capsys, tmp_path):
  """ml_collections reads --flagfile files as the config flag is defined (at import): a
  missing one was a traceback and exit 1 there, and 'ERROR:: ...' from absl's parse."""
  missing = tmp_path / "flags.txt"
  line = (f"error: Unable to open flagfile: [Errno 2] No such file or directory: '{missing}'; "
          "give --flagfile a file that exists\n")
  argv = ["prog", f"--flagfile={missing}"]
  with pytest.raises(SystemExit) as e:
    cli.define_config_file("config", None, "Config file.", flag_values=flags.FlagValues(),
                           sys_argv=argv)
  assert e.value.code == 2 and capsys.readouterr().err == line
  fv = flags.FlagValues()
  flags.DEFINE_integer("num_processes", 0, "Processes.", flag_values=fv)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, {}, fv)
  assert e.value.code == 2 and capsys.readouterr().err == line


def test_a_packaged_config_name_in_a_flagfile_is_found(monkeypatch, capsys, tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--config=pretrain:dataset=shapes\n--config.seed=x\n")
  monkeypatch.chdir(tmp_path)  # where no file is named 'pretrain'
  argv = ["prog", f"--flagfile={flagfile}"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  with pytest.raises(SystemExit) as e:  # the config loads: its override's value is the error
    cli.parse_flags(argv, {"config": CONFIG}, fv)
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: --config.seed=x: expected an integer\n"
