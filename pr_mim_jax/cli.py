"""Shared command-line handling: user mistakes become one `error:` line and exit code 2.

Every entry point parses absl flags and a big_vision config through `run`, so a bad flag,
config argument or override never shows a raw traceback, and -h / --help / --helpfull
print the command's usage.
"""

import difflib
import json
import re
import sys
from typing import Callable

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags as config_flags_impl

from pr_mim_jax import cli_help
from pr_mim_jax import log_filters
from pr_mim_jax.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def output_dir(path: str, flag: str):
  """The directory `path` (local or gs://), created; a UserError naming --flag otherwise."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = epath.Path(path)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"--{flag}: cannot create {out}: {e.strerror}") from None
  return out


def write_text(path: str, text: str, flag: str) -> None:
  """Write `text` to the file a --flag named; a UserError naming the flag if that fails."""
  try:
    with open(path, "w") as f:
      f.write(text)
  except OSError as e:
    raise UserError(f"--{flag}: cannot write {path}: {e.strerror}") from None


def write_report(json_path: str, report, markdown_path: str, markdown: str) -> None:
  """The --json and --markdown outputs of a report tool; an empty path writes nothing."""
  if json_path:
    write_text(json_path, json.dumps(report, indent=1) + "\n", "json")
  if markdown_path:
    write_text(markdown_path, markdown, "markdown")


def _load_config(argv, flag_values, name: str):
  """The ConfigDict of config flag --name as argv gives it, before overrides; None if it fails.

  Loaded again because ml_collections drops it when an override fails."""
  if name not in flag_values or not config_flags_impl.is_config_flag(flag_values[name]):
    return None
  argument = cli_help.argument_of(argv, name)
  try:
    config = flag_values[name].parser.parse(argument) if argument else flag_values[name].default
    config.keys()  # a file that failed to load raises here
  except Exception:  # pylint: disable=broad-except  # no config: the caller falls back
    return None
  return config if isinstance(config, ml_collections.ConfigDict) else None


def _overrides(argv, name: str) -> list[str]:
  """Field paths that argv overrides in config flag --name: --name.a.b=v -> 'a.b'."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
  return [m.group(1) for m in map(pattern.match, argv) if m]


def field_problem(config, path: str, name: str = "config") -> str | None:
  """Why `path` ('optim.base_lrr') names no field of `config`, and the closest path that does.

  None when `path` is a field. Each unknown step is replaced by its closest sibling (difflib),
  so 'optimm.base_lrr' becomes 'optim.base_lr'; a step with no close sibling lists its siblings."""
  node, fixed = config, []
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      where = ".".join(fixed)
      return (f"config field {where} is a {type(node).__name__}, not a group of fields; "
              f"set it with --{name}.{where}=VALUE")
    if part not in node:
      fields = sorted(node.keys())
      close = difflib.get_close_matches(part, fields, n=1)
      if not close:
        owner = ".".join([name] + fixed)
        return f"unknown config field {path}; {owner} has fields {', '.join(fields)}"
      part = close[0]
    node = node[part]
    fixed.append(part)
  suggestion = ".".join(fixed)
  return None if suggestion == path else f"unknown config field {path}; did you mean {suggestion}?"


def _override_error(argv, flag_values) -> str | None:
  """The first --config.a.b=... in argv that names no field, as `--config.a.b: why; fix`."""
  for name in cli_help.config_flag_names(flag_values):
    paths = _overrides(argv, name)
    config = _load_config(argv, flag_values, name) if paths else None
    for path in paths if config is not None else ():
      problem = field_problem(config, path, name)
      if problem:
        return f"--{name}.{path}: {problem}"
  return None


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes / contexts, outermost first."""
  out = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _unknown_key(argv, error: Exception) -> str | None:
  """Fallback when the config cannot be reloaded: the override behind ml_collections' KeyError.

  Its message reads `'base_lrr'\\nDid you mean "base_lr" instead of "base_lrr"?`."""
  errors = _chain(error)
  keys = [e.args[0] for e in errors if isinstance(e, KeyError) and e.args
          and isinstance(e.args[0], str) and "\n" not in e.args[0]]
  hint = next(filter(None, (re.search(r'Did you mean "([^"]+)"', str(e)) for e in errors)), None)
  for arg in argv:
    path = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and keys and keys[-1] in path.split("."):
      parts = [hint.group(1) if p == keys[-1] and hint else p for p in path.split(".")]
      fix = f"did you mean {'.'.join(parts)}?" if hint else "check its spelling in the config file"
      return f"--config.{path}: unknown config field {path}; {fix}"
  return None


def _expected(parser) -> str | None:
  """What a flag's parser accepts, in words: 'an integer', 'a number', 'true or false'."""
  if isinstance(parser, flags.BooleanParser):
    return "true or false"
  if isinstance(parser, (flags.IntegerParser, flags.FloatParser)):
    return parser.syntactic_help  # 'an integer', 'a non-negative integer', 'a number', ...
  return None


def bad_value(argv, error: flags.IllegalFlagValueError, flag_values) -> str:
  """`--name=value: expected ...` for a flag whose value does not parse."""
  message = str(error).splitlines()[0]
  m = re.match(r"flag --([^=]+)=", message)
  if not m:
    return message
  name = m.group(1)
  value = cli_help.argument_of(argv, name)
  reason = str(error.__cause__) if error.__cause__ else message.split(": ", 1)[-1]
  value = value if value is not None else message[m.end():].rsplit(": " + reason, 1)[0]
  root, _, path = name.partition(".")
  config = _load_config(argv, flag_values, root) if path else None
  if config is not None and isinstance(_get_path(config, path), ml_collections.ConfigDict):
    fields = sorted(_get_path(config, path).keys())
    return (f"--{name}={value}: {path} is a group of fields ({', '.join(fields)}); set them one "
            f"at a time, e.g. --{name}.{fields[0] if fields else 'FIELD'}=VALUE")
  expected = _expected(flag_values[name].parser) if name in flag_values else None
  return f"--{name}={value}: expected {expected}" if expected else f"--{name}={value}: {reason}"


def _get_path(config, path: str):
  """config.a.b for path 'a.b'; None when a step is missing."""
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def _unknown_flag(error: flags.UnrecognizedFlagError, flag_values, required) -> str:
  """absl's first line, with the fix: --helpfull lists the flags; an override needs its file."""
  name = getattr(error, "flagname", "") or ""
  root = name.removeprefix("no").split(".", 1)[0]
  if "." in name and root in flag_values and config_flags_impl.is_config_flag(flag_values[root]):
    example = required.get(root, "FILE")
    return f"--{name}: a config override needs --{root} first, e.g. --{root}={example}"
  return str(error).splitlines()[0] + " (see --helpfull)"


def parse_flags(argv, required: dict[str, str], flag_values=None) -> None:
  """Parse absl flags; `required` maps flag name -> an example value for the message.

  -h / --help / --helpshort / --helpfull print the usage and exit 0. `flag_values` defaults
  to absl's global FLAGS (tests pass their own)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  asked = [a for a in argv[1:] if a in cli_help.HELP_FLAGS]
  if asked:
    print(cli_help.usage(argv, full="--helpfull" in asked, flag_values=fv), end="")
    sys.exit(0)
  try:
    fv(argv)
  except flags.UnrecognizedFlagError as e:
    fail(_unknown_flag(e, fv, required))
  except flags.IllegalFlagValueError as e:
    fail(bad_value(argv, e, fv))
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except UserError as e:
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  # config file and override errors
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      fail(str(cause))
    fail(_override_error(argv, fv) or _unknown_key(argv, e) or str(e).splitlines()[0])
  for name, example in required.items():
    if not fv[name].value:
      fail(f"--{name} is required, e.g. --{name}={example}")


def run(main: Callable[[], int | None], required: dict[str, str], argv=None,
        flag_values=None) -> int:
  """Parse flags, then run `main()`; a UserError it raises is printed as one line.

  Known harmless start-up log lines are dropped first (log_filters)."""
  log_filters.install()
  parse_flags(argv if argv is not None else sys.argv, required, flag_values)
  try:
    return main() or 0
  except UserError as e:
    fail(str(e))
  return EXIT_USER_ERROR
