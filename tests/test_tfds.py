"""The tensorflow_datasets source.

The main suite runs without tensorflow_datasets: it checks the one-line error that says what to
install, and the order bookkeeping. With the ``tfds`` extra installed (``pip install -e
'.[test,tfds]'``, then ``python -m pytest -m tfds``), tfds prepares MNIST for real, offline, from
the bundled files, and the arrays it yields must equal the bundled MNIST exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import numpy as np
import pytest

from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.data.datasets import MNIST, bundled_dir, load_from_dir
from jax_mnist.data.idx import parse_idx
from jax_mnist.data.tfds_source import idx_content, restore_idx_order, tfds_order
from jax_mnist.errors import ConfigError, UserError

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
needs_tfds = pytest.mark.skipif(
    not HAVE_TFDS, reason="tensorflow_datasets is not installed (pip install -e '.[test,tfds]')"
)


@pytest.mark.skipif(HAVE_TFDS, reason="tensorflow_datasets is installed")
def test_without_tfds_one_line_says_what_to_install():
    with pytest.raises(UserError) as error:
        load_dataset(Config(data_source="tfds"))
    message = str(error.value)
    assert "\n" not in message and "pip install 'jax-mnist[tfds]'" in message


def test_data_dir_and_tfds_do_not_mix(tmp_path):
    with pytest.raises(ConfigError, match=r"--data-dir.*--tfds-data-dir"):
        load_dataset(Config(data_source="tfds", data_dir=str(tmp_path)))


def test_order_is_undone_exactly():
    images = np.arange(50 * 4, dtype=np.uint8).reshape(50, 2, 2)
    labels = np.arange(50, dtype=np.uint8)
    order = tfds_order("train", 50)
    assert sorted(order.tolist()) == list(range(50))
    assert order.tolist() != list(range(50))
    restored_images, restored_labels = restore_idx_order(images[order], labels[order], "train")
    np.testing.assert_array_equal(restored_images, images)
    np.testing.assert_array_equal(restored_labels, labels)
    # The order is that of the MD5 of split name + index, the split name acting as salt.
    digests = [hashlib.md5(f"train{i}".encode()).hexdigest() for i in order]
    assert digests == sorted(digests)


def test_idx_content_is_what_the_parser_reads():
    array = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_content(array)), array)


@needs_tfds
@pytest.mark.tfds
def test_our_order_is_the_one_tfds_hashing_gives():
    from tensorflow_datasets.core import hashing

    for split in ("train", "test"):
        hasher = hashing.Hasher(split)
        expected = sorted(range(1000), key=hasher.hash_key)
        assert tfds_order(split, 1000).tolist() == expected


def prefill_tfds_downloads(data_dir):
    """Puts the bundled MNIST files where tfds keeps its downloads, so it prepares MNIST offline.

    tfds takes a file in ``<data_dir>/downloads/mnist/`` named after the URL and the registered
    checksum, with an ``.INFO`` file beside it, as already downloaded. Our bundled .gz files
    are compressed differently from the official ones (same content once decompressed), so they
    are placed under the official names; the arrays are then checked against the content sums.
    """
    from tensorflow_datasets.core.download import checksums, resource

    infos = {
        url: info for url, info in checksums.get_all_url_infos().items() if "cvdf-datasets/mnist/" in url
    }
    assert len(infos) == 4, "tfds no longer lists MNIST's four files under the CVDF mirror"
    for url, info in infos.items():
        path = data_dir / "downloads" / "mnist" / resource.get_dl_fname(url, info.checksum)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundled_dir() / info.filename, path)
        resource.write_info_file(
            url=url, path=path, dataset_name="mnist", original_fname=info.filename, url_info=info
        )


@pytest.mark.tfds
@pytest.mark.skipif(
    not (HAVE_TFDS and HAVE_TF),
    reason="preparing a tfds dataset needs tensorflow_datasets and TensorFlow (pip install -e '.[test,tfds]')",
)
@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_prepares_mnist_offline_and_matches_the_bundled_files(tmp_path, file_format):
    import tensorflow_datasets as tfds

    prefill_tfds_downloads(tmp_path)
    builder = tfds.builder("mnist", data_dir=str(tmp_path), file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    # tfds stores the examples in its own order, not the IDX files' order.
    first = builder.as_data_source(split="test")[0] if file_format == "array_record" else None
    bundled = load_from_dir(MNIST, bundled_dir())
    if first is not None:
        assert not np.array_equal(first["image"][..., 0], bundled.test_images[0])

    arrays = load_dataset(Config(data_source="tfds", tfds_data_dir=str(tmp_path)))
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        got, want = getattr(arrays, key), getattr(bundled, key)
        assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
