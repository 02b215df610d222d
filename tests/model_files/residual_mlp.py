"""A user's model file: a residual MLP with batch norm and dropout, and a layer of its own
written MiniFlow style. Trained by the tests with `dpflow train --model THIS_FILE:build`."""

import numpy as np

from dpflow import Add, BatchNorm, Dropout, Input, Layer, Linear, Model, ReLU, SoftmaxCrossEntropy


class Scale(Layer):
    """z = s * x, written as the MiniFlow tutorial writes layers."""

    def __init__(self, inbound, s):
        Layer.__init__(self, [inbound])
        self.s = s

    def forward(self):
        self.value = self.inbound_layers[0].value * self.s

    def backward(self):
        self.gradients = {n: np.zeros_like(n.value) for n in self.inbound_layers}
        for n in self.outbound_layers:
            self.gradients[self.inbound_layers[0]] += n.gradients[self] * self.s


def build(input_shape, n_classes, rng, dtype, width=16, dropout=0.2):
    n_in = int(np.prod(input_shape))
    params = {}

    def param(name, value):
        params[name] = Input(np.asarray(value, dtype), name=name)
        return params[name]

    x, labels = Input(name="x"), Input(name="labels")
    h = Linear(x, param("in.W", rng.normal(0, np.sqrt(2 / n_in), (n_in, width))), param("in.b", np.zeros(width)))
    h = ReLU(BatchNorm(h, param("bn.gamma", np.ones(width)), param("bn.beta", np.zeros(width)), name="bn"))
    branch = Linear(h, param("res.W", rng.normal(0, np.sqrt(2 / width), (width, width))), param("res.b", np.zeros(width)))
    branch = Dropout(ReLU(branch), dropout, seed=int(rng.integers(2**63)))
    h = Scale(Add(h, branch), 0.5)
    logits = Linear(h, param("out.W", rng.normal(0, np.sqrt(1 / width), (width, n_classes))),
                    param("out.b", np.zeros(n_classes)))
    return Model(x, labels, logits, SoftmaxCrossEntropy(labels, logits), params)
