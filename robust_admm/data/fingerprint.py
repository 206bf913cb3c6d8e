"""Fingerprints of the data a run trains on, so that a resume on other data is caught: a
JSON-able dict per dataset, equal for equal data, and `differences` naming what changed.

- Data held in memory (tfds, files, npz, digits: `sources.load_dataset`): the whole
  dataset as read (before `data.train_examples` takes its subset): per split, the count,
  the image shape and SHA-256 digests of the images' and the labels' bytes. Exact, and
  the same whatever packaging held it (plain or gzip files, a folder or its archive).
- Files read streamed (an image folder, shards): per split, the file count, total bytes,
  a digest of every file's name and size, and a digest of the contents: of every byte
  where the split holds at most `WHOLE_BYTES`, else of the first and last `EDGE_BYTES`
  of `SAMPLE_FILES` files spread evenly over it (cheap on millions of files: one stat per
  file and a few MiB read; a file changed in place with its size kept is caught only if
  sampled).
- A TFDS dataset read streamed: its name, version and split sizes (TFDS checks its files).
"""
import hashlib
import json
import os

import numpy as np

WHOLE_BYTES = 64 << 20  # a split of files up to this size is hashed whole
SAMPLE_FILES = 256  # else the edges of this many files, spread evenly, are hashed
EDGE_BYTES = 1 << 16  # the bytes read at each end of a sampled file


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def of_arrays(splits: dict) -> dict:
    """{split: {examples, image_shape, images_sha256, labels_sha256}} of in-memory
    splits (`sources.Split`: uint8 images, int32 labels)."""
    return {"kind": "arrays",
            **{name: {"examples": int(len(s.labels)),
                      "image_shape": [int(d) for d in s.images.shape[1:]],
                      "images_sha256": _digest(s.images),
                      "labels_sha256": _digest(s.labels)}
               for name, s in splits.items()}}


def _read_edges(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        if size <= 2 * EDGE_BYTES:
            return f.read()
        head = f.read(EDGE_BYTES)
        f.seek(size - EDGE_BYTES)
        return head + f.read(EDGE_BYTES)


def _files_entry(paths: list, root: str) -> dict:
    sizes = [os.stat(p).st_size for p in paths]
    names = [os.path.relpath(p, root) for p in paths]
    listing = hashlib.sha256(json.dumps([names, sizes]).encode()).hexdigest()
    total = int(sum(sizes))
    contents = hashlib.sha256()
    if total <= WHOLE_BYTES:
        picked, how = range(len(paths)), "all bytes"
        for i in picked:
            with open(paths[i], "rb") as f:
                contents.update(f.read())
    else:
        count = min(SAMPLE_FILES, len(paths))
        picked = sorted({i * len(paths) // count for i in range(count)})
        how = (f"first and last {EDGE_BYTES} bytes of {len(picked)} of {len(paths)} "
               f"files, spread evenly")
        for i in picked:
            contents.update(_read_edges(paths[i], sizes[i]))
    return {"files": len(paths), "bytes": total, "names_sizes_sha256": listing,
            "contents_sha256": contents.hexdigest(), "contents": how}


def of_files(splits: dict, root: str) -> dict:
    """{split: {files, bytes, names_sizes_sha256, contents_sha256, contents}} of the files
    `splits` ({split: [path, ...]}, in the order read) under `root`."""
    return {"kind": "files", **{name: _files_entry(list(paths), root)
                                for name, paths in splits.items()}}


def of_tfds(name: str, data_dir: str | None, sizes: dict) -> dict:
    """Name, version and split sizes ({split: records}) of a prepared TFDS dataset."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    version = str(tfds.builder(name, data_dir=data_dir or None).info.version)
    return {"kind": "tfds", "name": name, "version": version,
            **{s: {"examples": int(n)} for s, n in sizes.items()}}


def of_streamed(ds, data_dir: str | None) -> dict:
    """The fingerprint of a dataset opened streamed (`streamed.StreamedDataset`)."""
    if ds.source == "folder":  # the files the listing found, as each split reads them
        return of_files({"train": ds.train.split.paths, "val": ds.test.split.paths}, ds.root)
    if ds.source == "shards":  # the shards and their index, all the folder holds
        files = sorted(os.path.join(ds.root, f) for f in os.listdir(ds.root)
                       if not f.startswith(".") and os.path.isfile(os.path.join(ds.root, f)))
        return of_files({"shards": files}, ds.root)
    if ds.source == "tfds":
        return of_tfds(ds.name, data_dir, {"train": len(ds.train), ds.test.split: len(ds.test)})
    raise NotImplementedError(f"no fingerprint for streamed data.source={ds.source!r}")


def differences(old: dict, new: dict, prefix: str = "") -> list:
    """['split.field: old -> new', ...] between two fingerprints (digests shortened)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        field = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, field + ".")
        elif a != b:
            short = lambda v: v[:12] if key.endswith("sha256") and isinstance(v, str) else v
            out.append(f"{field}: {short(a)!r} -> {short(b)!r}")
    return out
