"""Parse the `key=value,...` argument of a config file's `get_config(arg)`.

    --config=pr_mim_jax/configs/pretrain.py:variant=B/16,dataset=shapes

Types follow the defaults; an unknown key fails with the list of known ones.
"""

import ml_collections

from pr_mim_jax.errors import UserError


def _convert(key, text, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise UserError(f"config argument {key}={text!r}: expected true or false")
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      raise UserError(f"config argument {key}={text!r}: expected a {type(default).__name__}") from None
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x' with defaults {a: 0, b: 'y'} -> ConfigDict(a=1, b='x')."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    if not sep:
      raise UserError(f"config argument {item!r} is not key=value; known keys: {sorted(defaults)}")
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r}; known keys: {sorted(defaults)}")
    values[key] = _convert(key, text, defaults[key])
  return ml_collections.ConfigDict(values)
