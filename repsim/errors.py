"""The one exception type the CLI turns into a one-line message (no traceback).

Library messages speak Python: they name parameters as ``name=`` (``layers='blocks.9'``,
``batch_size=0``, ``restart=True``), so a notebook user reads the argument they passed. The
CLI rewrites each ``name=`` into its flag (``--layers 'blocks.9'``, ``--restart``) with
:func:`as_flags` before printing.
"""

import re


class UserError(Exception):
    """Bad input from the user: say what was given, what is valid, and how to fix it."""


def as_flags(message: str) -> str:
    """``"batch_size=0 ..."`` -> ``"--batch-size 0 ..."``: a library message in CLI terms.

    ``name=True`` becomes the bare switch ``--name``."""
    def flag(m: re.Match) -> str:
        return "--" + m.group(1).replace("_", "-") + ("" if m.group(2) else " ")

    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=(?!=)(True\b)?", flag, message)
