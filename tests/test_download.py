"""Downloads for real, against an HTTP server on 127.0.0.1 that the tests start and stop.

The server serves small IDX files the tests make; the checksums here are the tests' own. The
real URLs and sums live in ``jax_mnist.data.datasets`` and are checked for form only.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import re
import socket
import threading
import time
import zipfile

import numpy as np
import pytest

from jax_mnist.cli import main
from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.data.datasets import DATASETS, SPLIT_FILES, DatasetInfo, Download
from jax_mnist.data.download import (
    MANIFEST,
    default_cache_dir,
    download_file,
    fetch_dataset,
    is_cached,
    load_cached,
)
from jax_mnist.data.tfds_source import idx_content
from jax_mnist.errors import DataError

# Each test talks to its own server; every socket operation of the client times out after this.
TIMEOUT = 5.0


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with Range support, and records each request.

    ``cut`` holds paths whose first response stops halfway through the body and closes the
    connection; ``no_range`` makes the server ignore Range headers (always 200, whole file).
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.no_range = False
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if range_header and not self.server.no_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path in self.server.cut:
            self.server.cut.discard(self.path)
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def log_message(self, format, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def make_split_files(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """Small random IDX splits (20 train, 10 test) and their gzipped files, by split key."""
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, (20,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, (10,), dtype=np.uint8),
    }
    files = {key: gzip.compress(idx_content(array), mtime=0) for key, array in arrays.items()}
    return arrays, files


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def toy_dataset(server: FileServer, name: str = "toy", corrupt: str | None = None):
    """A DatasetInfo whose four files the server serves; ``corrupt`` names a split served damaged."""
    arrays, files = make_split_files(np.random.default_rng(0))
    downloads = []
    for key, stem in SPLIT_FILES.items():
        filename = f"{stem}.gz"
        served = files[key] if key != corrupt else files[key][:-8] + b"\0" * 8
        server.files[f"/{name}/{filename}"] = served
        downloads.append(
            Download(filename, f"{server.url}/{name}/{filename}", len(files[key]), sha(files[key]))
        )
    info = DatasetInfo(
        name=name,
        class_names=tuple("abcdefghij"),
        content_sha256=dict.fromkeys(SPLIT_FILES),
        mean=0.5,
        std=0.25,
        downloads=tuple(downloads),
    )
    return info, arrays


def assert_arrays_equal(loaded, arrays):
    for key, array in arrays.items():
        np.testing.assert_array_equal(getattr(loaded, key), array)


def test_good_download_is_verified_cached_and_loaded(server, tmp_path):
    info, arrays = toy_dataset(server)
    assert not is_cached(info, tmp_path)
    assert_arrays_equal(load_cached(info, tmp_path, progress=False, timeout=TIMEOUT), arrays)
    assert is_cached(info, tmp_path)
    files = sorted(p.name for p in (tmp_path / "toy").iterdir() if p.name != ".lock")
    assert files == sorted(d.filename for d in info.downloads)
    assert len(server.requests) == 4 and all(r is None for _, r in server.requests)
    # Loaded again: from the cache, no request.
    assert_arrays_equal(load_cached(info, tmp_path, progress=False, timeout=TIMEOUT), arrays)
    assert len(server.requests) == 4


def test_processes_sharing_a_cache_download_each_file_once(server, tmp_path):
    info, arrays = toy_dataset(server)
    results, errors = [], []

    def fetch():
        try:
            results.append(load_cached(info, tmp_path, progress=False, timeout=TIMEOUT))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 3
    for loaded in results:
        assert_arrays_equal(loaded, arrays)
    assert sorted(p for p, _ in server.requests) == sorted(f"/toy/{d.filename}" for d in info.downloads)


def test_checksum_mismatch_deletes_the_file_and_says_so(server, tmp_path):
    info, _ = toy_dataset(server, corrupt="train_labels")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: checksum mismatch.*deleted"):
        fetch_dataset(info, tmp_path, progress=False, timeout=TIMEOUT)
    folder = tmp_path / "toy"
    assert not (folder / "train-labels-idx1-ubyte.gz").exists()
    assert not (folder / "train-labels-idx1-ubyte.gz.part").exists()
    assert (folder / "train-images-idx3-ubyte.gz").is_file()  # the good file before it stays


def test_cut_connection_is_resumed_with_a_range_request(server, tmp_path):
    info, arrays = toy_dataset(server)
    path = "/toy/train-images-idx3-ubyte.gz"
    server.cut.add(path)
    size = len(server.files[path])
    assert_arrays_equal(load_cached(info, tmp_path, progress=False, timeout=TIMEOUT, backoff=0.01), arrays)
    ranges = [r for p, r in server.requests if p == path]
    assert ranges == [None, f"bytes={size // 2}-"]


def test_partial_file_left_by_an_earlier_run_is_resumed(server, tmp_path):
    data = bytes(range(256)) * 400
    server.files["/f.bin"] = data
    server.cut.add("/f.bin")
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match=r"transfer cut after 51,200 of 102,400 bytes"):
        download_file(
            f"{server.url}/f.bin", dest, sha256=sha(data), retries=0, timeout=TIMEOUT, progress=False
        )
    assert (tmp_path / "f.bin.part").stat().st_size == len(data) // 2 and not dest.exists()
    download_file(f"{server.url}/f.bin", dest, sha256=sha(data), retries=0, timeout=TIMEOUT, progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    assert server.requests[-1] == ("/f.bin", f"bytes={len(data) // 2}-")


def test_server_that_ignores_range_restarts_from_the_first_byte(server, tmp_path):
    data = b"x" * 10_000 + b"y" * 10_000
    server.files["/f.bin"] = data
    server.no_range = True
    (tmp_path / "f.bin.part").write_bytes(data[:5_000])
    download_file(
        f"{server.url}/f.bin", tmp_path / "f.bin", sha256=sha(data), timeout=TIMEOUT, progress=False
    )
    assert (tmp_path / "f.bin").read_bytes() == data


def test_server_down_is_a_clear_error_within_bounded_time(tmp_path):
    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        download_file(
            f"http://127.0.0.1:{port}/f.bin",
            tmp_path / "f.bin",
            sha256="0" * 64,
            retries=2,
            backoff=0.05,
            timeout=2.0,
            progress=False,
        )
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "\n" not in message
    assert "cannot download" in message and "Connection refused" in message
    assert f"put it at {tmp_path / 'f.bin'}" in message


def test_missing_file_is_not_retried(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(f"{server.url}/nope", tmp_path / "nope", sha256="0" * 64, retries=3, progress=False)
    assert len(server.requests) == 1


def test_server_down_while_fetching_a_dataset_names_every_file_to_put_in_the_cache(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = DATASETS["kmnist"]
    with pytest.raises(DataError) as error:
        fetch_dataset(info, tmp_path, mirror=f"http://127.0.0.1:{port}", progress=False, retries=0)
    message = str(error.value)
    assert "to work offline, put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "kmnist") in message


def test_mirror_from_the_environment_and_the_dataset_flag(server, tmp_path, monkeypatch):
    # The real Fashion-MNIST entry through a mirror serving a wrong file: the real sum catches it.
    server.files["/fashion_mnist/train-images-idx3-ubyte.gz"] = b"not the real file"
    monkeypatch.setenv("JAX_MNIST_MIRROR", server.url + "/")
    with pytest.raises(DataError, match=r"fashion_mnist/train-images-idx3-ubyte\.gz: checksum mismatch"):
        load_dataset(Config(dataset="fashion_mnist", cache_dir=str(tmp_path)))
    assert server.requests == [("/fashion_mnist/train-images-idx3-ubyte.gz", None)]
    assert [p.name for p in (tmp_path / "fashion_mnist").iterdir()] == [".lock"]


def test_zip_archive_is_verified_extracted_and_transposed(server, tmp_path):
    arrays, files = make_split_files(np.random.default_rng(1))
    stems = {
        key: f"toy-digits-{stem.split('-', 1)[0]}-{stem.split('-', 1)[1]}"
        for key, stem in SPLIT_FILES.items()
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for key, stem in stems.items():
            zf.writestr(f"gzip/{stem}.gz", files[key])
        zf.writestr("gzip/other-split.gz", b"not needed")
    archive = buffer.getvalue()
    server.files["/toy_zip/gzip.zip"] = archive
    info = DatasetInfo(
        name="toy_zip",
        class_names=tuple("0123456789"),
        content_sha256=dict.fromkeys(SPLIT_FILES),
        mean=0.5,
        std=0.25,
        split_files=stems,
        downloads=(Download("gzip.zip", "https://unused.invalid/gzip.zip", len(archive), sha(archive)),),
        archive_members=tuple(f"gzip/{stem}.gz" for stem in stems.values()),
        transpose=True,
    )
    loaded = load_cached(info, tmp_path, mirror=server.url, progress=False, timeout=TIMEOUT)
    np.testing.assert_array_equal(loaded.train_images, arrays["train_images"].transpose(0, 2, 1))
    np.testing.assert_array_equal(loaded.test_labels, arrays["test_labels"])
    folder = tmp_path / "toy_zip"
    assert not (folder / "gzip.zip").exists() and (folder / MANIFEST).is_file() and is_cached(info, tmp_path)
    # An extracted file damaged later is caught by the sums recorded at extraction.
    (folder / f"{stems['test_labels']}.gz").write_bytes(gzip.compress(idx_content(arrays["test_labels"] + 1)))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cached(info, tmp_path, progress=False)


def test_registry_entries_are_well_formed():
    hex64 = re.compile(r"[0-9a-f]{64}")
    assert set(DATASETS) == {"mnist", "fashion_mnist", "kmnist", "emnist_digits"}
    for info in DATASETS.values():
        assert info.num_classes == 10 and len(set(info.class_names)) == 10
        assert set(info.split_files) == set(SPLIT_FILES) == set(info.content_sha256)
        assert all(s is None or hex64.fullmatch(s) for s in info.content_sha256.values())
        assert 0 < info.mean < 1 and 0 < info.std < 1
        assert info.source and info.license and info.homepage.startswith("http") and info.tfds_name
        assert info.bundled == (not info.downloads)
        filenames = [d.filename for d in info.downloads]
        assert len(set(filenames)) == len(filenames)
        for d in info.downloads:
            assert d.url.startswith("https://") and d.url.endswith("/" + d.filename)
            assert hex64.fullmatch(d.sha256) and d.size > 1000
        if not info.archive_members:
            assert not info.downloads or sorted(filenames) == sorted(
                f"{s}.gz" for s in info.split_files.values()
            )
    emnist = DATASETS["emnist_digits"]
    assert len(emnist.downloads) == 1 and emnist.transpose
    assert [m.split("/")[-1] for m in emnist.archive_members] == [
        f"{s}.gz" for s in emnist.split_files.values()
    ]
    assert DATASETS["fashion_mnist"].class_names[0] == "T-shirt/top"


def test_default_cache_dir_follows_the_platform_convention(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_MNIST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if default_cache_dir().parent == tmp_path:  # Linux and other XDG systems
        assert default_cache_dir() == tmp_path / "jax-mnist"
    monkeypatch.setenv("JAX_MNIST_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"


def test_datasets_command_lists_sizes_and_what_is_cached(server, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "kmnist"
    folder.mkdir()
    for d in DATASETS["kmnist"].downloads:
        (folder / d.filename).write_bytes(b"")
    assert main(["datasets", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "bundled" in rows["mnist"]
    assert f"cached in {folder}" in rows["kmnist"]
    assert "30.9 MB" in rows["fashion_mnist"] and "not downloaded" in rows["fashion_mnist"]
    assert "561.8 MB" in rows["emnist_digits"]
    assert main(["datasets", "--files", "--cache-dir", str(tmp_path)]) == 0
    assert DATASETS["emnist_digits"].downloads[0].sha256 in capsys.readouterr().out


def test_download_command_with_a_mirror(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_MNIST_MIRROR", server.url)
    assert main(["download", "kmnist", "--cache-dir", str(tmp_path)]) == 1  # nothing served: 404
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["download", "mnist"]) == 1
    assert "ships inside the package" in capsys.readouterr().err


def test_data_dir_with_official_file_names_is_checked_against_the_download_sums(tmp_path):
    for d in DATASETS["kmnist"].downloads:
        (tmp_path / d.filename).write_bytes(gzip.compress(idx_content(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: checksum mismatch"):
        load_dataset(Config(dataset="kmnist", data_dir=str(tmp_path)))


def test_progress_is_plain_lines_when_not_a_terminal(server, tmp_path, capsys):
    data = b"z" * 3000
    server.files["/f.bin"] = data
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=sha(data), timeout=TIMEOUT)
    assert capsys.readouterr().err.splitlines() == ["downloading f.bin (3,000 bytes)", "downloaded f.bin"]
