"""The one exception type that reaches users as a single line."""


class UserError(ValueError):
  """Bad input from a user: the message names the problem and the fix."""
