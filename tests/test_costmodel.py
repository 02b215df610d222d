"""The allreduce cost model: textbook formulas, and a fit that recovers known alpha and beta."""

import pytest

from dpflow import costmodel


def test_formulas():
    assert costmodel.ring_seconds(4, 1000, 1e-6, 1e-9) == pytest.approx(6e-6 + 1.5e-6)
    assert costmodel.recursive_doubling_seconds(8, 1000, 1e-6, 1e-9) == pytest.approx(3e-6 + 3e-6)
    assert costmodel.rabenseifner_seconds(8, 1000, 1e-6, 1e-9) == pytest.approx(6e-6 + 1.75e-6)
    assert costmodel.allreduce_seconds(1, 10**9, 1, 1)[0] == 0.0
    # Without a named algorithm, the fastest: large messages favour ring's bytes in Rabenseifner's
    # few steps (a power of two), tiny ones recursive doubling.
    assert costmodel.allreduce_seconds(64, 10**8, 1e-5, 1e-9)[1] == "rabenseifner"
    assert costmodel.allreduce_seconds(64, 8, 1e-5, 1e-9)[1] == "recursive doubling"
    assert costmodel.allreduce_seconds(64, 10**8, 1e-5, 1e-9, "ring") == (costmodel.ring_seconds(64, 10**8, 1e-5, 1e-9), "ring")
    with pytest.raises(ValueError, match="tree"):
        costmodel.allreduce_seconds(4, 8, 1e-5, 1e-9, "tree")


def test_rabenseifner_folds_the_ranks_beyond_a_power_of_two():
    n, beta = 2_143_272, costmodel.line_rate_beta(1)  # the MLP's gradient on a 1 Gbit/s link
    # A power of two: ring's bytes in fewer steps.
    for p in (2, 4, 8):
        assert costmodel.coefficients("rabenseifner", p)[1] == costmodel.coefficients("ring", p)[1]
        assert costmodel.coefficients("rabenseifner", p)[0] <= costmodel.coefficients("ring", p)[0]
    # p = 3: the even rank sends its whole vector and gets the whole result back: 1 + 1 n
    # around the 2-rank reduce-scatter and allgather (n/2 + n/2): 3 n beta, where ring takes 4/3.
    assert costmodel.coefficients("rabenseifner", 3) == (4, 3)
    assert costmodel.rabenseifner_seconds(3, n, 0.0, beta) == pytest.approx(3 * n * beta)
    assert costmodel.rabenseifner_seconds(3, n, 0.0, beta) / costmodel.ring_seconds(3, n, 0.0, beta) == pytest.approx(2.25)
    # 5 to 7 fold into 4, whose reduce-scatter and allgather move 3/4 n each.
    for p in (5, 6, 7):
        assert costmodel.coefficients("rabenseifner", p) == (6, 3.5)
    assert costmodel.allreduce_seconds(3, n, 25e-6, beta)[1] == "ring"
    prediction = costmodel.predict(3, n, 3e-3, 25e-6, beta, algorithm="rabenseifner")
    assert prediction["algorithm"] == "rabenseifner"
    assert prediction["comm_s"] == pytest.approx(4 * 25e-6 + 3 * n * beta)


@pytest.mark.parametrize("p, algorithm", [(2, "ring"), (3, "ring"), (3, "rabenseifner"), (6, "rabenseifner")])
def test_fit_recovers_alpha_and_beta(p, algorithm):
    sizes = [2**k for k in range(3, 25, 2)]
    times = [costmodel.allreduce_seconds(p, n, 7e-6, 2e-10, algorithm)[0] for n in sizes]
    alpha, beta = costmodel.fit_alpha_beta(sizes, times, p=p, algorithm=algorithm)
    assert alpha == pytest.approx(7e-6, rel=1e-6) and beta == pytest.approx(2e-10, rel=1e-6)


def test_prediction_and_crossover():
    beta = costmodel.line_rate_beta(10)
    assert beta == pytest.approx(8 / 10e9 * 1538 / 1448)  # 1448 TCP payload bytes of 1538 on the wire
    slow = costmodel.predict(1024, 2e6, 5e-3, 25e-6, beta, algorithm="ring")
    fast = costmodel.predict(8, 2e6, 5e-3, 25e-6, beta, algorithm="ring")
    assert 0 < slow["efficiency"] < fast["efficiency"] < 1
    for algorithm, compute in (("ring", 5e-3), ("rabenseifner", 3e-3), (None, 3e-3)):
        crossover = costmodel.crossover_nodes(2e6, compute, 25e-6, beta, algorithm)
        assert costmodel.allreduce_seconds(crossover, 2e6, 25e-6, beta, algorithm)[0] >= compute
        assert costmodel.allreduce_seconds(crossover // 2, 2e6, 25e-6, beta, algorithm)[0] < compute
    # Rabenseifner's time grows with log2 p only: a compute time above 2 n beta is never reached.
    assert costmodel.crossover_nodes(2e6, 5e-3, 25e-6, beta, "rabenseifner") is None


def test_the_hosts_own_bandwidth_bounds_a_faster_link():
    sizes = [2**k for k in range(3, 25, 2)]
    for p, algorithm in ((4, "ring"), (3, "rabenseifner")):
        times = [costmodel.allreduce_seconds(p, n, 7e-6, 1e-9, algorithm)[0] for n in sizes]
        host = costmodel.bulk_beta(sizes, times, p=p, algorithm=algorithm)  # the largest message: alpha is negligible
        assert host == pytest.approx(1e-9, rel=1e-2)
    assert costmodel.network_beta(1, host) == costmodel.line_rate_beta(1)  # the link is slower
    assert costmodel.network_beta(100, host) == host  # the hosts are slower
    assert costmodel.network_beta(100, 0.0) == costmodel.line_rate_beta(100)
