"""ArrayRecord shards of an image folder: the converter command, records read back as the
folder's files (same bytes, labels, batches), and damaged shards refused by name."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, make_folder
from robust_admm.data import DataError
from robust_admm.data.folder import list_image_folder
from robust_admm.data.sampler import IndexSampler
from robust_admm.data.shards import (INDEX, decode_record, encode_record, open_shards,
                                     write_shards)
from robust_admm.data.stream import FolderSource, Preprocess, local_batches


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = make_folder(str(tmp_path_factory.mktemp("folder")), per_class=5, fmt="JPEG")
    out = str(tmp_path_factory.mktemp("shards") / "out")
    r = subprocess.run([sys.executable, "-m", "robust_admm", "shards", f"--folder={root}",
                        f"--out={out}", "--records_per_shard=4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 classes; train 15 records in 4 shards, val 15 records in 4 shards" in r.stdout
    return list_image_folder(root), out


def test_records_are_the_folders_files(converted):
    folder, out = converted
    classes, splits = open_shards(out)
    assert classes == list(folder.classes)
    for name in ("train", "val"):
        part, source = getattr(folder, name), splits[name]
        assert len(source) == len(part)
        for i in range(len(part)):
            data, label, where = source[i]
            with open(part.paths[i], "rb") as f:
                assert data == f.read()
            assert label == part.labels[i]
            assert os.path.relpath(part.paths[i], folder.root) in where


def test_shards_and_folder_give_the_same_batches(converted):
    folder, out = converted
    _, splits = open_shards(out)
    sampler = IndexSampler(15, 5, seed=2)
    pre = Preprocess(8, True, seed=2)
    a = list(local_batches(FolderSource(folder.train), sampler, pre, 0, 6))
    b = list(local_batches(splits["train"], sampler, pre, 0, 6, num_workers=1))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_a_record_is_checked_field_by_field():
    blob = encode_record(2, "train/cat/0.jpg", b"\xff\xd8data")
    assert decode_record(blob, "r", 3) == (b"\xff\xd8data", 2, "train/cat/0.jpg")
    with pytest.raises(DataError, match=r"r: class index 2 is out of range \[0, 2\)"):
        decode_record(blob, "r", 2)
    with pytest.raises(DataError, match="r: not a record of this format"):
        decode_record(b"XXXX" + blob[4:], "r", 3)
    with pytest.raises(DataError, match="shorter than its header"):
        decode_record(blob[:5], "r", 3)
    with pytest.raises(DataError, match="name runs past its end"):
        decode_record(blob[:14], "r", 3)


def test_damaged_or_unfinished_shards_are_refused_by_name(converted, tmp_path):
    folder, out = converted
    with pytest.raises(DataError, match="has no index.json"):
        open_shards(str(tmp_path))
    index = json.load(open(os.path.join(out, INDEX)))
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for f in os.listdir(out):
        os.link(os.path.join(out, f), broken / f) if f != INDEX else None
    index["splits"]["train"]["records"] = 16
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(DataError, match="the shards hold 15 records, index.json says 16"):
        open_shards(str(broken))
    index["splits"]["train"]["records"] = 15
    (broken / INDEX).write_text(json.dumps(index))
    os.remove(broken / index["splits"]["val"]["shards"][0])
    with pytest.raises(DataError, match=r"val-00000-of-00004\.array_record is missing"):
        open_shards(str(broken))
    (broken / INDEX).write_text("{not json")
    with pytest.raises(DataError, match="index.json: not an index of this format"):
        open_shards(str(broken))
    with pytest.raises(FileExistsError, match="exists; give a new folder"):
        write_shards(folder, out)


def test_a_bad_image_stops_the_conversion_naming_it(tmp_path):
    root = make_folder(str(tmp_path / "f"), per_class=2)
    bad = os.path.join(root, "val", "dog", "1.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DataError, match=r"val/dog/1\.png: not a readable image"):
        write_shards(list_image_folder(root), str(tmp_path / "out"), log=lambda m: None)
    assert not os.path.exists(tmp_path / "out")
