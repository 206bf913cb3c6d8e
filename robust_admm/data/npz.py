"""A user's own arrays: one .npz file (`np.savez`) holding `x_train, y_train, x_test,
y_test`, read as untrusted input (`data.source='npz'`, `data.dir=FILE.npz`).

- Images: (N, H, W, C) or (N, H, W) (a channel axis is added), the same (H, W, C) in both
  splits. uint8 0..255 as they are; other integer dtypes must lie in [0, 255]; floats
  must lie in [0, 1] on the grid of 1/255 (k / 255, to within the float's own rounding)
  and are stored as the uint8 k. Small datasets are kept on the device as uint8 and the
  step reads pixels as k / 255 (`data.batching.to_pixels`), so other float values would be
  changed silently: they are refused, naming one (round them yourself if that suits:
  `np.round(x * 255).astype(np.uint8)`).
- Labels: 1-D, an integer dtype, >= 0. The class count is the largest label (of both
  splits) + 1, at least 2.
- Loaded with `allow_pickle=False`: a file that is not an .npz archive, or one that needs
  pickle (object arrays), is refused. Other arrays in the file are ignored.
Every problem is a DataError that names the file, the array and the value.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from robust_admm.data.formats import DataError

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_CHUNK = 1 << 22  # elements checked and converted at a time (bounds the float64 copies)


def read_npz(path) -> tuple:
    """(train images, train labels, test images, test labels, class count) of the .npz
    file `path`: images uint8 (N, H, W, C), labels int32 (N,)."""
    if not path:
        raise DataError("data.source='npz' needs data.dir, the path of the .npz file "
                        "holding x_train, y_train, x_test, y_test")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"npz: {path!r} is not a file; data.dir must be the path of an .npz "
                        f"file holding {', '.join(NPZ_ARRAYS)}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"npz: {path!r} is not an .npz archive (as np.savez writes): save "
                        f"the arrays with np.savez(path, x_train=..., y_train=..., "
                        f"x_test=..., y_test=...)")
    try:
        try:
            npz = np.load(path, allow_pickle=False)
        except ValueError as e:  # not a zip by its first bytes: numpy takes it for a pickle
            raise DataError(f"npz: {path!r} is not an .npz archive (as np.savez writes): "
                            f"{e}") from None
        with npz as f:
            present = sorted(f.files)
            missing = [k for k in NPZ_ARRAYS if k not in present]
            if missing:
                raise DataError(f"npz: {path!r} lacks {missing}; it holds {present}; "
                                f"required: {list(NPZ_ARRAYS)}")
            arrays = {k: _load(f, k, path) for k in NPZ_ARRAYS}
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"npz: {path!r} cannot be read: {type(e).__name__}: {e}") from None
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"npz {path!r}"
        images = _images(x, f"x_{split}", where)
        labels = _labels(y, f"y_{split}", where)
        if len(labels) != len(images):
            raise DataError(f"{where}: x_{split} holds {len(images)} images but y_{split} "
                            f"{len(labels)} labels; they must be as many")
        if len(labels) == 0:
            raise DataError(f"{where}: the {split} split is empty (x_{split} has shape "
                            f"{x.shape})")
        splits[split] = images, labels
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"npz {path!r}: train images are {xtr.shape[1:]} (H, W, C) but test "
                        f"images {xte.shape[1:]}; they must be the same")
    classes = int(max(ytr.max(), yte.max())) + 1
    if classes < 2:
        raise DataError(f"npz {path!r}: every label is 0; a classifier needs at least 2 "
                        f"classes (the class count is the largest label + 1)")
    return xtr, ytr, xte, yte, classes


# Deflate expands a stream at most about 1032-fold: a member claiming more bytes than
# that of its compressed size is not an .npy that np.savez(_compressed) wrote.
_DEFLATE_MAX_RATIO = 1032


def _load(f, key: str, path: str) -> np.ndarray:
    """The array `key`, its .npy header checked against the bytes the archive holds for
    it before numpy allocates what the header claims."""
    name = key + ".npy" if key + ".npy" in f.zip.namelist() else key
    info = f.zip.getinfo(name)
    where = f"npz: {path!r}: {key}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(f"{where} is compressed with zip method {info.compress_type}; "
                        f"np.savez and np.savez_compressed write stored or deflated arrays")
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
    if info.file_size > ratio * info.compress_size + 1024:
        raise DataError(f"{where}: the archive claims {info.file_size:,} bytes for its "
                        f"{info.compress_size:,} stored bytes; the file is corrupt")
    with f.zip.open(name) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        except (ValueError, TypeError, SyntaxError, OverflowError) as e:
            raise DataError(f"{where} is not a readable .npy array ({e})") from None
        header = member.tell()
    if dtype.hasobject:
        raise DataError(f"{where} cannot be read without pickle (it holds Python objects, "
                        f"dtype {dtype}); save numeric arrays (uint8 or float images, "
                        f"integer labels)")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != info.file_size - header:
        raise DataError(f"{where}: its header claims shape {shape} of {dtype} "
                        f"({claimed:,} bytes) but the archive holds "
                        f"{info.file_size - header:,} bytes of data for it")
    try:
        return f[key]
    except ValueError as e:
        raise DataError(f"{where} cannot be read ({e})") from None


def _images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    """`x` checked and converted to uint8 (N, H, W, C)."""
    if x.dtype.kind not in "uif":
        raise DataError(f"{where}: {key} has dtype {x.dtype}; images must be uint8, another "
                        f"integer dtype in [0, 255], or floats in [0, 1]")
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise DataError(f"{where}: {key} has shape {x.shape}; images must be (N, H, W, C) or "
                        f"(N, H, W)")
    if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        raise DataError(f"{where}: {key} has shape {x.shape}, which looks channels-first "
                        f"(N, C, H, W); this source reads (N, H, W, C): "
                        f"np.transpose(x, (0, 2, 3, 1))")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    out = np.empty(x.shape, np.uint8)
    flat, dst = x.reshape(-1), out.reshape(-1)
    if x.dtype.kind in "ui":
        for s in range(0, flat.size, _CHUNK):
            c = flat[s:s + _CHUNK]
            bad = (c < 0) | (c > 255)
            if bad.any():
                _refuse(x, key, where, s + int(np.argmax(bad)),
                        "is outside [0, 255] (integer images are pixel values 0..255)")
            dst[s:s + _CHUNK] = c
        return out
    # Floats: finite, in [0, 1], k / 255 to within the float's rounding.
    tol = max(1e-3, 255 * float(np.finfo(x.dtype).eps))
    for s in range(0, flat.size, _CHUNK):
        c = flat[s:s + _CHUNK].astype(np.float64)
        nan = ~np.isfinite(c)
        if nan.any():
            _refuse(x, key, where, s + int(np.argmax(nan)), "is not finite",
                    f" ({int(np.count_nonzero(~np.isfinite(x)))} values of {key} are not)")
        bad = (c < 0) | (c > 1)
        if bad.any():
            _refuse(x, key, where, s + int(np.argmax(bad)),
                    "is outside [0, 1] (float images are pixels in [0, 1])")
        k = np.rint(c * 255.0)
        off = np.abs(c * 255.0 - k) > tol
        if off.any():
            _refuse(x, key, where, s + int(np.argmax(off)),
                    "is not a multiple of 1/255: images are kept as uint8 pixels k/255, so "
                    "it would change; quantize them yourself if that suits "
                    "(np.round(x * 255).astype(np.uint8)) or store uint8")
        dst[s:s + _CHUNK] = k.astype(np.uint8)
    return out


def _refuse(x, key, where, flat_index: int, what: str, more: str = ""):
    index = tuple(int(i) for i in np.unravel_index(flat_index, x.shape))
    raise DataError(f"{where}: {key}[{', '.join(map(str, index))}] = "
                    f"{x.reshape(-1)[flat_index].item()!r} {what}{more}")


def _labels(y: np.ndarray, key: str, where: str) -> np.ndarray:
    """`y` checked and converted to int32 (N,)."""
    if y.dtype.kind not in "ui":
        raise DataError(f"{where}: {key} has dtype {y.dtype}; labels must be integers "
                        f"0..classes-1 (e.g. y.astype(np.int64) if they are whole numbers)")
    if y.ndim != 1:
        raise DataError(f"{where}: {key} has shape {y.shape}; labels must be 1-D (N,) class "
                        f"indices (one-hot labels: y.argmax(-1))")
    if y.size and int(y.min()) < 0:
        i = int(np.argmax(y < 0))
        raise DataError(f"{where}: {key}[{i}] = {int(y[i])} is negative; labels must be "
                        f"class indices 0..classes-1")
    if y.size and int(y.max()) > np.iinfo(np.int32).max:
        raise DataError(f"{where}: {key} holds the label {int(y.max())}; labels must be "
                        f"class indices 0..classes-1")
    return y.astype(np.int32)
