"""Shared command-line handling: user mistakes become one `error:` line and exit code 2.

Every entry point parses absl flags and a big_vision config through `run`, so a bad flag,
config argument or override never shows a raw traceback, and -h / --help / --helpfull
print the command's usage.
"""

import json
import sys
from typing import Callable

from absl import flags

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


def _unknown_override(argv, error: Exception) -> str | None:
  """Name the --config.x.y=... flag behind a KeyError/AttributeError from ml_collections."""
  for err in (error, error.__cause__, error.__context__):
    if isinstance(err, (KeyError, AttributeError)):
      missing = str(err.args[0] if err.args else err).strip("'\"")
      for arg in argv:
        path = arg.split("=", 1)[0].removeprefix("--config.")
        if arg.startswith("--config.") and missing in path.split("."):
          return (f"config.{path}: unknown config field ({arg}); check the spelling against the "
                  "config file or the README's field list")
  return None


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def usage(full: bool) -> str:
  """The command's docstring and its flags; `full` adds absl's own flags."""
  by_module = flags.FLAGS.flags_by_module_dict()
  ours = [m for m in by_module if not m.startswith("absl")]
  main = sys.modules.get("__main__")
  # absl names a module run with `python -m` by its file path.
  modules_of = {m: sys.modules.get(m) or (main if m == getattr(main, "__file__", None) else None)
                for m in ours}
  docs = [(mod.__doc__ or "").strip() for mod in modules_of.values() if mod is not None]
  own = [f"Flags:\n{flags.FLAGS.module_help(m).strip().split(chr(10), 1)[1]}" for m in ours]
  others = [flags.FLAGS.module_help(m) for m in by_module if m not in ours] if full else []
  parts = [d for d in docs if d] + own + others
  if not full:
    parts.append("(--helpfull also lists absl's logging flags.)")
  return "\n\n".join(parts) + "\n"


def parse_flags(argv, required: dict[str, str]) -> None:
  """Parse absl flags; `required` maps flag name -> an example value for the message.

  -h / --help / --helpshort / --helpfull print the usage and exit 0."""
  asked = [a for a in argv[1:] if a in HELP_FLAGS]
  if asked:
    print(usage(full="--helpfull" in asked), end="")
    sys.exit(0)
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] + " (see --helpfull)")
  except UserError as e:
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  # config file and override errors
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      fail(str(cause))
    fail(_unknown_override(argv, e) or str(e).splitlines()[0])
  for name, example in required.items():
    if not flags.FLAGS[name].value:
      fail(f"--{name} is required, e.g. --{name}={example}")


def run(main: Callable[[], int | None], required: dict[str, str], argv=None) -> int:
  """Parse flags, then run `main()`; a UserError it raises is printed as one line."""
  parse_flags(argv if argv is not None else sys.argv, required)
  try:
    return main() or 0
  except UserError as e:
    fail(str(e))
  return EXIT_USER_ERROR
