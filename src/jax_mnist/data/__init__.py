"""Datasets: the bundled MNIST, files in a folder, downloads of the sister datasets, and tfds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from jax_mnist.config import Config
from jax_mnist.data.datasets import DATASETS, Arrays, DatasetInfo, bundled_dir, load_from_dir
from jax_mnist.errors import ConfigError


def load_dataset(config: Config, *, test: bool = True) -> Arrays:
    """The four splits of ``config.dataset`` as uint8 host arrays, verified by checksum.

    With ``test=False`` the test files are not opened at all (``test_images`` and
    ``test_labels`` are None): a hyperparameter search cannot read the test set by mistake.

    ``--data-source tfds`` loads through tensorflow_datasets (from ``--tfds-data-dir``).
    Otherwise the IDX files come from ``--data-dir`` if given, from the package for MNIST, and
    from the cache for the other datasets, downloaded into it first if they are not there.
    """
    info = DATASETS[config.dataset]
    if config.data_source == "tfds":
        if config.data_dir is not None:
            raise ConfigError(
                "--data-dir",
                "reads IDX files; with --data-source tfds give the tfds folder as --tfds-data-dir",
            )
        from jax_mnist.data.tfds_source import load_tfds

        return load_tfds(info, config.tfds_data_dir, test=test)
    if config.data_dir is not None:
        return load_from_dir(info, Path(config.data_dir), test=test)
    if info.bundled:
        return load_from_dir(info, bundled_dir(), test=test)
    from jax_mnist.data.download import load_cached

    return load_cached(info, config.cache_dir, test=test)


def load_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNIST that ships with jax-mnist, verified by checksum, as uint8 host arrays:
    train images ``[60000, 28, 28]`` and labels ``[60000]``, test images ``[10000, 28, 28]``
    and labels ``[10000]``. Pixels are 0 to 255 and labels 0 to 9."""
    arrays = load_from_dir(DATASETS["mnist"], bundled_dir(), test=True)
    return arrays.train_images, arrays.train_labels, *arrays.test_split()


__all__ = ["DATASETS", "Arrays", "DatasetInfo", "load_dataset", "load_mnist"]
