"""The one exception type for bad input: the CLIs print its message on one line and exit 2."""


class UserError(Exception):
    """Bad input from the user: a file, key or value, and what to do about it."""
