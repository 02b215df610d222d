"""Which rows each rank reads: pure functions of (n, seed, epoch, rank, size). numpy only.

Every rank computes the same permutation from `seed + epoch`; rank r then reads only its
contiguous block of each global batch. Block sizes differ by at most one row, and a rank
may hold 0 rows of a short last batch: every rank still takes every step, so no collective
is skipped.
"""

import numpy as np


def epoch_permutation(n_samples, seed, epoch):
    """The order of the training rows in `epoch`: the same on every rank, new every epoch."""
    return np.random.default_rng(seed + epoch).permutation(n_samples)


def batch_bounds(n_samples, batch_size):
    """[(start, stop), ...] of each global batch in the permuted order; the last may be short."""
    return [(start, min(start + batch_size, n_samples)) for start in range(0, n_samples, batch_size)]


def shard_bounds(n_rows, rank, size):
    """Rank `rank`'s contiguous block of `n_rows` rows: block sizes differ by at most one,
    and a rank may get 0 rows when n_rows < size."""
    base, extra = divmod(n_rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
