"""Tests for robust_admm.data (offline; every data file is built in tmp_path)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import socket
import struct
import tarfile
import time

import numpy as np
import pytest

from helpers import make_cifar, write
from robust_admm import data
from robust_admm.data import DataError
from robust_admm.data import formats
from robust_admm.data import sources

MNIST_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------------------
# Helpers that write IDX / CIFAR-10 files.


def idx_bytes(array: np.ndarray, magic: int | None = None,
              dims: tuple[int, ...] | None = None, extra: bytes = b"") -> bytes:
    """IDX encoding of a uint8 array; magic/dims may be overridden (to lie)."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    if dims is None:
        dims = array.shape
    header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    return header + array.tobytes() + extra


def make_mnist(tmp_path, n_train=12, n_test=5, rows=28, cols=28, gz=False,
               seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for key, arr in arrays.items():
        write(tmp_path / MNIST_NAMES[key], idx_bytes(arr), gz=gz)
    return arrays


def replace_file(tmp_path, key, payload: bytes, gz: bool = False):
    for suffix in ("", ".gz"):
        p = tmp_path / (MNIST_NAMES[key] + suffix)
        if p.exists():
            p.unlink()
    return write(tmp_path / MNIST_NAMES[key], payload, gz=gz)


# ---------------------------------------------------------------------------
# IDX round trip.


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_files_round_trip(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    ds = data.load_dataset("mnist", source="files", data_dir=str(tmp_path))
    assert ds.name == "mnist" and ds.num_classes == 10
    for split in ("train", "test"):
        s = getattr(ds, split)
        assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
        assert s.images.shape == arrays[f"{split}_images"].shape + (1,)
        np.testing.assert_array_equal(s.images[..., 0], arrays[f"{split}_images"])
        np.testing.assert_array_equal(s.labels, arrays[f"{split}_labels"])


def test_mnist_files_mixed_plain_and_gz_and_pathlike(tmp_path):
    arrays = make_mnist(tmp_path, rows=3, cols=5)
    replace_file(tmp_path, "train_images", idx_bytes(arrays["train_images"]), gz=True)
    ds = data.load_dataset("mnist", "files", tmp_path)  # os.PathLike accepted
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train_images"])
    assert ds.train.images.shape == (12, 3, 5, 1)


def test_read_idx_direct(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write(tmp_path / "x-idx3-ubyte", idx_bytes(arr), gz=True)
    np.testing.assert_array_equal(data.read_idx(p, formats.IDX_UBYTE_IMAGES), arr)


def test_describe_one_line(tmp_path):
    make_mnist(tmp_path)
    text = data.describe(data.load_dataset("mnist", "files", str(tmp_path)))
    assert "\n" not in text
    assert "mnist" in text and "(12, 28, 28, 1)" in text and "(5, 28, 28, 1)" in text


# ---------------------------------------------------------------------------
# Bad inputs.


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(missing))
    msg = str(e.value)
    assert str(missing) in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert ".gz" in msg


def test_missing_data_dir_argument():
    with pytest.raises(DataError, match="data.dir"):
        data.load_dataset("mnist", "files", None)


def test_missing_file(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / MNIST_NAMES["test_labels"]).unlink()
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / MNIST_NAMES["test_labels"]) in msg
    assert "train-images-idx3-ubyte" in msg and ".gz" in msg  # lists expected files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_wrong_magic(tmp_path, gz):
    arrays = make_mnist(tmp_path)
    path = replace_file(tmp_path, "train_images",
                        idx_bytes(arrays["train_images"], magic=0x00000801), gz=gz)
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    msg = str(e.value)
    assert path in msg and "0x00000801" in msg and "0x00000803" in msg


def test_not_an_idx_file_at_all(tmp_path):
    make_mnist(tmp_path)
    replace_file(tmp_path, "train_labels", b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        data.load_dataset("mnist", "files", str(tmp_path))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_truncated_payload(tmp_path, gz):
    arrays = make_mnist(tmp_path)
    imgs = arrays["train_images"]
    # Header claims 12 images, payload only holds 11.
    path = replace_file(tmp_path, "train_images",
                        idx_bytes(imgs[:11], dims=imgs.shape), gz=gz)
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    assert path in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_trailing_data(tmp_path, gz):
    arrays = make_mnist(tmp_path)
    path = replace_file(tmp_path, "test_labels",
                        idx_bytes(arrays["test_labels"], extra=b"\x01"), gz=gz)
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    assert path in str(e.value) and "trailing" in str(e.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("key,claim", [
    ("train_images", (4_000_000_000, 28, 28)),  # ~3 TB
    ("train_labels", (4_000_000_000,)),  # 4 GB
])
def test_billions_of_images_fail_fast(tmp_path, gz, key, claim):
    arrays = make_mnist(tmp_path)
    path = replace_file(tmp_path, key, idx_bytes(arrays[key], dims=claim), gz=gz)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    assert time.perf_counter() - t0 < 2.0  # refused from the header alone
    msg = str(e.value)
    assert path in msg and str(claim) in msg and "limit" in msg


def test_gz_claim_below_cap_but_beyond_payload_fails_fast(tmp_path):
    # A claim under the absolute size cap (so it is not refused outright):
    # the gzip reader must stop at the end of the real stream, quickly, without
    # allocating the claimed ~1.5 GB.
    arrays = make_mnist(tmp_path)
    claim = (2_000_000, 28, 28)
    assert np.prod(claim) < formats.MAX_PAYLOAD_BYTES
    replace_file(tmp_path, "train_images",
                 idx_bytes(arrays["train_images"], dims=claim), gz=True)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="truncated"):
        data.load_dataset("mnist", "files", str(tmp_path))
    assert time.perf_counter() - t0 < 2.0


def test_corrupt_gzip(tmp_path):
    arrays = make_mnist(tmp_path)
    path = replace_file(tmp_path, "train_images", idx_bytes(arrays["train_images"]),
                        gz=True)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2:] = b"\xff" * (len(raw) - len(raw) // 2)
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    assert path in str(e.value)


def test_mismatched_counts(tmp_path):
    arrays = make_mnist(tmp_path)
    replace_file(tmp_path, "test_labels", idx_bytes(arrays["test_labels"][:4]))
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    msg = str(e.value)
    assert "5 images" in msg and "4 labels" in msg and "t10k-labels-idx1-ubyte" in msg


def test_label_out_of_range(tmp_path):
    arrays = make_mnist(tmp_path)
    labels = arrays["train_labels"].copy()
    labels[3] = 10
    replace_file(tmp_path, "train_labels", idx_bytes(labels))
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "files", str(tmp_path))
    msg = str(e.value)
    assert "label 10" in msg and "index 3" in msg and "[0, 10)" in msg


def test_unknown_name():
    with pytest.raises(DataError) as e:
        data.load_dataset("imagenet")
    msg = str(e.value)
    assert "'imagenet'" in msg
    for name in ("mnist", "digits", "cifar10", "cifar100"):
        assert name in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", ["mnist", "digits", "cifar10", "cifar100"])
def test_unknown_source(name):
    with pytest.raises(DataError) as e:
        data.load_dataset(name, source="http")
    msg = str(e.value)
    assert "'http'" in msg and "tfds" in msg and "files" in msg


# ---------------------------------------------------------------------------
# sklearn digits.


def test_digits():
    ds = data.load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.train.images.shape == (1500, 8, 8, 1)
    assert ds.test.images.shape == (297, 8, 8, 1)
    for s in (ds.train, ds.test):
        assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
        assert s.images.min() == 0 and s.images.max() == 255
        assert set(np.unique(s.labels)) == set(range(10))
    # Values are round(v * 255 / 16) for v in 0..16.
    allowed = {int(round(v * 255 / 16)) for v in range(17)}
    assert set(np.unique(ds.train.images).tolist()) <= allowed
    # Deterministic, source ignored, and the splits partition the 1,797 images.
    again = data.load_dataset("digits", source="files")
    np.testing.assert_array_equal(ds.train.images, again.train.images)
    np.testing.assert_array_equal(ds.test.labels, again.test.labels)
    from sklearn.datasets import load_digits
    total = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(ds.train.labels, minlength=10)
        + np.bincount(ds.test.labels, minlength=10), total)


# ---------------------------------------------------------------------------
# CIFAR-10 binary format (helpers.make_cifar writes it).


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_cifar10_files_round_trip(tmp_path, gz):
    out = make_cifar(tmp_path / "cifar-10-batches-bin", gz=gz)
    ds = data.load_dataset("cifar10", "files", str(tmp_path))  # finds subfolder
    assert ds.name == "cifar10" and ds.num_classes == 10
    train_names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    np.testing.assert_array_equal(
        ds.train.images, np.concatenate([out[n][0] for n in train_names]))
    np.testing.assert_array_equal(
        ds.train.labels, np.concatenate([out[n][1] for n in train_names]))
    np.testing.assert_array_equal(ds.test.images, out["test_batch.bin"][0])
    np.testing.assert_array_equal(ds.test.labels, out["test_batch.bin"][1])
    assert ds.train.images.shape == (12, 32, 32, 3)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
    assert ds.test.images.flags["C_CONTIGUOUS"]


def test_cifar10_channel_layout(tmp_path):
    # Record = label, 1024 red, 1024 green, 1024 blue bytes (row-major 32x32).
    make_cifar(tmp_path)
    record = np.zeros(3073, dtype=np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 1 * 32 + 2] = 11  # red, row 1, col 2
    record[1 + 1 * 1024 + 0] = 22  # green, row 0, col 0
    record[1 + 2 * 1024 + 31 * 32 + 31] = 33  # blue, row 31, col 31
    (tmp_path / "test_batch.bin").write_bytes(record.tobytes())
    img = data.load_dataset("cifar10", "files", str(tmp_path)).test.images[0]
    assert img[1, 2, 0] == 11 and img[0, 0, 1] == 22 and img[31, 31, 2] == 33
    assert int(img.sum()) == 66


def test_cifar10_bad_files(tmp_path):
    make_cifar(tmp_path)
    bad = tmp_path / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", "files", str(tmp_path))
    assert str(bad) in str(e.value) and "3073" in str(e.value)

    make_cifar(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin"):
        data.load_dataset("cifar10", "files", str(tmp_path))

    make_cifar(tmp_path)
    raw = bytearray((tmp_path / "data_batch_1.bin").read_bytes())
    raw[3073] = 200  # label of record 1
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="label 200 at index 1"):
        data.load_dataset("cifar10", "files", str(tmp_path))


# ---------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 from the official .tar.gz archives (streamed).

CIFAR10_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def tar_entry(name, payload=b"", size=None, type_=tarfile.REGTYPE, linkname=""):
    """One tar member as bytes; ``size`` may lie about the payload's length."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    info.size = len(payload) if size is None else size
    pad = -len(payload) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.GNU_FORMAT) + payload + b"\0" * pad


def write_tar_gz(path, entries, end=True) -> str:
    """gzip of the entries; ``end``: the end-of-archive blocks and tar's zero
    padding to a multiple of its 10 KiB record."""
    raw = b"".join(entries)
    if end:
        raw += b"\0" * (2 * tarfile.BLOCKSIZE)
        raw += b"\0" * (-len(raw) % tarfile.RECORDSIZE)
    with gzip.open(path, "wb") as f:
        f.write(raw)
    return os.fspath(path)


def cifar10_tar_entries(folder, skip=()):
    entries = [tar_entry("cifar-10-batches-bin", type_=tarfile.DIRTYPE),
               tar_entry("cifar-10-batches-bin/batches.meta.txt", b"airplane\n")]
    for name in CIFAR10_NAMES:
        if name not in skip:
            entries.append(tar_entry(f"cifar-10-batches-bin/{name}",
                                     (folder / name).read_bytes()))
    return entries + [tar_entry("cifar-10-batches-bin/readme.html", b"<html/>")]


def assert_same_dataset(a, b):
    assert (a.name, a.num_classes) == (b.name, b.num_classes)
    for split in ("train", "test"):
        x, y = getattr(a, split), getattr(b, split)
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)
        assert x.images.dtype == y.images.dtype and x.labels.dtype == y.labels.dtype


def test_cifar10_tarball_equals_unpacked_folder(tmp_path):
    folder = tmp_path / "unpacked" / "cifar-10-batches-bin"
    make_cifar(folder, counts=(20,) * 5, n_test=20)
    archive = write_tar_gz(tmp_path / "cifar-10-binary.tar.gz",
                           cifar10_tar_entries(folder))
    before = sorted(os.listdir(tmp_path))
    ref = data.load_dataset("cifar10", "files", str(folder))
    assert ref.train.images.shape == (100, 32, 32, 3)
    assert_same_dataset(data.load_dataset("cifar10", "files", archive), ref)
    # A folder holding the archive (and no batches, no cifar-10-batches-bin).
    assert_same_dataset(data.load_dataset("cifar10", "files", tmp_path), ref)
    assert sorted(os.listdir(tmp_path)) == before  # nothing extracted


def _bad_cifar10_archive(tmp_path, kind):
    folder = tmp_path / "unpacked"
    make_cifar(folder, counts=(2,) * 5, n_test=2)
    entries = cifar10_tar_entries(folder)
    path = tmp_path / "cifar-10-binary.tar.gz"
    if kind == "symlink":  # replaces data_batch_3.bin
        entries[4] = tar_entry("cifar-10-batches-bin/data_batch_3.bin",
                               type_=tarfile.SYMTYPE, linkname="/etc/passwd")
    elif kind == "oversized":  # header claims one byte more than 10,000 records
        entries = entries[:3] + [tar_entry("cifar-10-batches-bin/data_batch_2.bin",
                                           b"\1" * 3073, size=10_000 * 3073 + 1)]
        return write_tar_gz(path, entries, end=False)
    elif kind == "missing":
        entries = cifar10_tar_entries(folder, skip=("test_batch.bin",))
    elif kind == "duplicate":
        entries.insert(3, entries[2])
    elif kind == "data after end":  # a member after the end-of-archive blocks
        entries += [b"\0" * (2 * tarfile.BLOCKSIZE),
                    tar_entry("cifar-10-batches-bin/extra.bin", b"x")]
    elif kind == "bad label":
        raw = bytearray((folder / "data_batch_4.bin").read_bytes())
        raw[3073] = 10  # label of record 1
        entries[5] = tar_entry("cifar-10-batches-bin/data_batch_4.bin", bytes(raw))
    write_tar_gz(path, entries)
    if kind in ("truncated", "truncated trailer", "not gzip"):
        raw = path.read_bytes()
        path.write_bytes({"truncated": raw[:len(raw) // 2],
                          "truncated trailer": raw[:-4],  # gzip CRC/length cut
                          "not gzip": raw[10:]}[kind])
    return os.fspath(path)


@pytest.mark.parametrize("kind,expected", [
    ("symlink", ["'cifar-10-batches-bin/data_batch_3.bin'", "symbolic link",
                 "/etc/passwd", "not a regular file"]),
    ("oversized", ["'cifar-10-batches-bin/data_batch_2.bin'", "declared size",
                   "30,730,001", "more than the 30,730,000 bytes"]),
    ("missing", ["no regular-file member(s) cifar-10-batches-bin/test_batch.bin",
                 "cifar-10-batches-bin/readme.html", "holds 8 member(s)"]),
    ("duplicate", ["'cifar-10-batches-bin/data_batch_1.bin'", "more than once"]),
    ("bad label", ["'cifar-10-batches-bin/data_batch_4.bin'", "label 10 at index 1"]),
    ("data after end", ["non-zero data follows the end of the tar archive"]),
    ("truncated", ["truncated"]),
    ("truncated trailer", ["truncated", "EOFError"]),
    ("not gzip", ["not a readable .tar.gz", "BadGzipFile"]),
])
def test_cifar10_bad_tarball(tmp_path, kind, expected):
    archive = _bad_cifar10_archive(tmp_path, kind)
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", "files", archive)
    msg = str(e.value)
    assert repr(archive) in msg or archive in msg
    for part in expected:
        assert part in msg


def test_cifar10_folder_batch_larger_than_official_is_refused(tmp_path, monkeypatch):
    # A batch holds at most 10,000 records (checked before reading); shrink the
    # limit so that the test file stays small.
    small = dataclasses.replace(formats.CIFAR10, splits={
        "train": {f"data_batch_{i}.bin": 3 for i in range(1, 6)},
        "test": {"test_batch.bin": 3}})
    monkeypatch.setattr(sources, "CIFAR10", small)
    make_cifar(tmp_path, counts=(3, 3, 4, 3, 3), n_test=3)
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", "files", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "data_batch_3.bin") in msg
    assert "12,292 bytes is more than the 9,219 bytes of 3 CIFAR-10 records" in msg


def make_cifar100(folder, n_train=20, n_test=20, seed=0):
    """Writes train.bin / test.bin; returns {file name: (n, 3074) uint8 records}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for fname, n in (("train.bin", n_train), ("test.bin", n_test)):
        records = rng.integers(0, 256, (n, 3074), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 20, n)
        records[:, 1] = rng.integers(0, 100, n)
        write(os.path.join(folder, fname), records.tobytes())
        out[fname] = records
    return out


@pytest.mark.parametrize("where", ["folder", "subfolder", "tarball", "tarball folder"])
def test_cifar100_files(tmp_path, where):
    sub = tmp_path / "cifar-100-binary"
    records = make_cifar100(tmp_path if where == "folder" else sub)
    data_dir = tmp_path
    if where.startswith("tarball"):
        entries = [tar_entry("cifar-100-binary/meta.txt", b"apple\n")]
        entries += [tar_entry(f"cifar-100-binary/{n}", (sub / n).read_bytes())
                    for n in ("test.bin", "train.bin")]
        shutil.rmtree(sub)
        data_dir = write_tar_gz(tmp_path / "cifar-100-binary.tar.gz", entries)
        if where == "tarball folder":
            data_dir = tmp_path
    ds = data.load_dataset("cifar100", "files", data_dir)
    assert ds.name == "cifar100" and ds.num_classes == 100
    for split, fname in (("train", "train.bin"), ("test", "test.bin")):
        s, rec = getattr(ds, split), records[fname]
        assert s.images.shape == (20, 32, 32, 3) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.int32 and s.images.flags["C_CONTIGUOUS"]
        expected = rec[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(s.images, expected)
        np.testing.assert_array_equal(s.labels, rec[:, 1])  # the fine label


@pytest.mark.parametrize("byte,value,message", [
    (0, 20, "coarse label 20 at index 3 is out of range [0, 20)"),
    (1, 100, "fine label 100 at index 3 is out of range [0, 100)"),
])
def test_cifar100_label_out_of_range(tmp_path, byte, value, message):
    records = make_cifar100(tmp_path)["train.bin"].copy()
    records[3, byte] = value
    path = write(tmp_path / "train.bin", records.tobytes())
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar100", "files", str(tmp_path))
    assert message in str(e.value) and path in str(e.value)


def test_cifar100_bad_sizes(tmp_path, monkeypatch):
    make_cifar100(tmp_path, n_test=3)
    path = write(tmp_path / "test.bin",
                 (tmp_path / "test.bin").read_bytes()[:-1])  # 3073-byte record
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar100", "files", str(tmp_path))
    assert path in str(e.value) and "record size 3074" in str(e.value)
    assert "coarse label 0..19, fine label 0..99" in str(e.value)

    small = dataclasses.replace(formats.CIFAR100, splits={"train": {"train.bin": 20},
                                                        "test": {"test.bin": 2}})
    monkeypatch.setattr(sources, "CIFAR100", small)
    os.unlink(path)
    make_cifar100(tmp_path, n_test=3)
    for gz in (False, True):
        path = os.fspath(tmp_path / "test.bin")
        if gz:
            raw = open(path, "rb").read()
            os.unlink(path)
            path = write(tmp_path / "test.bin", raw, gz=True)
        with pytest.raises(DataError) as e:
            data.load_dataset("cifar100", "files", str(tmp_path))
        assert path in str(e.value)
        assert "more than the 6,148 bytes of 2 CIFAR-100 records" in str(e.value)


def test_cifar100_missing_files_hint_the_archive(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar100", "files", str(tmp_path))
    msg = str(e.value)
    assert "train.bin" in msg and "test.bin" in msg
    assert "cifar-100-binary.tar.gz" in msg


class _RunsCode:
    """Unpickling this calls touch(path): what a hostile pickle could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name,layout", [
    ("cifar10", {"cifar-10-batches-py": ["data_batch_1", "test_batch", "batches.meta"]}),
    ("cifar100", {"cifar-100-python": ["train", "test", "meta"]}),
    ("cifar10", "cifar-10-python.tar.gz")])
def test_the_pickle_version_is_named_and_never_unpickled(tmp_path, name, layout):
    """A folder or archive of the python version (pickles, here ones whose loading would
    write a file) is refused pointing at the binary version, and nothing is unpickled."""
    import pickle
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"data": _RunsCode(str(marker)), "labels": [0]})
    if isinstance(layout, str):
        target = tmp_path / layout
        target.write_bytes(gzip.compress(payload))
    else:
        ((folder, files),) = layout.items()
        (tmp_path / folder).mkdir()
        for f in files:
            (tmp_path / folder / f).write_bytes(payload)
        target = tmp_path
    with pytest.raises(DataError) as e:
        data.load_dataset(name, "files", str(target))
    assert "python (pickle) version" in str(e.value)
    assert f"{name.replace('cifar', 'cifar-')}-binary.tar.gz" in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# TFDS path (mocked, conftest.tfds_mock; never touches the network).


@pytest.mark.parametrize("name,shape,num_classes", [("mnist", (28, 28, 1), 10),
                                                    ("cifar10", (32, 32, 3), 10),
                                                    ("cifar100", (32, 32, 3), 100)])
def test_tfds_mocked(tfds_mock, monkeypatch, tmp_path, name, shape, num_classes):
    tfds = tfds_mock
    # The mock redirects every builder to a non-existent data_dir, so the real
    # preparedness check would (correctly) say "not prepared" and the network
    # probe would run; the check is a separate function, replaced here.
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda name, data_dir: True)
    monkeypatch.setattr(sources, "_network_reachable",
                        lambda *a, **k: pytest.fail("network probed"))
    with tfds.testing.mock_data(num_examples=7,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(name, "tfds", data_dir=str(tmp_path))
    assert ds.name == name and ds.num_classes == num_classes
    for s in (ds.train, ds.test):
        assert s.images.shape == (7,) + shape
        assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
        assert s.labels.min() >= 0 and s.labels.max() < num_classes


def test_tfds_read_batches(tfds_mock, monkeypatch, tmp_path):
    """More records than one read batch: every record is copied, in order."""
    tfds = tfds_mock
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda name, data_dir: True)
    monkeypatch.setattr(sources, "_TFDS_READ_BATCH", 3)
    with tfds.testing.mock_data(num_examples=8,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("mnist", "tfds", data_dir=str(tmp_path))
        src = tfds.data_source("mnist", split="train")
        expected = [src[i] for i in range(8)]
    np.testing.assert_array_equal(ds.train.images,
                                  np.stack([e["image"] for e in expected]))
    np.testing.assert_array_equal(ds.train.labels, [int(e["label"]) for e in expected])


def _forbid_data_source(monkeypatch):
    import tensorflow_datasets as tfds

    def boom(*a, **k):
        raise AssertionError("tfds.data_source must not be called when offline")

    monkeypatch.setattr(tfds, "data_source", boom)


def test_tfds_offline_fails_fast(monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    _forbid_data_source(monkeypatch)
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda name, data_dir: False)
    monkeypatch.setattr(sources, "_network_reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", "tfds", data_dir="/some/tfds/dir")
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    assert "data.source=files" in msg and "data.dir" in msg
    assert "not prepared" in msg and "unreachable" in msg
    assert "/some/tfds/dir" in msg and "TFDS_DATA_DIR" in msg


def test_tfds_offline_hint_for_cifar100(monkeypatch):
    probed = []
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda name, data_dir: False)
    monkeypatch.setattr(sources, "_network_reachable",
                        lambda host, *a, **k: probed.append(host) or False)
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar100", "tfds", data_dir="/some/tfds/dir")
    assert probed == ["www.cs.toronto.edu"]
    msg = str(e.value)
    assert "'cifar100'" in msg and "cifar-100-binary" in msg
    assert "data.source=files" in msg


def test_tfds_real_preparedness_check_on_empty_dir(monkeypatch, tmp_path):
    """The real (unmocked) preparedness check says no for an empty data_dir."""
    pytest.importorskip("tensorflow_datasets")
    _forbid_data_source(monkeypatch)
    probed = []
    monkeypatch.setattr(sources, "_network_reachable",
                        lambda host, *a, **k: probed.append(host) or False)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="data.source=files"):
        data.load_dataset("mnist", "tfds", data_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5.0
    assert probed == ["storage.googleapis.com"]


def test_network_probe_refused_quickly(monkeypatch):
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    t0 = time.perf_counter()
    assert not sources._network_reachable("127.0.0.1", port, timeout=1.0)
    assert time.perf_counter() - t0 < 2.0

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        assert sources._network_reachable("127.0.0.1", server.getsockname()[1],
                                       timeout=1.0)
    finally:
        server.close()


# ---------------------------------------------------------------------------
# Real MNIST (optional; skipped unless the shared copy exists on this machine).

REAL_MNIST_DIR = "/work/shared/data/mnist"


@pytest.mark.skipif(not os.path.isdir(REAL_MNIST_DIR),
                    reason=f"real MNIST IDX files not present at {REAL_MNIST_DIR}")
def test_real_mnist_files_if_present():
    ds = data.load_dataset("mnist", "files", REAL_MNIST_DIR)
    assert ds.train.images.shape == (60000, 28, 28, 1)
    assert ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.train.images.dtype == np.uint8
    assert ds.train.images.min() == 0 and ds.train.images.max() == 255
    assert ds.train.labels[0] == 5 and ds.test.labels[0] == 7
    np.testing.assert_array_equal(
        np.bincount(ds.train.labels, minlength=10),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
