"""Errors a user can cause and fix: each carries one line that says what is wrong and what to do.

The CLI catches :class:`UserError` at the boundary and prints ``error: <message>`` with no
traceback. Programming errors are not wrapped: they stay loud.
"""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a run directory)."""

    exit_code = 1


class ConfigError(UserError):
    """A flag or config value out of range; exits with code 2 like argparse does."""

    exit_code = 2

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


class DataError(UserError):
    """A data file that is missing, damaged or not what it claims to be."""
