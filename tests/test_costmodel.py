"""The allreduce cost model: textbook formulas, and a fit that recovers known alpha and beta."""

import pytest

from dpflow import costmodel


def test_formulas():
    assert costmodel.ring_seconds(4, 1000, 1e-6, 1e-9) == pytest.approx(6e-6 + 1.5e-6)
    assert costmodel.recursive_doubling_seconds(8, 1000, 1e-6, 1e-9) == pytest.approx(3e-6 + 3e-6)
    assert costmodel.allreduce_seconds(1, 10**9, 1, 1) == (0.0, "ring")
    # Large messages favour the ring, tiny ones recursive doubling.
    assert costmodel.allreduce_seconds(64, 10**8, 1e-5, 1e-9)[1] == "ring"
    assert costmodel.allreduce_seconds(64, 8, 1e-5, 1e-9)[1] == "recursive doubling"


def test_fit_recovers_alpha_and_beta():
    sizes = [2**k for k in range(3, 25, 2)]
    times = [costmodel.ring_seconds(2, n, 7e-6, 2e-10) for n in sizes]
    alpha, beta = costmodel.fit_alpha_beta(sizes, times, p=2)
    assert alpha == pytest.approx(7e-6, rel=1e-6) and beta == pytest.approx(2e-10, rel=1e-6)


def test_prediction_and_crossover():
    beta = costmodel.line_rate_beta(10)
    assert beta == pytest.approx(8 / 9e9)
    slow = costmodel.predict(1024, 2e6, 5e-3, 25e-6, beta)
    fast = costmodel.predict(8, 2e6, 5e-3, 25e-6, beta)
    assert 0 < slow["efficiency"] < fast["efficiency"] < 1
    crossover = costmodel.crossover_nodes(2e6, 5e-3, 25e-6, beta)
    assert costmodel.allreduce_seconds(crossover, 2e6, 25e-6, beta)[0] >= 5e-3
    assert costmodel.allreduce_seconds(crossover // 2, 2e6, 25e-6, beta)[0] < 5e-3


def test_the_hosts_own_bandwidth_bounds_a_faster_link():
    sizes = [2**k for k in range(3, 25, 2)]
    times = [costmodel.ring_seconds(4, n, 7e-6, 1e-9) for n in sizes]
    host = costmodel.bulk_beta(sizes, times, p=4)  # the largest message: alpha is negligible
    assert host == pytest.approx(1e-9, rel=1e-2)
    assert costmodel.network_beta(1, host) == costmodel.line_rate_beta(1)  # the link is slower
    assert costmodel.network_beta(100, host) == host  # the hosts are slower
    assert costmodel.network_beta(100, 0.0) == costmodel.line_rate_beta(100)
