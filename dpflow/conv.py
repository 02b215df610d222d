"""Conv2D: a 2-d convolution as one matrix multiply per batch (im2col). numpy only, no MPI.

Each output position sees a (k_h, k_w, C) patch of the input; laid out as the rows of one
(batch * out_h * out_w, k_h * k_w * C) matrix, the convolution is `patches @ W` with
W of shape (k_h * k_w * C, filters): exactly `Linear` applied to every patch. The patches
are gathered by one copy from a strided view of the input (no Python loop over rows or
positions), in channels-last order so that each patch row is a run of contiguous memory
(see layout.py); the result of the multiply is the output, channels last, with no copy.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .graph import Layer
from .layers import _shape_error
from .layout import nhwc


def output_size(size, kernel, stride, padding):
    """Positions of a `kernel`-wide window sliding by `stride` over `size + 2 * padding`."""
    return (size + 2 * padding - kernel) // stride + 1


def windows(x, kernel_h, kernel_w, out_h, out_w, stride):
    """The (batch, out_h, out_w, kernel_h, kernel_w, C) view of every window of an NHWC
    array: no copy; entries overlap when stride < kernel, so it is read-only."""
    s_n, s_h, s_w, s_c = x.strides
    return as_strided(x, (x.shape[0], out_h, out_w, kernel_h, kernel_w, x.shape[3]),
                      (s_n, s_h * stride, s_w * stride, s_h, s_w, s_c), writeable=False)


class Conv2D(Layer):
    """z[n, f, i, j] = b[f] + sum over (di, dj, c) of W[di, dj, c, f] * X[n, c, i*s + di - p, j*s + dj - p]

    Input and output are NCHW: (batch, channels, height, width). Weights are
    (k_h, k_w, C_in, C_out), so that `W.reshape(-1, C_out)` is the weight matrix of one
    patch, as Linear's W is of one row. `padding` adds that many zero rows and columns on
    every side; `stride` is the step between windows.
    """

    def __init__(self, inbound, weights, bias, stride=1, padding=0, name=None):
        super().__init__([inbound, weights, bias], name=name)
        if int(stride) < 1 or int(padding) < 0:
            raise ValueError(f"Conv2D {name or ''}: stride must be >= 1 and padding >= 0, "
                             f"got stride={stride}, padding={padding}")
        self.stride, self.padding = int(stride), int(padding)

    def check_shapes(self, X, W, b):
        if W.ndim != 4:
            raise _shape_error(self, f"weights of shape {W.shape} are not 4-d",
                               "give weights of shape (k_h, k_w, in_channels, out_channels)")
        k_h, k_w, c_in, c_out = W.shape
        if X.ndim != 4 or X.shape[1] != c_in:
            raise _shape_error(
                self, f"input of shape {X.shape} does not fit weights of shape {W.shape}",
                f"Conv2D takes images (batch, {c_in}, height, width); load the data as images "
                "or put a Reshape layer before it",
            )
        if b.shape != (c_out,):
            raise _shape_error(self, f"bias of shape {b.shape} does not fit weights of shape {W.shape}",
                               f"the bias needs shape ({c_out},)")
        out_h = output_size(X.shape[2], k_h, self.stride, self.padding)
        out_w = output_size(X.shape[3], k_w, self.stride, self.padding)
        if out_h < 1 or out_w < 1:
            raise _shape_error(
                self, f"a {k_h}x{k_w} kernel does not fit an image of {X.shape[2]}x{X.shape[3]} "
                f"with padding {self.padding}",
                "pad more, use a smaller kernel, or pool less before this layer",
            )
        return out_h, out_w

    def padded(self, x):
        """The NHWC input with `padding` zeros around it (the input itself when 0)."""
        p = self.padding
        if p == 0:
            return x
        n, h, w, c = x.shape
        key = ("padded", (n, h + 2 * p, w + 2 * p, c), x.dtype)
        array = self._scratch.get(key)
        if array is None:  # the border is written once and stays zero
            array = self._scratch[key] = np.zeros(key[1], x.dtype)
        array[:, p:p + h, p:p + w, :] = x
        return array

    def forward(self):
        X, W, b = (layer.value for layer in self.inbound_layers)
        out_h, out_w = self.check_shapes(X, W, b)
        k_h, k_w, c_in, c_out = W.shape
        n = X.shape[0]
        dtype = np.result_type(X, W)
        x = self.padded(nhwc(X))  # (batch, H + 2p, W + 2p, C)
        rows = n * out_h * out_w
        if k_h == k_w == 1 and self.stride == 1 and x.flags.c_contiguous and x.dtype == dtype:
            col = x.reshape(rows, c_in)  # a 1x1 convolution reads the input as it is
        elif c_in == 1:
            # One channel (grey images): a patch row would be k_w values long, so gather the
            # transpose instead, one copy of whole image rows per kernel offset (5x faster
            # here), and hand the multiply its transpose: no copy, BLAS reads it either way.
            col_t = self.scratch("col_t", (k_h, k_w, n, out_h, out_w), dtype)
            s = self.stride
            for i in range(k_h):
                for j in range(k_w):
                    col_t[i, j] = x[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, 0]
            col = col_t.reshape(k_h * k_w, rows).T
        else:
            col = self.scratch("col", (n, out_h, out_w, k_h, k_w, c_in), dtype)
            np.copyto(col, windows(x, k_h, k_w, out_h, out_w, self.stride))
            col = col.reshape(rows, k_h * k_w * c_in)
        self.col = col  # (batch * out_h * out_w, k_h * k_w * C_in)
        z = np.matmul(col, W.reshape(-1, c_out), out=self.scratch("z", (rows, c_out), dtype))
        z += b
        self.value = z.reshape(n, out_h, out_w, c_out).transpose(0, 3, 1, 2)  # NCHW view, NHWC memory

    def backward(self):
        X_layer, W_layer, b_layer = self.inbound_layers
        X, W = X_layer.value, W_layer.value
        n, c_out, out_h, out_w = self.value.shape
        k_h, k_w, c_in, _ = W.shape
        dtype = self.value.dtype
        grad = self.output_gradient()  # (batch, C_out, out_h, out_w)
        g = self.scratch("grad", (n, out_h, out_w, c_out), dtype)
        if grad is None:
            g.fill(0)
        else:
            np.copyto(g, nhwc(grad))  # no work beyond a copy when it is channels last already
        g = g.reshape(-1, c_out)  # (batch * out_h * out_w, C_out)
        dW = self.gradient_target(W_layer, W.shape, dtype)
        np.matmul(self.col.T, g, out=dW.reshape(-1, c_out))
        self.gradients[W_layer] = dW
        # The bias rule: a sum over every row and position; dpflow sums once more over ranks.
        # As ones @ g, a matrix-vector product: 9x faster than np.sum(g, axis=0) here.
        self.gradients[b_layer] = np.matmul(self.ones(g.shape[0], dtype), g,
                                            out=self.gradient_target(b_layer, (c_out,), dtype))
        if not getattr(X_layer, "requires_grad", True):
            return  # the data: nobody reads its gradient, skip the largest multiply
        dcol = np.matmul(g, W.reshape(-1, c_out).T,
                         out=self.scratch("dcol", (self.col.shape[0], k_h * k_w * c_in), dtype))
        dcol = dcol.reshape(n, out_h, out_w, k_h, k_w, c_in)
        dX = self.gradient_target(X_layer, X.shape, dtype, channels_last=True)
        p, s = self.padding, self.stride
        h, w = X.shape[2], X.shape[3]
        dx = nhwc(dX) if p == 0 else self.scratch("dpadded", (n, h + 2 * p, w + 2 * p, c_in), dtype)
        dx.fill(0)
        # col2im: each kernel offset adds its slice of the patch gradients back where it was
        # read from. A loop over the k_h * k_w offsets, each one vectorised over the batch.
        for i in range(k_h):
            for j in range(k_w):
                dx[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, :] += dcol[:, :, :, i, j, :]
        if p:
            np.copyto(nhwc(dX), dx[:, p:p + h, p:p + w, :])
        self.gradients[X_layer] = dX
