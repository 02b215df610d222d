"""Every layer and loss: float64 central-difference gradient checks through one helper,
a hand-written numpy reference network, 0-row batches and bad input."""

import numpy as np
import pytest

from helpers import numeric_gradient, relative_error
from dpflow import (
    MSE, GraphError, Input, Linear, ReLU, Sigmoid, SoftmaxCrossEntropy, Tanh,
    forward_and_backward, forward_pass, sort_layers,
)


def check_gradients(loss, inputs, tolerance=1e-6):
    """Compare each input's analytic gradient with central differences of the loss."""
    graph = sort_layers(inputs)
    forward_and_backward(graph)
    for layer in inputs:
        if not layer.requires_grad:
            continue
        analytic = np.array(layer.gradients[layer], dtype=np.float64)
        numeric = numeric_gradient(lambda: float(forward_pass(graph)), layer.value)
        assert analytic.shape == layer.value.shape
        assert relative_error(analytic, numeric) < tolerance, (layer, analytic, numeric)


def rng():
    return np.random.default_rng(42)


def test_linear_gradients_through_mse():
    r = rng()
    X, W, b = Input(r.normal(size=(5, 4))), Input(r.normal(size=(4, 3))), Input(r.normal(size=3))
    y = Input(r.normal(size=(5, 3)))
    check_gradients(MSE(y, Linear(X, W, b)), [X, W, b, y])


@pytest.mark.parametrize("activation", [Sigmoid, Tanh, ReLU])
def test_activation_gradients(activation):
    r = rng()
    # Keep ReLU inputs away from 0, where it has no derivative for differences to find.
    x = r.normal(size=(6, 4))
    x[np.abs(x) < 0.05] = 0.3
    X, y = Input(x), Input(r.normal(size=(6, 4)))
    check_gradients(MSE(y, activation(X)), [X, y])


def test_softmax_cross_entropy_gradients():
    r = rng()
    logits = Input(r.normal(size=(7, 5)) * 3)
    labels = Input(r.integers(0, 5, 7), requires_grad=False)
    check_gradients(SoftmaxCrossEntropy(labels, logits), [logits, labels])


def test_normaliser_divides_the_sum():
    r = rng()
    logits = Input(r.normal(size=(4, 3)))
    labels = Input(np.array([0, 1, 2, 1]), requires_grad=False)
    loss = SoftmaxCrossEntropy(labels, logits)
    graph = sort_layers([logits, labels])
    mean = float(forward_pass(graph))
    loss.normaliser = 10
    assert float(forward_pass(graph)) == pytest.approx(mean * 4 / 10, rel=1e-12)


def test_three_layer_network_end_to_end():
    r = rng()
    X = Input(r.normal(size=(8, 5)), requires_grad=False)
    labels = Input(r.integers(0, 3, 8), requires_grad=False)
    params = []
    layer = X
    for i, (a, b) in enumerate([(5, 6), (6, 4), (4, 3)]):
        W, bias = Input(r.normal(size=(a, b)) * 0.7, name=f"W{i}"), Input(r.normal(size=b) * 0.1, name=f"b{i}")
        params += [W, bias]
        layer = Linear(layer, W, bias)
        if i == 0:
            layer = Tanh(layer)
        elif i == 1:
            layer = Sigmoid(layer)
    check_gradients(SoftmaxCrossEntropy(labels, layer), [X, labels, *params])


def test_input_used_twice_sums_both_gradients():
    r = rng()
    X = Input(r.normal(size=(4, 3)))
    W1, b1 = Input(r.normal(size=(3, 2))), Input(r.normal(size=2))
    W2, b2 = Input(r.normal(size=(3, 2))), Input(r.normal(size=2))
    y = Input(r.normal(size=(4, 2)))
    y2 = Input(r.normal(size=(4, 2)))
    shared = Sigmoid(X)
    # Sigmoid's output feeds two Linear branches, each with its own MSE; the check compares
    # the summed gradient at X with central differences of the sum of both losses.
    a = Linear(shared, W1, b1)
    b = Linear(shared, W2, b2)
    total = MSE(y, a)
    other = MSE(y2, b)

    graph = sort_layers([X, W1, b1, W2, b2, y, y2])
    forward_pass(graph)
    # Backward both losses into the shared layer; its gradient must be the sum of both.
    for layer in reversed(graph):
        layer.backward()
    analytic = X.gradients[X].copy()

    def both():
        forward_pass(graph)
        return float(total.value) + float(other.value)

    assert relative_error(analytic, numeric_gradient(both, X.value)) < 1e-6


def reference_network(X, labels, W1, b1, W2, b2):
    """A hand-written numpy MLP: ReLU hidden layer, softmax cross-entropy, mean over rows."""
    z1 = X @ W1 + b1
    h = np.maximum(z1, 0)
    z2 = h @ W2 + b2
    shifted = z2 - z2.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    n = len(X)
    loss = -np.log(p[np.arange(n), labels]).mean()
    dz2 = p.copy()
    dz2[np.arange(n), labels] -= 1
    dz2 /= n
    dW2, db2 = h.T @ dz2, dz2.sum(axis=0)
    dz1 = (dz2 @ W2.T) * (z1 > 0)
    dW1, db1 = X.T @ dz1, dz1.sum(axis=0)
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def test_graph_matches_hand_written_numpy_network():
    r = rng()
    X_, labels_ = r.normal(size=(16, 6)), r.integers(0, 4, 16)
    values = {"W1": r.normal(size=(6, 8)), "b1": r.normal(size=8), "W2": r.normal(size=(8, 4)), "b2": r.normal(size=4)}
    params = {name: Input(value.copy(), name=name) for name, value in values.items()}
    X, labels = Input(X_, requires_grad=False), Input(labels_, requires_grad=False)
    hidden = ReLU(Linear(X, params["W1"], params["b1"]))
    loss = SoftmaxCrossEntropy(labels, Linear(hidden, params["W2"], params["b2"]))
    graph = sort_layers([X, labels, *params.values()])
    forward_and_backward(graph)
    expected_loss, expected_grads = reference_network(X_, labels_, **values)
    assert abs(float(loss.value) - expected_loss) < 1e-12
    for name, param in params.items():
        assert np.max(np.abs(param.gradients[param] - expected_grads[name])) < 1e-12, name


@pytest.mark.parametrize("activation", [Sigmoid, Tanh, ReLU])
def test_zero_row_batch_gives_zero_parameter_gradients(activation):
    r = rng()
    X = Input(np.zeros((0, 4)), requires_grad=False)
    labels = Input(np.zeros(0, np.int64), requires_grad=False)
    W1, b1 = Input(r.normal(size=(4, 5))), Input(r.normal(size=5))
    W2, b2 = Input(r.normal(size=(5, 3))), Input(r.normal(size=3))
    loss = SoftmaxCrossEntropy(labels, Linear(activation(Linear(X, W1, b1)), W2, b2))
    loss.normaliser = 32  # the global batch: other ranks hold the rows
    graph = sort_layers([X, labels, W1, b1, W2, b2])
    forward_and_backward(graph)
    assert float(loss.value) == 0.0
    for p in (W1, b1, W2, b2):
        assert p.gradients[p].shape == p.value.shape
        assert not np.any(p.gradients[p])


def test_zero_rows_with_default_normaliser_is_not_nan():
    X, y = Input(np.zeros((0, 1))), Input(np.zeros(0))
    W, b = Input(np.ones((1, 1))), Input(np.zeros(1))
    loss = MSE(y, Linear(X, W, b))
    forward_and_backward(sort_layers([X, y, W, b]))
    assert float(loss.value) == 0.0 and not np.any(W.gradients[W])


def test_linear_rejects_mismatched_shapes_naming_the_layer():
    X, W, b = Input(np.ones((2, 3))), Input(np.ones((4, 2))), Input(np.ones(2))
    Linear(X, W, b, name="fc0")
    with pytest.raises(GraphError, match=r"'fc0'.*\(2, 3\).*\(4, 2\).*4 columns"):
        forward_pass(sort_layers([X, W, b]))


def test_linear_rejects_mismatched_bias():
    X, W, b = Input(np.ones((2, 3))), Input(np.ones((3, 2))), Input(np.ones(5))
    Linear(X, W, b)
    with pytest.raises(GraphError, match=r"bias of shape \(5,\).*needs shape \(2,\)"):
        forward_pass(sort_layers([X, W, b]))


def test_labels_must_match_logits_rows():
    labels, logits = Input(np.array([0, 1])), Input(np.ones((3, 4)))
    SoftmaxCrossEntropy(labels, logits)
    with pytest.raises(GraphError, match=r"labels of shape \(2,\).*logits of shape \(3, 4\)"):
        forward_pass(sort_layers([labels, logits]))


def test_labels_out_of_range():
    labels, logits = Input(np.array([0, 7, 1])), Input(np.ones((3, 4)))
    SoftmaxCrossEntropy(labels, logits)
    with pytest.raises(GraphError, match=r"label 7 is outside 0\.\.3"):
        forward_pass(sort_layers([labels, logits]))


def test_float_labels_are_refused():
    labels, logits = Input(np.array([0.0, 1.0])), Input(np.ones((2, 4)))
    SoftmaxCrossEntropy(labels, logits)
    with pytest.raises(GraphError, match="integer class indices"):
        forward_pass(sort_layers([labels, logits]))


def test_mse_rejects_wrong_target_count():
    y, a = Input(np.ones(5)), Input(np.ones((4, 1)))
    MSE(y, a)
    with pytest.raises(GraphError, match=r"targets of shape \(5,\).*outputs of shape \(4, 1\)"):
        forward_pass(sort_layers([y, a]))


def test_softmax_is_stable_for_huge_logits():
    logits = Input(np.array([[1000.0, -1000.0], [-1e4, 1e4]]))
    labels = Input(np.array([0, 1]))
    loss = SoftmaxCrossEntropy(labels, logits)
    forward_and_backward(sort_layers([labels, logits]))
    assert float(loss.value) == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(logits.gradients[logits]).all()


def test_gradient_check_catches_a_wrong_derivative():
    class BrokenSigmoid(Sigmoid):
        def backward(self):
            super().backward()
            self.gradients[self.inbound_layers[0]] *= 1.01

    r = rng()
    X, y = Input(r.normal(size=(3, 2))), Input(r.normal(size=(3, 2)))
    with pytest.raises(AssertionError):
        check_gradients(MSE(y, BrokenSigmoid(X)), [X, y])
