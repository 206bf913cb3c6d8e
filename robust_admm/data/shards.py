"""An image folder as ArrayRecord shards: a few large files instead of a million small ones,
which is how a pod's hosts read (one file per record on a network filesystem is slow).

    OUT/index.json                              classes, and per split its records and shards
    OUT/train-00000-of-00004.array_record ...   records in the folder's order
    OUT/val-00000-of-00001.array_record ...

A record holds the file's image bytes as they were (JPEG or PNG, not decoded), its class
index and its name in the folder, behind a magic word and a version; records are read
back as untrusted input (every field checked, errors naming the shard and the record).
`write_shards` checks every image's header while it copies it, and writes index.json last,
so a folder of shards without one is an unfinished conversion.
"""
import json
import os
import shutil
import struct

import grain
from array_record.python.array_record_module import ArrayRecordWriter

from robust_admm.data.folder import SPLITS, ImageFolder
from robust_admm.data.formats import DataError
from robust_admm.data.images import MAX_PIXELS, open_image, read_bytes

MAGIC, VERSION = b"RADM", 1
_HEAD = struct.Struct("<4sBIH")  # magic, version, class index, name length (bytes)
INDEX = "index.json"
INDEX_FORMAT = "robust_admm image shards"


def encode_record(label: int, name: str, data: bytes) -> bytes:
    raw = name.encode("utf-8")
    return _HEAD.pack(MAGIC, VERSION, label, len(raw)) + raw + data


def decode_record(blob: bytes, where: str, num_classes: int) -> tuple:
    """(image bytes, class index, name) of a record, every field checked."""
    if len(blob) < _HEAD.size:
        raise DataError(f"{where}: a record of {len(blob)} bytes, shorter than its header")
    magic, version, label, length = _HEAD.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise DataError(f"{where}: not a record of this format (magic {magic!r}, version "
                        f"{version}; expected {MAGIC!r} version {VERSION})")
    if label >= num_classes:
        raise DataError(f"{where}: class index {label} is out of range [0, {num_classes})")
    end = _HEAD.size + length
    if end > len(blob):
        raise DataError(f"{where}: the record's name runs past its end")
    try:
        name = blob[_HEAD.size:end].decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: the record's name is not UTF-8") from None
    return blob[end:], label, name


def shard_names(split: str, count: int) -> list:
    return [f"{split}-{i:05d}-of-{count:05d}.array_record" for i in range(count)]


def write_shards(folder: ImageFolder, out: str, records_per_shard: int = 1024,
                 max_pixels: int = MAX_PIXELS, log=print) -> dict:
    """Writes `folder` as shards under `out` (a new folder); returns the index."""
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard={records_per_shard} must be >= 1")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; give a new folder for the shards")
    tmp = f"{out}.writing"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    index = {"format": INDEX_FORMAT, "version": VERSION, "classes": list(folder.classes),
             "splits": {}}
    for split in SPLITS:
        part = getattr(folder, split)
        count = -(-len(part) // records_per_shard)
        names = shard_names(split, count)
        for s, name in enumerate(names):
            writer = ArrayRecordWriter(os.path.join(tmp, name), "group_size:1")
            rows = range(s * records_per_shard, min((s + 1) * records_per_shard, len(part)))
            for i in rows:
                path = part.paths[i]
                data = read_bytes(path)
                open_image(data, path, max_pixels)  # the header: format and size
                rel = os.path.relpath(path, folder.root)
                writer.write(encode_record(part.labels[i], rel, data))
            writer.close()
            log(f"[shards] {name}: {len(rows)} records")
        index["splits"][split] = {"records": len(part), "shards": names}
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, out)
    return index


class ShardSource:
    """Random access to one split's records in shards: (image bytes, label, where)."""

    def __init__(self, folder: str, shards: list, records: int, num_classes: int):
        paths = [os.path.join(folder, s) for s in shards]
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"{p} is missing ({INDEX} lists it)")
        try:
            self._source = grain.sources.ArrayRecordDataSource(paths)
        except RuntimeError as e:
            raise DataError(f"{folder}: a shard cannot be read as ArrayRecord ({e})") from None
        if len(self._source) != records:
            raise DataError(f"{folder}: the shards hold {len(self._source)} records, "
                            f"{INDEX} says {records}")
        self.folder, self.num_classes = folder, num_classes

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        where = f"{self.folder} record {index}"
        data, label, name = decode_record(self._source[index], where, self.num_classes)
        return data, label, f"{where} ({name})"


def open_shards(folder: str) -> tuple:
    """(classes, {split: ShardSource}) of the shards in `folder`, checked against its
    index.json."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise DataError(f"{folder} has no {INDEX}: not a folder of shards written by "
                        f"`robust-admm shards` (or its conversion did not finish)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != INDEX_FORMAT or index.get("version") != VERSION:
            raise ValueError(f"format {index.get('format')!r} version {index.get('version')}")
        classes = [str(c) for c in index["classes"]]
        splits = {s: (list(index["splits"][s]["shards"]), int(index["splits"][s]["records"]))
                  for s in SPLITS}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not an index of this format ({type(e).__name__}: {e})") \
            from None
    if not classes:
        raise DataError(f"{path} lists no class")
    return classes, {s: ShardSource(folder, shards, records, len(classes))
                     for s, (shards, records) in splits.items()}
