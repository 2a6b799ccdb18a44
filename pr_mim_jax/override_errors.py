"""Readable errors for --config.a.b=VALUE overrides that ml_collections rejects.

ml_collections reports a misspelt field as a KeyError repr and a bad value with its parser's
text; these name the full field path, the closest field that exists, or the expected type.
The config is loaded again for this, because ml_collections drops it when an override fails.
"""

import difflib
import re

import ml_collections
from absl import flags

from pr_mim_jax import cli_help


def _load_config(argv, flag_values, name: str):
  """The ConfigDict of config flag --name as argv gives it, before overrides; None if it fails.

  Loaded again because ml_collections drops it when an override fails."""
  if name not in cli_help.config_flag_names(flag_values):
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


def unknown_field(argv, flag_values) -> str | None:
  """The first --config.a.b=... in argv that names no field, as `--config.a.b: why; fix`."""
  for name in cli_help.config_flag_names(flag_values):
    paths = _overrides(argv, name)
    config = _load_config(argv, flag_values, name) if paths else None
    for path in paths if config is not None else ():
      problem = field_problem(config, path, name)
      if problem:
        return f"--{name}.{path}: {problem}"
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
  load_error = _config_load_error(str(error))
  if load_error:
    return f"--{name}={value}: cannot load it: {load_error}"
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


def _config_load_error(text: str) -> str | None:
  """The exception line of a config file's get_config that raised TypeError or ValueError:
  ml_collections packs its traceback into the flag error, whose first line ends at
  'Error whilst parsing config file:'. None for any other error text."""
  if "Error whilst parsing config file:" not in text or "Traceback" not in text:
    return None
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1].strip()


def _get_path(config, path: str):
  """config.a.b for path 'a.b'; None when a step is missing."""
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node
