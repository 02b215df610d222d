"""Summing a buffer over ranks that share one node's memory, without sending it anywhere.

When every rank of a job runs on one node, the gradient buffer can live in memory all of
them can read (an MPI shared-memory window, MPI_Win_allocate_shared): each rank's backward
writes its gradients straight into it. The sum over ranks is then one pass and a copy:

    barrier                      every rank's gradients are final
    sums[mine] = g_0[mine] + g_1[mine] + ... + g_(p-1)[mine]     each rank sums its 1/p
    barrier                      every part of the sum is final
    g_me[:] = sums               each rank copies the whole sum into its own buffer

Each element is summed once and copied to every rank, so all ranks hold the same bits. The
additions follow MPICH's own MPI_Allreduce (recursive doubling and halving): with p = 2^k + r
ranks, ranks 2i and 2i + 1 are added first for i < r, then the 2^k values pairwise, neighbours
first: (g0 + g1) + (g2 + g3) on 4 ranks, (g0 + g1) + g2 on 3. That is the order MPICH's
MPI_Allreduce gave on one node on 2 to 8 ranks (tests/test_nodesum.py checks it), so a run
sums to the same bits here as through MPICH's MPI_Allreduce (`reducer` mpi).
MPI_Allreduce moves the same bytes through the library's own queues, copying them in and out:
for the 2.1 MB buffer of BENCHMARKS.md on 2 ranks it took 0.22 ms against 0.08 ms this way
(scripts/bench has the figures of its run). The communicator calls this; it holds buffers and
knows no layers.
"""

import os

import numpy as np

PAGE = 4096


class NodeSum:
    """A zeroed array of `size` in the node's shared memory (`array`), and its sum over the
    node's ranks (`allreduce`, for the array or any contiguous view of it). Collective to
    create over `node` (an mpi4py intracommunicator of ranks on one node)."""

    def __init__(self, MPI, node, size, dtype):
        self.node = node
        self.rank, self.ranks = node.Get_rank(), node.Get_size()
        self.dtype = np.dtype(dtype)
        padded = -(-size * self.dtype.itemsize // PAGE) * PAGE
        # Rank 0's segment holds the sums too: [sums | its buffer]; the others' only their buffer.
        segment = padded * (2 if self.rank == 0 else 1)
        self.window = MPI.Win.Allocate_shared(segment, self.dtype.itemsize, comm=node)
        memory = [np.frombuffer(self.window.Shared_query(rank)[0], np.uint8) for rank in range(self.ranks)]
        self.sums = memory[0][:size * self.dtype.itemsize].view(self.dtype)
        first = [padded, *[0] * (self.ranks - 1)]  # where each rank's buffer starts in its segment
        self.buffers = [memory[rank][first[rank]:first[rank] + size * self.dtype.itemsize].view(self.dtype)
                        for rank in range(self.ranks)]
        self.array = self.buffers[self.rank]
        # Room for tree_sum's partial sums; the first goes into `sums`.
        self.scratch = [np.empty(-(-size // self.ranks), self.dtype) for _ in range(partial_sums(self.ranks) - 1)]
        self.array[...] = 0
        if self.rank == 0:
            self.sums[...] = 0  # its pages taken now: a full /dev/shm fails here, not mid-run
        self.address = self.array.__array_interface__["data"][0]
        # The MPI standard's recipe for plain loads and stores in a shared window: a passive
        # epoch for the window's life, and Win_sync on both sides of each barrier, so that what
        # one rank wrote before the barrier is what the others read after it on any CPU (x86
        # orders stores anyway; weaker memory models need the fences).
        self.window.Lock_all(MPI.MODE_NOCHECK)
        self.synchronised_barrier()

    def synchronised_barrier(self):
        self.window.Sync()
        self.node.Barrier()
        self.window.Sync()

    def free(self):
        """Unmap the window; nothing may use `array` or a view of it after. Collective."""
        self.array = self.sums = self.buffers = None
        self.window.Unlock_all()
        self.window.Free()

    def holds(self, buffer):
        """Whether `buffer` is a contiguous view of `array` (so every rank can read it)."""
        if not isinstance(buffer, np.ndarray) or buffer.dtype != self.dtype or not buffer.flags.c_contiguous:
            return False
        start = buffer.__array_interface__["data"][0] - self.address
        return 0 <= start and start + buffer.nbytes <= self.array.nbytes

    def allreduce(self, buffer):
        """Sum `buffer` (a view of `array` at the same place on every rank) over the node's
        ranks, in place. Collective over the node."""
        first = (buffer.__array_interface__["data"][0] - self.address) // self.dtype.itemsize
        n = buffer.size
        lo = first + self.rank * n // self.ranks
        hi = first + (self.rank + 1) * n // self.ranks
        self.synchronised_barrier()  # every rank's gradients are written
        if hi > lo:
            with np.errstate(over="ignore", invalid="ignore"):  # as MPI's sum: the trainer checks
                tree_sum([other[lo:hi] for other in self.buffers], self.sums[lo:hi],
                         [scratch[:hi - lo] for scratch in self.scratch])
        self.synchronised_barrier()  # every part of the sum is written
        buffer.reshape(-1)[...] = self.sums[first:first + n]


def partial_sums(p):
    """At most how many arrays tree_sum writes for p parts: one per pair of the fold, and one
    per pair of the first level after it."""
    power = 1 << (p.bit_length() - 1)
    return (p - power) + power // 2


def tree_sum(parts, out, scratch):
    """parts[0] + ... + parts[p-1] into `out`, in MPICH's order (see the module's docstring):
    fold the first 2r parts pairwise, then add neighbours, level by level. Only `out` and
    `scratch` (partial_sums(p) - 1 arrays of out's shape) are written; each addition is one pass."""
    free = [out, *scratch]
    mine = set()  # ids of the arrays written here, which may be added to in place

    def add(a, b):
        if id(a) in mine:
            a += b
            return a
        target = free.pop(0)
        np.add(a, b, out=target)
        mine.add(id(target))
        return target

    fold = len(parts) - (1 << (len(parts).bit_length() - 1))
    values = [add(parts[2 * i], parts[2 * i + 1]) for i in range(fold)] + list(parts[2 * fold:])
    while len(values) > 1:
        values = [add(values[2 * i], values[2 * i + 1]) for i in range(len(values) // 2)]


def room_for(size, dtype, ranks, path="/dev/shm"):
    """Whether the node's shared memory has room for `ranks` buffers and the sums, with half of
    what is free left over for MPI itself (True where it cannot be read: the library decides)."""
    need = (ranks + 1) * (size * np.dtype(dtype).itemsize + PAGE)
    try:
        stats = os.statvfs(path)
    except OSError:
        return True
    return need <= stats.f_bavail * stats.f_frsize / 2
