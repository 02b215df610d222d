"""dpflow: MiniFlow's graph of layers, trained data-parallel with one fused MPI allreduce.

    from dpflow import Input, Linear, Sigmoid, MSE, topological_sort, forward_and_backward, sgd_update
"""

__version__ = "0.1.0"

import sys as _sys

if "numpy" not in _sys.modules:  # thread pools are sized when numpy's BLAS loads
    from ._threads import configure_blas_threads as _configure

    _configure()

from .graph import (  # noqa: E402
    GraphError, Input, Layer, backward_pass, feed, forward_and_backward, forward_pass,
    sgd_update, sort_layers, topological_sort,
)
from .layers import MSE, Activation, Linear, Loss, ReLU, Sigmoid, SoftmaxCrossEntropy, Tanh  # noqa: E402
from .batchnorm import BatchNorm  # noqa: E402
from .conv import Conv2D  # noqa: E402
from .dropout import Dropout  # noqa: E402
from .model import MLP, Model  # noqa: E402
from .pooling import GlobalAveragePool, MaxPool2D  # noqa: E402
from .reshape import Flatten, Reshape  # noqa: E402
from .residual import Add  # noqa: E402

__all__ = [
    "Activation", "Add", "BatchNorm", "Conv2D", "Dropout", "Flatten", "GlobalAveragePool",
    "GraphError", "Input", "Layer", "Linear", "Loss", "MLP", "MSE", "MaxPool2D", "Model", "ReLU",
    "Reshape", "Sigmoid", "SoftmaxCrossEntropy", "Tanh", "backward_pass", "feed",
    "forward_and_backward", "forward_pass", "sgd_update", "sort_layers", "topological_sort",
]
