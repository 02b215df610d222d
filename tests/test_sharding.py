"""Sharding as pure functions: coverage, disjointness and seeding, without MPI."""

import numpy as np
import pytest

from dpflow.sharding import batch_bounds, epoch_permutation, shard_bounds


@pytest.mark.parametrize("n_samples,batch_size,size", [(100, 10, 3), (97, 16, 4), (5, 4, 4), (33, 33, 2), (10, 3, 7)])
def test_every_row_of_an_epoch_is_used_exactly_once_in_disjoint_blocks(n_samples, batch_size, size):
    permutation = epoch_permutation(n_samples, seed=3, epoch=1)
    seen = []
    for start, stop in batch_bounds(n_samples, batch_size):
        blocks = [shard_bounds(stop - start, rank, size) for rank in range(size)]
        lengths = [b - a for a, b in blocks]
        assert max(lengths) - min(lengths) <= 1
        assert blocks[0][0] == 0 and blocks[-1][1] == stop - start
        for (a, b), (c, d) in zip(blocks, blocks[1:]):
            assert b == c  # contiguous and disjoint
        for a, b in blocks:
            seen.extend(permutation[start + a: start + b])
    assert sorted(seen) == list(range(n_samples))


def test_a_short_batch_leaves_some_ranks_with_zero_rows():
    assert [shard_bounds(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_permutation_depends_only_on_seed_and_epoch():
    a = epoch_permutation(50, seed=7, epoch=2)
    assert np.array_equal(a, epoch_permutation(50, seed=7, epoch=2))
    assert not np.array_equal(a, epoch_permutation(50, seed=7, epoch=3))
    assert not np.array_equal(a, epoch_permutation(50, seed=8, epoch=2))


def test_batch_bounds_keep_the_short_last_batch():
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
