"""The gradient noise scale estimator on synthetic gradients with known |G|^2 and tr(Sigma)."""

import numpy as np
import pytest

from dpflow.noise import NoiseScale, estimate, local_term, step_estimate


def simulate(rows_per_rank, steps, seed=0, dim=40):
    """Per-row gradients G + L z: |G|^2 and tr(Sigma) = ||L||_F^2 are known. Each step feeds
    the estimator exactly what the trainer does: every rank's slot term computed from its
    gradient of the loss normalised by the global rows, their sum, and the global gradient."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=dim) * 0.3
    L = rng.normal(size=(dim, dim)) * 0.2
    global_rows = sum(rows_per_rank)
    meter = NoiseScale()
    for _ in range(steps):
        rows = G + rng.normal(size=(global_rows, dim)) @ L.T  # (B, dim) per-row gradients
        slot, start = 0.0, 0
        for b in rows_per_rank:
            local = rows[start:start + b].sum(axis=0) / global_rows  # loss normalised by B
            slot += local_term(local @ local, b, global_rows)
            start += b
        total = rows.mean(axis=0)
        measured = step_estimate(slot, rows_per_rank, total @ total, global_rows)
        meter.add(*measured)
    return meter, G @ G, np.sum(L * L)


@pytest.mark.parametrize("rows_per_rank", [[8, 8], [5, 4, 4, 0], [16, 16, 16, 16]])
def test_estimates_recover_the_true_gradient_and_noise(rows_per_rank):
    meter, gradient_sq, trace = simulate(rows_per_rank, steps=3000)
    assert meter.gradient_sq / meter.steps == pytest.approx(gradient_sq, rel=0.1)
    assert meter.trace / meter.steps == pytest.approx(trace, rel=0.05)
    assert meter.value() == pytest.approx(trace / gradient_sq, rel=0.12)


def test_the_naive_ratio_of_norms_would_be_wrong():
    """Sanity of the setting: the global batch's raw |G_B|^2 is far from |G|^2 here, so the
    estimator's correction is what makes the test above pass."""
    rng = np.random.default_rng(0)
    G, L = rng.normal(size=40) * 0.3, rng.normal(size=(40, 40)) * 0.2
    mean = (G + rng.normal(size=(16, 40)) @ L.T).mean(axis=0)
    assert mean @ mean > 2 * (G @ G)


def test_equal_shards_reduce_to_the_papers_formulas():
    b, B, small, big = 16, 64, 3.0, 1.2
    gradient_sq, trace = estimate(small, 1 / b, big, B)
    assert gradient_sq == pytest.approx((B * big - b * small) / (B - b))
    assert trace == pytest.approx((small - big) / (1 / b - 1 / B))


def test_not_measurable_with_one_batch_size():
    assert step_estimate(1.0, [32], 1.0, 32) is None  # one rank
    assert step_estimate(1.0, [0, 7, 0], 1.0, 7) is None  # one rank held every row
    assert NoiseScale().value() is None
    meter = NoiseScale()
    meter.add(-0.5, 3.0)  # |G|^2 not yet resolved from the noise
    assert meter.value() is None


def test_local_term_rescales_to_the_ranks_mean_gradient():
    assert local_term(4.0, 8, 32) == pytest.approx(64.0)  # (32/8)^2 * 4
    assert local_term(4.0, 0, 32) == 0.0


def test_state_round_trip_continues_the_sums():
    meter = NoiseScale()
    meter.add(2.0, 30.0)
    resumed = NoiseScale()
    resumed.load_state(meter.state())
    for m in (meter, resumed):
        m.add(1.0, 15.0)
    assert resumed.state() == meter.state() and resumed.value() == pytest.approx(15.0)
    meter.reset()
    assert meter.value() is None and meter.steps == 0
