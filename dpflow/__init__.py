"""dpflow: MiniFlow's graph of layers, trained data-parallel with one fused MPI allreduce.

    from dpflow import Input, Linear, Sigmoid, MSE, topological_sort, forward_and_backward, sgd_update
"""

__version__ = "0.1.0"

# Importing dpflow changes nothing in the caller's process: BLAS thread pools are sized when
# an MPI communicator is created (see _threads.py).
from .graph import (
    GraphError, Input, Layer, backward_pass, feed, forward_and_backward, forward_pass,
    sgd_update, sort_layers, topological_sort,
)
from .layers import MSE, Activation, Linear, Loss, ReLU, Sigmoid, SoftmaxCrossEntropy, Tanh
from .batchnorm import BatchNorm
from .conv import Conv2D
from .dropout import Dropout
from .model import MLP, Model
from .pooling import GlobalAveragePool, MaxPool2D
from .reshape import Flatten, Reshape
from .residual import Add
from .api import fit
from .predict import load_model
from .parallel import DataParallel

__all__ = [
    "Activation", "Add", "BatchNorm", "Conv2D", "Dropout", "Flatten", "GlobalAveragePool",
    "GraphError", "Input", "Layer", "Linear", "Loss", "MLP", "MSE", "MaxPool2D", "Model", "ReLU",
    "Reshape", "Sigmoid", "SoftmaxCrossEntropy", "Tanh", "backward_pass", "feed",
    "forward_and_backward", "forward_pass", "sgd_update", "sort_layers", "topological_sort",
    "DataParallel", "fit", "load_model",
]
