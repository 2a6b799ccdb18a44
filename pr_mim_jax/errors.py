"""The one exception type for user mistakes (configs, datasets, checkpoints, flags).

`main` catches it, prints its message on one line and exits with code 2, without a
traceback. Messages name what was wrong and how to fix it.
"""


class UserError(Exception):
  """A mistake the user can fix; its message says what and how."""
