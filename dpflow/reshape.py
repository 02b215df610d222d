"""Flatten and Reshape: the same numbers in another shape, the batch axis kept. numpy only."""

import numpy as np

from .graph import Layer
from .layers import _shape_error


class Reshape(Layer):
    """z = X.reshape(batch, *shape), reading X in NCHW (C) order whatever its memory layout.

    A C-ordered input is reshaped without a copy; a channels-last image batch is copied once
    into C order, so that the features are always in the documented (channel, row, column)
    order. The gradient is the output's gradient in the input's shape.
    """

    def __init__(self, inbound, shape, name=None):
        super().__init__([inbound], name=name)
        self.shape = tuple(int(size) for size in shape)

    def target_shape(self, X):
        return self.shape

    def forward(self):
        X = self.inbound_layers[0].value
        if X.ndim < 1:
            raise _shape_error(self, "its input is a scalar", "feed a batch: an array whose first axis is the rows")
        shape = self.target_shape(X)
        per_row = int(np.prod(X.shape[1:], dtype=np.int64))
        if int(np.prod(shape, dtype=np.int64)) != per_row:
            raise _shape_error(
                self, f"rows of shape {X.shape[1:]} ({per_row} values) cannot become {shape}",
                f"give a shape of {per_row} values per row",
            )
        if not X.flags.c_contiguous:
            ordered = self.scratch("c_order", X.shape, X.dtype)
            np.copyto(ordered, X)
            X = ordered
        self.value = X.reshape(X.shape[0], *shape)

    def backward(self):
        X_layer = self.inbound_layers[0]
        shape = X_layer.value.shape
        grad = self.output_gradient()
        if grad is None:
            target = self.gradient_target(X_layer, shape, self.value.dtype)
            target.fill(0)
            self.gradients[X_layer] = target
        else:
            self.gradients[X_layer] = grad.reshape(shape)  # a view when grad is C-ordered


class Flatten(Reshape):
    """z = X.reshape(batch, -1): each row as one vector, in (channel, row, column) order."""

    def __init__(self, inbound, name=None):
        super().__init__(inbound, (), name=name)

    def target_shape(self, X):
        return (int(np.prod(X.shape[1:], dtype=np.int64)),)
