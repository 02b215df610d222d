"""The MiniFlow graph: layers, inputs, a deterministic topological sort, forward and backward.

numpy only. A layer reads `inbound.value` for each inbound layer, sets `self.value` in
`forward()`, and in `backward()` fills `self.gradients[inbound]` with d(loss)/d(inbound.value),
summing what its outbound layers sent back to it.
"""

from collections import deque

import numpy as np

from .errors import GraphError
from .layout import empty_nchw, is_channels_last


class Layer:
    """A node of the graph: `inbound_layers` feed it, `outbound_layers` consume its `value`.

    `training` is the mode: layers that behave differently in evaluation (Dropout,
    BatchNorm) read it; `Model.train()` and `Model.eval()` set it on every layer.
    """

    training = True

    def __init__(self, inbound_layers=(), name=None):
        self.inbound_layers = list(inbound_layers)
        self.outbound_layers = []
        self.value = None
        self.gradients = {}
        self.name = name
        # Scratch arrays reused across steps, keyed by role and shape: fresh multi-megabyte
        # temporaries page-fault on every step (measured on a 2-core machine: 6.1 ms against 3.8 ms per step).
        self._scratch = {}
        for layer in self.inbound_layers:
            layer.outbound_layers.append(self)

    def __repr__(self):
        label = f" {self.name!r}" if self.name else ""
        return f"<{type(self).__name__}{label}>"

    def forward(self):
        raise NotImplementedError

    def backward(self):
        raise NotImplementedError

    def scratch(self, role, shape, dtype, channels_last=False):
        """A reusable array for `role`; allocated once per (role, shape, dtype, layout).

        `channels_last` stores a 4-d NCHW-shaped array as NHWC (see layout.py)."""
        shape = tuple(shape)
        channels_last = bool(channels_last) and len(shape) == 4
        key = (role, shape, np.dtype(dtype), channels_last)
        array = self._scratch.get(key)
        if array is None:
            array = self._scratch[key] = empty_nchw(shape, dtype, channels_last)
        return array

    def ones(self, n, dtype):
        """A vector of n ones, made once (sums over rows as matrix-vector products)."""
        key = ("ones", n, np.dtype(dtype))
        array = self._scratch.get(key)
        if array is None:
            array = self._scratch[key] = np.ones(n, dtype)
        return array

    def scratch_like(self, role, x, dtype=None):
        """A reusable array with the shape and memory layout of `x`."""
        return self.scratch(role, x.shape, x.dtype if dtype is None else dtype, is_channels_last(x))

    def gradient_target(self, inbound, shape, dtype, channels_last=False):
        """Where to write d(loss)/d(inbound.value).

        A parameter bound to a flat gradient buffer with this layer as its only consumer gets
        its gradient written straight into that buffer: no copy on the hot path.
        """
        bound = getattr(inbound, "bound_gradient", None)
        if bound is not None and len(inbound.outbound_layers) == 1 and bound.shape == shape:
            return bound
        return self.scratch(("grad", id(inbound)), shape, dtype, channels_last)

    def output_gradient(self):
        """d(loss)/d(self.value), summed over every outbound layer; None when nothing consumes it."""
        grads = [layer.gradients[self] for layer in self.outbound_layers if self in layer.gradients]
        if not grads:
            return None
        if len(grads) == 1:
            return grads[0]
        total = self.scratch("grad_sum", grads[0].shape, grads[0].dtype)
        np.copyto(total, grads[0])
        for grad in grads[1:]:
            total += grad
        return total


class Input(Layer):
    """A value fed from outside: data, labels, or a parameter (an Input with a name).

    MiniFlow style: `Input()` then `topological_sort(feed_dict)` sets its value.
    dpflow style: `Input(value, name="fc0.W")` for a parameter.
    """

    def __init__(self, value=None, name=None, requires_grad=True):
        super().__init__(name=name)
        self.value = value
        # Data inputs set this False so that the first Linear skips `grad @ W.T`, the
        # largest matrix multiply of the backward pass, whose result nobody reads.
        self.requires_grad = requires_grad
        self.bound_gradient = None

    def forward(self, value=None):
        if value is not None:
            self.value = value

    def bind_gradient(self, array):
        """Make `self.gradients[self]` this array (a view into a flat gradient buffer)."""
        self.bound_gradient = array
        self.gradients[self] = array

    def backward(self):
        if not self.requires_grad:
            return
        grads = [layer.gradients[self] for layer in self.outbound_layers if self in layer.gradients]
        target = self.bound_gradient
        if target is None:
            if not grads:
                self.gradients[self] = np.zeros_like(self.value)
                return
            target = self.scratch("grad", grads[0].shape, grads[0].dtype)
            self.gradients[self] = target
        if len(grads) == 1 and grads[0] is target:
            return  # the consumer wrote into the flat buffer directly
        if not grads:
            target.fill(0)
            return
        np.copyto(target, grads[0])
        for grad in grads[1:]:
            target += grad


def sort_layers(input_layers):
    """Kahn's algorithm over every layer reachable from `input_layers`.

    Deterministic: ties are broken by discovery order (inputs in the order given, then
    `outbound_layers` in construction order), never by `id()` or set order, so every rank
    builds the same list.
    """
    inbound_count = {}
    discovered = list(input_layers)
    index = 0
    seen = set(map(id, discovered))
    while index < len(discovered):
        layer = discovered[index]
        index += 1
        inbound_count.setdefault(layer, 0)
        for inbound in layer.inbound_layers:
            if id(inbound) not in seen:
                seen.add(id(inbound))
                discovered.append(inbound)
        for outbound in layer.outbound_layers:
            if id(outbound) not in seen:
                seen.add(id(outbound))
                discovered.append(outbound)
    for layer in discovered:
        inbound_count[layer] = len(layer.inbound_layers)
    ready = deque(layer for layer in discovered if inbound_count[layer] == 0)
    ordered = []
    while ready:
        layer = ready.popleft()
        ordered.append(layer)
        for outbound in layer.outbound_layers:
            inbound_count[outbound] -= 1
            if inbound_count[outbound] == 0:
                ready.append(outbound)
    if len(ordered) != len(discovered):
        stuck = [repr(layer) for layer in discovered if inbound_count[layer] > 0]
        raise GraphError(
            f"the graph has a cycle through {', '.join(stuck)}; "
            "a layer must not feed (directly or indirectly) one of its own inputs"
        )
    return ordered


def feed(feed_dict):
    """Set each Input's value from `feed_dict`, keeping the array itself (and its dtype)."""
    for layer, value in feed_dict.items():
        if not isinstance(layer, Input):
            raise GraphError(f"feed_dict keys must be Input layers, got {layer!r}")
        array = np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise GraphError(
                f"the value fed to {layer!r} has {np.count_nonzero(~np.isfinite(array))} "
                "non-finite entries (NaN or inf); clean or impute the data before feeding it"
            )
        layer.value = array


def topological_sort(feed_dict):
    """MiniFlow's entry point: sort the graph reachable from the fed Inputs, then feed them."""
    graph = sort_layers(list(feed_dict))
    feed(feed_dict)
    return graph


def forward_pass(graph):
    """Run `forward()` in sorted order; the last layer's value is the output (the loss)."""
    for layer in graph:
        layer.forward()
    return graph[-1].value


def backward_pass(graph):
    """Run `backward()` in reverse sorted order."""
    for layer in reversed(graph):
        layer.backward()


def forward_and_backward(graph):
    """One forward pass then one backward pass (MiniFlow's name)."""
    forward_pass(graph)
    backward_pass(graph)


def sgd_update(trainables, learning_rate=1e-2):
    """MiniFlow's update: value -= learning_rate * gradient, in place."""
    for trainable in trainables:
        trainable.value -= learning_rate * trainable.gradients[trainable]
