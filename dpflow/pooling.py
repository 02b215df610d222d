"""Pooling over image positions: MaxPool2D and GlobalAveragePool. numpy only, no MPI.

NCHW at the interface, channels last in memory (see layout.py). Max pooling walks the
k_h * k_w offsets of its window, each one a strided view of the whole batch: a loop over
the window, never over rows or positions.
"""

import numpy as np

from .graph import Layer
from .layers import _shape_error
from .layout import nhwc


class MaxPool2D(Layer):
    """z[n, c, i, j] = max over the window (i*s .. i*s + k - 1, j*s .. j*s + k - 1) of X[n, c]

    `size` is the window (an int or (k_h, k_w)); `stride` defaults to the window, so that
    windows tile the image; rows and columns left over at the far edges are dropped (floor),
    as in PyTorch. The gradient goes to the first maximum of each window only (ties are
    common after ReLU, and each window must pass its gradient on once).
    """

    def __init__(self, inbound, size=2, stride=None, name=None):
        super().__init__([inbound], name=name)
        self.k_h, self.k_w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
        self.stride = int(stride) if stride is not None else None
        if min(self.k_h, self.k_w) < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"MaxPool2D {name or ''}: size and stride must be >= 1, "
                             f"got size={size}, stride={stride}")

    def window_views(self, x, out_h, out_w):
        """For each offset (di, dj) of the window, the (batch, out_h, out_w, C) view of x it reads."""
        s_h = self.stride or self.k_h
        s_w = self.stride or self.k_w
        return [x[:, di:di + s_h * (out_h - 1) + 1:s_h, dj:dj + s_w * (out_w - 1) + 1:s_w, :]
                for di in range(self.k_h) for dj in range(self.k_w)]

    def forward(self):
        X = self.inbound_layers[0].value
        if X.ndim != 4:
            raise _shape_error(self, f"input of shape {X.shape} is not a batch of images",
                               "MaxPool2D takes (batch, channels, height, width); put it after a Conv2D "
                               "or a Reshape to images")
        n, c, h, w = X.shape
        s_h, s_w = self.stride or self.k_h, self.stride or self.k_w
        out_h, out_w = (h - self.k_h) // s_h + 1, (w - self.k_w) // s_w + 1
        if out_h < 1 or out_w < 1:
            raise _shape_error(self, f"a {self.k_h}x{self.k_w} window does not fit an image of {h}x{w}",
                               "use a smaller window, pad the convolution before it, or pool less")
        views = self.window_views(nhwc(X), out_h, out_w)
        z = self.scratch("value", (n, out_h, out_w, c), X.dtype)
        if len(views) == 1:
            np.copyto(z, views[0])
        else:
            np.maximum(views[0], views[1], out=z)
            for view in views[2:]:
                np.maximum(z, view, out=z)
        self.value = z.transpose(0, 3, 1, 2)  # NCHW view, NHWC memory

    def backward(self):
        X_layer = self.inbound_layers[0]
        X = X_layer.value
        z = nhwc(self.value)
        n, out_h, out_w, c = z.shape
        dX = self.gradient_target(X_layer, X.shape, z.dtype, channels_last=True)
        dx = nhwc(dX)
        grad = self.output_gradient()
        s_h, s_w = self.stride or self.k_h, self.stride or self.k_w
        tiles = s_h == self.k_h and s_w == self.k_w and X.shape[2] == out_h * s_h and X.shape[3] == out_w * s_w
        disjoint = s_h >= self.k_h and s_w >= self.k_w
        if grad is None or not tiles:
            dx.fill(0)  # positions no window reads (or no gradient at all) get 0
        if grad is None:
            self.gradients[X_layer] = dX
            return
        g = nhwc(grad)  # (batch, out_h, out_w, C)
        first = self.scratch("first", z.shape, bool)  # this offset holds the window's first maximum
        claimed = self.scratch("claimed", z.shape, bool)  # an earlier offset held it
        views = self.window_views(nhwc(X), out_h, out_w)
        targets = self.window_views(dx, out_h, out_w)
        for index, (view, target) in enumerate(zip(views, targets)):
            np.equal(view, z, out=first)
            if index:
                np.greater(first, claimed, out=first)  # first and not claimed
                np.logical_or(claimed, first, out=claimed)
            else:
                np.copyto(claimed, first)
            if disjoint:
                np.multiply(g, first, out=target)
            else:  # overlapping windows: a position may collect from several
                target += np.multiply(g, first, out=self.scratch("part", z.shape, z.dtype))
        self.gradients[X_layer] = dX


class GlobalAveragePool(Layer):
    """z[n, c] = mean over (i, j) of X[n, c, i, j]: one value per channel, any image size."""

    def __init__(self, inbound, name=None):
        super().__init__([inbound], name=name)

    def forward(self):
        X = self.inbound_layers[0].value
        if X.ndim != 4 or X.shape[2] * X.shape[3] == 0:
            raise _shape_error(self, f"input of shape {X.shape} is not a batch of non-empty images",
                               "GlobalAveragePool takes (batch, channels, height, width)")
        n, c, h, w = X.shape
        z = np.sum(nhwc(X), axis=(1, 2), out=self.scratch("value", (n, c), X.dtype))  # (batch, C)
        z *= X.dtype.type(1.0 / (h * w))
        self.value = z

    def backward(self):
        """dz/dX[n, c, i, j] = 1 / (h * w)"""
        X_layer = self.inbound_layers[0]
        X = X_layer.value
        dX = self.gradient_target(X_layer, X.shape, self.value.dtype, channels_last=True)
        grad = self.output_gradient()
        if grad is None:
            dX.fill(0)
        else:
            np.multiply(grad[:, None, None, :], self.value.dtype.type(1.0 / (X.shape[2] * X.shape[3])),
                        out=nhwc(dX))
        self.gradients[X_layer] = dX
