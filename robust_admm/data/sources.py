"""Host-side (numpy) loading of small image-classification datasets, by name and source.

Public API::

    ds = load_dataset("mnist", source="files", data_dir="/path/to/mnist-idx")
    ds.train.images  # uint8, (N, H, W, C)
    ds.train.labels  # int32, (N,)
    print(describe(ds))

Datasets and sources
--------------------
``mnist``
    * ``source="tfds"`` (default): ``tfds.data_source("mnist", ...)`` (no
      TensorFlow needed).  If the dataset is not prepared under ``data_dir``
      (or ``$TFDS_DATA_DIR`` / ``~/tensorflow_datasets``) and the download host
      cannot be reached within a few seconds, a :class:`DataError` is raised
      immediately instead of letting TFDS retry for minutes.
    * ``source="files"``: the four original IDX files in ``data_dir``
      (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
      ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each either
      plain or gzip-compressed with a ``.gz`` suffix (plain wins if both exist).
``digits``
    The 8x8 handwritten digits bundled with scikit-learn (1,797 images, values
    0..16), rescaled to uint8 0..255 with ``round(v * 255 / 16)``, shape
    (N, 8, 8, 1).  Split: a fixed permutation from ``np.random.default_rng(0)``;
    the first 1,500 permuted images are the training split, the remaining 297
    the test split (all 10 classes occur in both).  No download is needed, so
    ``source`` (which must still be a valid source name) and ``data_dir`` are
    ignored.
``cifar10``
    * ``source="tfds"``: as for mnist.
    * ``source="files"``: the CIFAR-10 *binary* version
      (``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``; each
      record is 1 label byte + 3072 bytes of CHW pixels) in ``data_dir`` or in
      ``data_dir/cifar-10-batches-bin`` (the folder the official tarball
      extracts to).  ``.gz`` versions are accepted too.  Or the official
      ``cifar-10-binary.tar.gz`` itself: ``data_dir`` may be its path, or a
      folder holding it (used when neither the batches nor
      ``cifar-10-batches-bin`` are there).  Its members
      ``cifar-10-batches-bin/<batch>`` are read from the archive in one pass
      (nothing is extracted to disk) and must be regular files; other members
      are ignored.
      A batch, wherever it comes from, may hold at most the 10,000 records of
      an official batch.
``cifar100``
    * ``source="tfds"``: as for mnist (the ``label`` key: 100 fine classes).
    * ``source="files"``: the CIFAR-100 *binary* version (``train.bin``,
      ``test.bin``; each record is a coarse label byte 0..19, a fine label byte
      0..99 and 3072 bytes of CHW pixels; the fine label is the class, both are
      range-checked) in ``data_dir`` or ``data_dir/cifar-100-binary``, plain or
      ``.gz``; or the official ``cifar-100-binary.tar.gz`` (members
      ``cifar-100-binary/train.bin`` and ``test.bin``) as for cifar10.  At most
      50,000 train and 10,000 test records.

Any other data
    ``source="npz"``: the user's own arrays in one ``.npz`` file, ``data_dir`` its path
    (``data/npz.py``: the arrays, dtypes and ranges it takes); ``name`` is only a label
    for the logs; the class count is the largest label + 1.

The files themselves are read by `data/formats.py` (and `data/npz.py`), as untrusted input.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.parse
from typing import Callable

import numpy as np

from robust_admm.data.formats import (CIFAR10, CIFAR100, IDX_UBYTE_IMAGES,
                                      IDX_UBYTE_LABELS, CifarFormat, DataError,
                                      check_dir, check_labels, find_file,
                                      python_version_note, read_cifar_archive,
                                      read_cifar_file, read_idx, require_files)
from robust_admm.data.npz import read_npz


SOURCES = ("tfds", "files", "npz")  # read into memory (data/streamed.py: streamed sources)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset: uint8 images (N, H, W, C) and int32 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise DataError(f"Split.images must be a uint8 ndarray, got "
                            f"{getattr(self.images, 'dtype', type(self.images))}")
        if self.images.ndim != 4:
            raise DataError(f"Split.images must have shape (N, H, W, C), got "
                            f"{self.images.shape}")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int32:
            raise DataError(f"Split.labels must be an int32 ndarray, got "
                            f"{getattr(self.labels, 'dtype', type(self.labels))}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"Split.labels must have shape ({self.images.shape[0]},)"
                            f" to match the images, got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    num_classes: int
    name: str


def describe(ds: Dataset) -> str:
    """One-line summary for logs: name, shapes, dtype, per-class counts."""

    def counts(split: Split) -> list[int]:
        return np.bincount(split.labels, minlength=ds.num_classes).tolist()

    return (f"{ds.name}: {ds.num_classes} classes; "
            f"train images {tuple(ds.train.images.shape)} {ds.train.images.dtype}"
            f" class counts {counts(ds.train)}; "
            f"test images {tuple(ds.test.images.shape)} {ds.test.images.dtype}"
            f" class counts {counts(ds.test)}")


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_mnist_files(data_dir: str | None) -> Dataset:
    expected = [f for pair in _MNIST_FILES.values() for f in pair]
    data_dir = check_dir(data_dir, "mnist", expected)
    paths = require_files(data_dir, "mnist", expected)
    splits = {}
    for split, (img_name, lbl_name) in _MNIST_FILES.items():
        img_path, lbl_path = paths[img_name], paths[lbl_name]
        # Labels first: small, and a bad count is detected before the big read.
        labels = read_idx(lbl_path, IDX_UBYTE_LABELS)
        images = read_idx(img_path, IDX_UBYTE_IMAGES)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"mnist {split}: {img_path!r} holds {images.shape[0]:,} images but "
                f"{lbl_path!r} holds {labels.shape[0]:,} labels")
        check_labels(labels, 10, f"mnist {split} labels {lbl_path!r}")
        splits[split] = Split(images=images[..., None],
                              labels=labels.astype(np.int32))
    return Dataset(train=splits["train"], test=splits["test"], num_classes=10,
                   name="mnist")


def _load_cifar_files(fmt: CifarFormat, data_dir: str | None) -> Dataset:
    """CIFAR files from a folder, its ``fmt.folder`` subfolder, or the archive.

    ``data_dir`` may be the archive itself.  For a folder: its ``fmt.folder``
    subfolder when the folder lacks the test file and the subfolder exists;
    else ``data_dir/fmt.archive`` when the folder holds none of the files and
    that archive exists; else the folder itself (missing files are named).
    """
    names = list(fmt.max_records)
    alternative = (f", or the official archive {fmt.archive} (its path, or a "
                   f"folder holding it)")
    pickled = python_version_note(data_dir, fmt)
    if pickled:
        alternative += f"; {pickled}"
    parts = None
    if data_dir is not None and os.path.isfile(os.fspath(data_dir)):
        if pickled:  # the file is the python version's archive
            raise DataError(f"{fmt.name}: {data_dir!r}: {pickled}")
        parts = read_cifar_archive(os.fspath(data_dir), fmt)
    else:
        data_dir = check_dir(data_dir, fmt.name, names, alternative)
        sub = os.path.join(data_dir, fmt.folder)
        archive = os.path.join(data_dir, fmt.archive)
        test_file = next(iter(fmt.splits["test"]))
        if find_file(data_dir, test_file) is None and os.path.isdir(sub):
            data_dir = sub
        elif (not any(find_file(data_dir, n) for n in names)
              and os.path.isfile(archive)):
            parts = read_cifar_archive(archive, fmt)
        if parts is None:
            paths = require_files(data_dir, fmt.name, names, alternative)
            parts = {n: read_cifar_file(paths[n], fmt, n) for n in names}

    def split(files):
        return Split(images=np.concatenate([parts[f][0] for f in files]),
                     labels=np.concatenate([parts[f][1] for f in files]))

    return Dataset(train=split(fmt.splits["train"]), test=split(fmt.splits["test"]),
                   num_classes=fmt.num_classes, name=fmt.name)


# -----------------------------------------------------------------------------
# scikit-learn digits.

DIGITS_NUM_TRAIN = 1500
DIGITS_SEED = 0


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    if values.min() < 0 or values.max() > 16:
        raise DataError(f"sklearn digits: pixel values outside 0..16 "
                        f"({values.min()}..{values.max()})")
    images = np.round(values * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int32)
    perm = np.random.default_rng(DIGITS_SEED).permutation(len(labels))
    tr, te = perm[:DIGITS_NUM_TRAIN], perm[DIGITS_NUM_TRAIN:]
    return Dataset(
        train=Split(images=np.ascontiguousarray(images[tr]), labels=labels[tr]),
        test=Split(images=np.ascontiguousarray(images[te]), labels=labels[te]),
        num_classes=10, name="digits")


# -----------------------------------------------------------------------------
# TensorFlow Datasets (array_record data source; TensorFlow not required).

# Host each TFDS builder downloads its raw files from (see the builders' URLs:
# mnist -> https://storage.googleapis.com/cvdf-datasets/mnist/,
# cifar10 -> https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz,
# cifar100 -> https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz).
_TFDS_DOWNLOAD_HOSTS = {
    "mnist": "storage.googleapis.com",
    "cifar10": "www.cs.toronto.edu",
    "cifar100": "www.cs.toronto.edu",
}
NETWORK_PROBE_TIMEOUT_S = 3.0
_TFDS_READ_BATCH = 4096


def _tfds_is_prepared(name: str, data_dir: str | None) -> bool:
    """Whether TFDS already has ``name`` prepared locally (no network access)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # pylint: disable=broad-except
        return False


def _network_reachable(host: str, port: int = 443,
                       timeout: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe of ``host:port`` (or of the HTTPS proxy, if one is set)."""
    proxy = (os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
             or os.environ.get("all_proxy") or os.environ.get("ALL_PROXY"))
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "//" + proxy)
        if parsed.hostname:
            host, port = parsed.hostname, parsed.port or 8080
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ensure_tfds_available(name: str, data_dir: str | None) -> None:
    """Fails in seconds (not minutes of TFDS retries) when TFDS cannot work."""
    if _tfds_is_prepared(name, data_dir):
        return
    host = _TFDS_DOWNLOAD_HOSTS[name]
    if _network_reachable(host):
        return
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    files_hint = {
        "mnist": "/path/to/mnist-idx  (folder with the 4 MNIST IDX files, "
                 "plain or .gz)",
        "cifar10": "/path/to/cifar-10-batches-bin  (CIFAR-10 binary version; "
                   "or the path of cifar-10-binary.tar.gz)",
        "cifar100": "/path/to/cifar-100-binary  (CIFAR-100 binary version; "
                    "or the path of cifar-100-binary.tar.gz)",
    }[name]
    raise DataError(
        f"TFDS dataset {name!r} is not prepared in {where!r} and the network is "
        f"unreachable (could not connect to {host} within "
        f"{NETWORK_PROBE_TIMEOUT_S:g} s), so it cannot be downloaded. Either use "
        f"local files: --config.data.source=files --config.data.dir={files_hint}"
        f"; or prepare the TFDS dataset on a machine with network access (e.g. "
        f"tfds.data_source({name!r}, download=True)) and point TFDS_DATA_DIR or "
        f"--config.data.dir at that data directory.")


def _read_tfds_split(ds, name: str, split: str, num_classes: int) -> Split:
    n = len(ds)
    if n == 0:
        raise DataError(f"TFDS {name} split {split!r} is empty")
    images = labels = None
    for start in range(0, n, _TFDS_READ_BATCH):
        keys = list(range(start, min(n, start + _TFDS_READ_BATCH)))
        records = ds.__getitems__(keys)
        batch = np.stack([np.asarray(r["image"]) for r in records])
        if images is None:
            if batch.ndim == 3:  # (B, H, W): add a channel axis
                batch = batch[..., None]
            images = np.empty((n,) + batch.shape[1:], dtype=np.uint8)
            labels = np.empty((n,), dtype=np.int32)
        elif batch.ndim == 3:
            batch = batch[..., None]
        if batch.shape[1:] != images.shape[1:]:
            raise DataError(f"TFDS {name} {split}: record {start} has image shape "
                            f"{batch.shape[1:]}, expected {images.shape[1:]}")
        if batch.dtype != np.uint8:
            raise DataError(f"TFDS {name} {split}: images are {batch.dtype}, "
                            f"expected uint8")
        images[start:start + len(keys)] = batch
        labels[start:start + len(keys)] = [int(r["label"]) for r in records]
    check_labels(labels, num_classes, f"TFDS {name} {split}")
    return Split(images=images, labels=labels)


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    _ensure_tfds_available(name, data_dir)
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        sources = tfds.data_source(name, split={"train": "train", "test": "test"},
                                   data_dir=data_dir, download=True)
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(
            f"tfds.data_source({name!r}, data_dir={data_dir!r}) failed: "
            f"{type(e).__name__}: {e}. Alternatively use "
            f"--config.data.source=files --config.data.dir=/path/to/{name}-files"
        ) from e
    num_classes = _SPECS[name].num_classes
    return Dataset(
        train=_read_tfds_split(sources["train"], name, "train", num_classes),
        test=_read_tfds_split(sources["test"], name, "test", num_classes),
        num_classes=num_classes, name=name)


# -----------------------------------------------------------------------------
# A user's own arrays (data/npz.py).


def _load_npz(name: str, path: str | None) -> Dataset:
    xtr, ytr, xte, yte, classes = read_npz(path)
    return Dataset(train=Split(xtr, ytr), test=Split(xte, yte), num_classes=classes,
                   name=name or os.path.basename(os.fspath(path)))


# -----------------------------------------------------------------------------
# Registry and entry point.


@dataclasses.dataclass(frozen=True)
class _Spec:
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of every image, as the loaders give it
    # source -> loader(data_dir).  A spec with a single "*" key ignores source.
    loaders: dict[str, Callable[[str | None], Dataset]]


# The one place that says each dataset's image shape and class count.
_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(10, (28, 28, 1), {"tfds": lambda d: _load_tfds("mnist", d),
                                     "files": _load_mnist_files}),
    "digits": _Spec(10, (8, 8, 1), {"*": lambda d: _load_digits()}),
    "cifar10": _Spec(10, (32, 32, 3), {"tfds": lambda d: _load_tfds("cifar10", d),
                                       "files": lambda d: _load_cifar_files(CIFAR10, d)}),
    "cifar100": _Spec(100, (32, 32, 3), {"tfds": lambda d: _load_tfds("cifar100", d),
                                         "files": lambda d: _load_cifar_files(CIFAR100, d)}),
}
DATASETS = tuple(_SPECS)


def input_shape(name: str, source: str = "tfds",
                data_dir: str | None = None) -> tuple[tuple[int, int, int], int]:
    """((H, W, C), number of classes) of dataset `name`, without loading it (an npz file,
    whose arrays say both, is read)."""
    if source == "npz":
        ds = _load_npz(name, data_dir)
        return tuple(ds.train.images.shape[1:]), ds.num_classes
    if name not in _SPECS:
        raise DataError(f"unknown dataset name {name!r}; allowed names: {', '.join(DATASETS)}")
    return _SPECS[name].image_shape, _SPECS[name].num_classes


def load_dataset(name: str, source: str = "tfds",
                 data_dir: str | None = None) -> Dataset:
    """Loads dataset ``name`` into host memory.

    Args:
      name: one of ``DATASETS`` (``mnist``, ``digits``, ``cifar10``,
        ``cifar100``); with ``npz``, any label.
      source: ``"tfds"`` (TensorFlow Datasets, may download), ``"files"``
        (local raw files in ``data_dir``) or ``"npz"`` (the user's arrays).
        Ignored by ``digits`` (bundled with scikit-learn), but must still be one
        of ``SOURCES``.
      data_dir: for ``files``, the folder holding the raw files (CIFAR: or the
        path of the official ``.tar.gz`` archive); for ``tfds``,
        the TFDS data directory (None: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); for ``npz``, the file's path.

    Returns:
      A :class:`Dataset` with uint8 (N, H, W, C) images and int32 labels.

    Raises:
      DataError: unknown name/source, missing or malformed files, or a TFDS
        dataset that is not prepared while the network is unreachable.
    """
    if source == "npz":
        return _load_npz(name, data_dir)
    spec = _SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise DataError(f"unknown dataset name {name!r}; allowed names: "
                        f"{', '.join(DATASETS)}")
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed sources: "
                        f"{', '.join(SOURCES)}")
    loader = spec.loaders.get("*") or spec.loaders.get(source)
    if loader is None:
        raise DataError(f"dataset {name!r} cannot be loaded from source "
                        f"{source!r}; supported: {', '.join(spec.loaders)}")
    return loader(data_dir)
