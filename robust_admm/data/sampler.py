"""Which records make up each batch of a streamed run: pure in (seed, step), the same
global batch whatever the number of processes, each process reading only its slice.

Epoch e visits the records in the order of a permutation drawn from (seed, e); step s
(counted from the start of the phase) is batch s mod steps_per_epoch of epoch
s // steps_per_epoch; the last partial batch of an epoch is dropped, as the on-device
feeder drops it. Process p of P takes the contiguous rows `runtime.parallel.process_slice`
gives it, so with 1 process or 2 the global batch, and so the training, is the same, and
a resumed run needs only the step. Written by hand: grain's IndexSampler shards the
records per process (ShardByJaxProcess), which makes a global batch depend on how many
processes read it.
"""
import dataclasses

import numpy as np

from robust_admm.runtime.parallel import process_slice

ORDER_STREAM = 2  # the first word of the order's seed: its stream is apart from a record's


def epoch_order(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The order of the records in `epoch`: a permutation of range(num_records), int64."""
    return np.random.default_rng([ORDER_STREAM, seed, epoch]).permutation(num_records)


@dataclasses.dataclass(frozen=True)
class IndexSampler:
    """The records of every step's global batch, and this process's part of it."""
    num_records: int
    global_batch: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.global_batch < 1:
            raise ValueError(f"batch_size={self.global_batch} must be >= 1")
        if self.num_records < self.global_batch:
            raise ValueError(f"batch_size={self.global_batch} exceeds the "
                             f"{self.num_records} training records")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process index {self.process_index} is not in "
                             f"[0, {self.process_count})")
        process_slice(self.global_batch, self.process_index, self.process_count)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        """`epoch_order` of `epoch`, kept while that epoch is read (one at a time: a batch
        never spans two)."""
        cache = self.__dict__.setdefault("_order_cache", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_order(self.seed, epoch, self.num_records)
        return cache[epoch]

    def __getstate__(self):  # sent to worker processes without its cache
        state = dict(self.__dict__)
        state.pop("_order_cache", None)
        return state

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> np.ndarray:
        """The records of global batch `step`, in batch order."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        return order[i * self.global_batch:(i + 1) * self.global_batch]

    def local_indices(self, step: int) -> np.ndarray:
        """This process's rows of global batch `step`: the records it reads."""
        rows = process_slice(self.global_batch, self.process_index, self.process_count)
        return self.global_indices(step)[rows]
