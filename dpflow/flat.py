"""Parameters and gradients as views into two contiguous buffers. numpy only.

Packing is in sorted-name order, so every rank computes the same offsets without talking.
One buffer means one allreduce, one broadcast, one vectorised optimizer update and one
checksum, with no copies in or out.
"""

import math

import numpy as np


class FlatParameters:
    """`values` holds every parameter, `grads` every gradient, as one array each.

    After construction each parameter's `value` *is* a view into `values` and its gradient
    a view into `grads`; writing either buffer changes the graph's arrays. `grads` may carry
    `extra_slots` trailing entries that ride along with the gradient allreduce (the trainer
    uses them for the loss sum and the stop flag); `param_grads` excludes them. `zeros(size,
    dtype)` allocates `grads` (a communicator's `summable_zeros` puts it where it sums fastest).
    """

    def __init__(self, params, dtype, extra_slots=0, zeros=np.zeros):
        self.names = sorted(params)
        self.shapes = {name: tuple(params[name].value.shape) for name in self.names}
        self.slices = {}
        offset = 0
        for name in self.names:
            size = int(np.prod(self.shapes[name], dtype=np.int64))
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.size = offset
        self.dtype = np.dtype(dtype)
        self.values = np.empty(self.size, self.dtype)
        self.grads = zeros(self.size + extra_slots, self.dtype)  # the communicator's, to sum fast
        self.param_grads = self.grads[: self.size]
        self.extra = self.grads[self.size:]
        self.params = {name: params[name] for name in self.names}
        for name, param in self.params.items():
            view = self.view(self.values, name)
            view[...] = param.value
            param.value = view
            param.bind_gradient(self.view(self.grads, name))

    def move_grads(self, grads):
        """Make `grads`, a copy of the gradient buffer in other memory, the gradient buffer: the
        parameters' gradients, and their consumers' views of them from the last backward, point
        into it, so that the old buffer may be freed."""
        old, self.grads = self.grads, grads
        self.param_grads, self.extra = grads[: self.size], grads[self.size:]
        for name, param in self.params.items():
            view = self.view(grads, name)
            param.bind_gradient(view)
            for layer in param.outbound_layers:
                if param in layer.gradients and np.shares_memory(layer.gradients[param], old):
                    layer.gradients[param] = view

    def view(self, buffer, name):
        """The part of a flat buffer that belongs to parameter `name`, in its shape."""
        return buffer[self.slices[name]].reshape(self.shapes[name])

    def as_dict(self, buffer=None):
        """name -> array view of `buffer` (the parameter values by default)."""
        buffer = self.values if buffer is None else buffer
        return {name: self.view(buffer, name) for name in self.names}

    def grad_views(self):
        """The gradient of each parameter, in packing order (for the per-parameter reducer)."""
        return [self.view(self.grads, name) for name in self.names]


def squared_norm(buffer):
    """sum(buffer ** 2) as a float, in one BLAS pass; inf or NaN when an entry is, or when the
    squares overflow."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is expected, and handled
        return float(np.dot(buffer, buffer))


def all_finite(buffer, squared=None):
    """True when no entry of `buffer` is NaN or infinite; exact, so every rank holding the
    same bytes gets the same answer. `squared`: `squared_norm(buffer)`, if already known.

    One BLAS dot product (one pass over memory) settles the common case: a NaN or an inf
    anywhere makes it non-finite in any summation order, so a finite result proves every
    entry finite. Only when it is not (a bad entry, or squares that overflow) do max and min
    decide, exactly: two more passes, on the rare step that needs them.
    """
    if buffer.size == 0:
        return True
    if math.isfinite(squared_norm(buffer) if squared is None else squared):
        return True
    return math.isfinite(float(buffer.max())) and math.isfinite(float(buffer.min()))
