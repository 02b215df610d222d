"""`DataParallel`: the few lines a MiniFlow-style program adds to train on N ranks.

    dp = DataParallel({"W1": W1, "b1": b1, "W2": W2, "b2": b2})   # names fix the packing order
    # or DataParallel([W1, b1, W2, b2]): a list is named by position ("0", "1", ...)
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

import time

import numpy as np

from .agreement import ranks_that_differ
from .comm import create_communicator, fingerprint
from .errors import TrainingError, UsageError
from .graph import Input
from .sharding import shard_bounds
from .flat import FlatParameters


class DataParallel:
    """Parameters packed into flat buffers, the same on every rank, gradients summed in one call.

    `params` is a dict name -> parameter Input (the names fix the packing order), or a list
    of parameter Inputs, named by their position ("0", "1", ...). Entries that are not named,
    named twice, or not parameters are refused: a parameter left out would silently drift
    apart between ranks. Construction is collective: it checks that every rank has the same
    parameter names and shapes, then broadcasts rank 0's values. With `consistency_every`
    N > 0, every Nth `allreduce_gradients` also checks that all ranks hold the same values
    (`check_consistency`).
    """

    def __init__(self, params, comm=None, extra_slots=0, reducer="flat", consistency_every=0):
        self.comm = comm if comm is not None else create_communicator()
        self.rank, self.size = self.comm.rank, self.comm.size
        params = checked_parameters(params)
        first = next(iter(params.values()))
        # `mpi` keeps the gradients in private memory, so MPI_Allreduce sums them even on one node.
        zeros = np.zeros if reducer == "mpi" else self.comm.summable_zeros
        self.flat = FlatParameters(params, first.value.dtype, extra_slots=extra_slots, zeros=zeros)
        self.reducer = reducer
        self.buckets = []  # filled by plan_buckets: then MPI_Iallreduce sums them during backward
        self.consistency_every, self.reductions = int(consistency_every), 0
        self.synchronise()

    @property
    def is_root(self):
        return self.rank == 0

    def synchronise(self):
        """Check every rank holds the same parameter names and shapes, then copy rank 0's
        values to all. Collective."""
        root, differ = ranks_that_differ(self.comm, [(name, self.flat.shapes[name]) for name in self.flat.names])
        if differ:
            rank = min(differ)
            layout = differ[rank]
            described = [f"{a} vs {b}" for a, b in zip(root, layout) if a != b]
            if len(layout) != len(root):
                described.append(f"{len(root)} parameters vs {len(layout)}")
            raise UsageError(
                f"rank {rank} builds a different model from rank 0 ({'; '.join(described[:3])}); "
                "every rank must get the same flags, config file and dataset"
            )
        self.comm.broadcast(self.flat.values, root=0)

    def shard(self, global_batch):
        """This rank's contiguous block of the rows of a global batch (a view, no copy)."""
        start, stop = shard_bounds(len(global_batch), self.rank, self.size)
        return global_batch[start:stop]

    def sum_path(self):
        """How the gradients are summed, for the banner and the bench: "node shared memory",
        "MPI_Allreduce", "MPI_Iallreduce of N buckets" (planned: the buffer may still be the
        node's, but the buckets never pass through it) or "none (one rank)"."""
        if self.buckets and self.size > 1:
            return f"MPI_Iallreduce of {len(self.buckets)} buckets"
        return self.comm.sum_path(self.flat.grads)

    def release_shared_memory(self):
        """Move the gradients into private memory and give the node's shared memory back (see
        nodesum): a process that trains several times, as a sweep of `dpflow.fit` calls does,
        kept every run's window until it exited. Later sums go through MPI_Allreduce. Collective."""
        shared = self.flat.grads
        if self.comm.shared(shared):
            self.flat.move_grads(np.array(shared))
            self.comm.release(shared)

    def allreduce_gradients(self):
        """Sum every gradient (and any extra slots) over all ranks, in place. Collective."""
        if self.reducer == "naive":
            self.comm.allreduce_sum_each(self.flat.grad_views() + [self.flat.extra])
        else:
            self.comm.allreduce_sum(self.flat.grads)
        self.reductions += 1
        if self.consistency_every and self.reductions % self.consistency_every == 0:
            self.check_consistency()

    def check_consistency(self):
        """Every rank must hold bit-identical parameter values: a parameter updated on some
        ranks only, or a non-deterministic update, makes the ranks train different models.
        Collective; TrainingError on every rank naming the ranks that differ."""
        _, differ = ranks_that_differ(self.comm, fingerprint(self.flat.values))
        if differ:
            raise TrainingError(
                f"ranks {sorted(differ)} hold parameter values that differ from rank 0's after "
                f"{self.reductions} gradient reductions; every rank must update every parameter "
                "with the same reduced gradients (is a trainable missing from DataParallel's params?)")

    # --- overlapping the allreduce with backward ----------------------------------------------

    def plan_buckets(self, graph, bucket_bytes):
        """Group the gradient buffer into buckets of about `bucket_bytes`, from its end.

        Backward finishes the last layers first, and sorted names put them at the end of the
        buffer, so a bucket of the tail is complete early and its allreduce can run while
        backward continues. The extra slots ride with the first bucket.
        """
        flat, params = self.flat, {p.name: p for p in graph if p.name in self.flat.slices}
        position = {id(layer): index for index, layer in enumerate(graph)}
        self.buckets = []  # [start, stop) ranges of flat.grads, in launch order
        bucket_of, members = {}, []
        stop = flat.grads.size
        for name in reversed(flat.names):
            members.append(name)
            start = flat.slices[name].start
            if (stop - start) * flat.dtype.itemsize >= bucket_bytes or name == flat.names[0]:
                for member in members:
                    bucket_of[member] = len(self.buckets)
                self.buckets.append((start, stop, len(members)))
                members, stop = [], start
        # A parameter's gradient is final after its consumer that runs backward last.
        self.finished_after = {}
        for name, param in params.items():
            last = min(param.outbound_layers, key=lambda layer: position[id(layer)])
            self.finished_after.setdefault(id(last), []).append((param, bucket_of[name]))
        self.overlap_graph = graph

    def backward_and_start_allreduce(self, graph):
        """backward_pass(graph), starting each bucket's non-blocking allreduce as soon as its
        gradients are final. Returns the requests to `comm.wait`; `started_at` holds the
        clock reading at each one's start (for a timeline). Collective."""
        assert graph is self.overlap_graph, "plan_buckets(graph, ...) first"
        waiting = [count for _, _, count in self.buckets]
        requests, self.started_at = [], []
        params = {id(param) for entries in self.finished_after.values() for param, _ in entries}
        for layer in reversed(graph):
            if id(layer) in params:
                continue  # run below, as soon as its last consumer is done
            layer.backward()
            for param, bucket in self.finished_after.get(id(layer), ()):
                param.backward()  # sums several consumers; nothing to do for one
                waiting[bucket] -= 1
                if waiting[bucket] == 0:
                    start, stop, _ = self.buckets[bucket]
                    requests.append(self.comm.start_allreduce_sum(self.flat.grads[start:stop]))
                    self.started_at.append(time.perf_counter())
        return [request for request in requests if request is not None]


def checked_parameters(params):
    """name -> parameter Input, from a dict or a list; refuses what cannot be a parameter."""
    if isinstance(params, (list, tuple)):
        params = {str(index): param for index, param in enumerate(params)}
    elif not isinstance(params, dict):
        raise UsageError(f"DataParallel takes a dict name -> parameter Input, or a list of them; "
                         f"got {type(params).__name__}")
    if not params:
        raise UsageError("DataParallel was given no parameters")
    unnamed = [repr(param) for name, param in params.items() if not isinstance(name, str) or not name]
    if unnamed:
        raise UsageError(
            f"DataParallel: {', '.join(unnamed)} has no name (a dict built from unnamed Inputs, such as "
            "{t.name: t for t in trainables} with Input(), keeps only the last one and leaves the "
            "others to drift apart); name each parameter, Input(value, name='W1'), or pass the list")
    seen = {}
    for name, param in params.items():
        if not isinstance(param, Input):
            raise UsageError(f"DataParallel: {name!r} is a {type(param).__name__}, not a parameter Input")
        if not isinstance(param.value, np.ndarray) or param.value.dtype.kind != "f":
            raise UsageError(f"DataParallel: {name!r} has no floating-point array value "
                             f"(got {type(param.value).__name__}); set it before DataParallel sees it")
        if not param.requires_grad:
            raise UsageError(f"DataParallel: {name!r} is an Input with requires_grad=False (data, "
                             "not a parameter); list only the trainables")
        if id(param) in seen:
            raise UsageError(f"DataParallel: one Input is listed as both {seen[id(param)]!r} and {name!r}")
        seen[id(param)] = name
    dtypes = {param.value.dtype for param in params.values()}
    if len(dtypes) > 1:
        raise UsageError(f"DataParallel: the parameters mix dtypes {sorted(map(str, dtypes))}; "
                         "give them one dtype")
    return params
