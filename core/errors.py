"""Errors that are the user's mistake, not the program's.

Every ``landmarks`` command catches :class:`UserError` (and its subclasses, e.g. a manifest with a
misspelt column) and prints one line, ``landmarks <command>: error: <message>``, with exit status
2. So the message must name what to fix: the file, the row, the key or the option.
"""


class UserError(ValueError):
    """A bad input (file, column, row, option, config value); the message names it.

    A ``ValueError`` too, so code written against the older per-module errors keeps working.
    """
