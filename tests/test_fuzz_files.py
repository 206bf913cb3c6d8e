"""Fuzzed data files: IDX, CIFAR binary (plain, .gz, the official .tar.gz) and user .npz
files, mutated from valid ones, are read to the result a reference parser gives, or
refused with a DataError naming the file; never another exception, a hang, or an
allocation beyond a small multiple of what the file holds (tests/fuzz_support.py)."""
import gzip
import io
import os
import tarfile
import tempfile
import zipfile

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_support import fuzz_settings, mutated_bytes, outcome
from robust_admm.data.formats import (CIFAR10, IDX_UBYTE_IMAGES, IDX_UBYTE_LABELS,
                                      read_cifar_archive, read_cifar_file, read_idx)
from robust_admm.data.npz import read_npz

RNG = np.random.default_rng(0)
SLACK = 8 << 20  # bytes a reader may use whatever the file (its 4 MiB gzip read chunks)


def _write(data: bytes, name: str, gz: bool) -> str:
    folder = tempfile.mkdtemp(prefix="fuzz-")
    path = os.path.join(folder, name + (".gz" if gz else ""))
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------- IDX

IDX_IMAGES = (IDX_UBYTE_IMAGES.to_bytes(4, "big") + b"".join(
    d.to_bytes(4, "big") for d in (3, 5, 4)) + RNG.integers(0, 256, 60, np.uint8).tobytes())
IDX_LABELS = (IDX_UBYTE_LABELS.to_bytes(4, "big") + (7).to_bytes(4, "big")
              + RNG.integers(0, 10, 7, np.uint8).tobytes())


def reference_idx(data: bytes, magic: int):
    """The array an IDX file holds, or None where it is not a valid one."""
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        return None
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    payload = data[4 + 4 * ndim:]
    if 0 in dims or np.prod(dims, dtype=object) != len(payload):
        return None
    return np.frombuffer(payload, np.uint8).reshape(dims)


@given(st.sampled_from([(IDX_IMAGES, IDX_UBYTE_IMAGES), (IDX_LABELS, IDX_UBYTE_LABELS)])
       .flatmap(lambda v: st.tuples(
           mutated_bytes(v[0], fields=[(0, 4), (4, 4), (8, 4), (12, 4)]), st.just(v[1]))),
       st.booleans())
@fuzz_settings()
def test_idx(file, gz):
    data, magic = file
    path = _write(data, "x-idx-ubyte", gz)
    got = outcome(lambda: read_idx(path, magic), [path], max_bytes=4 * len(data) + SLACK)
    ref = reference_idx(data, magic)
    if got is None:
        assert ref is None, f"a valid IDX file refused: {data[:16]!r}"
    else:
        assert ref is not None and got.shape == ref.shape and np.array_equal(got, ref)


# ----------------------------------------------------------------------------- CIFAR

CIFAR_RECORDS = b"".join(bytes([int(RNG.integers(0, 10))]) + RNG.integers(
    0, 256, 3072, np.uint8).tobytes() for _ in range(3))


def reference_cifar(data: bytes):
    """(images NHWC, labels) of CIFAR-10 records, or None where they are not valid."""
    if not data or len(data) % 3073:
        return None
    rec = np.frombuffer(data, np.uint8).reshape(-1, 3073)
    if rec[:, 0].max() >= 10:
        return None
    return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, 0]


def assert_cifar(got, ref):
    if got is None:
        assert ref is None, "valid CIFAR records refused"
    else:
        assert ref is not None
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@given(mutated_bytes(CIFAR_RECORDS, fields=[(0, 1), (3073, 1), (6146, 1)]), st.booleans())
@fuzz_settings(0.5)
def test_cifar_file(data, gz):
    path = _write(data, "test_batch.bin", gz)
    got = outcome(lambda: read_cifar_file(path, CIFAR10, "test_batch.bin"), [path],
                  max_bytes=4 * len(data) + SLACK)
    assert_cifar(got, reference_cifar(data))


def _tar_member(name: str, payload: bytes, size: int | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(payload) if size is None else size
    return info.tobuf(tarfile.GNU_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def _archive(members: dict, claims: dict) -> bytes:
    raw = b"".join(_tar_member(f"cifar-10-batches-bin/{n}", p, claims.get(n))
                   for n, p in members.items())
    raw += b"\0" * 1024
    return raw + b"\0" * (-len(raw) % tarfile.RECORDSIZE)


@st.composite
def cifar_archives(draw):
    """(tar bytes, the members' payloads): the six batches of 1 record each, a member's
    payload mutated, its header's size claim changed (the checksum kept valid), or the
    tar bytes mutated."""
    members = {n: CIFAR_RECORDS[:3073] for n in CIFAR10.max_records}
    claims = {}
    kind = draw(st.sampled_from(("payload", "claim", "bytes")))
    name = draw(st.sampled_from(sorted(members)))
    if kind == "payload":
        members[name] = draw(mutated_bytes(members[name], fields=[(0, 1)]))
    elif kind == "claim":
        claims[name] = draw(st.integers(0, CIFAR10.max_bytes(name) + 1)
                            | st.sampled_from((0, 3073, 3074, 10 ** 6, 30_000_000,
                                               CIFAR10.max_bytes(name))))
    raw = _archive(members, claims)
    if kind == "bytes":  # no reference: the members are whatever tarfile makes of it
        return draw(mutated_bytes(raw, fields=[(124, 12), (148, 8)], max_edits=2)), None, None
    return raw, members, claims


@given(cifar_archives())
@example((_archive({n: CIFAR_RECORDS[:3073] for n in CIFAR10.max_records},
                   {"test_batch.bin": 30_000_000}), None, None))  # a size the file lacks
@fuzz_settings()
def test_cifar_archive(archive):
    raw, members, claims = archive
    path = _write(raw, "cifar-10-binary.tar", gz=True)
    got = outcome(lambda: read_cifar_archive(path, CIFAR10), [path],
                  max_bytes=4 * len(raw) + SLACK)
    if members is not None and not claims and got is not None:
        for name, payload in members.items():
            assert_cifar(got[name], reference_cifar(payload))
    if members is not None and not claims:  # a well-formed tar: as its members are
        valid = all(reference_cifar(p) is not None for p in members.values())
        assert (got is not None) == valid


# ----------------------------------------------------------------------------- npz

NPZ_ARRAYS = {"x_train": RNG.integers(0, 256, (6, 4, 4, 1), np.uint8),
              "y_train": np.array([0, 1, 2, 0, 1, 2]),
              "x_test": RNG.integers(0, 256, (3, 4, 4, 1), np.uint8) / 255.0,
              "y_test": np.array([2, 1, 0], np.uint8)}


def _npy(array: np.ndarray, shape=None, descr=None) -> bytes:
    """The .npy bytes of `array`, its header's shape or dtype replaced (data kept)."""
    out = io.BytesIO()
    header = {"descr": descr or np.lib.format.dtype_to_descr(array.dtype),
              "fortran_order": False, "shape": array.shape if shape is None else shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + np.ascontiguousarray(array).tobytes()


def _zip(members: dict, compress: bool) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return out.getvalue()


@st.composite
def npz_files(draw):
    """An npz file: the valid arrays with one changed (dtype, shape, values: NaN, out of
    range, off the 1/255 grid), missing or extra; an .npy header claiming another shape or
    dtype than its data; or the zip's bytes mutated."""
    arrays = dict(NPZ_ARRAYS)
    key = draw(st.sampled_from(sorted(arrays)))
    kind = draw(st.sampled_from(("dtype", "shape", "value", "missing", "header", "bytes",
                                 "valid")))
    members = None
    if kind == "dtype":
        arrays[key] = arrays[key].astype(draw(st.sampled_from(
            ("float16", "float32", "int8", "int64", "uint16", "bool", "complex64", "U3",
             ">f8", "datetime64[s]"))))
    elif kind == "shape":
        arrays[key] = np.resize(arrays[key], draw(st.lists(st.integers(0, 5), max_size=5)))
    elif kind == "value":
        a = arrays[key].astype(np.float64 if key.startswith("x") else np.int64).copy()
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(
            (np.nan, np.inf, -1, 256, 0.5, 2 ** 40) if key.startswith("x") else
            (-1, 2 ** 31, 2 ** 40, 1000)))
        arrays[key] = a
    elif kind == "missing":
        del arrays[key]
    members = {k: _npy(v) for k, v in arrays.items()}
    if kind == "header":
        shape = tuple(draw(st.lists(st.integers(0, 2 ** 40) | st.integers(0, 40),
                                    min_size=0, max_size=4)))
        descr = draw(st.sampled_from((None, "<f8", "|u1", "<i8", "|O", "<U40")))
        members[key] = _npy(arrays[key], shape, descr)
    compress = draw(st.booleans())
    data = _zip(members, compress)
    if kind == "bytes":
        data = draw(mutated_bytes(data, max_edits=3))
    return data, arrays if kind != "header" and kind != "bytes" else None, compress


def reference_npz(arrays):
    """(x_train, y_train, x_test, y_test) as read_npz gives them, or None if refused."""
    out = []
    for split in ("train", "test"):
        if f"x_{split}" not in arrays or f"y_{split}" not in arrays:
            return None
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "uif" or y.dtype.kind not in "ui" or y.ndim != 1:
            return None
        x = x[..., None] if x.ndim == 3 else x
        if x.ndim != 4 or len(x) != len(y) or len(y) == 0 or 0 in x.shape:
            return None
        if x.dtype.kind == "f":
            if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
                return None
            k = np.rint(x.astype(np.float64) * 255)
            if np.abs(x * 255.0 - k).max() > 1e-3:
                return None
            x = k
        elif x.min() < 0 or x.max() > 255:
            return None
        if y.min() < 0 or y.max() > 2 ** 31 - 1:
            return None
        out += [x.astype(np.uint8), y.astype(np.int32)]
    if out[0].shape[1:] != out[2].shape[1:] or max(out[1].max(), out[3].max()) < 1:
        return None
    return out


@given(npz_files())
@fuzz_settings(1.5)
def test_npz(npz):
    data, arrays, compress = npz
    path = _write(data, "mine.npz", gz=False)
    # What the file's size allows: its bytes, or what deflate can expand them to.
    got = outcome(lambda: read_npz(path), [path],
                  max_bytes=(2 * 1032 if compress else 8) * len(data) + SLACK)
    if arrays is not None:
        ref = reference_npz(arrays)
        assert (got is None) == (ref is None), (got, ref)
        if ref is not None:
            for a, b in zip(got, ref):
                assert a.dtype == b.dtype and np.array_equal(a, b)
    if got is not None:
        xtr, ytr, xte, yte, classes = got
        assert xtr.dtype == xte.dtype == np.uint8 and ytr.dtype == yte.dtype == np.int32
        assert classes == max(ytr.max(), yte.max()) + 1 >= 2
