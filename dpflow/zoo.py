"""The built-in models, written as any user's builder would be. Wiring only: numpy, no MPI.

A builder is `function(input_shape, n_classes, rng, dtype, **model_args) -> Model`:
`input_shape` is one example's shape (no batch axis), `rng` a numpy Generator seeded the
same on every rank, `dtype` the training dtype. `dpflow train --model NAME` picks one of
`BUILDERS`; `--model path/to/file.py:function` takes a user's own.
"""

import math

import numpy as np

from .batchnorm import BatchNorm
from .conv import Conv2D, output_size
from .dropout import Dropout
from .graph import GraphError, Input
from .layers import Linear, ReLU, SoftmaxCrossEntropy
from .model import MLP, Model, init_weights
from .pooling import MaxPool2D
from .reshape import Flatten, Reshape


def as_ints(value, what, least=1):
    """An int, a sequence of ints, or a string "32,64" (from --model-arg) as a tuple of ints,
    each at least `least` (a size of 0 would divide by zero when the weights are drawn)."""
    if isinstance(value, str):
        value = [part for part in value.replace("x", ",").split(",") if part.strip()]
    if np.isscalar(value):
        value = [value]
    try:
        ints = tuple(int(item) for item in value)
    except (TypeError, ValueError, OverflowError):
        raise GraphError(f"{what} must be integers such as 32,64; got {value!r}") from None
    if any(item < least for item in ints):
        raise GraphError(f"{what} must be integers >= {least}; got {value!r}")
    return ints


def mlp(input_shape, n_classes, rng, dtype, hidden=(256, 128), activation="relu"):
    """Linear -> activation per hidden size -> Linear -> softmax cross-entropy; images are
    flattened first. Today's `dpflow train` model, parameter for parameter."""
    n_inputs = math.prod(input_shape)
    return MLP(n_inputs, as_ints(hidden, "hidden"), n_classes, activation, dtype=dtype, rng=rng,
               flatten=len(input_shape) > 1)


def image_shape(input_shape):
    """(channels, height, width); a flat row of a square number of pixels is one grey image."""
    if len(input_shape) == 3:
        return tuple(input_shape)
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return (1, side, side)
    raise GraphError(f"the cnn model needs images (channels, height, width), got examples of shape "
                     f"{tuple(input_shape)}; load the data as images, or use `model` mlp")


def cnn(input_shape, n_classes, rng, dtype, channels=(32, 64), kernel=3, dense=128, dropout=0.5,
        padding=None, pool=2, batch_norm=False):
    """[conv kernel x kernel -> (BatchNorm) -> ReLU -> max pool] per entry of `channels`
    -> Flatten -> Linear(dense) -> ReLU -> Dropout -> Linear(n_classes) -> softmax cross-entropy.

    `padding` defaults to kernel // 2 ("same": 28x28 -> 28, 14, 14, 7): on Fashion-MNIST it
    ended 20 epochs about a point above "valid" padding (28 -> 26, 13, 11, 5), and the 8x8
    digits keep a feature map.
    """
    channels, (kernel,), (pool,), (dense,) = (as_ints(channels, "channels"), as_ints(kernel, "kernel"),
                                              as_ints(pool, "pool"), as_ints(dense, "dense"))
    dropout, batch_norm = float(dropout), str(batch_norm).lower() in ("1", "true", "yes")
    if not 0.0 <= dropout < 1.0:  # NaN too: it would silently turn dropout off
        raise GraphError(f"dropout must be a rate in [0, 1), got {dropout}; 0 turns it off")
    c, h, w = image_shape(input_shape)
    padding = kernel // 2 if padding is None else as_ints(padding, "padding", least=0)[0]
    data = Input(name="inputs")
    labels = Input(name="labels")
    layer = data if len(input_shape) == 3 else Reshape(data, (c, h, w), name="image")
    params = {}

    def parameter(name, value):
        params[name] = Input(np.asarray(value, dtype), name=name)
        return params[name]

    for i, filters in enumerate(channels):
        fan_in = kernel * kernel * c
        W = parameter(f"conv{i}.W", rng.normal(0.0, np.sqrt(2.0 / fan_in), (kernel, kernel, c, filters)))
        b = parameter(f"conv{i}.b", np.zeros(filters))
        layer = Conv2D(layer, W, b, padding=padding, name=f"conv{i}")
        h, w = output_size(h, kernel, 1, padding), output_size(w, kernel, 1, padding)
        if batch_norm:
            layer = BatchNorm(layer, parameter(f"bn{i}.gamma", np.ones(filters)),
                              parameter(f"bn{i}.beta", np.zeros(filters)), name=f"bn{i}")
        layer = ReLU(layer, name=f"relu{i}")
        layer = MaxPool2D(layer, pool, name=f"pool{i}")
        h, w, c = h // pool, w // pool, filters
        if min(h, w) < 1:
            raise GraphError(f"the cnn's feature map vanishes after block {i + 1} of {len(channels)} ({input_shape} in, "
                             f"channels {channels}, kernel {kernel}, padding {padding}, pool {pool}); "
                             "use fewer channels entries, padding=1, or pool=1")
    layer = Flatten(layer, name="flatten")
    features = c * h * w
    for i, (fan_in, fan_out) in enumerate([(features, dense), (dense, n_classes)]):
        W = parameter(f"fc{i}.W", init_weights(rng, fan_in, fan_out, "relu"))
        b = parameter(f"fc{i}.b", np.zeros(fan_out))
        layer = Linear(layer, W, b, name=f"fc{i}")
        if i == 0:
            layer = ReLU(layer, name=f"relu{len(channels)}")
            if dropout > 0:
                layer = Dropout(layer, dropout, seed=int(rng.integers(2**63)), name="dropout")
    loss = SoftmaxCrossEntropy(labels, layer, name="loss")
    return Model(data, labels, layer, loss, params)


cnn.input_layout = "images"  # (C, H, W) examples; flat rows of a square image work too
BUILDERS = {"mlp": mlp, "cnn": cnn}
