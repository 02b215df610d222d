"""Conv2D, MaxPool2D, GlobalAveragePool, Flatten, Reshape and Add: float64 central-difference
gradient checks, a loop-by-loop numpy reference, memory layout, 0-row batches, shape errors."""

import numpy as np
import pytest

from test_layers import check_gradients
from dpflow import (
    MSE, Add, Conv2D, Flatten, GlobalAveragePool, GraphError, Input, Linear, MaxPool2D, ReLU,
    Reshape, SoftmaxCrossEntropy, forward_and_backward, forward_pass, sort_layers,
)
from dpflow.layout import is_channels_last


def rng():
    return np.random.default_rng(7)


def conv_reference(X, W, b, stride, padding):
    """The convolution written as its definition, one output value at a time."""
    n, c, h, w = X.shape
    k_h, k_w, _, f = W.shape
    Xp = np.pad(X, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (h + 2 * padding - k_h) // stride + 1
    out_w = (w + 2 * padding - k_w) // stride + 1
    z = np.zeros((n, f, out_h, out_w))
    for row in range(n):
        for filt in range(f):
            for i in range(out_h):
                for j in range(out_w):
                    patch = Xp[row, :, i * stride:i * stride + k_h, j * stride:j * stride + k_w]
                    z[row, filt, i, j] = b[filt] + np.sum(patch * W[:, :, :, filt].transpose(2, 0, 1))
    return z


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_conv_matches_the_definition(stride, padding, channels):
    r = rng()
    X, W, b = r.normal(size=(3, channels, 7, 6)), r.normal(size=(3, 2, channels, 4)), r.normal(size=4)
    conv = Conv2D(Input(X), Input(W), Input(b), stride=stride, padding=padding)
    conv.forward()
    assert conv.value.shape == conv_reference(X, W, b, stride, padding).shape
    assert np.max(np.abs(conv.value - conv_reference(X, W, b, stride, padding))) < 1e-12
    assert is_channels_last(conv.value)  # NCHW shape, NHWC memory: no copy after the GEMM


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("stride,padding,kernel", [(1, 0, 3), (1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 2)])
def test_conv_gradients(stride, padding, kernel, channels):
    r = rng()
    X = Input(r.normal(size=(2, channels, 6, 5)))
    W, b = Input(r.normal(size=(kernel, kernel, channels, 4)) * 0.5), Input(r.normal(size=4))
    conv = Conv2D(X, W, b, stride=stride, padding=padding)
    conv.forward()
    y = Input(r.normal(size=conv.value.shape))
    check_gradients(MSE(y, conv), [X, W, b, y])


def test_two_convolutions_pass_channels_last_images_between_them():
    r = rng()
    X = Input(r.normal(size=(2, 2, 7, 7)))
    W1, b1 = Input(r.normal(size=(3, 3, 2, 3)) * 0.5), Input(r.normal(size=3))
    W2, b2 = Input(r.normal(size=(2, 2, 3, 2)) * 0.5), Input(r.normal(size=2))
    first = Conv2D(X, W1, b1, padding=1)
    second = Conv2D(first, W2, b2, stride=2)
    graph = sort_layers([X, W1, b1, W2, b2])
    forward_pass(graph)
    y = Input(r.normal(size=second.value.shape))
    check_gradients(MSE(y, second), [X, W1, b1, W2, b2, y])
    assert is_channels_last(first.value) and is_channels_last(second.value)


def test_conv_relu_pool_keep_the_channels_last_layout():
    r = rng()
    X = Input(r.normal(size=(2, 1, 8, 8)), requires_grad=False)
    W, b = Input(r.normal(size=(3, 3, 1, 4))), Input(r.normal(size=4))
    pool = MaxPool2D(ReLU(Conv2D(X, W, b)), 2)
    forward_pass(sort_layers([X, W, b]))
    relu = pool.inbound_layers[0]
    assert is_channels_last(relu.value) and is_channels_last(pool.value)
    assert pool.value.shape == (2, 4, 3, 3)


@pytest.mark.parametrize("size,stride,shape", [(2, None, (2, 3, 6, 6)), (2, None, (2, 3, 7, 5)),
                                               (3, 2, (2, 2, 7, 7)), ((2, 3), 1, (1, 2, 4, 5))])
def test_max_pool_gradients(size, stride, shape):
    # Distinct values: a maximum is then unique and has a derivative for differences to find.
    r = rng()
    values = r.permutation(np.prod(shape)).reshape(shape) * 0.1 + r.normal(size=shape) * 0.01
    X = Input(values)
    pool = MaxPool2D(X, size, stride)
    pool.forward()
    y = Input(r.normal(size=pool.value.shape))
    check_gradients(MSE(y, pool), [X, y])


def test_max_pool_matches_a_reshape_max_and_passes_each_gradient_once_on_ties():
    r = rng()
    x = r.normal(size=(3, 2, 6, 4))
    pool = MaxPool2D(Input(x), 2)
    pool.forward()
    assert np.array_equal(pool.value, x.reshape(3, 2, 3, 2, 2, 2).max(axis=(3, 5)))
    # All equal (as after a ReLU of a blank background): one position per window gets it.
    X = Input(np.ones((2, 3, 4, 4)))
    pool = MaxPool2D(X, 2)
    y = Input(np.zeros((2, 3, 2, 2)))
    MSE(y, pool)
    forward_and_backward(sort_layers([X, y]))
    grad = X.gradients[X]
    windows = grad.reshape(2, 3, 2, 2, 2, 2)
    assert np.count_nonzero(grad) == 2 * 3 * 2 * 2
    assert np.allclose(windows.sum(axis=(3, 5)), pool.gradients[X].reshape(2, 3, 2, 2, 2, 2).sum(axis=(3, 5)))
    assert np.all(np.count_nonzero(windows, axis=(3, 5)) == 1)


def test_global_average_pool_and_flatten_gradients():
    r = rng()
    X = Input(r.normal(size=(3, 4, 3, 5)))
    y = Input(r.normal(size=(3, 4)))
    check_gradients(MSE(y, GlobalAveragePool(X)), [X, y])
    X2 = Input(r.normal(size=(3, 2, 3, 3)))
    W, b = Input(r.normal(size=(2, 2, 2, 3))), Input(r.normal(size=3))
    W2, b2 = Input(r.normal(size=(12, 4))), Input(r.normal(size=4))
    labels = Input(np.array([0, 3, 1]), requires_grad=False)
    flat = Flatten(Conv2D(X2, W, b))  # channels-last memory in, (channel, row, column) order out
    check_gradients(SoftmaxCrossEntropy(labels, Linear(flat, W2, b2)), [X2, W, b, W2, b2])
    conv = flat.inbound_layers[0]
    assert np.array_equal(flat.value, np.ascontiguousarray(conv.value).reshape(3, -1))


def test_reshape_gradients_and_views():
    r = rng()
    X = Input(r.normal(size=(4, 12)))
    image = Reshape(X, (3, 2, 2))
    y = Input(r.normal(size=(4, 3, 2, 2)))
    check_gradients(MSE(y, image), [X, y])
    assert np.shares_memory(image.value, X.value)  # C-ordered input: no copy


def test_add_gradients_including_an_input_used_twice():
    r = rng()
    X = Input(r.normal(size=(4, 3)))
    W, b = Input(r.normal(size=(3, 3))), Input(r.normal(size=3))
    hidden = ReLU(Linear(X, W, b))
    y = Input(r.normal(size=(4, 3)))
    check_gradients(MSE(y, Add(hidden, X)), [X, W, b, y])  # a residual block
    X2, y2 = Input(r.normal(size=(2, 3))), Input(r.normal(size=(2, 3)))
    check_gradients(MSE(y2, Add(X2, X2, X2)), [X2, y2])


def test_zero_row_batches_give_zero_parameter_gradients():
    r = rng()
    X = Input(np.zeros((0, 1, 8, 8)), requires_grad=False)
    labels = Input(np.zeros(0, np.int64), requires_grad=False)
    Wc, bc = Input(r.normal(size=(3, 3, 1, 2))), Input(r.normal(size=2))
    Wd, bd = Input(r.normal(size=(8, 3))), Input(r.normal(size=3))
    Wg, bg = Input(r.normal(size=(2, 3))), Input(r.normal(size=3))
    features = ReLU(Conv2D(X, Wc, bc, padding=1))
    dense = Linear(Flatten(MaxPool2D(features, 3)), Wd, bd)
    pooled = Linear(GlobalAveragePool(features), Wg, bg)
    loss = SoftmaxCrossEntropy(labels, Add(dense, Reshape(pooled, (3,))))
    loss.normaliser = 16  # the global batch: other ranks hold the rows
    params = [Wc, bc, Wd, bd, Wg, bg]
    forward_and_backward(sort_layers([X, labels, *params]))
    assert float(loss.value) == 0.0
    for p in params:
        assert p.gradients[p].shape == p.value.shape and not np.any(p.gradients[p])


@pytest.mark.parametrize("build,value,pattern", [
    (lambda X: Conv2D(X, Input(np.ones((3, 3, 1, 2))), Input(np.ones(2)), name="conv0"),
     np.ones((2, 64)), r"'conv0'.*\(2, 64\).*images \(batch, 1, height, width\).*Reshape"),
    (lambda X: Conv2D(X, Input(np.ones((3, 3, 1, 2))), Input(np.ones(2)), name="conv0"),
     np.ones((2, 3, 8, 8)), r"'conv0'.*\(2, 3, 8, 8\) does not fit weights"),
    (lambda X: Conv2D(X, Input(np.ones((5, 5, 1, 2))), Input(np.ones(2)), name="conv0"),
     np.ones((2, 1, 3, 3)), r"'conv0'.*5x5 kernel does not fit an image of 3x3.*pad more"),
    (lambda X: Conv2D(X, Input(np.ones((3, 3, 1, 2))), Input(np.ones(3)), name="conv0"),
     np.ones((2, 1, 5, 5)), r"'conv0'.*bias of shape \(3,\).*needs shape \(2,\)"),
    (lambda X: MaxPool2D(X, 2, name="pool0"), np.ones((2, 8)), r"'pool0'.*not a batch of images"),
    (lambda X: MaxPool2D(X, 4, name="pool0"), np.ones((2, 1, 3, 3)), r"'pool0'.*4x4 window.*3x3"),
    (lambda X: GlobalAveragePool(X, name="gap"), np.ones((2, 8)), r"'gap'.*not a batch of non-empty images"),
    (lambda X: Reshape(X, (3, 3), name="image"), np.ones((2, 8)), r"'image'.*\(8,\) \(8 values\).*8 values per row"),
    (lambda X: Add(X, Input(np.ones((2, 3))), name="join"), np.ones((2, 4)), r"'join'.*every input of Add"),
])
def test_shape_errors_name_the_layer_and_the_fix(build, value, pattern):
    X = Input(value)
    build(X)
    with pytest.raises(GraphError, match=pattern):
        forward_pass(sort_layers([X]))


def test_bad_settings_are_refused_at_construction():
    X = Input()
    with pytest.raises(ValueError, match="stride must be >= 1"):
        Conv2D(X, Input(), Input(), stride=0)
    with pytest.raises(ValueError, match="size and stride must be >= 1"):
        MaxPool2D(X, 0)
    with pytest.raises(ValueError, match="at least two inputs"):
        Add(X)
