"""Dropout whose mask of a row does not depend on which rank holds the row. numpy only, no MPI.

N ranks compute what one process computes only if every row is dropped the same way
wherever it lands. So the mask is not drawn from a generator that advances with the rows a
rank happens to see: it is read from a counter-based generator (Philox, whose output at a
counter is a pure function of its key and that counter) keyed by (seed, global step), at
the counters that belong to the row's position in the GLOBAL batch. Row r of step t gets
the same bits on rank 0 of 1 as on rank 3 of 4. The trainer tells the layer the step and
the global position of this rank's first row (`set_batch_position`); used alone, the layer
counts its own forward passes as steps.
"""

import numpy as np

from .graph import Layer
from .layout import is_channels_last

BITS_PER_BLOCK = 8  # Philox4x64 gives 4 64-bit words per counter: 8 32-bit draws


def keep_mask(seed, step, first_row, rows, per_row, keep):
    """(rows, per_row) booleans, True with probability `keep`, for global rows
    first_row .. first_row + rows - 1 of `step`."""
    blocks = -(-per_row // BITS_PER_BLOCK)  # counters per row, so row r starts at r * blocks
    generator = np.random.Philox(key=[seed % 2**64, step % 2**64], counter=[first_row * blocks, 0, 0, 0])
    bits = generator.random_raw(rows * blocks * 4).view(np.uint32)
    bits = bits.reshape(rows, blocks * BITS_PER_BLOCK)[:, :per_row]
    return bits < np.uint32(min(int(keep * 2**32), 2**32 - 1))


class Dropout(Layer):
    """z = X * mask / (1 - rate) in training (mask[i] = 1 with probability 1 - rate),
    z = X in evaluation; dz/dX = mask / (1 - rate).

    `seed` picks the masks; give each Dropout of a model its own (a builder draws them from
    its `rng`), or two layers with one seed drop the same positions.
    """

    def __init__(self, inbound, rate=0.5, seed=0, name=None):
        super().__init__([inbound], name=name)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"Dropout {name or ''}: rate must be in [0, 1), got {rate}")
        self.rate, self.seed = float(rate), int(seed)
        self.position = None  # (global step, global index of this rank's first row)
        self.forward_calls = 0
        self.mask = None

    def set_batch_position(self, step, first_row):
        """The trainer's global step and the position of this rank's first row in the global batch."""
        self.position = (int(step), int(first_row))

    def forward(self):
        X = self.inbound_layers[0].value
        if not self.training or self.rate == 0.0:
            self.mask = None
            self.value = X
            return
        step, first_row = self.position if self.position is not None else (self.forward_calls, 0)
        self.forward_calls += 1
        rows = X.shape[0]
        per_row = int(np.prod(X.shape[1:], dtype=np.int64))
        keep = 1.0 - self.rate
        kept = keep_mask(self.seed, step, first_row, rows, per_row, keep)
        # The mask in the rows' logical (C) order; the product takes the input's memory layout.
        mask = self.scratch("mask", X.shape, X.dtype)
        np.multiply(kept.reshape(X.shape), X.dtype.type(1.0 / keep), out=mask)
        self.mask = mask
        self.value = np.multiply(X, mask, out=self.scratch_like("value", X))

    def backward(self):
        X_layer = self.inbound_layers[0]
        grad = self.output_gradient()
        if grad is None:
            grad = np.zeros_like(self.value)
        if self.mask is None:
            self.gradients[X_layer] = grad
            return
        target = self.gradient_target(X_layer, self.value.shape, grad.dtype, is_channels_last(self.value))
        self.gradients[X_layer] = np.multiply(grad, self.mask, out=target)
