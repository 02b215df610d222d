"""`DataParallel`: the few lines a MiniFlow-style program adds to train on N ranks.

    dp = DataParallel({"W1": W1, "b1": b1, "W2": W2, "b2": b2})   # names fix the packing order
    for X_batch, y_batch in global_batches:
        X.value, y.value = dp.shard(X_batch), dp.shard(y_batch)   # this rank's rows
        cost.normaliser = len(X_batch)                            # the GLOBAL row count
        forward_and_backward(graph)
        dp.allreduce_gradients()                                  # sum over ranks, one call
        sgd_update(trainables, learning_rate)                     # same update everywhere

Why summing is exact: a loss divided by the global row count is a sum over rows, so its
gradient is a sum over rows, and the rows may be split between ranks in any way: summing
the ranks' gradients gives the whole batch's gradient, exactly as `Linear` sums its bias
gradient over the rows of the batch.
"""

from .comm import create_communicator
from .config import UsageError
from .data import shard_bounds
from .flat import FlatParameters


class DataParallel:
    """Parameters packed into flat buffers, the same on every rank, gradients summed in one call.

    Construction is collective: it checks that every rank has the same parameter names and
    shapes, then broadcasts rank 0's values.
    """

    def __init__(self, params, comm=None, extra_slots=0, reducer="flat"):
        self.comm = comm if comm is not None else create_communicator()
        self.rank, self.size = self.comm.rank, self.comm.size
        first = next(iter(params.values()))
        self.flat = FlatParameters(params, first.value.dtype, extra_slots=extra_slots)
        self.reducer = reducer
        self.synchronise()

    @property
    def is_root(self):
        return self.rank == 0

    def synchronise(self):
        """Check every rank holds the same parameter names and shapes, then copy rank 0's
        values to all. Collective."""
        layouts = self.comm.allgather_object([(name, self.flat.shapes[name]) for name in self.flat.names])
        for rank, layout in enumerate(layouts):
            if layout != layouts[0]:
                differ = [f"{a} vs {b}" for a, b in zip(layouts[0], layout) if a != b]
                if len(layout) != len(layouts[0]):
                    differ.append(f"{len(layouts[0])} parameters vs {len(layout)}")
                raise UsageError(
                    f"rank {rank} builds a different model from rank 0 ({'; '.join(differ[:3])}); "
                    "every rank must get the same flags, config file and dataset"
                )
        self.comm.broadcast(self.flat.values, root=0)

    def shard(self, global_batch):
        """This rank's contiguous block of the rows of a global batch (a view, no copy)."""
        start, stop = shard_bounds(len(global_batch), self.rank, self.size)
        return global_batch[start:stop]

    def allreduce_gradients(self):
        """Sum every gradient (and any extra slots) over all ranks, in place. Collective."""
        if self.reducer == "naive":
            self.comm.allreduce_sum_each(self.flat.grad_views() + [self.flat.extra])
        else:
            self.comm.allreduce_sum(self.flat.grads)
