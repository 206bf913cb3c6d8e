"""Host-side (numpy) loading of small image-classification datasets.

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

Data files are treated as untrusted input: headers are validated and the size
they claim is checked against the real payload *before* any large buffer is
allocated; gzip streams are decompressed incrementally and never read past the
claimed size (+1 byte, to detect trailing data).  Every problem is reported as
a :class:`DataError` (a ``ValueError``) that names the offending file.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import socket
import tarfile
import urllib.parse
import zlib
from typing import BinaryIO, Callable

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "Split",
    "SOURCES",
    "DATASETS",
    "describe",
    "load_dataset",
    "read_idx",
]


class DataError(ValueError):
    """Any problem with finding, downloading or parsing a dataset."""


SOURCES = ("tfds", "files")

# Refuse any single data file whose header claims more than this many payload
# bytes.  Real MNIST train images are 47 MB and CIFAR-10 batches 30 MB; the cap
# only exists so that a corrupt/crafted header (e.g. "4 billion images") fails
# immediately, even for a gzip file whose decompressed size is unknown.
MAX_PAYLOAD_BYTES = 1 << 31  # 2 GiB

_READ_CHUNK = 1 << 22  # 4 MiB of decompressed data per read


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


# -----------------------------------------------------------------------------
# Low-level, size-checked file reading.


def _find_file(data_dir: str, filename: str) -> str | None:
    """Returns ``data_dir/filename`` or ``data_dir/filename.gz`` if present."""
    for candidate in (filename, filename + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _check_dir(data_dir: str | None, name: str, expected: list[str],
               alternative: str = "") -> str:
    hint = (f"expected the files {', '.join(expected)} (each plain or "
            f"gzip-compressed with a '.gz' suffix){alternative}")
    if data_dir is None:
        raise DataError(
            f"source='files' for {name!r} needs a data directory "
            f"(--config.data.dir=/path/to/{name}); {hint}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(
            f"{name} data directory {data_dir!r} does not exist or is not a "
            f"directory; {hint}")
    return data_dir


def _require_files(data_dir: str, name: str, expected: list[str],
                   alternative: str = "") -> dict[str, str]:
    found = {f: _find_file(data_dir, f) for f in expected}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"{name}: missing file(s) in {data_dir!r}: "
            f"{', '.join(os.path.join(data_dir, f) for f in missing)}; expected "
            f"the files {', '.join(expected)} (each plain or gzip-compressed with "
            f"a '.gz' suffix){alternative}")
    return found  # type: ignore[return-value]


def _open(path: str) -> BinaryIO:
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open {path!r}: {e}") from e


def _read_exact(f: BinaryIO, path: str, n: int, what: str) -> bytes:
    """Reads exactly ``n`` (small) bytes or raises a DataError."""
    try:
        data = f.read(n)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path!r}: cannot read {what}: {e}") from e
    if len(data) != n:
        raise DataError(f"{path!r}: file too short for its {what} "
                        f"(wanted {n} bytes, got {len(data)})")
    return data


def _readinto_full(f: BinaryIO, buf: bytearray) -> int:
    """Fills ``buf`` from ``f`` until it is full or ``f`` ends; returns the count."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            break
        got += k
    return got


def _read_payload(f: BinaryIO, path: str, nbytes: int, offset: int,
                  what: str) -> np.ndarray:
    """Reads exactly ``nbytes`` more bytes from ``f`` and checks that none follow.

    ``offset`` is the number of bytes already consumed (header), only used for
    the size check of plain files.  Never allocates more than the bytes actually
    present in the file, and never reads more than ``nbytes + 1``.
    """
    if nbytes > MAX_PAYLOAD_BYTES:
        raise DataError(
            f"{path!r}: header claims {what} of {nbytes:,} bytes, more than the "
            f"limit of {MAX_PAYLOAD_BYTES:,} bytes; the file is corrupt or not "
            f"a dataset file")
    if not path.endswith(".gz"):
        # Plain file: the payload size is known up front.
        actual = os.path.getsize(path) - offset
        if actual != nbytes:
            kind = "truncated" if actual < nbytes else "has trailing data"
            raise DataError(
                f"{path!r}: header claims {what} of {nbytes:,} bytes but the file "
                f"holds {actual:,} bytes after the header (file {kind})")
        buf = bytearray(nbytes)
        got = _readinto_full(f, buf)
        if got != nbytes:
            raise DataError(f"{path!r}: file changed while reading (got {got:,} of "
                            f"{nbytes:,} payload bytes)")
        return np.frombuffer(buf, dtype=np.uint8)

    # Gzip: decompressed size unknown, so grow the buffer with what is really
    # there, chunk by chunk, and stop after nbytes + 1.
    buf = bytearray()
    want = nbytes + 1
    try:
        while len(buf) < want:
            chunk = f.read(min(_READ_CHUNK, want - len(buf)))
            if not chunk:
                break
            buf += chunk
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path!r}: corrupt gzip stream after {len(buf):,} "
                        f"decompressed payload bytes: {e}") from e
    if len(buf) < nbytes:
        raise DataError(
            f"{path!r}: header claims {what} of {nbytes:,} bytes but the "
            f"decompressed file holds only {len(buf):,} bytes after the header "
            f"(file truncated)")
    if len(buf) > nbytes:
        raise DataError(
            f"{path!r}: file has trailing data after the {nbytes:,} payload bytes "
            f"its header claims")
    return np.frombuffer(buf, dtype=np.uint8)


# -----------------------------------------------------------------------------
# IDX (original MNIST format).

IDX_UBYTE_IMAGES = 0x00000803  # uint8, 3 dimensions (N, rows, cols)
IDX_UBYTE_LABELS = 0x00000801  # uint8, 1 dimension (N,)


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Reads a uint8 IDX file (plain or ``.gz``) after validating its header.

    The magic number is big-endian: two zero bytes, the type code (0x08 for
    unsigned byte) and the number of dimensions; then one big-endian uint32 per
    dimension.  Only uint8 data is supported.
    """
    path = os.fspath(path)
    ndim = expected_magic & 0xFF
    with _open(path) as f:
        magic = int.from_bytes(_read_exact(f, path, 4, "IDX magic number"), "big")
        if magic != expected_magic:
            raise DataError(
                f"{path!r}: bad IDX magic number 0x{magic:08x}, expected "
                f"0x{expected_magic:08x} (uint8, {ndim}-D)")
        header = _read_exact(f, path, 4 * ndim, "IDX dimensions")
        dims = tuple(int.from_bytes(header[4 * i:4 * i + 4], "big")
                     for i in range(ndim))
        if any(d == 0 for d in dims):
            raise DataError(f"{path!r}: IDX header has an empty dimension {dims}")
        nbytes = math.prod(dims)  # Python int: no overflow
        data = _read_payload(f, path, nbytes, 4 + 4 * ndim,
                             what=f"an array of shape {dims}")
    return data.reshape(dims)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _check_labels(labels: np.ndarray, num_classes: int, where: str,
                  what: str = "label") -> None:
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(
            f"{where}: {what} {int(labels[bad])} at index {bad} is out of range "
            f"[0, {num_classes})")
    if labels.size and int(labels.min()) < 0:
        bad = int(np.argmax(labels < 0))
        raise DataError(
            f"{where}: {what} {int(labels[bad])} at index {bad} is out of range "
            f"[0, {num_classes})")


def _load_mnist_files(data_dir: str | None) -> Dataset:
    expected = [f for pair in _MNIST_FILES.values() for f in pair]
    data_dir = _check_dir(data_dir, "mnist", expected)
    paths = _require_files(data_dir, "mnist", expected)
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
        _check_labels(labels, 10, f"mnist {split} labels {lbl_path!r}")
        splits[split] = Split(images=images[..., None],
                              labels=labels.astype(np.int32))
    return Dataset(train=splits["train"], test=splits["test"], num_classes=10,
                   name="mnist")


# -----------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 binary formats.
#
# A file is a sequence of records: the label byte(s), then 3072 pixel bytes
# (the 1024 red, 1024 green and 1024 blue values of a row-major 32x32 image).
# The files are read from a folder (plain or .gz) or straight from the official
# .tar.gz archive (read front to back, nothing is extracted to disk); every route
# hands its bytes to the same parser, _parse_cifar_records.

_CIFAR_PIXELS = 3 * 32 * 32
# After the end of its tar archive a .tar.gz may only hold zero padding (tar pads
# an archive to a multiple of its record, 10 KiB by default), at most this much.
# Anything else is a damaged archive whose rest tarfile would silently ignore.
_TAR_TRAILING_LIMIT = 16 << 20


@dataclasses.dataclass(frozen=True)
class _CifarFormat:
    name: str  # dataset name (as in DATASETS)
    title: str  # for messages
    label_bytes: tuple[tuple[str, int], ...]  # (what, number of values) per label byte
    class_label: int  # index in label_bytes of the label used as the class
    splits: dict[str, dict[str, int]]  # split -> {file name: records it holds}
    folder: str  # folder the official archive unpacks to (its members' prefix)
    archive: str  # file name of the official archive
    # Names of the python (pickle) version's archive, folder and files: never read
    # (unpickling runs code from the file), but recognised, to point at the binary version.
    python_version: tuple[str, ...] = ()

    @property
    def record_size(self) -> int:
        return len(self.label_bytes) + _CIFAR_PIXELS

    @property
    def num_classes(self) -> int:
        return self.label_bytes[self.class_label][1]

    @property
    def max_records(self) -> dict[str, int]:
        return {f: n for files in self.splits.values() for f, n in files.items()}

    @property
    def record_layout(self) -> str:
        if len(self.label_bytes) == 1:
            return f"1 label byte + {_CIFAR_PIXELS} pixel bytes"
        labels = ", ".join(f"{what} 0..{n - 1}" for what, n in self.label_bytes)
        return (f"{len(self.label_bytes)} label bytes ({labels}) + {_CIFAR_PIXELS} "
                f"pixel bytes")

    def max_bytes(self, filename: str) -> int:
        return min(self.max_records[filename] * self.record_size, MAX_PAYLOAD_BYTES)

    def too_big(self, filename: str) -> str:
        return (f"more than the {self.max_bytes(filename):,} bytes of "
                f"{self.max_records[filename]:,} {self.title} records, the size of "
                f"the official {filename}")


_CIFAR10 = _CifarFormat(
    name="cifar10", title="CIFAR-10", label_bytes=(("label", 10),), class_label=0,
    splits={"train": {f"data_batch_{i}.bin": 10_000 for i in range(1, 6)},
            "test": {"test_batch.bin": 10_000}},
    folder="cifar-10-batches-bin", archive="cifar-10-binary.tar.gz",
    python_version=("cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1",
                    "test_batch"))
_CIFAR100 = _CifarFormat(
    name="cifar100", title="CIFAR-100",
    label_bytes=(("coarse label", 20), ("fine label", 100)), class_label=1,
    splits={"train": {"train.bin": 50_000}, "test": {"test.bin": 10_000}},
    folder="cifar-100-binary", archive="cifar-100-binary.tar.gz",
    python_version=("cifar-100-python.tar.gz", "cifar-100-python", "train", "test"))


def _parse_cifar_records(buf, where: str,
                         fmt: _CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """Parses the bytes of one CIFAR file; returns (uint8 NHWC images, int32 labels).

    ``where`` names the file (or archive member) in error messages.  Every label
    byte is range-checked; the labels returned are those of ``fmt.class_label``.
    """
    raw = np.frombuffer(buf, dtype=np.uint8)
    record = fmt.record_size
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{where}: size {raw.size:,} bytes is not a positive multiple of the "
            f"{fmt.title} record size {record} ({fmt.record_layout})")
    records = raw.reshape(-1, record)
    for i, (what, count) in enumerate(fmt.label_bytes):
        _check_labels(records[:, i], count, f"{fmt.name} {where}", what=what)
    labels = records[:, fmt.class_label].astype(np.int32)
    images = records[:, len(fmt.label_bytes):].reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels


def _read_cifar_file(path: str, fmt: _CifarFormat,
                     filename: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the CIFAR file ``path`` (plain or ``.gz``), the dataset's ``filename``."""
    path = os.fspath(path)
    max_bytes = fmt.max_bytes(filename)
    if path.endswith(".gz"):
        # Decompressed size unknown: read what is present, at most max_bytes + 1.
        with _open(path) as f:
            buf = bytearray()
            try:
                while len(buf) <= max_bytes:
                    chunk = f.read(min(_READ_CHUNK, max_bytes + 1 - len(buf)))
                    if not chunk:
                        break
                    buf += chunk
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path!r}: corrupt gzip stream: {e}") from e
        if len(buf) > max_bytes:
            raise DataError(f"{path!r}: decompresses to {fmt.too_big(filename)}; "
                            f"not a {fmt.title} file")
        raw = np.frombuffer(buf, dtype=np.uint8)
    else:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise DataError(f"{path!r}: {size:,} bytes is {fmt.too_big(filename)}; "
                            f"not a {fmt.title} file")
        with _open(path) as f:
            raw = _read_payload(f, path, size, 0, what=f"{fmt.title} records")
    return _parse_cifar_records(raw, repr(path), fmt)


def read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 binary batch; returns (uint8 NHWC images, int32 labels).

    The batch (plain or ``.gz``) may hold at most the 10,000 records of an
    official batch.
    """
    path = os.fspath(path)
    name = os.path.basename(path).removesuffix(".gz")
    return _read_cifar_file(path, _CIFAR10,
                            name if name in _CIFAR10.max_records else "test_batch.bin")


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    for test, kind in ((member.isdir, "directory"), (member.ischr, "character device"),
                       (member.isblk, "block device"), (member.isfifo, "FIFO"),
                       (member.issparse, "sparse file")):
        if test():
            return kind
    return f"member of tar type {member.type!r}"


def _read_cifar_archive(archive: str, fmt: _CifarFormat
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the dataset's files from its official ``.tar.gz`` without extracting it.

    The archive is read once, front to back.  Only regular-file members named
    exactly ``<fmt.folder>/<file>`` are read, each after checking its declared
    size; other members are skipped.  The gzip stream is read to its end, so that its
    CRC and length are checked and nothing but zero padding follows the tar
    archive.  Returns {file name: (images, labels)}.
    """
    wanted = {f"{fmt.folder}/{f}": f for f in fmt.max_records}
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seen: list[str] = []  # member names, for the message about missing ones
    num_members = 0
    try:
        with gzip.open(archive, "rb") as gz:
            # Plain (not "|" stream) mode: tarfile then reads exactly the blocks it
            # parses, and only forwards, so the gzip stream is decompressed once.
            with tarfile.open(fileobj=gz, mode="r:") as tar:
                for member in tar:
                    num_members += 1
                    if len(seen) < 20:
                        seen.append(member.name)
                    filename = wanted.get(member.name)
                    if filename is None:
                        continue
                    where = f"{archive!r} member {member.name!r}"
                    if filename in parts:
                        raise DataError(f"{where}: occurs more than once in the "
                                        f"archive")
                    if not member.isreg() or member.issparse():
                        raise DataError(f"{where}: is a {_member_kind(member)}, not a "
                                        f"regular file; refusing to read it")
                    if member.size > fmt.max_bytes(filename):
                        raise DataError(
                            f"{where}: declared size {member.size:,} bytes is "
                            f"{fmt.too_big(filename)}; refusing to read it")
                    buf = bytearray(member.size)
                    got = _readinto_full(tar.extractfile(member), buf)
                    if got != member.size:
                        raise DataError(f"{where}: archive ends after {got:,} of its "
                                        f"{member.size:,} bytes (truncated)")
                    parts[filename] = _parse_cifar_records(buf, where, fmt)
            # Read the gzip stream to its end (this checks its CRC and length);
            # tarfile stopped at the first zero block, and only zeros may follow.
            trailing = 0
            while chunk := gz.read(_READ_CHUNK):
                trailing += len(chunk)
                if chunk.count(0) != len(chunk):
                    raise DataError(
                        f"{archive!r}: non-zero data follows the end of the tar "
                        f"archive (damaged tar stream, or a member header tarfile "
                        f"could not parse)")
                if trailing > _TAR_TRAILING_LIMIT:
                    raise DataError(
                        f"{archive!r}: more than {_TAR_TRAILING_LIMIT:,} bytes of "
                        f"padding follow the end of the tar archive")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive!r}: not a readable .tar.gz archive (corrupt or "
                        f"truncated gzip/tar stream): {type(e).__name__}: {e}") from e
    missing = [m for m, f in wanted.items() if f not in parts]
    if missing:
        listed = ", ".join(seen) + (", ..." if num_members > len(seen) else "")
        raise DataError(
            f"{fmt.name}: archive {archive!r} has no regular-file member(s) "
            f"{', '.join(missing)}; it holds {num_members} member(s): "
            f"{listed or '(none)'}; expected the official {fmt.archive} with "
            f"{', '.join(wanted)}")
    return parts


def _python_version_note(data_dir: str | None, fmt: _CifarFormat) -> str:
    """'this is the python (pickle) version ...' when `data_dir` is, or holds, one of the
    names of that version; '' otherwise."""
    if data_dir is None:
        return ""
    path = os.fspath(data_dir)
    names = {os.path.basename(os.path.normpath(path))}
    if os.path.isdir(path):
        names |= set(os.listdir(path))
    if not names & set(fmt.python_version):
        return ""
    return (f"this is the python (pickle) version of {fmt.title}, which is not read "
            f"(unpickling a file can run any code in it): use the binary version, "
            f"{fmt.archive}")


def _load_cifar_files(fmt: _CifarFormat, data_dir: str | None) -> Dataset:
    """CIFAR files from a folder, its ``fmt.folder`` subfolder, or the archive.

    ``data_dir`` may be the archive itself.  For a folder: its ``fmt.folder``
    subfolder when the folder lacks the test file and the subfolder exists;
    else ``data_dir/fmt.archive`` when the folder holds none of the files and
    that archive exists; else the folder itself (missing files are named).
    """
    names = list(fmt.max_records)
    alternative = (f", or the official archive {fmt.archive} (its path, or a "
                   f"folder holding it)")
    pickled = _python_version_note(data_dir, fmt)
    if pickled:
        alternative += f"; {pickled}"
    parts = None
    if data_dir is not None and os.path.isfile(os.fspath(data_dir)):
        if pickled:  # the file is the python version's archive
            raise DataError(f"{fmt.name}: {data_dir!r}: {pickled}")
        parts = _read_cifar_archive(os.fspath(data_dir), fmt)
    else:
        data_dir = _check_dir(data_dir, fmt.name, names, alternative)
        sub = os.path.join(data_dir, fmt.folder)
        archive = os.path.join(data_dir, fmt.archive)
        test_file = next(iter(fmt.splits["test"]))
        if _find_file(data_dir, test_file) is None and os.path.isdir(sub):
            data_dir = sub
        elif (not any(_find_file(data_dir, n) for n in names)
              and os.path.isfile(archive)):
            parts = _read_cifar_archive(archive, fmt)
        if parts is None:
            paths = _require_files(data_dir, fmt.name, names, alternative)
            parts = {n: _read_cifar_file(paths[n], fmt, n) for n in names}

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
    _check_labels(labels, num_classes, f"TFDS {name} {split}")
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
# Registry and entry point.


@dataclasses.dataclass(frozen=True)
class _Spec:
    num_classes: int
    # source -> loader(data_dir).  A spec with a single "*" key ignores source.
    loaders: dict[str, Callable[[str | None], Dataset]]


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(10, {"tfds": lambda d: _load_tfds("mnist", d),
                        "files": _load_mnist_files}),
    "digits": _Spec(10, {"*": lambda d: _load_digits()}),
    "cifar10": _Spec(10, {"tfds": lambda d: _load_tfds("cifar10", d),
                          "files": lambda d: _load_cifar_files(_CIFAR10, d)}),
    "cifar100": _Spec(100, {"tfds": lambda d: _load_tfds("cifar100", d),
                            "files": lambda d: _load_cifar_files(_CIFAR100, d)}),
}
DATASETS = tuple(_SPECS)


def load_dataset(name: str, source: str = "tfds",
                 data_dir: str | None = None) -> Dataset:
    """Loads dataset ``name`` into host memory.

    Args:
      name: one of ``DATASETS`` (``mnist``, ``digits``, ``cifar10``,
        ``cifar100``).
      source: ``"tfds"`` (TensorFlow Datasets, may download) or ``"files"``
        (local raw files in ``data_dir``).  Ignored by ``digits`` (bundled with
        scikit-learn), but must still be one of ``SOURCES``.
      data_dir: for ``files``, the folder holding the raw files (CIFAR: or the
        path of the official ``.tar.gz`` archive); for ``tfds``,
        the TFDS data directory (None: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).

    Returns:
      A :class:`Dataset` with uint8 (N, H, W, C) images and int32 labels.

    Raises:
      DataError: unknown name/source, missing or malformed files, or a TFDS
        dataset that is not prepared while the network is unreachable.
    """
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
