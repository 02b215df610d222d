"""Wiring only: an MLP graph from layer sizes, with named, reproducibly initialised parameters."""

import numpy as np

from .graph import Input, sort_layers
from .layers import Linear, ReLU, Sigmoid, SoftmaxCrossEntropy, Tanh

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


def init_weights(rng, fan_in, fan_out, activation):
    """He normal for ReLU, Glorot (Xavier) uniform otherwise; float64, cast by the caller."""
    if activation == "relu":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out))


class MLP:
    """inputs -> [Linear -> activation] * len(hidden) -> Linear -> SoftmaxCrossEntropy.

    `params` maps names (`fc0.W`, `fc0.b`, ...) to the parameter Inputs, in sorted-name
    order; `graph` is the sorted layer list, whose last layer is the loss.
    """

    def __init__(self, n_inputs, hidden, n_classes, activation="relu", seed=0, dtype=np.float32):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.sizes = [int(n_inputs), *map(int, hidden), int(n_classes)]
        self.activation = activation
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        self.inputs = Input(name="inputs", requires_grad=False)
        self.labels = Input(name="labels", requires_grad=False)
        params = {}
        layer = self.inputs
        n_layers = len(self.sizes) - 1
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            W = Input(init_weights(rng, fan_in, fan_out, activation).astype(self.dtype), name=f"fc{i}.W")
            b = Input(np.zeros(fan_out, self.dtype), name=f"fc{i}.b")
            params[W.name], params[b.name] = W, b
            layer = Linear(layer, W, b, name=f"fc{i}")
            if i < n_layers - 1:
                layer = ACTIVATIONS[activation](layer, name=f"{activation}{i}")
        self.logits = layer
        self.loss = SoftmaxCrossEntropy(self.labels, self.logits, name="loss")
        self.params = {name: params[name] for name in sorted(params)}
        self.graph = sort_layers([self.inputs, self.labels, *self.params.values()])
        assert self.graph[-1] is self.loss

    def parameter_count(self):
        return sum(p.value.size for p in self.params.values())
