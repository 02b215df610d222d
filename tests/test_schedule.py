"""Learning-rate schedules against plain per-step formulas."""

import math

import pytest

from dpflow.schedule import Schedule

STEPS = 7  # steps per epoch


def sequence(schedule, epochs):
    """The lr of every step of a run, positions computed as the trainer does."""
    return [schedule.lr_at(epoch + step / STEPS) for epoch in range(epochs) for step in range(STEPS)]


def reference(kind, peak, epochs, warmup=0, start=0.0, decay=(), factor=0.1, power=2.0, min_lr=0.0):
    """Straightforward per-step formulas, written independently of dpflow.schedule."""
    rates = []
    for k in range(epochs * STEPS):
        t = k / STEPS
        if t < warmup:
            rates.append(start + (peak - start) * min(1.0, (k + 1) / (warmup * STEPS)))
        elif kind == "constant":
            rates.append(peak)
        elif kind == "step":
            rates.append(max(min_lr, peak * factor ** sum(1 for e in decay if t >= e)))
        else:
            p = (t - warmup) / (epochs - warmup)
            shape = (1 + math.cos(math.pi * p)) / 2 if kind == "cosine" else (1 - p) ** power
            rates.append(min_lr + (peak - min_lr) * shape)
    return rates


@pytest.mark.parametrize("kind, options", [
    ("constant", {}),
    ("cosine", {"min_lr": 0.001}),
    ("step", {"decay": (3, 6), "factor": 0.5}),
    ("step", {"decay": (2.5,), "factor": 0.1, "min_lr": 0.03}),
    ("poly", {"power": 2.0}),
    ("poly", {"power": 0.5, "min_lr": 0.01}),
])
@pytest.mark.parametrize("warmup, start", [(0, 0.0), (2, 0.0), (1.5, 0.1)])
def test_schedule_matches_the_per_step_formula(kind, options, warmup, start):
    schedule = Schedule(peak=0.8, epochs=8, steps_per_epoch=STEPS, kind=kind, warmup_epochs=warmup,
                        warmup_start=start, decay_epochs=tuple(options.get("decay", ())),
                        decay_factor=options.get("factor", 0.1), power=options.get("power", 2.0),
                        min_lr=options.get("min_lr", 0.0))
    got = sequence(schedule, 8)
    want = reference(kind, 0.8, 8, warmup, start, **options)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if kind != "constant":
        assert min(got[warmup * STEPS:] if warmup == int(warmup) else got[-STEPS:]) < 0.8  # it decays
        after = got[math.ceil(warmup * STEPS):]
        assert all(a >= b for a, b in zip(after, after[1:]))  # and never climbs after warmup


def test_step_decay_applies_from_the_first_step_of_its_epoch():
    schedule = Schedule(peak=1.0, epochs=5, steps_per_epoch=STEPS, kind="step", decay_epochs=(2, 4))
    rates = sequence(schedule, 5)
    assert rates[2 * STEPS - 1] == 1.0 and rates[2 * STEPS] == pytest.approx(0.1)
    assert rates[4 * STEPS - 1] == pytest.approx(0.1) and rates[4 * STEPS] == pytest.approx(0.01)


def test_cosine_and_poly_reach_their_ends():
    for kind in ("cosine", "poly"):
        schedule = Schedule(peak=1.0, epochs=4, steps_per_epoch=STEPS, kind=kind, warmup_epochs=1, min_lr=0.05)
        assert schedule.lr_at(1.0) == pytest.approx(1.0)  # the peak right after warmup
        assert schedule.lr_at(4.0) == pytest.approx(0.05)  # the floor at the end
        assert schedule.lr_at(2.5) == pytest.approx(0.05 + 0.95 * (0.5 if kind == "cosine" else 0.25))


def test_warmup_ramps_from_the_start_to_the_peak():
    schedule = Schedule(peak=1.0, epochs=4, steps_per_epoch=4, warmup_epochs=1, warmup_start=0.2)
    assert [schedule.lr_at(k / 4) for k in range(5)] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="constant, cosine, step, poly, got 'linear'"):
        Schedule(peak=1.0, epochs=1, steps_per_epoch=1, kind="linear")

