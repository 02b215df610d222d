"""A user's model file: a small CNN (convolution, batch norm, pooling, global average
pooling, dropout) for square grey images given as rows of pixels."""

import math

import numpy as np

from dpflow import (
    BatchNorm, Conv2D, Dropout, GlobalAveragePool, Input, Linear, MaxPool2D, Model, ReLU, Reshape,
    SoftmaxCrossEntropy,
)


def build(input_shape, n_classes, rng, dtype, filters=4):
    side = math.isqrt(int(np.prod(input_shape)))
    params = {}

    def param(name, value):
        params[name] = Input(np.asarray(value, dtype), name=name)
        return params[name]

    x, labels = Input(name="x"), Input(name="labels")
    h = Reshape(x, (1, side, side))
    h = Conv2D(h, param("c1.W", rng.normal(0, np.sqrt(2 / 9), (3, 3, 1, filters))), param("c1.b", np.zeros(filters)),
               padding=1)
    h = ReLU(BatchNorm(h, param("bn.gamma", np.ones(filters)), param("bn.beta", np.zeros(filters)), name="bn"))
    h = MaxPool2D(h, 2)
    h = Conv2D(h, param("c2.W", rng.normal(0, np.sqrt(2 / (9 * filters)), (3, 3, filters, 2 * filters))),
               param("c2.b", np.zeros(2 * filters)), padding=1)
    h = Dropout(GlobalAveragePool(ReLU(h)), 0.25, seed=int(rng.integers(2**63)))
    logits = Linear(h, param("out.W", rng.normal(0, np.sqrt(1 / (2 * filters)), (2 * filters, n_classes))),
                    param("out.b", np.zeros(n_classes)))
    return Model(x, labels, logits, SoftmaxCrossEntropy(labels, logits), params)
