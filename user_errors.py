"""Errors that the entry points turn into one line on stderr and exit code 2.

The ground floor of the project: every package imports it, it imports nothing of the project."""


class UserError(Exception):
    """Bad input from the user: a wrong option, a missing file, an impossible request.

    The message must be one line that says what is wrong and, where possible,
    what is valid. ``attack.py`` and ``train.py`` print it as
    ``error: <message>`` and exit with code 2, with no traceback.
    """


class DataError(UserError):
    """A data set is missing, truncated or malformed."""


class CompositionError(UserError):
    """A batch composition cannot be drawn from the chosen split."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe, corrupt or does not fit the request."""
