"""The MiniFlow API: sorting, feeding, dtypes, in-place values, cycles, and the tutorial program."""

import os
import runpy

import numpy as np
import pytest

from helpers import ROOT
from dpflow import (
    MSE, GraphError, Input, Linear, Sigmoid, feed, forward_and_backward, forward_pass,
    sgd_update, sort_layers, topological_sort,
)


def small_graph():
    X, y, W, b = Input(), Input(), Input(), Input()
    cost = MSE(y, Sigmoid(Linear(X, W, b)))
    return X, y, W, b, cost


def test_topological_sort_orders_inputs_before_consumers_and_loss_last():
    X, y, W, b, cost = small_graph()
    graph = topological_sort({X: np.ones((2, 3)), y: np.ones(2), W: np.ones((3, 1)), b: np.zeros(1)})
    position = {id(layer): i for i, layer in enumerate(graph)}
    for layer in graph:
        for inbound in layer.inbound_layers:
            assert position[id(inbound)] < position[id(layer)]
    assert graph[-1] is cost


def test_sort_is_deterministic_in_construction_order():
    names = []
    for _ in range(3):
        inputs = [Input(name=f"in{i}") for i in range(6)]
        W = Input(name="W")
        for i, x in enumerate(inputs[1:]):
            Linear(x, W, inputs[0], name=f"lin{i}")
        names.append([layer.name for layer in sort_layers(list(reversed(inputs)) + [W])])
    assert names[0] == names[1] == names[2]
    assert names[0][:7] == ["in5", "in4", "in3", "in2", "in1", "in0", "W"]


def test_a_cycle_is_a_clear_error():
    X = Input(name="X")
    a = Sigmoid(X, name="a")
    b = Sigmoid(a, name="b")
    a.inbound_layers.append(b)
    b.outbound_layers.append(a)
    with pytest.raises(GraphError, match="cycle through .*'a'.*'b'"):
        sort_layers([X])


def test_feeding_keeps_dtype_and_identity():
    X, y, W, b, cost = small_graph()
    X_ = np.ones((2, 3), np.float64)
    W_ = np.full((3, 1), 0.5, np.float32)
    topological_sort({X: X_, y: np.ones(2), W: W_, b: np.zeros(1, np.float32)})
    assert X.value is X_ and X.value.dtype == np.float64
    assert W.value is W_ and W.value.dtype == np.float32


def test_non_finite_values_fed_are_refused():
    X, y, W, b, cost = small_graph()
    bad = np.ones((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(GraphError, match="1 non-finite"):
        feed({X: bad})


def test_changing_value_in_place_changes_the_next_forward_pass():
    X, y, W, b, cost = small_graph()
    W_ = np.zeros((3, 1))
    graph = topological_sort({X: np.ones((2, 3)), y: np.ones(2), W: W_, b: np.zeros(1)})
    before = float(forward_pass(graph))
    W_ += 1.0  # the caller's array is the graph's array
    assert float(forward_pass(graph)) != before


def test_gradients_are_keyed_by_the_trainable_itself():
    X, y, W, b, cost = small_graph()
    graph = topological_sort({X: np.ones((4, 3)), y: np.zeros(4), W: np.ones((3, 1)), b: np.zeros(1)})
    forward_and_backward(graph)
    assert W.gradients[W].shape == (3, 1) and b.gradients[b].shape == (1,)
    before = W.value.copy()
    sgd_update([W, b], learning_rate=0.1)
    assert np.allclose(W.value, before - 0.1 * W.gradients[W])


def test_miniflow_tutorial_program_runs_unchanged_and_its_loss_falls():
    namespace = runpy.run_path(os.path.join(ROOT, "examples", "miniflow_regression.py"))
    losses = namespace["main"](epochs=10, verbose=False)
    assert losses[-1] < 0.2 * losses[0]
    assert all(np.isfinite(losses))
