"""What a damaged checkpoint raises, recognized by the chain of causes, not the outer type.

Orbax wraps what goes wrong underneath: a data file truncated after the fact fails inside
TensorStore with ``ValueError: OUT_OF_RANGE: Error reading ...``, and Orbax raises a bare
``Exception: Encountered error while reading array index ...`` from it. So an error is damage
when some link of its chain (``__cause__``, else ``__context__``) says a file is missing,
unreadable or not what was written:

- an ``OSError`` (a file deleted, replaced by a folder, unreadable as the disk fails);
- a TensorStore status error (a ``ValueError`` whose message starts with ``OUT_OF_RANGE:``,
  ``DATA_LOSS:``, ``NOT_FOUND:``, ``FAILED_PRECONDITION:``, ...: a data file or OCDBT manifest
  truncated, altered or gone);
- JSON or msgpack that does not parse (Orbax's metadata files);
- :class:`ChecksumMismatch`: the arrays read back are not the arrays saved.

Anything else (a ``MemoryError`` anywhere in the chain, a sharding error, a bug) is not
damage: it propagates, and the checkpoint stays where it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

# TensorStore's status codes that mean the stored bytes are missing or not what was written.
# RESOURCE_EXHAUSTED (out of memory) and CANCELLED are not among them.
_TENSORSTORE_DAMAGE = re.compile(
    r"^(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN|ABORTED|"
    r"UNAVAILABLE|PERMISSION_DENIED|INTERNAL): "
)


# Any TensorStore status error ("CODE: message"), RESOURCE_EXHAUSTED (a full disk) included.
_TENSORSTORE_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


class ChecksumMismatch(ValueError):
    """Arrays restored from a checkpoint differ from the checksums stored when it was saved."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _is_damage_link(link: BaseException) -> bool:
    if isinstance(link, (OSError, json.JSONDecodeError, UnicodeDecodeError, ChecksumMismatch)):
        return True
    if type(link).__module__.startswith("msgpack"):  # ExtraData, FormatError, ...
        return True
    return isinstance(link, ValueError) and bool(_TENSORSTORE_DAMAGE.match(str(link)))


def from_tensorstore(error: BaseException) -> bool:
    """Whether ``error`` is a TensorStore status error (a ``ValueError`` ``"CODE: ..."``): what
    a read or write of a checkpoint's files raises, damage or not."""
    return isinstance(error, ValueError) and bool(_TENSORSTORE_STATUS.match(str(error)))


def damage(error: BaseException) -> BaseException | None:
    """The link of ``error``'s chain of causes that says a checkpoint is damaged, or None.

    None also when any link is a ``MemoryError``: running out of memory while reading is not
    the checkpoint's fault.
    """
    links = list(_chain(error))
    if any(isinstance(link, MemoryError) for link in links):
        return None
    return next((link for link in links if _is_damage_link(link)), None)


def describe(error: BaseException) -> str:
    """The first line of an error (up to 200 characters), or its type when it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
