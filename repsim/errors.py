"""The one exception type the CLI turns into a one-line message (no traceback).

Library messages speak Python: they name parameters as ``name=`` (``layers='blocks.9'``,
``batch_size=0``), so a notebook user reads the argument they passed. The CLI rewrites each
``name=`` into its flag (``--layers 'blocks.9'``) with :func:`as_flags` before printing.
"""

import re


class UserError(Exception):
    """Bad input from the user: say what was given, what is valid, and how to fix it."""


def as_flags(message: str) -> str:
    """``"batch_size=0 ..."`` -> ``"--batch-size 0 ..."``: a library message in CLI terms."""
    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=(?!=)",
                  lambda m: "--" + m.group(1).replace("_", "-") + " ", message)
