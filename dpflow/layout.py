"""Memory layout of image batches: NCHW at every interface, NHWC (channels last) in memory.

Image layers take and give arrays of shape (batch, channels, height, width), as PyTorch
does. Inside, a convolution is one matrix multiply of (batch * out_h * out_w, k * k * C)
patches by (k * k * C, filters) weights, whose result is already channels last; so a
layer hands on `nhwc_array.transpose(0, 3, 1, 2)`: the NCHW shape, the NHWC memory, no
copy. The next layer asks `nhwc(x)` for the channels-last view, contiguous again, and an
element-wise layer keeps the layout by allocating with `empty_like_layout`. Flatten is the
one place that copies into NCHW order, so dense weights see the features in the documented
(channel, row, column) order. numpy only.
"""

import numpy as np


def is_channels_last(x):
    """True for a 4-d NCHW-shaped array whose memory is NHWC (and not also plain C order)."""
    return (x.ndim == 4 and not x.flags.c_contiguous
            and x.transpose(0, 2, 3, 1).flags.c_contiguous)


def nhwc(x):
    """The (batch, height, width, channels) view of an NCHW-shaped array (contiguous when
    `x` is channels last, or has one channel)."""
    return x.transpose(0, 2, 3, 1)


def empty_nchw(shape, dtype, channels_last):
    """An uninitialised NCHW-shaped array, stored channels last when asked."""
    if channels_last and len(shape) == 4:
        n, c, h, w = shape
        return np.empty((n, h, w, c), dtype).transpose(0, 3, 1, 2)
    return np.empty(shape, dtype)
