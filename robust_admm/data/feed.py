"""What the train step is given at each step, from one of two feeders behind one interface
(`steps(seed, start_step, num_steps, key)`, an iterator of `Step`):

- `DeviceFeed`: the whole split on the devices as uint8 (MNIST, digits, CIFAR) and the
  epoch's order of its examples, drawn once per epoch from `key`; the step gathers its
  batch inside the compiled program (`training.step`, feed 'device').
- `StreamFeed`: image records read, decoded and cropped by this process for its slice of
  every global batch (`data.stream`), assembled into the global batch across processes
  (`jax.make_array_from_process_local_data`) and put on the devices by a thread that keeps
  `prefetch` batches ahead of the step, so the step waits only when the host is slower
  (feed 'stream').

And the evaluation's side: `DeviceTest` slices the padded test split kept on the devices;
`StreamTest` reads the test split in padded global batches, never whole; `subset(n, ...)`
of either is what the evaluations during training read with eval.n.
"""
import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp

from robust_admm.data import stream
from robust_admm.data.batching import DATA_KEY_TAG, epoch_order
from robust_admm.data.sampler import IndexSampler
from robust_admm.data.streamed import SpreadRecords
from robust_admm.runtime import parallel

PREFETCH = 2  # global batches on the devices ahead of the step


@dataclasses.dataclass(frozen=True)
class Step:
    """What one step is given (`data`) and the files this process skipped in it."""
    data: object
    bad: tuple = ()


class DeviceFeed:
    """The split on the devices, replicated: (images uint8, labels int32), and each
    epoch's order of the examples, drawn once per epoch from the train state's key (the
    step gathers its batch from it: `data.batching.batch_indices`)."""
    kind = "device"

    def __init__(self, arrays: tuple, batch_size: int, mesh):
        self.arrays, self.batch_size = arrays, batch_size
        n = self.num_records
        self._order = jax.jit(lambda key, epoch: epoch_order(
            jax.random.fold_in(key, DATA_KEY_TAG), epoch, n),
            out_shardings=parallel.replicated(mesh))

    @property
    def num_records(self) -> int:
        return int(self.arrays[1].shape[0])

    def steps(self, seed: int, start_step: int, num_steps: int, key=None):
        """`key`: the phase's train state key (the order's); `seed` is the streamed
        feed's."""
        del seed
        per_epoch = self.num_records // self.batch_size
        epoch = order = None
        for step in range(start_step, start_step + num_steps):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = self._order(key, epoch)
            yield Step(self.arrays + (order,))


@dataclasses.dataclass(frozen=True)
class Reading:
    """How streamed records are read (the `data.*` fields of a streamed source): crops of
    `size` pixels on the `mesh`, `num_workers` reader processes of `num_threads` threads,
    `prefetch` global batches ahead of the step."""
    size: int
    mesh: object
    bad_images: str = "stop"
    max_pixels: int = stream.images.MAX_PIXELS
    num_workers: int = 0
    num_threads: int = 1
    prefetch: int = PREFETCH
    crops: str = "imagenet"
    channels: int = 3

    @classmethod
    def of_config(cls, data, mesh) -> "Reading":
        """From a config's `data` section."""
        return cls(size=data.image_size, mesh=mesh, bad_images=data.bad_images,
                   max_pixels=data.max_pixels, num_workers=data.num_workers,
                   num_threads=data.num_threads, prefetch=data.prefetch, crops=data.crops,
                   channels=data.channels)

    def preprocess(self, train: bool, seed: int = 0) -> stream.Preprocess:
        return stream.Preprocess(self.size, train=train, seed=seed,
                                 max_pixels=self.max_pixels, bad_images=self.bad_images,
                                 crops=self.crops, channels=self.channels)


@dataclasses.dataclass
class StreamFeed:
    """Streamed training batches of `source` (random access to (bytes, label, where));
    each process reads its rows of every global batch."""
    source: object
    global_batch: int
    reading: Reading
    kind = "stream"

    @property
    def num_records(self) -> int:
        return len(self.source)

    def sampler(self, seed: int) -> IndexSampler:
        return IndexSampler(len(self.source), self.global_batch, seed,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())

    def steps(self, seed: int, start_step: int, num_steps: int, key=None):
        """Steps start_step .. start_step + num_steps - 1 of a phase whose records are
        drawn and cropped with `seed` (`key` is the device feed's); a generator: closing
        it stops the reader."""
        del key
        r = self.reading
        local = stream.local_batches(self.source, self.sampler(seed),
                                     r.preprocess(True, seed), start_step, num_steps,
                                     r.num_workers, r.num_threads)
        yield from on_devices(local, r.mesh, r.prefetch)


def on_devices(local_batches, mesh, prefetch: int = PREFETCH):
    """`Step`s of global batches {image, label, valid} on the mesh, from this process's
    batches of `stream.collate`'s form, converted up to `prefetch` ahead by a thread.
    An error of the reader is raised here, at the step that needed the batch."""
    if prefetch < 1:
        raise ValueError(f"data.prefetch={prefetch} must be >= 1")
    ready = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for batch in local_batches:
                arrays = {k: batch[k] for k in ("image", "label", "valid")}
                if not put(Step(parallel.host_local_batch_to_global(arrays, mesh),
                                tuple(batch["bad"]))):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, raised at its next step
            put(e)

    thread = threading.Thread(target=fill, name="robust_admm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
        close = getattr(local_batches, "close", None)
        if close is not None:
            close()


class DeviceTest:
    """The test split on the devices, padded to whole batches: (images, labels, valid)."""

    def __init__(self, arrays: tuple):
        self.arrays = arrays

    def subset(self, n: int, batch_size: int) -> "DeviceTest":
        """The first `n` examples (all where n is 0 or at least the split), padded to
        whole batches of `batch_size` (what `batches` will be given)."""
        valid = self.arrays[2]
        if n <= 0 or n >= int(valid.sum()):
            return self
        rows = -(-n // batch_size) * batch_size
        take = jax.jit(lambda images, labels, valid: (
            images[:rows], labels[:rows], valid[:rows] & (jnp.arange(rows) < n)))
        return DeviceTest(take(*self.arrays))

    def batches(self, batch_size: int):
        images, labels, valid = self.arrays
        for start in range(0, labels.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            yield images[sl], labels[sl], valid[sl]


@dataclasses.dataclass
class StreamTest:
    """The test split of `source`, read in order in global batches padded with invalid
    entries, each process reading its rows; the evaluation crop."""
    source: object
    reading: Reading

    def subset(self, n: int, batch_size: int) -> "StreamTest":
        """`n` records spread evenly over the split (all where n is 0 or at least the
        split): its records are in class order, so the first n would be of a few classes."""
        if n <= 0 or n >= len(self.source):
            return self
        return StreamTest(SpreadRecords(self.source, n), self.reading)

    def batches(self, batch_size: int):
        r = self.reading
        local = stream.eval_local_batches(self.source, r.preprocess(False), batch_size,
                                          jax.process_index(), jax.process_count(),
                                          r.num_workers, r.num_threads)
        for step in on_devices(local, r.mesh, r.prefetch):
            yield step.data["image"], step.data["label"], step.data["valid"]
