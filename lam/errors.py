"""Errors caused by the user's input (a missing file, a block size that does not fit, ...).

The entry points print such an error as one line and exit with status 1, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user, with a message that says what to change."""
