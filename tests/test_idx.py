import gzip
import shutil
import struct

import numpy as np
import pytest

from jax_mnist.data.datasets import MNIST, SPLIT_FILES, bundled_dir, load_from_dir
from jax_mnist.data.idx import load_idx, parse_idx, sha256
from jax_mnist.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_bundled_mnist_loads_with_expected_shapes_and_class_counts():
    arrays = load_from_dir(MNIST, bundled_dir())
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (10000, 28, 28)
    assert np.bincount(arrays.train_labels).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert np.bincount(arrays.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_parse_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad magic number"),
        (lambda b: b[:4] + struct.pack(">I", 3) + b[8:], "header declares shape (3, 3, 4)"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b"", "no header"),
    ],
)
def test_damaged_idx_gets_a_clear_error_naming_the_file(mutate, message):
    good = idx_bytes(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(DataError, match=r"images\.idx") as info:
        parse_idx(mutate(good), name="images.idx")
    assert message in str(info.value)


def test_checksum_mismatch_names_the_file(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(5, dtype=np.uint8))))
    assert load_idx(path).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=f"{path}: checksum mismatch"):
        load_idx(path, expected_sha256="0" * 64)


def test_damaged_gzip_is_reported(tmp_path):
    path = tmp_path / "labels.gz"
    data = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="damaged gzip"):
        load_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_idx(tmp_path / "nope.gz")


def test_data_dir_accepts_uncompressed_files_and_verifies_them(tmp_path):
    for stem in SPLIT_FILES.values():
        with gzip.open(bundled_dir() / f"{stem}.gz") as src, open(tmp_path / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    arrays = load_from_dir(MNIST, tmp_path)
    assert arrays.test_labels.shape == (10000,)
    assert sha256((tmp_path / "t10k-labels-idx1-ubyte").read_bytes()) == MNIST.content_sha256["test_labels"]

    # One changed pixel: the structure is fine, the checksum is not.
    content = bytearray((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    content[5000] ^= 0xFF
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(content))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: checksum mismatch"):
        load_from_dir(MNIST, tmp_path)


def test_data_dir_missing_a_file(tmp_path):
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\.gz or train-images-idx3-ubyte"):
        load_from_dir(MNIST, tmp_path)
