"""The flat buffers' non-finite check: exact, whatever the values' magnitude."""

import numpy as np
import pytest

from dpflow.flat import all_finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_finds_any_nan_or_inf(dtype):
    buffer = np.linspace(-1, 1, 10001).astype(dtype)
    assert all_finite(buffer)
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 5000, 10000):
            broken = buffer.copy()
            broken[where] = bad
            assert not all_finite(broken), (bad, where)
    both = buffer.copy()
    both[[3, 7]] = np.inf, -np.inf
    assert not all_finite(both)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_accepts_values_whose_squares_overflow(dtype):
    huge = np.full(100, np.finfo(dtype).max / 2, dtype)
    huge[::2] *= -1
    assert all_finite(huge)


def test_all_finite_of_nothing():
    assert all_finite(np.zeros(0, np.float32))
