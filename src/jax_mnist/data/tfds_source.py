"""Loading a dataset through tensorflow_datasets (``--data-source tfds``), as the seed script did.

tensorflow_datasets is an optional extra (``pip install 'jax-mnist[tfds]'``); nothing here is
imported unless this source is chosen.

Order. tfds does not store a split in the order of the IDX files: when it prepares a dataset it
sorts the examples by the MD5 of ``split name + example index`` (its deterministic shuffle,
``tensorflow_datasets.core.hashing``), and reading with ``shuffle_files=False`` yields them in
that order. We put them back in IDX order by inverting that sort, so that both sources give the
same arrays in the same order and a run is reproducible whichever source it used. For MNIST the
restored arrays are then checked against the SHA-256 of the official IDX content, so a tfds copy
that differs in any image, label or position is an error.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from jax_mnist.data.datasets import Arrays, DatasetInfo
from jax_mnist.errors import DataError, UserError

INSTALL_HINT = "pip install 'jax-mnist[tfds]'"


def import_tfds():
    """The tensorflow_datasets module, or one line saying what to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            f"--data-source tfds needs tensorflow_datasets, which cannot be imported ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return tfds


def tfds_order(split: str, num_examples: int) -> np.ndarray:
    """Where tfds puts each example of a split: ``tfds_arrays[j] == idx_arrays[order[j]]``.

    tfds sorts examples by the 128-bit MD5 of ``split`` followed by the example's key, and the
    MNIST builders key example ``i`` by ``i``. Hex digests of equal length sort like the integers.
    """
    salt = hashlib.md5(split.encode())
    digests = []
    for i in range(num_examples):
        h = salt.copy()
        h.update(str(i).encode())
        digests.append(h.hexdigest())
    return np.argsort(np.array(digests), kind="stable")


def restore_idx_order(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Puts a split read from tfds back in the order of the IDX files."""
    order = tfds_order(split, len(labels))
    restored_images, restored_labels = np.empty_like(images), np.empty_like(labels)
    restored_images[order] = images
    restored_labels[order] = labels
    return restored_images, restored_labels


def idx_content(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array (what the official file decompresses to)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _read_split(tfds, builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of ``split`` in the order tfds stored them: images ``[N, 28, 28]`` uint8."""
    if str(builder.info.file_format).lower().endswith("array_record"):
        # Random-access format: read with NumPy alone (no TensorFlow needed).
        source = builder.as_data_source(split=split)
        records = source.__getitems__(list(range(len(source))))
        images = np.stack([np.asarray(r["image"]) for r in records])
        labels = np.array([r["label"] for r in records])
    else:
        # TFRecord (tfds' default format) is read through tf.data, so TensorFlow is needed.
        read_config = tfds.ReadConfig(interleave_cycle_length=1)
        batch = tfds.as_numpy(
            builder.as_dataset(split=split, batch_size=-1, shuffle_files=False, read_config=read_config)
        )
        images, labels = batch["image"], batch["label"]
    return np.asarray(images, np.uint8).reshape(len(labels), 28, 28), np.asarray(labels).astype(np.uint8)


def load_tfds(info: DatasetInfo, data_dir: str | None = None, *, test: bool = True) -> Arrays:
    """Loads ``info``'s train and test splits through tensorflow_datasets, in IDX order.

    Args:
      info: the dataset; its ``tfds_name`` names the tfds builder.
      data_dir: the tfds data directory (tfds' default, ``~/tensorflow_datasets``, when None).
        A dataset not prepared there yet is downloaded and prepared by tfds, which needs
        TensorFlow.

    Returns:
      The same arrays the IDX loader gives, checked against the content checksums for MNIST.
    """
    tfds = import_tfds()
    if not info.tfds_name:
        raise UserError(f"--data-source tfds: tensorflow_datasets has no {info.name}")
    try:
        builder = tfds.builder(info.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare()
        names = ("train", "test") if test else ("train",)  # test=False: the test split is never read
        splits = {split: _read_split(tfds, builder, split) for split in names}
    except ImportError as e:
        raise UserError(
            f"tensorflow_datasets could not load {info.tfds_name} ({e}); "
            f"preparing a dataset and reading TFRecord files need TensorFlow: {INSTALL_HINT}"
        ) from None
    arrays = {}
    for split, (images, labels) in splits.items():
        images, labels = restore_idx_order(images, labels, split)
        for key, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
            expected = info.content_sha256.get(key)
            if expected is not None and hashlib.sha256(idx_content(array)).hexdigest() != expected:
                raise DataError(
                    f"tensorflow_datasets {info.tfds_name} {split}: the {key.split('_')[1]} differ from the "
                    f"official {info.name} files (SHA-256 of the IDX content does not match); "
                    f"the tfds copy in {builder.data_dir} is damaged or from another version"
                )
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    if info.transpose:
        for key in [k for k in ("train_images", "test_images") if k in arrays]:
            arrays[key] = np.ascontiguousarray(arrays[key].transpose(0, 2, 1))
    return Arrays(**arrays)
