"""Shared command-line handling: user mistakes become one `error:` line and exit code 2.

Every entry point parses absl flags and a big_vision config through `run`, so a bad flag,
config argument or override never shows a raw traceback, and -h / --help / --helpfull
print the command's usage.
"""

import json
import os
import pathlib
import sys
from typing import Callable

from absl import flags

from pr_mim_jax import cli_help
from pr_mim_jax import log_filters
from pr_mim_jax import override_errors
from pr_mim_jax.configs import JOBS as PACKAGED_JOBS
from pr_mim_jax import errors
from pr_mim_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

# The --config flag that define_config_file defines belongs to the command calling it: its
# help is the command's (cli_help.usage lists flags by the module that owns them).
flags.disclaim_key_flags()


def print_error(message: str) -> None:
  """`error: message` on stderr as one write: print() writes the newline separately, so a
  log line from a background thread (orbax, TensorStore) could land inside the error line."""
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()


def fail(message: str) -> None:
  print_error(message)
  sys.exit(EXIT_USER_ERROR)


def storage_full(e: OSError) -> str:
  """The one line for a write that a full disk, a quota or a file-size limit refused, anywhere
  in a run (config.json, metrics, a picture): rerunning resumes, and checkpoints are written
  aside and renamed when complete, so the last complete one is intact."""
  what = f"writing {e.filename}" if e.filename else "a write"
  return (f"{what} failed: {e.strerror} (the disk is full, or a quota or file-size limit was "
          "hit); free space, then rerun the same command: pre-training, fine-tuning and study "
          "runs go on from their last complete checkpoint, which is untouched")


def check_not_a_file(path, flag: str) -> None:
  """A UserError naming --flag when `path` (local or gs://), meant as a directory, is a file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  if path.exists() and not path.is_dir():  # (etils 1.9's is_file() is True below a file)
    raise UserError(f"--{flag}={path} is a file, not a directory: choose a directory (a new "
                    "path, or an existing directory)")


def output_dir(path: str, flag: str):
  """The directory `path` (local or gs://), created; a UserError naming --flag otherwise."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = epath.Path(path)
  check_not_a_file(out, flag)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"--{flag}: cannot create {out}: {e.strerror}") from None
  return out


def at_least(flag, minimum: int, meaning: str) -> int:
  """The value of absl `flag` (a FlagHolder); a UserError naming it when below `minimum`."""
  if flag.value < minimum:
    raise UserError(f"--{flag.name}={flag.value}: must be >= {minimum} ({meaning})")
  return flag.value


def check_output_file(path: str, flag: str) -> None:
  """A UserError naming --flag when the report file `path` could not be written: checked
  before the run (compiles or timings of many minutes), which would otherwise end in the
  same error with its results unsaved. '' (no file asked for) passes."""
  if not path:
    return
  if os.path.isdir(path):
    raise UserError(f"--{flag}: cannot write {path}: Is a directory")
  target = os.path.realpath(path)
  if _special(target):  # /dev/stdout, a pipe: written in place
    writable = os.access(target, os.W_OK)
  else:  # written aside in its folder, then renamed over it (write_text)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
      raise UserError(f"--{flag}: cannot write {path}: No such directory {folder}")
    writable = os.access(folder, os.W_OK) and (
        not os.path.exists(target) or os.access(target, os.W_OK))
  if not writable:
    raise UserError(f"--{flag}: cannot write {path}: Permission denied")


def _special(path: str) -> bool:
  """True for an existing file that is no regular file: a device or a pipe."""
  return os.path.exists(path) and not os.path.isfile(path)


def write_text(path: str, text: str, flag: str) -> None:
  """Write `text` to the file a --flag named (through symlinks); a UserError naming the flag
  if that fails. A regular file is written aside and renamed into place, so a failed write
  never leaves a torn file where a good one was; a device or pipe is written in place."""
  target = os.path.realpath(path)
  direct = _special(target)
  aside = target if direct else f"{target}.partial"
  try:
    with open(aside, "w") as f:
      f.write(text)
    if not direct:
      os.replace(aside, target)
  except OSError as e:
    if not direct and os.path.isfile(aside):  # ours, half written (not a folder of that name)
      os.remove(aside)
    raise UserError(f"--{flag}: cannot write {path}: {e.strerror}") from None


def failed_settings_exit(rows: list[dict]) -> int:
  """A report tool's exit code: 1, after one error line, when it had settings and every one
  failed (a script with `set -e` then stops rather than read a table of errors as a
  result); else 0."""
  if rows and all("error" in r for r in rows):
    print_error(f"all {len(rows)} settings failed, the last with: {rows[-1]['error']}; the "
                "report names each one's error")
    return 1
  return 0


def write_report(json_path: str, report, markdown_path: str, markdown: str) -> None:
  """The --json and --markdown outputs of a report tool; an empty path writes nothing."""
  if json_path:
    write_text(json_path, json.dumps(report, indent=1) + "\n", "json")
  if markdown_path:
    write_text(markdown_path, markdown, "markdown")


def _flagfile_problem(error: flags.CantOpenFlagFileError) -> str:
  """absl's 'ERROR:: Unable to open flagfile: why' as one line with the fix."""
  why = " ".join(str(error).split()).removeprefix("ERROR:: ")
  return f"{why}; give --flagfile a file that exists"


def define_config_file(name: str, default, help_string: str, **kwargs):
  """config_flags.DEFINE_config_file, where a --flagfile that cannot be opened is one error
  line and exit 2: ml_collections reads the flagfiles of sys.argv as it defines the flag, at
  import, before parse_flags could report it (a traceback, exit 1)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except flags.CantOpenFlagFileError as e:
    fail(_flagfile_problem(e))


def _unknown_flag(error: flags.UnrecognizedFlagError, flag_values, required) -> str:
  """absl's first line, with the fix: --helpfull lists the flags; an override needs its file."""
  name = getattr(error, "flagname", "") or ""
  root = name.removeprefix("no").split(".", 1)[0]
  if "." in name and root in cli_help.config_flag_names(flag_values):
    example = required.get(root, "FILE")
    return f"--{name}: a config override needs --{root} first, e.g. --{root}={example}"
  return str(error).splitlines()[0] + " (see --helpfull)"


PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def packaged_config(value: str) -> str:
  """`value` (FILE[:args]) with FILE replaced by the packaged config it names, when FILE is
  not a file here but `NAME`, `NAME.py` or `.../configs/NAME.py` of pr_mim_jax/configs/.
  So --config=pretrain works from any directory, and so does the source tree's path."""
  file, sep, args = value.partition(":")
  if not file or os.path.isfile(file):
    return value
  name = pathlib.PurePath(file).name.removesuffix(".py")
  parent = pathlib.PurePath(file).parent.name
  packaged = PACKAGED_CONFIGS / f"{name}.py"
  if parent in ("", "configs") and name in PACKAGED_JOBS:
    return f"{packaged}{sep}{args}"
  return value


def _with_packaged_configs(argv, flag_values, check: bool = True) -> list[str]:
  """argv with every config flag's value passed through packaged_config; a UserError for a
  config file that is neither a file nor a packaged name (ml_collections would only report
  it later, as a traceback)."""
  # absl also takes the single-dash form, -config=FILE.
  names = {f"{dashes}{n}" for n in cli_help.config_flag_names(flag_values)
           for dashes in ("-", "--")}
  out = list(argv)
  for i, arg in enumerate(out):
    flag, sep, value = arg.partition("=")
    if flag in names and sep:
      at = i
    elif arg in names and i + 1 < len(out):
      flag, at, value = arg, i + 1, out[i + 1]
    else:
      continue
    value = packaged_config(value)
    file = value.partition(":")[0]
    if check and not os.path.isfile(file):  # '' too: ml_collections would defer that error
      raise UserError(f"{flag}={file}: no such config file; give a path, or the name of a "
                      f"packaged config: {', '.join(PACKAGED_JOBS)}")
    out[at] = f"{flag}={value}" if at == i else value
  return out


def _stray_argument(argv, arg: str, flag_values) -> str:
  """Why a positional argument is refused: no command takes one, and absl would drop it
  silently (`--config.knn.enabled false` sets True and drops 'false')."""
  at = argv.index(arg, 1) if arg in argv[1:] else 0  # 0: it came from a --flagfile
  before = argv[at - 1] if at > 1 else ""
  flag = before.lstrip("-")
  positive = flag[2:] if flag.startswith("no") and flag not in flag_values else flag
  if (before.startswith("-") and "=" not in before and positive in flag_values
      and isinstance(flag_values[positive].parser, flags.BooleanParser)):
    fix = f"--{positive}={arg}" if positive == flag else f"{before} alone"
    return f"unexpected argument {arg!r}: {before} takes no separate value; write {fix}"
  name = arg.partition("=")[0]
  root = name.removeprefix("no").split(".", 1)[0]
  if name in flag_values or root in cli_help.config_flag_names(flag_values):
    return f"unexpected argument {arg!r}: did you mean --{arg}?"
  return (f"unexpected argument {arg!r}: this command takes only flags; give a value as "
          "--flag=value (see --help)")


def _given_configs(argv, flag_values) -> list[tuple[str, str]]:
  """(name, value as typed) of each config flag given in argv."""
  return [(name, given) for name in cli_help.config_flag_names(flag_values)
          if (given := cli_help.argument_of(argv[1:], name)) is not None]


def _cannot_load(argv, flag_values, error: Exception) -> str | None:
  """`--config=FILE: cannot load it: why` for the OSError that ml_collections raises, in
  place of a config, on the first use of a config whose get_config raised OSError (a file
  it could not open); None for any other error."""
  if not isinstance(error, OSError) or error.__cause__ is None:
    return None
  given = _given_configs(argv, flag_values)
  if not given:
    return None
  why = " ".join(str(error.__cause__).split())  # one line
  return f"--{given[0][0]}={given[0][1]}: cannot load it: {why}"


def _json_config(argv, flag_values) -> str | None:
  """A config flag naming a .json file, e.g. a workdir's config.json (a run's record, which
  ml_collections would run as Python: "name 'null' is not defined"): what to give instead."""
  for name, given in _given_configs(argv, flag_values):
    if given.split(":", 1)[0].endswith(".json"):
      return (f"--{name}={given}: a .json file is a run's record, not a config file; give a "
              "config file such as pr_mim_jax/configs/pretrain.py with --config.FIELD=VALUE "
              "overrides (convert prints those of a converted workdir), or init=WORKDIR for "
              "probing, fine-tuning and k-NN")
  return None


def _config_problem(argv, flag_values) -> str | None:
  """Why a config flag given in argv holds no config, or None: ml_collections defers a load
  error to the config's first use (a traceback there), and keeps the None of a get_config
  without `return`."""
  for name, given in _given_configs(argv, flag_values):
    value = flag_values[name].value
    try:
      getattr(value, "keys", None)  # ml_collections' stand-in raises its load error here
    except OSError as e:
      return _cannot_load(argv, flag_values, e) or str(e)
    if value is None:
      return f"--{name}={given}: its get_config() returned None (a missing return statement?)"
  return None


def parse_flags(argv, required: dict[str, str], flag_values=None) -> None:
  """Parse absl flags; `required` maps flag name -> an example value for the message.

  -h / --help / --helpshort / --helpfull print the usage and exit 0. `flag_values` defaults
  to absl's global FLAGS (tests pass their own)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  asked = [a for a in argv[1:] if a in cli_help.HELP_FLAGS]
  if asked:
    print(cli_help.usage(_with_packaged_configs(argv, fv, check=False),
                         full="--helpfull" in asked, flag_values=fv), end="")
    sys.exit(0)
  try:  # flagfiles expanded first: a packaged config name may be given in one
    argv = _with_packaged_configs(fv.read_flags_from_files(argv, force_gnu=False), fv)
  except flags.CantOpenFlagFileError as e:
    fail(_flagfile_problem(e))
  except UserError as e:
    fail(str(e))
  json_config = _json_config(argv, fv)
  if json_config:
    fail(json_config)
  try:
    rest = fv(argv)
  except flags.UnrecognizedFlagError as e:
    fail(_unknown_flag(e, fv, required))
  except flags.IllegalFlagValueError as e:
    fail(override_errors.bad_value(argv, e, fv))
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except UserError as e:
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  # config file and override errors
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      fail(str(cause))
    fail(_cannot_load(argv, fv, e) or override_errors.unknown_field(argv, fv)
         or str(e).splitlines()[0])
  if rest[1:]:
    fail(_stray_argument(argv, rest[1], fv))
  problem = _config_problem(argv, fv)
  if problem:
    fail(problem)
  for name, example in required.items():
    if not fv[name].value:
      fail(f"--{name} is required, e.g. --{name}={example}")
  _expand_home(fv)


def _expand_home(fv) -> None:
  """A leading ~ in every string flag, expanded: the shell leaves `--workdir=~/run` as it is,
  which would make a folder named '~' in the current one (the configs' paths expand too)."""
  for name in fv:
    value = fv[name].value
    if isinstance(value, str) and value.startswith("~"):
      fv[name].value = os.path.expanduser(value)


# The command that runs each kind of config (config_kind).
KIND_COMMANDS = {"pretrain": "pr_mim_jax.main", "linear_probe": "pr_mim_jax.main",
                 "finetune": "pr_mim_jax.main", "knn": "pr_mim_jax.main",
                 "study": "pr_mim_jax.tools.study"}


def config_kind(config) -> str:
  """config.mode ('pretrain' when unset), or 'study' for pr_mim_jax/configs/study.py, the one
  config without a mode and with the study's `methods` and `setting`."""
  if "mode" not in config and "methods" in config and "setting" in config:
    return "study"
  return config.get("mode", "pretrain")


def check_config_kind(config_flag, kinds: tuple[str, ...], example: str) -> None:
  """A UserError naming --config's file and the kinds of config this command takes, unless
  the parsed config (`config_flag`, the absl flag) is one of `kinds`."""
  kind = config_kind(config_flag.value)
  if kind in kinds:
    return
  why = [] if kind == "study" else [f"config.mode={kind!r}"]
  why += [f"run by python -m {KIND_COMMANDS[kind]}"] if kind in KIND_COMMANDS else []
  takes = " or ".join(filter(None, (", ".join(kinds[:-1]), kinds[-1])))
  raise UserError(f"--{config_flag.name}={config_flag.config_filename} is a {kind} config "
                  f"({', '.join(why)}); this command takes a {takes} config, "
                  f"e.g. --{config_flag.name}={example}")


def run(main: Callable[[], int | None], required: dict[str, str], argv=None,
        flag_values=None, config_kinds: tuple[str, ...] = (), interrupted: str = "") -> int:
  """Parse flags, then run `main()`; a UserError it raises is printed as one line.

  `config_kinds`: the kinds of --config the command takes (config_kind), checked first.
  `interrupted`: what the one-line message for a Ctrl-C adds (what is kept, how to go on).
  Known harmless start-up log lines are dropped first (log_filters)."""
  log_filters.install()
  parse_flags(argv if argv is not None else sys.argv, required, flag_values)
  fv = flags.FLAGS if flag_values is None else flag_values
  try:
    if config_kinds:
      check_config_kind(fv["config"], config_kinds, required["config"])
    return main() or 0
  except UserError as e:
    fail(str(e))
  except OSError as e:
    if e.errno not in errors.STORAGE_FULL:
      raise
    fail(storage_full(e))
  except KeyboardInterrupt:  # Ctrl-C where no stop handler runs (compiling, a final k-NN)
    print_error(f"interrupted (Ctrl-C){'; ' + interrupted if interrupted else ''}")
    return EXIT_INTERRUPTED
  return EXIT_USER_ERROR
