"""Errors a user can cause and fix: each carries one line that says what is wrong and what to do.

The CLI catches :class:`UserError` at the boundary and prints ``error: <message>`` with no
traceback. Programming errors are not wrapped: they stay loud.
"""

import errno
import re


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


class WriteError(UserError):
    """A file could not be written: no space left, over quota, a read-only file system, no
    permission. Exits with code 74 (``EX_IOERR`` of sysexits.h)."""

    exit_code = 74


# The errors that say the storage refuses a write, rather than that the program is wrong.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def write_failure(error: BaseException) -> tuple[str, int] | None:
    """``(path, errno)`` if ``error``, or an error it was raised from, is a refused write.

    Python's own writes raise ``OSError``; TensorStore (under Orbax's checkpoints) raises a
    ``ValueError`` whose message ends with the OS error code, as
    ``Failed writing: "PATH": ... [os_error_code='28']``.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return str(e.filename or "?"), e.errno
        code = re.search(r"\[os_error_code='(\d+)'\]", str(e))
        if code and int(code.group(1)) in WRITE_ERRNOS:
            path = re.search(r'(?:Failed writing|local file|file): "([^"]+)"', str(e))
            return (path.group(1) if path else "?"), int(code.group(1))
        pending += [e.__cause__, e.__context__]
    return None
