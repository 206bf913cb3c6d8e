"""The streamed path's index sampler: every epoch a permutation, the same global batches
for any number of processes, each process's rows disjoint, nothing but (seed, step)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robust_admm.data.sampler import IndexSampler


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 16), st.integers(0, 2**32 - 1), st.integers(0, 3))
def test_an_epoch_reads_each_record_at_most_once(n, batch, seed, epoch):
    if batch > n:
        return
    s = IndexSampler(n, batch, seed)
    spe = s.steps_per_epoch
    assert spe == n // batch
    steps = range(epoch * spe, (epoch + 1) * spe)
    seen = np.concatenate([s.global_indices(t) for t in steps])
    assert len(seen) == spe * batch == len(set(seen.tolist()))
    assert seen.min() >= 0 and seen.max() < n
    assert all(len(s.global_indices(t)) == batch for t in steps)


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 200), st.sampled_from([1, 2, 4]), st.integers(1, 4),
       st.integers(0, 2**32 - 1), st.integers(0, 50))
def test_processes_read_disjoint_slices_of_the_same_global_batch(n, processes, per, seed,
                                                                  step):
    batch = processes * per
    if batch > n:
        return
    one = IndexSampler(n, batch, seed)
    parts = [IndexSampler(n, batch, seed, p, processes).local_indices(step)
             for p in range(processes)]
    np.testing.assert_array_equal(np.concatenate(parts), one.global_indices(step))


def test_the_order_is_pure_in_seed_and_epoch():
    a, b = IndexSampler(1000, 10, seed=3), IndexSampler(1000, 10, seed=3)
    for step in (250, 0, 99, 100, 101, 7):  # any order of asking, a fresh sampler alike
        np.testing.assert_array_equal(a.global_indices(step), b.global_indices(step))
    assert not np.array_equal(a.global_indices(0), IndexSampler(1000, 10, 4).global_indices(0))
    epoch0 = np.concatenate([a.global_indices(t) for t in range(100)])
    epoch1 = np.concatenate([a.global_indices(t) for t in range(100, 200)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(1000))
    assert not np.array_equal(epoch0, epoch1)
    # About as many records move between the halves of two epochs as chance says: a
    # permutation independent of the previous one.
    moved = len(set(epoch0[:500]) - set(epoch1[:500]))
    assert 200 < moved < 300, moved


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size=20 exceeds the 10 training records"):
        IndexSampler(10, 20, 0)
    with pytest.raises(ValueError, match="process index 2 is not in"):
        IndexSampler(100, 8, 0, 2, 2)
    with pytest.raises(ValueError, match="global batch 9 is not divisible by the 2 "
                                         "processes"):
        IndexSampler(100, 9, 0, 0, 2)
    with pytest.raises(ValueError, match="step=-1"):
        IndexSampler(100, 8, 0).global_indices(-1)
