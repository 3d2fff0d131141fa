"""Reading IDX files, the format MNIST and its sister datasets ship in.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the data in C order. We read it ourselves (no
pickle, no framework) and check every part, so a damaged file names itself instead of
surfacing later as a shape error inside JAX.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from jax_mnist.errors import DataError

# IDX dtype codes; MNIST uses only 0x08 (uint8), the rest are part of the format.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """Returns the content of ``path``, decompressed when it is gzip (by its magic bytes)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: damaged gzip data ({e}); replace the file with a good copy") from None


def parse_idx(content: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Parses IDX ``content`` into an array with the shape and dtype the header declares.

    Args:
      content: the decompressed bytes of an IDX file.
      name: how to name the file in error messages.

    Returns:
      The array, e.g. uint8 ``[N, 28, 28]`` for images or ``[N]`` for labels.

    Raises:
      DataError: the magic number, dtype, dimensions or size do not check out.
    """
    if len(content) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(content)} bytes, no header)")
    zero, dtype_code, ndim = content[:2], content[2], content[3]
    if zero != b"\x00\x00" or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(
            f"{name}: not an IDX file (bad magic number 0x{content[:4].hex()}); "
            "expected e.g. 0x00000803 for images or 0x00000801 for labels"
        )
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise DataError(f"{name}: truncated IDX header ({len(content)} of {header_size} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[dtype_code]
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(content) != expected:
        what = "truncated" if len(content) < expected else "has trailing bytes"
        raise DataError(
            f"{name}: {what}: header declares shape {shape} ({expected} bytes), file has {len(content)} bytes"
        )
    array = np.frombuffer(content, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def sha256(content: bytes) -> str:
    """Hex SHA-256 of ``content``."""
    return hashlib.sha256(content).hexdigest()


def load_idx(path: Path, *, expected_sha256: str | None = None) -> np.ndarray:
    """Reads, verifies and parses one IDX file, gzipped or not.

    Args:
      path: the file.
      expected_sha256: SHA-256 of the decompressed content; checked when given.

    Returns:
      The parsed array (see :func:`parse_idx`).
    """
    content = read_bytes(path)
    array = parse_idx(content, name=str(path))
    if expected_sha256 is not None and sha256(content) != expected_sha256:
        raise DataError(
            f"{path}: checksum mismatch (SHA-256 of its content is {sha256(content)[:16]}..., "
            f"expected {expected_sha256[:16]}...); the file is damaged or not the one expected, "
            "replace it with a good copy"
        )
    return array
