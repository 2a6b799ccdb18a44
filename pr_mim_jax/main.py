r"""Command line: python -m pr_mim_jax.main --config=configs/FILE.py[:k=v,...] --workdir=DIR [--config.x=y]

Invalid flags and config values stop before anything compiles, with one line that
names the field and the fix, and exit code 2.
"""

import logging
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pr_mim_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, big_vision style.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and pictures go "
                               "(local path or gs://). Rerunning with the same workdir resumes.")

MODES = ("pretrain",)
EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


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


def _parse_flags(argv):
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] + " (see --helpfull)")
  except UserError as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  # config file and override errors
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      _fail(str(cause))
    _fail(_unknown_override(argv, e) or str(e).splitlines()[0])
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/pretrain.py:dataset=shapes")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=workdirs/demo")


def main(argv=None) -> int:
  _parse_flags(argv if argv is not None else sys.argv)
  config = _CONFIG.value
  mode = config.get("mode", "pretrain")
  try:
    if mode not in MODES:
      raise UserError(f"config.mode: unknown mode {mode!r}; use one of {MODES}")
    from pr_mim_jax import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.check_config(config)  # before INFO logging, so a mistake prints one line
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    # orbax narrates every save at INFO; keep its warnings and errors only.
    absl_logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
    try:
      summary = pretrain.train(config, _WORKDIR.value)
    except pretrain.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  except UserError as e:
    _fail(str(e))
  logging.info("done: %s", summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
