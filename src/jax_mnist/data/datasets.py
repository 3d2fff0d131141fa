"""The datasets jax-mnist knows, where their files live, and loading them as uint8 arrays."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import numpy as np

from jax_mnist.data.idx import load_idx
from jax_mnist.errors import DataError

SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What we know of one IDX dataset.

    Attributes:
      name: the name given to ``--dataset``.
      class_names: one display name per label.
      content_sha256: SHA-256 of each decompressed IDX file, keyed by ``SPLIT_FILES`` keys.
      mean, std: pixel statistics of the training images scaled to [0, 1], for normalization.
      bundled: whether the files ship inside the package.
      description, source, license: for ``jax-mnist datasets`` and the README.
    """

    name: str
    class_names: tuple[str, ...]
    content_sha256: dict[str, str]
    mean: float
    std: float
    bundled: bool = False
    description: str = ""
    source: str = ""
    license: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


MNIST = DatasetInfo(
    name="mnist",
    class_names=tuple(str(d) for d in range(10)),
    content_sha256={
        "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    mean=0.1307,
    std=0.3081,
    bundled=True,
    description="handwritten digits 0-9, 60,000 train + 10,000 test, 28x28 grayscale",
    source="Yann LeCun, Corinna Cortes, Christopher J.C. Burges (bundled in the package)",
    license="CC BY-SA 3.0",
)

DATASETS: dict[str, DatasetInfo] = {MNIST.name: MNIST}


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A dataset's splits as host arrays: images uint8 ``[N, 28, 28]``, labels uint8 ``[N]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def bundled_dir() -> Path:
    """The folder inside the installed package that holds the bundled MNIST files."""
    return Path(str(resources.files("jax_mnist.data") / "mnist"))


def find_split_file(directory: Path, stem: str) -> Path:
    """Finds ``stem`` or ``stem.gz`` in ``directory``; a clear error when neither is there."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{directory}: no {stem}.gz or {stem} here; put the four IDX files of the dataset "
        f"({', '.join(SPLIT_FILES.values())}) in this folder, gzipped or not"
    )


def load_from_dir(info: DatasetInfo, directory: Path) -> Arrays:
    """Loads and verifies the four IDX files of ``info`` from ``directory``."""
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory not found")
    arrays = {
        key: load_idx(find_split_file(directory, stem), expected_sha256=info.content_sha256[key])
        for key, stem in SPLIT_FILES.items()
    }
    return Arrays(**arrays)


def split_validation(
    images: np.ndarray, labels: np.ndarray, val_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Holds out ``val_size`` examples, chosen by a permutation drawn from ``seed``.

    Returns:
      ``(train_images, train_labels, val_images, val_labels)``; the training part keeps the
      original order of the remaining examples so data order is set by the training loop alone.
    """
    order = np.random.default_rng(seed).permutation(len(images))
    val_index = np.sort(order[:val_size])
    train_mask = np.ones(len(images), bool)
    train_mask[val_index] = False
    return images[train_mask], labels[train_mask], images[val_index], labels[val_index]
