"""The file formats read from disk, as untrusted input: IDX (the original MNIST files)
and the CIFAR-10 / CIFAR-100 binary versions (plain, .gz, or inside the official .tar.gz).

Headers are validated and the size they claim is checked against the real payload
*before* any large buffer is allocated; gzip streams are decompressed incrementally and
never read past the claimed size (+1 byte, to detect trailing data). Every problem is
reported as a :class:`DataError` (a ``ValueError``) that names the offending file.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import tarfile
import zlib
from typing import BinaryIO

import numpy as np


class DataError(ValueError):
    """Any problem with finding, downloading or parsing a dataset."""


# Refuse any single data file whose header claims more than this many payload
# bytes.  Real MNIST train images are 47 MB and CIFAR-10 batches 30 MB; the cap
# only exists so that a corrupt/crafted header (e.g. "4 billion images") fails
# immediately, even for a gzip file whose decompressed size is unknown.
MAX_PAYLOAD_BYTES = 1 << 31  # 2 GiB

_READ_CHUNK = 1 << 22  # 4 MiB of decompressed data per read
_MEMBER_CHUNK = 1 << 20  # 1 MiB per read of an archive member (its claimed size unproven)


# -----------------------------------------------------------------------------
# Low-level, size-checked file reading.


def find_file(data_dir: str, filename: str) -> str | None:
    """Returns ``data_dir/filename`` or ``data_dir/filename.gz`` if present."""
    for candidate in (filename, filename + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def check_dir(data_dir: str | None, name: str, expected: list[str],
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


def require_files(data_dir: str, name: str, expected: list[str],
                   alternative: str = "") -> dict[str, str]:
    found = {f: find_file(data_dir, f) for f in expected}
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


def check_labels(labels: np.ndarray, num_classes: int, where: str,
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
class CifarFormat:
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


CIFAR10 = CifarFormat(
    name="cifar10", title="CIFAR-10", label_bytes=(("label", 10),), class_label=0,
    splits={"train": {f"data_batch_{i}.bin": 10_000 for i in range(1, 6)},
            "test": {"test_batch.bin": 10_000}},
    folder="cifar-10-batches-bin", archive="cifar-10-binary.tar.gz",
    python_version=("cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1",
                    "test_batch"))
CIFAR100 = CifarFormat(
    name="cifar100", title="CIFAR-100",
    label_bytes=(("coarse label", 20), ("fine label", 100)), class_label=1,
    splits={"train": {"train.bin": 50_000}, "test": {"test.bin": 10_000}},
    folder="cifar-100-binary", archive="cifar-100-binary.tar.gz",
    python_version=("cifar-100-python.tar.gz", "cifar-100-python", "train", "test"))


def _parse_cifar_records(buf, where: str,
                         fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
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
        check_labels(records[:, i], count, f"{fmt.name} {where}", what=what)
    labels = records[:, fmt.class_label].astype(np.int32)
    images = records[:, len(fmt.label_bytes):].reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels


def read_cifar_file(path: str, fmt: CifarFormat,
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
    return read_cifar_file(path, CIFAR10,
                            name if name in CIFAR10.max_records else "test_batch.bin")


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


def read_cifar_archive(archive: str, fmt: CifarFormat
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
                    # Grown with what the archive really holds: a header may claim
                    # more bytes than follow it.
                    member_file, buf = tar.extractfile(member), bytearray()
                    while len(buf) < member.size:
                        chunk = member_file.read(min(_MEMBER_CHUNK, member.size - len(buf)))
                        if not chunk:
                            break
                        buf += chunk
                    if len(buf) != member.size:
                        raise DataError(f"{where}: archive ends after {len(buf):,} of its "
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


def python_version_note(data_dir: str | None, fmt: CifarFormat) -> str:
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
