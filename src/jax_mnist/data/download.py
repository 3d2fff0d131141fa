"""Fetching a dataset's files into the cache, verified, on request only.

Nothing here runs unless the user selects a dataset that is not bundled (``--dataset
fashion_mnist``) or asks for it (``jax-mnist download NAME``). Each file is

- downloaded with urllib into ``<cache>/<dataset>/<file>.part``, with a timeout on every socket
  operation; an interrupted transfer resumes from where it stopped (an HTTP ``Range`` request),
  and failed attempts are retried with exponential backoff;
- checked against the SHA-256 kept in the code (:mod:`jax_mnist.data.datasets`): a mismatch
  deletes the file and says so; a good file is renamed to its final name.

A dataset shipped as one zip (EMNIST) is extracted after its check: the members it needs are
written beside it, their SHA-256 is recorded in ``SHA256SUMS`` for later loads, and the zip is
deleted.

Without a network, a one-line error names the file and where to put it. The base URL can be
replaced by a mirror (``JAX_MNIST_MIRROR``, or ``mirror=`` here): files are then fetched from
``<mirror>/<dataset>/<file>``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from jax_mnist.data.datasets import DATASETS, Arrays, DatasetInfo, Download, file_sha256, load_from_dir
from jax_mnist.errors import DataError

MIRROR_ENV = "JAX_MNIST_MIRROR"
CACHE_ENV = "JAX_MNIST_CACHE"
MANIFEST = "SHA256SUMS"
CHUNK = 1 << 16
USER_AGENT = "jax-mnist (+https://pypi.org/project/jax-mnist/)"

# HTTP statuses worth another try: the server is busy or briefly failing.
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


def default_cache_dir() -> Path:
    """The platform's user cache folder for jax-mnist.

    ``$JAX_MNIST_CACHE`` if set; else ``%LOCALAPPDATA%\\jax-mnist\\Cache`` on Windows,
    ``~/Library/Caches/jax-mnist`` on macOS, and ``$XDG_CACHE_HOME/jax-mnist`` (default
    ``~/.cache/jax-mnist``) elsewhere.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "jax-mnist" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "jax-mnist"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "jax-mnist"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def dataset_dir(info: DatasetInfo, cache_dir: str | Path | None = None) -> Path:
    """The folder of ``info``'s files inside the cache."""
    return resolve_cache_dir(cache_dir) / info.name


def source_url(info: DatasetInfo, download: Download, mirror: str | None = None) -> str:
    """Where to fetch ``download``: its official URL, or ``<mirror>/<dataset>/<file>``."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{info.name}/{download.filename}"
    return download.url


def final_files(info: DatasetInfo) -> list[str]:
    """The names of the files a complete cache of ``info`` holds."""
    if info.archive_members:
        return [Path(m).name for m in info.archive_members] + [MANIFEST]
    return [d.filename for d in info.downloads]


def is_cached(info: DatasetInfo, cache_dir: str | Path | None = None) -> bool:
    """Whether every file of ``info`` is in the cache (not re-verified here)."""
    directory = dataset_dir(info, cache_dir)
    return bool(info.downloads) and all((directory / name).is_file() for name in final_files(info))


def cached_size(info: DatasetInfo, cache_dir: str | Path | None = None) -> int:
    """Bytes that ``info``'s finished files take in the cache."""
    directory = dataset_dir(info, cache_dir)
    return sum((directory / n).stat().st_size for n in final_files(info) if (directory / n).is_file())


def read_manifest(directory: Path) -> dict[str, str]:
    """File name -> SHA-256 from ``directory/SHA256SUMS`` (``sha256  name`` lines), if present."""
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest and name:
            sums[name] = digest
    return sums


class Progress:
    """A progress bar for one file: rich on a terminal, a start and an end line otherwise."""

    def __init__(self, name: str, total: int, done: int, enabled: bool):
        self.name, self.total, self.enabled = name, total, enabled
        self._bar = None
        if not enabled:
            return
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(name, total=total or None, completed=done)
        else:
            resumed = f", resuming at {done:,} bytes" if done else ""
            print(f"downloading {name} ({total:,} bytes{resumed})", file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self, ok: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and ok:
            print(f"downloaded {self.name}", file=sys.stderr, flush=True)


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    timeout: float = 30.0,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Downloads ``url`` to ``dest``, resuming a partial ``dest.part``, and verifies it.

    Args:
      url: http(s) URL of the file.
      dest: the final path; the transfer goes to ``dest`` + ``.part`` and is renamed when good.
      sha256: the expected SHA-256 of the whole file.
      size: the expected size in bytes, for the progress bar and an early check.
      timeout: seconds allowed for connecting and for each read from the socket.
      retries: further attempts after a failed one (connection errors, 5xx, cut transfers).
      backoff: seconds before the first retry, doubled for each next one.
      progress: show a progress bar (a plain line when stderr is not a terminal).
      sleep: how to wait between attempts (``time.sleep``).

    Returns:
      ``dest``, verified.

    Raises:
      DataError: the file could not be fetched, or its checksum is wrong (the file is deleted).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, size=size, timeout=timeout, progress=progress, name=dest.name)
            break
        except DownloadError as e:
            raise DownloadError(e.url, e.reason, dest, sha256) from None
        except _Retryable as e:
            if attempt == retries:
                raise DownloadError(url, str(e), dest, sha256) from None
            sleep(backoff * 2**attempt)
    digest = file_sha256(part)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{url}: checksum mismatch (SHA-256 {digest[:16]}..., expected {sha256[:16]}...); "
            "the downloaded file was deleted, try again or fetch it from another mirror"
        )
    os.replace(part, dest)
    return dest


class _Retryable(Exception):
    """A failure that another attempt may get past; its message says what happened."""


class DownloadError(DataError):
    """A file could not be fetched (no network, server down, HTTP error).

    The message says what happened and where to put the file to work offline.
    """

    def __init__(self, url: str, reason: str, dest: Path | None = None, sha256: str | None = None):
        self.url, self.reason = url, reason
        hint = f"; to work offline, fetch that file elsewhere and put it at {dest} (SHA-256 {sha256})"
        super().__init__(f"cannot download {url} ({reason}){hint if dest else ''}")


def _fetch(url: str, part: Path, *, size: int | None, timeout: float, progress: bool, name: str) -> None:
    """One attempt: appends to ``part`` from its current length to the end of the file."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()  # longer than the real file: not a prefix of it
        have = 0
    if size is not None and have == size:
        return  # complete already; the checksum decides
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return  # nothing left past what we have; the checksum decides
        if e.code in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(url, f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        if isinstance(e.reason, socket.gaierror):
            # The host name does not resolve: offline, most likely; retrying would only wait.
            raise DownloadError(url, f"no network: {reason}") from None
        raise _Retryable(f"no connection: {reason}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Retryable(f"no connection: {e or type(e).__name__}") from None
    with response:
        if have and (response.status != 206 or not _range_starts_at(response, have)):
            have = 0  # the server ignored Range: start again from the first byte
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else (size or 0)
        bar = Progress(name, total, have, progress)
        ok = False
        try:
            with part.open("ab" if have else "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.advance(len(chunk))
            got = part.stat().st_size
            # A server that closes the connection early ends the body without an error.
            if length and length.isdigit() and got != have + int(length):
                raise _Retryable(f"transfer cut after {got:,} of {have + int(length):,} bytes")
            ok = True
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            what = type(e).__name__ if not str(e) else str(e)
            raise _Retryable(f"transfer cut after {part.stat().st_size:,} bytes: {what}") from None
        finally:
            bar.close(ok)


def _range_starts_at(response, offset: int) -> bool:
    """Whether a 206 response's ``Content-Range: bytes START-END/TOTAL`` starts at ``offset``."""
    content_range = response.headers.get("Content-Range", "")
    start = content_range.removeprefix("bytes ").split("-", 1)[0]
    return start.isdigit() and int(start) == offset


def fetch_dataset(
    info: DatasetInfo,
    cache_dir: str | Path | None = None,
    *,
    mirror: str | None = None,
    progress: bool = True,
    **download_options,
) -> Path:
    """Makes sure ``info``'s files are in the cache, downloading what is missing.

    Args:
      info: a dataset with ``downloads``.
      cache_dir: the cache root (default: :func:`default_cache_dir`).
      mirror: a base URL to fetch from instead of the official ones (default ``$JAX_MNIST_MIRROR``).
      progress: show progress bars.
      **download_options: passed to :func:`download_file` (timeout, retries, backoff).

    Returns:
      The dataset's folder in the cache.
    """
    if not info.downloads:
        raise DataError(f"{info.name} ships inside the package; there is nothing to download")
    directory = dataset_dir(info, cache_dir)
    if is_cached(info, cache_dir):
        return directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{directory}: cannot create the cache folder ({e.strerror}); set --cache-dir"
        ) from None
    with _cache_lock(directory):
        # Another process may have filled the cache while this one waited for the lock.
        if not is_cached(info, cache_dir):
            _fetch_missing(info, directory, mirror=mirror, progress=progress, **download_options)
    return directory


@contextlib.contextmanager
def _cache_lock(directory: Path):
    """An exclusive lock on ``directory/.lock``, so that processes sharing a cache (the processes
    of one run, or two runs) never write the same ``.part`` file at once. No lock where
    ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_missing(info: DatasetInfo, directory: Path, *, mirror, progress, **download_options) -> None:
    """Downloads the files of ``info`` not yet in ``directory``, then extracts an archive."""
    for download in info.downloads:
        dest = directory / download.filename
        if dest.is_file():
            continue
        try:
            download_file(
                source_url(info, download, mirror),
                dest,
                sha256=download.sha256,
                size=download.size,
                progress=progress,
                **download_options,
            )
        except DownloadError as e:
            missing = [d.filename for d in info.downloads if not (directory / d.filename).is_file()]
            raise DataError(
                f"cannot download {e.url} ({e.reason}); to work offline, put {', '.join(missing)} "
                f"(see `jax-mnist datasets --files` for URLs and SHA-256) in {directory}"
            ) from None
    if info.archive_members:
        extract_members(directory / info.downloads[0].filename, info.archive_members, directory)


def extract_members(archive: Path, members: tuple[str, ...], directory: Path) -> None:
    """Writes ``members`` of the zip ``archive`` into ``directory``, records their SHA-256, deletes the zip.

    ``zipfile`` checks each member's CRC-32 as it reads it; the zip itself was checked by SHA-256.
    """
    sums = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in members:
                target = directory / Path(member).name
                tmp = target.with_name(target.name + ".part")
                with zf.open(member) as src, tmp.open("wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp, target)
                sums[target.name] = file_sha256(target)
    except KeyError as e:
        raise DataError(
            f"{archive}: the archive has no member {e}; delete it and download it again"
        ) from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{archive}: cannot extract ({e}); delete it and download it again") from None
    (directory / MANIFEST).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    archive.unlink()


def load_cached(
    info: DatasetInfo, cache_dir: str | Path | None = None, *, test: bool = True, **fetch_options
) -> Arrays:
    """``info``'s arrays from the cache, fetching the files first if they are not there."""
    directory = fetch_dataset(info, cache_dir, **fetch_options)
    return load_from_dir(info, directory, file_sha256=read_manifest(directory), test=test)


def describe(cache_dir: str | Path | None = None) -> list[dict]:
    """One row per dataset for ``jax-mnist datasets``: name, classes, sizes, where it is."""
    rows = []
    for info in DATASETS.values():
        if info.bundled:
            where = "bundled"
        elif is_cached(info, cache_dir):
            where = f"cached in {dataset_dir(info, cache_dir)}"
        else:
            where = "not downloaded"
        rows.append(
            {
                "name": info.name,
                "classes": info.num_classes,
                "download_bytes": info.download_size,
                "cached_bytes": cached_size(info, cache_dir) if not info.bundled else 0,
                "where": where,
                "license": info.license,
                "description": info.description,
            }
        )
    return rows


def format_datasets(rows: list[dict]) -> str:
    """The table ``jax-mnist datasets`` prints."""
    lines = [f"{'dataset':<14} {'classes':>7} {'download':>9}  {'where':<40} license"]
    for row in rows:
        size = f"{row['download_bytes'] / 1e6:.1f} MB" if row["download_bytes"] else "-"
        lines.append(f"{row['name']:<14} {row['classes']:>7} {size:>9}  {row['where']:<40} {row['license']}")
        lines.append(f"{'':<14} {row['description']}")
    return "\n".join(lines)


def format_files(cache_dir: str | Path | None = None) -> str:
    """Every file to download, where it comes from, where it goes, and its SHA-256: for offline use."""
    lines = []
    for info in DATASETS.values():
        for d in info.downloads:
            lines.append(f"{info.name}: {d.url}  ({d.size:,} bytes)")
            lines.append(f"    -> {dataset_dir(info, cache_dir) / d.filename}")
            lines.append(f"    sha256 {d.sha256}")
    return "\n".join(lines)
