"""Add: the sum of several layers of one shape, the join of a residual connection. numpy only."""

import numpy as np

from .graph import Layer
from .layers import _shape_error


class Add(Layer):
    """z = a + b (+ ...): every input gets the output's gradient unchanged, dz/da = dz/db = 1."""

    def __init__(self, *inbound, name=None):
        if len(inbound) < 2:
            raise ValueError(f"Add {name or ''} needs at least two inputs, got {len(inbound)}")
        super().__init__(inbound, name=name)

    def forward(self):
        values = [layer.value for layer in self.inbound_layers]
        first = values[0]
        for layer, value in zip(self.inbound_layers[1:], values[1:]):
            if value.shape != first.shape:
                raise _shape_error(
                    self, f"{layer!r} gives shape {value.shape}, {self.inbound_layers[0]!r} gives {first.shape}",
                    "every input of Add needs the same shape (project the shortcut with a Linear "
                    "or a 1x1 Conv2D when the sizes differ)",
                )
        z = np.add(values[0], values[1], out=self.scratch_like("value", first, np.result_type(*values)))
        for value in values[2:]:
            z += value
        self.value = z

    def backward(self):
        grad = self.output_gradient()
        if grad is None:
            grad = np.zeros_like(self.value)
        # The same array for every input: consumers only read gradients. An input given twice
        # (Add(x, x)) is listed twice among x's consumers and so receives the gradient twice.
        for layer in self.inbound_layers:
            self.gradients[layer] = grad
