"""The datasets jax-mnist knows, where their files live, and loading them as uint8 arrays."""

from __future__ import annotations

import dataclasses
import hashlib
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
class Download:
    """One file to fetch for a dataset, as its publisher distributes it.

    Attributes:
      filename: the file's name in the cache folder (and at the end of ``url``).
      url: the official location (https).
      size: its size in bytes, as published.
      sha256: SHA-256 of the file exactly as downloaded (still compressed), as published in
        tensorflow_datasets' checksum registry for this URL.
    """

    filename: str
    url: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What we know of one IDX dataset.

    Attributes:
      name: the name given to ``--dataset``.
      class_names: one display name per label.
      content_sha256: SHA-256 of each decompressed IDX file, keyed by ``SPLIT_FILES`` keys;
        ``None`` where no published sum exists (the download's SHA-256 is checked instead).
      mean, std: pixel statistics of the training images scaled to [0, 1], for normalization.
      bundled: whether the files ship inside the package.
      description, source, license, homepage: for ``jax-mnist datasets`` and docs/data.md.
      split_files: the IDX file stem of each split (``SPLIT_FILES`` for MNIST's names).
      downloads: the files to fetch into the cache; empty for the bundled dataset.
      archive_members: for a dataset shipped inside one zip (``downloads`` has one entry):
        the members to extract, by path inside the zip, in ``split_files`` order.
      transpose: the IDX files store each image transposed (EMNIST); loading flips it back
        so that images are upright like MNIST's.
      tfds_name: the dataset's name in tensorflow_datasets.
    """

    name: str
    class_names: tuple[str, ...]
    content_sha256: dict[str, str | None]
    mean: float
    std: float
    bundled: bool = False
    description: str = ""
    source: str = ""
    license: str = ""
    homepage: str = ""
    split_files: dict[str, str] = dataclasses.field(default_factory=lambda: dict(SPLIT_FILES))
    downloads: tuple[Download, ...] = ()
    archive_members: tuple[str, ...] = ()
    transpose: bool = False
    tfds_name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def download_size(self) -> int:
        """Bytes to fetch for this dataset (0 when bundled)."""
        return sum(d.size for d in self.downloads)

    def file_sha256(self, filename: str) -> str | None:
        """The published SHA-256 of the downloaded file ``filename``, if it is one of ours."""
        return next((d.sha256 for d in self.downloads if d.filename == filename), None)


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
    homepage="http://yann.lecun.com/exdb/mnist/",
    tfds_name="mnist",
)

# The URLs, sizes and SHA-256 sums below are those of tensorflow_datasets' checksum registry
# (tensorflow_datasets/url_checksums/{fashion_mnist,kmnist,emnist}.txt, version 4.9.10), for
# the publishers' own files. Where the registry lists an http URL, we use the publisher's https
# location of the same file. The SHA-256 of the decompressed content of these files is not
# published; it is None here and the download's own SHA-256 is what we check.
_NO_CONTENT_SUMS: dict[str, str | None] = dict.fromkeys(SPLIT_FILES)

# Fashion-MNIST's site serves its files from an S3 website (http only); the same four files are
# committed to the official repository, which GitHub serves over https.
_FASHION_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
_KMNIST_URL = "https://codh.rois.ac.jp/kmnist/dataset/kmnist/"

FASHION_MNIST = DatasetInfo(
    name="fashion_mnist",
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    content_sha256=_NO_CONTENT_SUMS,
    # Training-image statistics (pixel / 255) as commonly quoted; only normalization uses them.
    mean=0.2860,
    std=0.3530,
    description="Zalando article images in 10 classes, 60,000 train + 10,000 test, 28x28 grayscale",
    source="Han Xiao, Kashif Rasul, Roland Vollgraf (Zalando Research)",
    license="MIT",
    homepage="https://github.com/zalandoresearch/fashion-mnist",
    downloads=(
        Download(
            "train-images-idx3-ubyte.gz",
            _FASHION_URL + "train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        Download(
            "train-labels-idx1-ubyte.gz",
            _FASHION_URL + "train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        Download(
            "t10k-images-idx3-ubyte.gz",
            _FASHION_URL + "t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        Download(
            "t10k-labels-idx1-ubyte.gz",
            _FASHION_URL + "t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    ),
    tfds_name="fashion_mnist",
)

KMNIST = DatasetInfo(
    name="kmnist",
    # The ten hiragana of Kuzushiji-MNIST by label (kmnist_classmap.csv): お き す つ な は ま や れ を,
    # romanized so that terminals and plot fonts without kana show them.
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    content_sha256=_NO_CONTENT_SUMS,
    # Training-image statistics (pixel / 255) as commonly quoted; only normalization uses them.
    mean=0.1918,
    std=0.3483,
    description="cursive Japanese (Kuzushiji) hiragana in 10 classes, 60,000 train + 10,000 test, 28x28",
    source="ROIS-DS Center for Open Data in the Humanities (CODH), Clanuwat et al. 2018",
    license="CC BY-SA 4.0",
    homepage="https://github.com/rois-codh/kmnist",
    downloads=(
        Download(
            "train-images-idx3-ubyte.gz",
            _KMNIST_URL + "train-images-idx3-ubyte.gz",
            18165135,
            "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        ),
        Download(
            "train-labels-idx1-ubyte.gz",
            _KMNIST_URL + "train-labels-idx1-ubyte.gz",
            29497,
            "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
        ),
        Download(
            "t10k-images-idx3-ubyte.gz",
            _KMNIST_URL + "t10k-images-idx3-ubyte.gz",
            3041136,
            "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        ),
        Download(
            "t10k-labels-idx1-ubyte.gz",
            _KMNIST_URL + "t10k-labels-idx1-ubyte.gz",
            5120,
            "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
        ),
    ),
    tfds_name="kmnist",
)

_EMNIST_DIGITS_FILES = {
    "train_images": "emnist-digits-train-images-idx3-ubyte",
    "train_labels": "emnist-digits-train-labels-idx1-ubyte",
    "test_images": "emnist-digits-test-images-idx3-ubyte",
    "test_labels": "emnist-digits-test-labels-idx1-ubyte",
}

# NIST publishes EMNIST only as one zip of all six splits (gzip.zip, 562 MB); the digits
# split is four .gz members of it. We download the zip, check its SHA-256, extract those four
# members (zipfile checks each member's CRC-32) and delete the zip.
EMNIST_DIGITS = DatasetInfo(
    name="emnist_digits",
    class_names=tuple(str(d) for d in range(10)),
    content_sha256=_NO_CONTENT_SUMS,
    # Training-image statistics (pixel / 255) as commonly quoted; only normalization uses them.
    mean=0.1733,
    std=0.3317,
    description="handwritten digits 0-9 from NIST SD 19, 240,000 train + 40,000 test, 28x28 grayscale",
    source="Gregory Cohen, Saeed Afshar, Jonathan Tapson, André van Schaik (NIST / Western Sydney Univ.)",
    license="NIST, U.S. Government work (public domain in the U.S.)",
    homepage="https://www.nist.gov/itl/products-and-services/emnist-dataset",
    split_files=_EMNIST_DIGITS_FILES,
    downloads=(
        Download(
            "gzip.zip",
            "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
            561753746,
            "fb9bb67e33772a9cc0b895e4ecf36d2cf35be8b709693c3564cea2a019fcda8e",
        ),
    ),
    archive_members=tuple(f"gzip/{stem}.gz" for stem in _EMNIST_DIGITS_FILES.values()),
    transpose=True,
    tfds_name="emnist/digits",
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (MNIST, FASHION_MNIST, KMNIST, EMNIST_DIGITS)}


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A dataset's splits as host arrays: images uint8 ``[N, 28, 28]``, labels uint8 ``[N]``.

    The test arrays are None when the test set was deliberately not loaded (``test=False``).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    def test_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The test images and labels, which must have been loaded."""
        if self.test_images is None or self.test_labels is None:
            raise ValueError("the test set was not loaded (load_dataset(..., test=False))")
        return self.test_images, self.test_labels


def bundled_dir() -> Path:
    """The folder inside the installed package that holds the bundled MNIST files."""
    return Path(str(resources.files("jax_mnist.data") / "mnist"))


def find_split_file(directory: Path, stem: str, info: DatasetInfo | None = None) -> Path:
    """Finds ``stem`` or ``stem.gz`` in ``directory``; a clear error when neither is there."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    stems = (info.split_files if info is not None else SPLIT_FILES).values()
    raise DataError(
        f"{directory}: no {stem}.gz or {stem} here; put the four IDX files of the dataset "
        f"({', '.join(stems)}) in this folder, gzipped or not"
    )


def load_from_dir(
    info: DatasetInfo, directory: Path, file_sha256: dict[str, str] | None = None, *, test: bool = True
) -> Arrays:
    """Loads and verifies the four IDX files of ``info`` from ``directory``.

    Each file is checked against the SHA-256 of its decompressed content when the dataset has
    one; otherwise a file that is exactly a published download (e.g. Fashion-MNIST's
    ``train-images-idx3-ubyte.gz``) is checked against the download's SHA-256, and
    ``file_sha256`` (file name -> SHA-256, e.g. recorded when the cache extracted an archive)
    covers the rest. A file none of these cover is checked for its IDX structure only.
    With ``test=False`` the two test files are neither opened nor required.
    """
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory not found")
    known = {d.filename: d.sha256 for d in info.downloads} | dict(file_sha256 or {})
    arrays = {}
    for key, stem in info.split_files.items():
        if not test and key.startswith("test_"):
            continue
        path = find_split_file(directory, stem, info)
        content_sum = info.content_sha256.get(key)
        if content_sum is None and path.name in known:
            verify_file(path, known[path.name])
        array = load_idx(path, expected_sha256=content_sum)
        if info.transpose and array.ndim == 3:
            array = np.ascontiguousarray(array.transpose(0, 2, 1))
        arrays[key] = array
    return Arrays(**arrays)


def verify_file(path: Path, expected_sha256: str) -> None:
    """Checks the SHA-256 of ``path`` as it lies on disk; a clear error naming it if wrong."""
    digest = file_sha256(path)
    if digest != expected_sha256:
        raise DataError(
            f"{path}: checksum mismatch (SHA-256 {digest[:16]}..., expected {expected_sha256[:16]}...); "
            "the file is damaged or not the one expected, delete it and download it again"
        )


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return digest.hexdigest()


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
