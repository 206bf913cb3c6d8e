"""Streamed batches of image records: each process reads, decodes and crops only the
records of its slice of every global batch, in worker processes, in step order.

A record's place in the run is a position: step * local_batch + slot. Position p reads
record `sampler.local_indices(step)[slot]`, decoded and cropped with the random stream of
(seed, epoch, record) (`images.record_rng`), so the pixels of a step depend on nothing but
the seed and the step: a run resumed at step s reads from position s * local_batch on,
with no iterator state to save, and any number of workers gives the same batches.

grain (the JAX ecosystem's loader) runs the positions through worker processes and keeps
their order: a `MapDataset` over positions (random access, so a resume slices it), mapped
and batched, then `mp_prefetch` over `num_workers` processes (0: in this process).

A file that cannot be decoded follows `bad_images`: 'stop' raises a `DataError` naming it;
'skip' gives a zero image marked `valid = False` in its batch, for the step to leave out
of the loss (`training.step`, feed 'stream'), and names it in the batch's `bad` list, for
the log. `eval_local_batches` reads a split in order for the evaluation, its last batch
padded with invalid entries.
"""
import dataclasses

import grain
import numpy as np
from absl import flags

from robust_admm.data import images
from robust_admm.data.folder import FolderSplit
from robust_admm.data.formats import DataError
from robust_admm.data.sampler import IndexSampler
from robust_admm.runtime.parallel import process_slice

BAD_IMAGES = ("stop", "skip")
PADDING = (-1, -1, None)  # an entry past a split's last record (grain drops a None)


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Random access to the files of one split of an image folder: (bytes, label, path)."""
    split: FolderSplit

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        path = self.split.paths[index]
        return images.read_bytes(path), self.split.labels[index], path


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Record -> {image uint8 (size, size, channels), label, valid, bad}: the training
    crop (keyed by seed, epoch, record) or the evaluation crop, of `crops` (images.CROPS),
    in RGB or (channels 1) grayscale."""
    size: int
    train: bool
    seed: int = 0
    max_pixels: int = images.MAX_PIXELS
    bad_images: str = "stop"
    crops: str = "imagenet"
    channels: int = 3

    def __post_init__(self):
        if self.channels not in images.CHANNELS:
            raise ValueError(f"data.channels={self.channels!r}; allowed: "
                             f"{', '.join(map(str, images.CHANNELS))}")
        if self.crops not in images.CROPS:
            raise ValueError(f"data.crops={self.crops!r}; allowed: {', '.join(images.CROPS)}")
        if self.bad_images not in BAD_IMAGES:
            raise ValueError(f"data.bad_images={self.bad_images!r}; allowed: "
                             f"{', '.join(BAD_IMAGES)}")
        if self.size < 1:
            raise ValueError(f"image size {self.size} must be >= 1")

    def __call__(self, record: tuple) -> dict:
        if record == PADDING:  # to a whole evaluation batch
            return {"image": np.zeros((self.size, self.size, self.channels), np.uint8),
                    "label": np.int32(0), "valid": False, "bad": ""}
        epoch, index, (data, label, where) = record
        try:
            img = (images.decode(data, where, self.max_pixels) if isinstance(data, bytes)
                   else images.from_array(data, where, self.max_pixels))
            if self.crops == "resize":
                pixels = images.resize_transform(img, self.size)
            elif self.train:
                pixels = images.train_transform(img, self.size,
                                                images.record_rng(self.seed, epoch, index))
            else:
                pixels = images.eval_transform(img, self.size)
        except DataError:
            if self.bad_images == "stop":
                raise
            return {"image": np.zeros((self.size, self.size, self.channels), np.uint8),
                    "label": np.int32(label), "valid": False, "bad": where}
        if self.channels == 1:
            pixels = images.to_gray(pixels)
        return {"image": pixels, "label": np.int32(label), "valid": True, "bad": ""}


@dataclasses.dataclass(frozen=True)
class _ReadPosition:
    """Position -> (epoch, record index, the record), by the sampler."""
    source: object
    sampler: IndexSampler

    def __call__(self, position: int):
        local = self.sampler.global_batch // self.sampler.process_count
        step, slot = divmod(int(position), local)
        index = int(self.sampler.local_indices(step)[slot])
        return self.sampler.epoch_of(step), index, self.source[index]


@dataclasses.dataclass(frozen=True)
class _ReadEvalPosition:
    """Local position -> (0, record index, the record), or PADDING past the last record:
    batch b's rows of process p are records b * global + p * local + row."""
    source: object
    global_batch: int
    process_index: int
    process_count: int

    def __call__(self, position: int):
        local = self.global_batch // self.process_count
        batch, row = divmod(int(position), local)
        index = batch * self.global_batch + self.process_index * local + row
        return (0, index, self.source[index]) if index < len(self.source) else PADDING


def collate(examples) -> dict:
    """A batch of examples: stacked arrays, and the names of the files skipped."""
    return {"image": np.stack([e["image"] for e in examples]),
            "label": np.asarray([e["label"] for e in examples], np.int32),
            "valid": np.asarray([e["valid"] for e in examples], bool),
            "bad": [e["bad"] for e in examples if e["bad"]]}


def local_batches(source, sampler: IndexSampler, preprocess: Preprocess, start_step: int,
                  num_steps: int, num_workers: int = 0, num_threads: int = 1,
                  buffer_per_worker: int = 2):
    """This process's batches of steps start_step .. start_step + num_steps - 1, in order:
    dicts of `collate`'s form, each `global_batch / process_count` examples. Each of
    `num_workers` processes (0: this one) reads with `num_threads` threads (PIL lets go
    of the GIL while it decodes and resizes)."""
    if len(source) != sampler.num_records:
        raise ValueError(f"the sampler counts {sampler.num_records} records, the source "
                         f"holds {len(source)}")
    if start_step < 0 or num_steps < 0:
        raise ValueError(f"steps {start_step} + {num_steps} must be >= 0")
    local = sampler.global_batch // sampler.process_count
    ds = (grain.MapDataset.range(start_step * local, (start_step + num_steps) * local)
          .map(_ReadPosition(source, sampler))
          .map(preprocess))
    return _batched(ds, local, num_workers, num_threads, buffer_per_worker)


def eval_local_batches(source, preprocess: Preprocess, global_batch: int,
                       process_index: int = 0, process_count: int = 1,
                       num_workers: int = 0, num_threads: int = 1):
    """This process's rows of every global batch of `source` read in order, the last
    batch padded with invalid entries (`valid` False): ceil(len / global_batch) batches."""
    process_slice(global_batch, process_index, process_count)  # checks the split
    local = global_batch // process_count
    num_batches = -(-len(source) // global_batch)
    ds = (grain.MapDataset.range(num_batches * local)
          .map(_ReadEvalPosition(source, global_batch, process_index, process_count))
          .map(preprocess))
    return _batched(ds, local, num_workers, num_threads)


def _batched(ds, local: int, num_workers: int, num_threads: int,
             buffer_per_worker: int = 2):
    """Examples -> batches of `local`, read by `num_workers` processes (0: this one) of
    `num_threads` threads each."""
    if num_workers < 0 or num_threads < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 0 and num_threads="
                         f"{num_threads} >= 1")
    ds = (ds.batch(local, drop_remainder=True, batch_fn=collate)
          .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                             prefetch_buffer_size=2 * num_threads)))
    if num_workers:
        if not flags.FLAGS.is_parsed():
            # grain's workers read its absl flags; outside an absl program (a library
            # user's, a test) they are at their defaults, which must be marked as read.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=buffer_per_worker))
    return _worker_deaths_named(iter(ds))


def _worker_deaths_named(batches):
    """`batches`, with a worker process that died (killed for memory, say) reported as
    the data's error, not a bare RuntimeError of the loader."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            if "Worker process" not in str(e):
                raise
            raise DataError(f"a data worker process died while reading batches ({e}); "
                            f"if the system killed it for memory, lower "
                            f"data.num_workers") from None
        yield batch
