"""What -h / --help / --helpshort / --helpfull print: the command's docstring, the config
file it was given (its docstring and the arguments of FILE:key=value,...), and its flags.

A config file's arguments are its module-level ARGUMENTS dict (name -> default), the one
its get_config hands to config_args.parse_arg.
"""

import importlib.util
import os
import sys

from absl import flags
from ml_collections.config_flags import config_flags as config_flags_impl

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def argument_of(argv, name: str) -> str | None:
  """The value argv gives --name (`--name=v` or `--name v`, the last one wins); None if absent."""
  value = None
  for i, arg in enumerate(argv):
    flag, sep, text = arg.partition("=")
    if flag.lstrip("-") == name and flag.startswith("-"):
      value = text if sep else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def config_flag_names(flag_values) -> list[str]:
  return [n for n in flag_values
          if "." not in n and config_flags_impl.is_config_flag(flag_values[n])]


def config_file_help(name: str, path: str) -> str:
  """The docstring and ARGUMENTS of the config file --name=PATH[:args] names."""
  if not os.path.isfile(path):
    return f"--{name}={path}: no such config file."
  spec = importlib.util.spec_from_file_location("_config_file_for_help", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # help must not fail on a bad file
    return f"--{name}={path}: cannot load it ({type(e).__name__}: {e})."
  arguments = getattr(module, "ARGUMENTS", None)
  if arguments:
    listed = "\n".join(f"  {k}  (default {v!r})" for k, v in arguments.items())
    args = f"Arguments, as --{name}={path}:key=value,...:\n{listed}"
  else:
    args = "It takes no arguments."
  return f"Config file {path}:\n\n{(module.__doc__ or '').strip()}\n\n{args}"


def _config_help(argv, flag_values) -> list[str]:
  parts = []
  for name in config_flag_names(flag_values):
    value = argument_of(argv[1:], name)
    if value:
      parts.append(config_file_help(name, value.split(":", 1)[0]))
    else:
      parts.append(f"Add --{name}=FILE to --help to see that config file's description and "
                   "arguments.")
  return parts


def usage(argv, full: bool, flag_values=None) -> str:
  """The command's docstring, its config file's help, and its flags; `full` adds absl's own."""
  fv = flags.FLAGS if flag_values is None else flag_values
  by_module = fv.flags_by_module_dict()
  main = sys.modules.get("__main__")
  # Ours: this package's modules and the command itself (libraries such as orbax define flags too).
  ours = [m for m in by_module
          if m.startswith("pr_mim_jax") or m == getattr(main, "__file__", None)]
  # absl names a module run with `python -m` by its file path.
  modules_of = {m: sys.modules.get(m) or (main if m == getattr(main, "__file__", None) else None)
                for m in ours}
  docs = [(mod.__doc__ or "").strip() for mod in modules_of.values() if mod is not None]
  own = [f"Flags:\n{fv.module_help(m).strip().split(chr(10), 1)[1]}" for m in ours]
  others = [fv.module_help(m) for m in by_module if m not in ours] if full else []
  parts = [d for d in docs if d] + _config_help(argv, fv) + own + others
  if not full:
    parts.append("(--helpfull also lists absl's logging flags.)")
  return "\n\n".join(parts) + "\n"
