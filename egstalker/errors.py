"""User-facing errors.

Every stage raises `EgstalkerError` for problems the user can fix (bad input, missing weights, an unwritable
folder). The CLI prints its message as one line and exits non-zero, without a traceback. Messages say what is
wrong and what to do.
"""


class EgstalkerError(Exception):
    """An error caused by the user's input or environment, with a one-line message that says what to do."""

    exit_code = 2


class EgstalkerWarning(UserWarning):
    """Something the user should know that does not stop the work (an outdated dataset, a close-up); the CLI
    prints it as one line, `egstalker COMMAND: warning: ...`."""
