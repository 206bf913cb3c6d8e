"""Streamed batches from a folder of images: the same pixels whatever the number of
workers, a resume reads on from its step, each process reads only its records, and a
bad file stops the run naming it or is skipped and counted. Images made in the test."""
import dataclasses
import os
import signal

import numpy as np
import pytest
from PIL import Image

from robust_admm.data import DataError
from robust_admm.data.folder import list_image_folder
from robust_admm.data.sampler import IndexSampler
from robust_admm.data.stream import FolderSource, Preprocess, local_batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes, JPEG and PNG, sizes and colour modes varied (gray ones are in
    test_images.py: here each class shows in its colour)."""
    root = str(tmp_path_factory.mktemp("images"))
    rng = np.random.default_rng(0)
    modes = ("RGB", "P", "RGBA", "CMYK")
    for split, per_class in (("train", 8), ("val", 3)):
        for c, name in enumerate(("ant", "bee", "cat")):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                a[..., c] = 255  # the class shows in its colour
                mode = modes[i % len(modes)]
                fmt = "JPEG" if mode == "CMYK" or (mode == "RGB" and i % 2) else "PNG"
                img = Image.fromarray(a).convert(mode)
                img.save(os.path.join(root, split, name,
                                      f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"), format=fmt)
    return list_image_folder(root)


def batches(folder, workers=0, start=0, steps=5, batch=6, process=0, processes=1,
            bad_images="stop", source=None, threads=1):
    source = source or FolderSource(folder.train)
    sampler = IndexSampler(len(source), batch, seed=5, process_index=process,
                           process_count=processes)
    it = local_batches(source, sampler, Preprocess(16, True, seed=5, bad_images=bad_images),
                       start, steps, num_workers=workers, num_threads=threads)
    return list(it)


def same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
               for k in ("image", "label", "valid"))


def test_batches_have_the_shape_and_labels_of_their_files(folder):
    out = batches(folder)
    assert len(out) == 5
    sampler = IndexSampler(len(folder.train), 6, seed=5)
    for step, b in enumerate(out):
        assert b["image"].shape == (6, 16, 16, 3) and b["image"].dtype == np.uint8
        want = [folder.train.labels[i] for i in sampler.global_indices(step)]
        assert b["label"].tolist() == want and b["valid"].all() and b["bad"] == []
        # The class's colour channel is the brightest of the crop (255 in the source).
        means = b["image"].reshape(6, -1, 3).mean(1)
        assert (means.argmax(1) == b["label"]).all()


def test_workers_give_the_same_batches_and_a_resume_reads_on(folder):
    ref = batches(folder)
    assert same(batches(folder, workers=2), ref)
    assert same(batches(folder, threads=3), ref)
    assert same(batches(folder, start=3, steps=2), ref[3:])
    # Past the first epoch (4 steps of 6 of the 24 records): a new order, same pixels.
    assert same(batches(folder, start=4, steps=1, workers=1), ref[4:])


@dataclasses.dataclass(frozen=True)
class Recording:
    """A source that notes which records a process opened (in this process: workers=0)."""
    inner: FolderSource
    opened: list

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.opened.append(i)
        return self.inner[i]


def test_two_processes_read_disjoint_halves_of_the_same_batches(folder):
    ref = batches(folder, steps=4)
    opened = {0: [], 1: []}
    parts = {p: batches(folder, steps=4, process=p, processes=2,
                        source=Recording(FolderSource(folder.train), opened[p]))
             for p in (0, 1)}
    for step in range(4):
        joined = {k: np.concatenate([parts[p][step][k] for p in (0, 1)])
                  for k in ("image", "label")}
        np.testing.assert_array_equal(joined["image"], ref[step]["image"])
        np.testing.assert_array_equal(joined["label"], ref[step]["label"])
    # Each process opened only its own records, each once: one epoch, 24 records.
    for p in (0, 1):
        sampler = IndexSampler(24, 6, 5, p, 2)
        assert opened[p] == [int(i) for s in range(4) for i in sampler.local_indices(s)]
    assert sorted(opened[0] + opened[1]) == list(range(24))


def test_a_bad_file_stops_naming_it_or_is_skipped_and_named(folder, tmp_path):
    split = folder.train
    bad = str(tmp_path / "broken.jpg")
    with open(split.paths[0], "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[:len(data) // 3])  # truncated
    broken = dataclasses.replace(split, paths=(bad,) + split.paths[1:])
    source = FolderSource(broken)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        batches(folder, source=source, steps=4)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        batches(folder, source=source, steps=4, workers=1)
    out = batches(folder, source=source, steps=4, bad_images="skip")
    bads = [(s, b["bad"], int((~b["valid"]).sum())) for s, b in enumerate(out) if b["bad"]]
    assert len(bads) == 1 and bads[0][1] == [bad] and bads[0][2] == 1
    step = bads[0][0]
    row = int(np.flatnonzero(~out[step]["valid"])[0])
    assert not out[step]["image"][row].any()
    ref = batches(folder, steps=4)
    keep = out[step]["valid"]
    np.testing.assert_array_equal(out[step]["image"][keep], ref[step]["image"][keep])


def test_settings_are_checked(folder):
    with pytest.raises(ValueError, match="data.bad_images='ignore'; allowed: stop, skip"):
        Preprocess(16, True, bad_images="ignore")
    source = FolderSource(folder.train)
    with pytest.raises(ValueError, match="the sampler counts 30 records, the source holds 24"):
        local_batches(source, IndexSampler(30, 6, 0), Preprocess(16, True), 0, 1)


@dataclasses.dataclass(frozen=True)
class DiesOnRecord5(Preprocess):
    """A worker that is killed (as the system kills one for memory) at record 5."""

    def __call__(self, record):
        if record[1] == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(record)


def test_a_worker_that_dies_is_an_error_not_a_hang(folder):
    source = FolderSource(folder.train)
    it = local_batches(source, IndexSampler(24, 6, 5), DiesOnRecord5(16, True), 0, 4,
                       num_workers=2)
    with pytest.raises(DataError, match="a data worker process died while reading batches"):
        list(it)


def test_the_evaluation_reads_in_order_padded_each_process_its_rows(folder):
    """9 val records, global batch 4, 2 processes: 3 batches; process p reads rows
    2p, 2p + 1 of each; the entries past the last record are invalid zero images."""
    from robust_admm.data.stream import eval_local_batches
    source = FolderSource(folder.val)
    pre = Preprocess(16, False)
    whole = list(eval_local_batches(source, pre, 4))
    assert [int(b["valid"].sum()) for b in whole] == [4, 4, 1]
    labels = np.concatenate([b["label"][b["valid"]] for b in whole])
    assert labels.tolist() == list(folder.val.labels)
    assert not whole[-1]["image"][1:].any()
    opened = {0: [], 1: []}
    parts = {p: list(eval_local_batches(Recording(source, opened[p]), pre, 4, p, 2))
             for p in (0, 1)}
    for i, b in enumerate(whole):
        for k in ("image", "label", "valid"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][i][k], parts[1][i][k]]), b[k])
    assert opened[0] == [0, 1, 4, 5, 8] and opened[1] == [2, 3, 6, 7]
