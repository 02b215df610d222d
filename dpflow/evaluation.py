"""Evaluation: the mean loss and accuracy of a model over a dataset split, each row once.

Each rank runs forward over its contiguous block of the rows and one allreduce sums the
three totals, so any number of ranks counts every row exactly once (no padding).
"""

import numpy as np

from .data import gather
from .graph import forward_pass
from .normalize import Normalizer
from .sharding import shard_bounds

EVAL_CHUNK = 4096  # rows per forward pass: bounds memory on large test sets


def evaluate(model, x, y, comm, dtype, normalizer=Normalizer(), rows=None, confusion=None):
    """(mean loss, accuracy) of `model` on the examples `x` with labels `y`, or on their
    `rows` (an index array, e.g. the validation rows), each batch normalised as training
    batches are; with `confusion`, a (classes, classes) float64 array, also counts [true
    class, predicted class]. Collective."""
    saved_normaliser = model.loss.normaliser
    model.loss.normaliser = None
    model.eval()  # no dropout, running statistics: and so no collective inside the graph
    n = len(y) if rows is None else len(rows)
    first, last = shard_bounds(n, comm.rank, comm.size)
    totals = np.zeros(3, np.float64)  # loss sum, correct, rows
    for start in range(first, last, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, last)
        which = slice(start, stop) if rows is None else rows[start:stop]
        X = gather(x, which, normalizer, np.empty((stop - start,) + x.shape[1:], dtype))
        labels = np.asarray(y[which])
        model.inputs.value, model.labels.value = X, labels
        forward_pass(model.graph)
        totals[0] += model.loss.loss_sum
        predicted = model.logits.value.argmax(axis=1)
        totals[1] += np.count_nonzero(predicted == labels)
        totals[2] += len(labels)
        if confusion is not None:
            k = len(confusion)
            confusion += np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    model.loss.normaliser = saved_normaliser
    model.train()
    comm.allreduce_sum(totals)
    if confusion is not None:
        comm.allreduce_sum(confusion)
    loss_sum, correct, rows_seen = totals
    return loss_sum / max(rows_seen, 1), correct / max(rows_seen, 1)
