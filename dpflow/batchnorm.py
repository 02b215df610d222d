"""BatchNorm over the GLOBAL batch: N ranks normalise exactly as one process. numpy only, no MPI.

A rank sees only its rows, but the statistics must be those of the whole global batch, or
N ranks train another model than one process. So the layer sums what it needs over its
rows and hands the sums to `reduce_sum`, a function that sums an array in place over every
rank: once in forward (count, sum, sum of squares per channel), once in backward (the sum
of the output gradient and of its product with the normalised input). The trainer sets
`reduce_sum` to its communicator's allreduce; the default, the identity, is right for one
process and MiniFlow-style use. A rank with 0 rows contributes zeros. PyTorch's
SyncBatchNorm does the same with one gather and one sum; sums are enough here.
"""

import numpy as np

from .graph import Layer
from .layers import _shape_error
from .layout import nhwc


def identity(array):
    """The reduction of a single process: the sums are already global."""
    return array


class BatchNorm(Layer):
    """z = gamma * (X - mean) / sqrt(var + eps) + beta, per channel of an image batch
    (statistics over batch, height and width) or per feature of a (batch, features) matrix.

    Training uses the global batch's mean and (biased) variance, and moves the running
    statistics towards them by `momentum` (the running variance is unbiased, as in PyTorch);
    evaluation uses the running statistics. The running statistics are state, not
    parameters: `state_arrays()` names them for checkpoints, and they are identical on every
    rank because they are computed from reduced sums.
    """

    def __init__(self, inbound, gamma, beta, momentum=0.1, eps=1e-5, name=None):
        super().__init__([inbound, gamma, beta], name=name)
        if not 0.0 <= float(momentum) <= 1.0 or float(eps) <= 0.0:
            raise ValueError(f"BatchNorm {name or ''}: momentum must be in [0, 1] and eps > 0, "
                             f"got momentum={momentum}, eps={eps}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.reduce_sum = identity
        channels = np.shape(gamma.value)[0] if gamma.value is not None else 0
        self.running_mean = np.zeros(channels, np.float64)
        self.running_var = np.ones(channels, np.float64)

    def state_arrays(self):
        """The non-trainable state a checkpoint must keep (float64, live arrays)."""
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def channel_rows(self, X, role):
        """X as a (rows, channels) matrix: a view for (batch, features) and channels-last images."""
        if X.ndim == 2:
            return X
        x = nhwc(X)
        if x.flags.c_contiguous:
            return x.reshape(-1, X.shape[1])
        rows = self.scratch(role, x.shape, X.dtype)
        np.copyto(rows, x)
        return rows.reshape(-1, X.shape[1])

    def as_input_shape(self, rows, X):
        """A (rows, channels) result in X's NCHW shape (channels last in memory for images)."""
        if X.ndim == 2:
            return rows
        n, c, h, w = X.shape
        return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)

    def forward(self):
        X, gamma, beta = (layer.value for layer in self.inbound_layers)
        if X.ndim not in (2, 4) or gamma.shape != (X.shape[1],) or beta.shape != (X.shape[1],):
            raise _shape_error(
                self, f"input of shape {X.shape} does not fit gamma {gamma.shape} and beta {beta.shape}",
                "BatchNorm takes (batch, features) or (batch, channels, height, width), with gamma "
                "and beta of shape (features,) or (channels,)",
            )
        dtype = np.result_type(X, gamma)
        x = self.channel_rows(X, "x_rows")  # (rows, C)
        c = x.shape[1]
        if self.running_mean.shape != (c,):  # gamma was fed after construction (MiniFlow style)
            self.running_mean, self.running_var = np.zeros(c), np.ones(c)
        if self.training:
            sums = self.scratch("sums", (1 + 2 * c,), np.float64)  # count, sum x, sum x^2
            sums[0] = x.shape[0]
            np.sum(x, axis=0, dtype=np.float64, out=sums[1:1 + c])
            square = np.multiply(x, x, out=self.scratch("square", x.shape, x.dtype))
            np.sum(square, axis=0, dtype=np.float64, out=sums[1 + c:])
            self.reduce_sum(sums)  # over every rank's rows: the global batch
            count = sums[0]
            if count < 1:
                raise _shape_error(self, "the global batch has no rows", "train on at least one row")
            mean = sums[1:1 + c] / count
            var = np.maximum(sums[1 + c:] / count - mean * mean, 0.0)  # (C,) float64
            self.count = count
            m = self.momentum
            self.running_mean *= 1 - m
            self.running_mean += m * mean
            self.running_var *= 1 - m
            self.running_var += m * var * (count / max(count - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        invstd = 1.0 / np.sqrt(var + self.eps)
        self.invstd = invstd.astype(dtype)
        xhat = np.subtract(x, mean.astype(dtype), out=self.scratch("xhat", x.shape, dtype))
        xhat *= self.invstd
        self.xhat = xhat  # (rows, C)
        z = np.multiply(xhat, gamma, out=self.scratch("z", x.shape, dtype))
        z += beta
        self.value = self.as_input_shape(z, X)

    def backward(self):
        """With g = dL/dz, m the global row count and sums over the GLOBAL batch:
        dL/dbeta = sum g, dL/dgamma = sum g * xhat, and in training
        dL/dX = gamma * invstd * (g - sum(g) / m - xhat * sum(g * xhat) / m)."""
        X_layer, gamma_layer, beta_layer = self.inbound_layers
        X, gamma = X_layer.value, gamma_layer.value
        xhat = self.xhat
        rows, c = xhat.shape
        grad = self.output_gradient()
        if grad is None:
            g = np.zeros_like(xhat)
        else:
            g = self.channel_rows(grad, "grad_rows") if grad.ndim == 4 else grad  # (rows, C)
        g_xhat = np.multiply(g, xhat, out=self.scratch("g_xhat", xhat.shape, xhat.dtype))
        # This rank's sums: the parameter gradients, which the trainer's allreduce sums.
        self.gradients[beta_layer] = np.sum(g, axis=0, out=self.gradient_target(beta_layer, (c,), xhat.dtype))
        self.gradients[gamma_layer] = np.sum(g_xhat, axis=0,
                                             out=self.gradient_target(gamma_layer, (c,), xhat.dtype))
        if not getattr(X_layer, "requires_grad", True):
            return
        dx = self.scratch("dx", xhat.shape, xhat.dtype)
        if self.training:
            sums = self.scratch("grad_sums", (2 * c,), np.float64)  # sum g, sum g * xhat
            np.sum(g, axis=0, dtype=np.float64, out=sums[:c])
            np.sum(g_xhat, axis=0, dtype=np.float64, out=sums[c:])
            self.reduce_sum(sums)  # over every rank's rows, as in forward
            np.multiply(xhat, (sums[c:] / self.count).astype(xhat.dtype), out=dx)
            np.subtract(g, dx, out=dx)
            dx -= (sums[:c] / self.count).astype(xhat.dtype)
        else:
            np.copyto(dx, g)
        dx *= gamma * self.invstd
        self.gradients[X_layer] = self.as_input_shape(dx, X)
