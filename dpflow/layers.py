"""Layers and losses: each forward sits next to its derivative. numpy only, no MPI.

Every layer accepts a batch of 0 rows (a rank may hold none of a short last batch) and then
produces zero gradients for its parameters.
"""

import numpy as np

from .graph import GraphError, Layer
from .layout import is_channels_last


def _shape_error(layer, message, fix):
    return GraphError(f"{layer!r}: {message}; {fix}")


class Linear(Layer):
    """z = X @ W + b"""

    def __init__(self, inbound, weights, bias, name=None):
        super().__init__([inbound, weights, bias], name=name)

    def forward(self):
        X = self.inbound_layers[0].value  # (batch, n_in)
        W = self.inbound_layers[1].value  # (n_in, n_out)
        b = self.inbound_layers[2].value  # (n_out,)
        if X.ndim != 2 or W.ndim != 2 or X.shape[1] != W.shape[0]:
            raise _shape_error(
                self,
                f"input of shape {X.shape} does not fit weights of shape {W.shape}",
                f"the input needs 2 dimensions and {W.shape[0] if W.ndim == 2 else '?'} columns "
                "(reshape the data or build the layer with the data's feature count)",
            )
        if b.shape != (W.shape[1],):
            raise _shape_error(
                self, f"bias of shape {b.shape} does not fit weights of shape {W.shape}",
                f"the bias needs shape ({W.shape[1]},)",
            )
        dtype = np.result_type(X, W)
        self.value = np.matmul(X, W, out=self.scratch("z", (X.shape[0], W.shape[1]), dtype))
        self.value += b

    def backward(self):
        X_layer, W_layer, b_layer = self.inbound_layers
        X, W = X_layer.value, W_layer.value
        grad = self.output_gradient()  # (batch, n_out)
        if grad is None:
            grad = np.zeros_like(self.value)
        if getattr(X_layer, "requires_grad", True):
            self.gradients[X_layer] = np.matmul(
                grad, W.T, out=self.gradient_target(X_layer, X.shape, grad.dtype))  # (batch, n_in)
        self.gradients[W_layer] = np.matmul(
            X.T, grad, out=self.gradient_target(W_layer, W.shape, grad.dtype))  # (n_in, n_out)
        # The bias rule: a sum over the rows of the batch; dpflow sums once more over ranks.
        # As ones @ grad, one BLAS pass: numpy's grad.sum(axis=0) adds row by row (a
        # 784-512-256-10 step, paired: 1.4% faster at 256 rows, 2.3% at 128).
        self.gradients[b_layer] = np.matmul(
            self.ones(grad.shape[0], grad.dtype), grad,
            out=self.gradient_target(b_layer, (W.shape[1],), grad.dtype))  # (n_out,)


class Activation(Layer):
    """An element-wise function of one inbound layer: `compute` is the function, `chain`
    multiplies the incoming gradient by its derivative. `chains_in_place`: `chain` may be
    given the incoming gradient itself as `out` (it reads each element of `grad` before it
    writes the same element of `out`)."""

    chains_in_place = False

    def __init__(self, inbound, name=None):
        super().__init__([inbound], name=name)

    def forward(self):
        x = self.inbound_layers[0].value
        # The same memory layout as the input: element-wise work on channels-last images
        # stays a contiguous sweep (see layout.py).
        self.value = self.compute(x, out=self.scratch_like("value", x))

    def backward(self):
        inbound = self.inbound_layers[0]
        grad = self.output_gradient()
        if self.chains_in_place and grad is not None and self.owns_output_gradient():
            out = grad  # one buffer fewer on the hot path (a 784-512-256-10 step: 1.5% faster)
        else:
            out = self.gradient_target(inbound, self.value.shape, self.value.dtype,
                                       is_channels_last(self.value))
        if grad is None:
            out.fill(0)
        else:
            self.chain(grad, out)
        self.gradients[inbound] = out

    def owns_output_gradient(self):
        """Whether the gradient sent back to this layer is an array no other layer reads: a
        Linear's, written for this layer alone (an Add hands one array to all its inputs)."""
        return len(self.outbound_layers) == 1 and type(self.outbound_layers[0]) is Linear


class Sigmoid(Activation):
    """s = 1 / (1 + exp(-x)), computed as (1 + tanh(x / 2)) / 2, which cannot overflow."""

    def compute(self, x, out):
        np.multiply(x, 0.5, out=out)
        np.tanh(out, out=out)
        out += 1
        out *= 0.5
        return out

    def chain(self, grad, out):
        """ds/dx = s * (1 - s)"""
        np.subtract(1, self.value, out=out)
        out *= self.value
        out *= grad


class Tanh(Activation):
    """t = tanh(x)"""

    def compute(self, x, out):
        return np.tanh(x, out=out)

    def chain(self, grad, out):
        """dt/dx = 1 - t**2"""
        np.multiply(self.value, self.value, out=out)
        np.subtract(1, out, out=out)
        out *= grad


class ReLU(Activation):
    """r = max(x, 0), computed as x * (x > 0) with the mask kept in x's float type: the
    backward pass reuses it, and float-by-float multiplies run at SIMD speed where
    float-by-bool ones go through a casting loop (for 256 x 512 float32: forward 29 against
    26 us with a bool mask, backward 14 against 22; np.maximum alone takes 40)."""

    chains_in_place = True

    def compute(self, x, out):
        self.positive = np.greater(x, 0, out=self.scratch_like("mask", x, x.dtype), casting="unsafe")
        return np.multiply(x, self.positive, out=out)

    def chain(self, grad, out):
        """dr/dx = 1 where x > 0, else 0"""
        np.multiply(grad, self.positive, out=out)


class Loss(Layer):
    """A loss sums over its rows and divides by `normaliser`.

    `normaliser = None` divides by the local row count (MiniFlow's mean). Data-parallel
    training sets it to the global row count of the step on every rank, so that the sum of
    the ranks' gradients is exactly the gradient of the whole global batch.
    """

    normaliser = None

    def divisor(self, rows):
        if self.normaliser is not None:
            return self.normaliser
        return max(rows, 1)  # 0 rows: a 0 loss and 0 gradients, not 0 / 0


class MSE(Loss):
    """L = sum((y - a)**2) / (normaliser * n_outputs); with the default normaliser, MiniFlow's mean."""

    def __init__(self, y, a, name=None):
        super().__init__([y, a], name=name)

    def forward(self):
        y = self.inbound_layers[0].value
        a = self.inbound_layers[1].value
        a2 = a.reshape(a.shape[0], int(np.prod(a.shape[1:])))  # (batch, n_outputs)
        if y.size != a2.size:
            raise _shape_error(
                self, f"targets of shape {y.shape} do not match outputs of shape {a.shape}",
                f"give one target per output ({a2.size} values)",
            )
        diff = np.subtract(y.reshape(a2.shape), a2,
                           out=self.scratch("diff", a2.shape, np.result_type(y, a2)))
        self.diff = diff
        self.rows = a2.shape[0]
        self.scale = 1.0 / (self.divisor(self.rows) * max(a2.shape[1], 1))
        self.loss_sum = float(np.vdot(diff, diff)) if diff.size else 0.0
        self.value = diff.dtype.type(self.loss_sum * self.scale)

    def backward(self):
        """dL/dy = 2 (y - a) * scale, dL/da = -2 (y - a) * scale"""
        y_layer, a_layer = self.inbound_layers
        grad_a = self.gradient_target(a_layer, a_layer.value.shape, self.diff.dtype)
        np.multiply(self.diff.reshape(grad_a.shape), -2 * self.scale, out=grad_a)
        self.gradients[a_layer] = grad_a
        if getattr(y_layer, "requires_grad", True):
            grad_y = self.gradient_target(y_layer, y_layer.value.shape, self.diff.dtype)
            np.negative(grad_a.reshape(grad_y.shape), out=grad_y)
            self.gradients[y_layer] = grad_y


class SoftmaxCrossEntropy(Loss):
    """L = sum_i -log softmax(z_i)[label_i] / normaliser, softmax fused in for stability.

    The work runs on a transposed copy of the logits, (n_classes, batch): numpy reduces a
    short inner axis one row at a time, so the per-row max and sum over 10 classes took 25-70
    and 11-20 us for 128-256 rows, against about 1 us each over the outer axis."""

    def __init__(self, labels, logits, name=None):
        super().__init__([labels, logits], name=name)

    def forward(self):
        labels = self.inbound_layers[0].value  # (batch,) integers
        z = self.inbound_layers[1].value  # (batch, n_classes)
        rows, n_classes = z.shape
        if labels.shape != (rows,):
            raise _shape_error(
                self, f"labels of shape {labels.shape} do not match logits of shape {z.shape}",
                f"give one integer label per row, shape ({rows},)",
            )
        if labels.dtype.kind not in "iu":
            raise _shape_error(
                self, f"labels have dtype {labels.dtype}",
                "use integer class indices (e.g. labels.astype(np.int64))",
            )
        if rows and (labels.min() < 0 or labels.max() >= n_classes):
            bad = labels[(labels < 0) | (labels >= n_classes)][0]
            raise _shape_error(
                self, f"label {bad} is outside 0..{n_classes - 1}",
                f"labels must index one of the {n_classes} classes",
            )
        shifted = self.scratch("shifted", (n_classes, rows), z.dtype)  # (n_classes, batch)
        np.copyto(shifted, z.T)
        if rows:
            shifted -= shifted.max(axis=0)
        probs = np.exp(shifted, out=self.scratch("probs", (n_classes, rows), z.dtype))
        sums = probs.sum(axis=0)  # (batch,)
        # Where each row's label sits in the flattened (n_classes, batch) arrays.
        label_index = self.scratch("label_index", (rows,), np.intp)
        np.copyto(label_index, labels, casting="unsafe")  # uint8 labels (IDX files) too
        label_index *= rows
        label_index += self.row_index(rows)
        self.label_index = label_index
        # -log p[label] = log(sum(exp(shifted))) - shifted[label]
        self.loss_sum = float(np.log(sums).sum() - shifted.reshape(-1)[self.label_index].sum())
        probs /= sums
        self.probs, self.labels = probs, labels
        self.value = z.dtype.type(self.loss_sum / self.divisor(rows))

    def row_index(self, rows):
        index = self._scratch.get(("rows", rows))
        if index is None:
            index = self._scratch[("rows", rows)] = np.arange(rows)
        return index

    def backward(self):
        """dL/dz = (softmax(z) - onehot(label)) / normaliser, the onehot subtracted over the
        probabilities (forward's scratch, which nothing reads after backward)."""
        logits_layer = self.inbound_layers[1]
        probs = self.probs  # (n_classes, batch)
        probs.reshape(-1)[self.label_index] -= 1
        grad = self.gradient_target(logits_layer, probs.shape[::-1], probs.dtype)  # (batch, n_classes)
        np.divide(probs.T, self.divisor(len(self.labels)), out=grad)
        self.gradients[logits_layer] = grad
