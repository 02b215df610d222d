"""Optimizers over flat buffers against the textbook formulas, step by step."""

import numpy as np
import pytest

from dpflow.flat import FlatParameters
from dpflow.graph import Input
from dpflow.optim import create_optimizer


def run(name, steps=5, **kwargs):
    rng = np.random.default_rng(0)
    params = rng.normal(size=50)
    grads = [rng.normal(size=50) for _ in range(steps)]
    optimizer = create_optimizer(name, 50, np.float64, lr=0.1, **kwargs)
    values = params.copy()
    for g in grads:
        optimizer.step(values, g.copy())
    return params, grads, values


def test_sgd():
    p, grads, values = run("sgd", weight_decay=0.01)
    for g in grads:
        p = p - 0.1 * (g + 0.01 * p)
    assert np.allclose(values, p, atol=1e-14)


def test_momentum():
    p, grads, values = run("momentum", momentum=0.9)
    v = np.zeros_like(p)
    for g in grads:
        v = 0.9 * v + g
        p = p - 0.1 * v
    assert np.allclose(values, p, atol=1e-14)


def test_adam():
    p, grads, values = run("adam")
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert np.allclose(values, p, atol=1e-12)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="sgd, momentum or adam, got 'rmsprop'"):
        create_optimizer("rmsprop", 3, np.float64, 0.1)


def test_flat_buffers_are_views_in_sorted_name_order():
    params = {name: Input(np.full(shape, i, np.float64), name=name)
              for i, (name, shape) in enumerate([("b", (2,)), ("a", (2, 3)), ("c", (1,))])}
    flat = FlatParameters(params, np.float64, extra_slots=2)
    assert flat.names == ["a", "b", "c"]
    assert np.array_equal(flat.values, [1] * 6 + [0] * 2 + [2])
    params["b"].value[...] = 9  # the parameter's value IS the buffer
    assert np.array_equal(flat.values[6:8], [9, 9])
    flat.grads[:] = np.arange(11)
    assert np.array_equal(params["c"].gradients[params["c"]], [8])
    assert flat.grads.size == flat.size + 2 and np.array_equal(flat.extra, [9, 10])
