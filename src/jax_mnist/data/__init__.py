"""Datasets: the bundled MNIST, files in a folder, and (by name) the sister datasets."""

from __future__ import annotations

from pathlib import Path

from jax_mnist.config import Config
from jax_mnist.data.datasets import DATASETS, Arrays, bundled_dir, load_from_dir


def load_dataset(config: Config) -> Arrays:
    """The four splits of ``config.dataset`` as uint8 host arrays, verified by checksum."""
    info = DATASETS[config.dataset]
    if config.data_dir is not None:
        return load_from_dir(info, Path(config.data_dir))
    return load_from_dir(info, bundled_dir())


__all__ = ["DATASETS", "Arrays", "load_dataset"]
