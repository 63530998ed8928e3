"""The one exception type the CLI turns into a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input from the user: say what was given, what is valid, and how to fix it."""
