"""The sum over one node's ranks through shared memory (dpflow/nodesum.py): the same bits as
summing in rank order, for the whole buffer and for any view of it, and the fallbacks to
MPI_Allreduce. The MPI-marked tests run under mpiexec -n 2/3/4 (pytest --with-mpi)."""

import dataclasses
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from dpflow import nodesum
from dpflow.comm import LocalCommunicator, create_communicator
from dpflow.config import TrainConfig
from dpflow.data import load_dataset
from dpflow.output import banner_lines
from dpflow.trainer import Trainer
from helpers import OPENMPI_ENV, launch_prefix, run


def ranks_data(rank, size, dtype):
    """What `rank` holds: every rank can make every rank's, to compute the expected sum."""
    return np.random.default_rng(100 + rank).normal(size=size).astype(dtype)


def in_mpich_order(size, ranks, dtype):
    """The ranks' data summed as MPICH's MPI_Allreduce adds them, written out plainly: fold
    the first 2r ranks pairwise (p = 2^k + r), then add neighbours level by level."""
    values = [ranks_data(rank, size, dtype) for rank in range(ranks)]
    fold = ranks - (1 << (ranks.bit_length() - 1))
    values = [values[2 * i] + values[2 * i + 1] for i in range(fold)] + values[2 * fold:]
    while len(values) > 1:
        values = [values[2 * i] + values[2 * i + 1] for i in range(len(values) // 2)]
    return values[0]


@pytest.mark.parametrize("ranks", range(2, 13))
def test_tree_sum_adds_in_mpich_order_and_writes_only_its_own_arrays(ranks):
    parts = [ranks_data(rank, 999, np.float32) for rank in range(ranks)]
    before = [part.copy() for part in parts]
    out = np.empty(999, np.float32)
    scratch = [np.empty(999, np.float32) for _ in range(nodesum.partial_sums(ranks) - 1)]
    nodesum.tree_sum(parts, out, scratch)
    assert np.array_equal(out, in_mpich_order(999, ranks, np.float32))
    assert all(np.array_equal(part, copy) for part, copy in zip(parts, before))
    if ranks >= 4:  # not the rank order: the test could tell them apart
        rank_order = parts[0] + parts[1]
        for part in parts[2:]:
            rank_order += part
        assert not np.array_equal(out, rank_order)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_shared_buffer_and_its_views_sum_in_mpich_order(dtype):
    comm = create_communicator("mpi")
    assert comm.size == comm.local_size, "these tests run on one node"
    buffer = comm.summable_zeros(1001, dtype)
    assert comm.sum_path(buffer) == "node shared memory"
    assert buffer.dtype == dtype and buffer.shape == (1001,) and not buffer.any()
    buffer[...] = ranks_data(comm.rank, 1001, dtype)
    expected = in_mpich_order(1001, comm.size, dtype)
    private = buffer.copy()  # not in the window: MPI_Allreduce sums it
    comm.allreduce_sum(private)
    if comm.library().startswith("MPICH"):  # the same bits as MPICH's own sum
        assert np.array_equal(private, expected)
    # A 2-D view at an odd offset, one element (fewer elements than ranks), then the rest.
    parts = [buffer[3:503].reshape(20, 25), buffer[503:504], buffer[:3], buffer[504:]]
    for part in parts:
        comm.allreduce_sum(part)
    assert np.array_equal(buffer, expected)
    comm.allreduce_sum(buffer)  # and the whole of it: every rank now holds `expected`
    assert np.allclose(buffer, expected * comm.size, rtol=1e-6)
    if comm.size <= 4:  # (e + e) + e rounds once, as e * 3 does; 2e + 2e is exact
        assert np.array_equal(buffer, expected * comm.size)


@pytest.mark.mpi(min_size=2)
def test_arrays_outside_the_window_go_through_mpi():
    comm = create_communicator("mpi")
    comm.summable_zeros(10, np.float64)
    private = np.full(10, comm.rank + 1.0)
    comm.allreduce_sum(private)
    assert np.all(private == comm.size * (comm.size + 1) / 2)
    assert not any(node_sum.holds(private) for node_sum in comm.node_sums)


@pytest.mark.mpi(min_size=2)
def test_without_room_the_gradients_stay_private(monkeypatch):
    comm = create_communicator("mpi")
    monkeypatch.setattr("dpflow.comm.room_for", lambda *args: False)
    buffer = comm.summable_zeros(10, np.float64)
    assert comm.sum_path(buffer) == "MPI_Allreduce" and not comm.node_sums
    buffer += 1
    comm.allreduce_sum(buffer)
    assert np.all(buffer == comm.size)


def trainer_of(comm, reducer, **settings):
    settings = {"epochs": 2, **settings}
    config = TrainConfig(dataset="synthetic", hidden=[7, 5], batch_size=13, lr=0.1, optimizer="momentum",
                         dtype="float64", seed=11, reducer=reducer, **settings)
    return Trainer(config, comm, load_dataset("synthetic", samples=51, features=6, classes=3, seed=5))


@pytest.mark.mpi(min_size=2)
def test_a_window_mpi_cannot_make_leaves_the_gradients_private(monkeypatch):
    comm = create_communicator("mpi")

    def refused(MPI, node, size, dtype):  # as Open MPI refuses without a component for it
        raise MPI.Exception(MPI.ERR_INTERN)

    monkeypatch.setattr("dpflow.comm.NodeSum", refused)
    buffer = comm.summable_zeros(10, np.float64)
    assert comm.sum_path(buffer) == "MPI_Allreduce" and not comm.node_sums
    buffer += 1
    comm.allreduce_sum(buffer)
    assert np.all(buffer == comm.size)


@pytest.mark.mpi(min_size=2)
def test_a_window_made_on_some_ranks_only_is_an_error_there(monkeypatch):
    comm = create_communicator("mpi")

    def made_on_rank_0_only(MPI, node, size, dtype):
        if node.Get_rank() != 0:
            raise MPI.Exception(MPI.ERR_INTERN)
        return SimpleNamespace(array=np.zeros(size, dtype))

    monkeypatch.setattr("dpflow.comm.NodeSum", made_on_rank_0_only)
    if comm.rank == 0:  # the others would sum by MPI_Allreduce, and rank 0 wait for them
        with pytest.raises(RuntimeError, match="refused it on others; set `reducer` to mpi"):
            comm.summable_zeros(10, np.float64)
    else:
        assert not comm.summable_zeros(10, np.float64).any() and not comm.node_sums


def test_open_mpi_with_no_component_for_shared_windows_trains_by_mpi_allreduce():
    # A site's OMPI_MCA_osc (ucx or rdma: one-sided over the network) leaves Open MPI no
    # component for a shared-memory window, and MPI_Win_allocate_shared fails on every rank.
    launcher, dpflow, _ = launch_prefix("openmpi", 2)
    result = run([*launcher, *dpflow, "train", "--epochs", "1", "--hidden", "8"], timeout=60,
                 env={**OPENMPI_ENV, "OMPI_MCA_osc": "rdma"})
    assert result.returncode == 0, result
    assert "gradients summed by MPI_Allreduce" in result.stdout and "done:" in result.stdout, result


def train(comm, reducer):
    trainer = trainer_of(comm, reducer)
    trainer.fit()
    return trainer


@pytest.mark.mpi(min_size=2)
def test_training_through_shared_memory_equals_mpi_allreduce_and_one_process():
    comm = create_communicator("mpi")
    shared, private = train(comm, "flat"), train(comm, "mpi")
    assert comm.node_sums and comm.node_sums[0].holds(shared.flat.grads)
    assert not comm.node_sums[0].holds(private.flat.grads)
    reference = train(LocalCommunicator(), "flat").flat.values
    assert np.max(np.abs(shared.flat.values - reference)) < 1e-10
    assert np.max(np.abs(shared.flat.values - private.flat.values)) < 1e-12
    if comm.size == 2:  # a + b is b + a: the two paths agree to the bit
        assert np.array_equal(shared.flat.values, private.flat.values)


@pytest.mark.mpi(min_size=2)
def test_the_banner_names_the_path_this_trainer_sums_by():
    comm = create_communicator("mpi")
    shared = trainer_of(comm, "flat")
    private = trainer_of(comm, "mpi")  # on a communicator that already holds a window
    overlapped = trainer_of(comm, "flat", bucket_mb=1e-4)  # buckets of MPI_Iallreduce
    assert overlapped.overlap and comm.node_sums[-1].holds(overlapped.flat.grads)
    paths = {"node shared memory": shared, "MPI_Allreduce": private,
             f"MPI_Iallreduce of {len(overlapped.parallel.buckets)} buckets": overlapped}
    for path, trainer in paths.items():
        assert trainer.parallel.sum_path() == path
        assert banner_lines(trainer, comm, "vm")[0].endswith(f"| gradients summed by {path}")


@pytest.mark.mpi(min_size=2)
def test_released_gradients_are_private_and_training_goes_on():
    comm = create_communicator("mpi")
    trainer = train(comm, "flat")
    shared, windows = trainer.flat.grads, len(comm.node_sums)
    before = np.array(shared)
    trainer.parallel.release_shared_memory()
    assert len(comm.node_sums) == windows - 1 and trainer.parallel.sum_path() == "MPI_Allreduce"
    grads = trainer.flat.grads
    assert np.array_equal(grads, before) and not np.shares_memory(grads, shared)
    for param in trainer.model.params.values():  # no view of the freed window is left in the graph
        held = [param.gradients[param]] + [layer.gradients[param] for layer in param.outbound_layers
                                           if param in layer.gradients]
        assert all(not np.shares_memory(array, shared) for array in held), param.name
    trainer.config = dataclasses.replace(trainer.config, epochs=3)
    trainer.fit()
    reference = trainer_of(LocalCommunicator(), "flat", epochs=3)
    reference.fit()
    assert np.max(np.abs(trainer.flat.values - reference.flat.values)) < 1e-10


SWEEP = """
import dpflow, dpflow.comm
from dpflow.nodesum import NodeSum

live = []

class Counted(NodeSum):
    def __init__(self, *args):
        super().__init__(*args)
        live.append(self)

    def free(self):
        live.remove(self)
        super().free()

dpflow.comm.NodeSum = Counted
for lr in (0.1, 0.2, 0.3):
    dpflow.fit("mlp", "synthetic", hidden=[8], samples=64, features=6, epochs=1, batch_size=16, lr=lr)
    from mpi4py import MPI  # initialised by fit; one line from rank 0 (the ranks' lines interleave)
    left = MPI.COMM_WORLD.allreduce(len(live))
    if MPI.COMM_WORLD.rank == 0:
        print("windows left on the node:", left, flush=True)
"""


def test_a_sweep_of_fit_calls_gives_each_run_s_shared_memory_back(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    result = run([sys.executable, str(script)], ranks=2, timeout=60)
    assert result.returncode == 0, result
    assert result.stdout.count("gradients summed by node shared memory") == 3, result
    assert result.stdout.count("windows left on the node: 0") == 3, result


def test_one_rank_has_a_plain_array_and_no_path():
    comm = LocalCommunicator()
    buffer = comm.summable_zeros(3, np.float32)
    assert isinstance(buffer, np.ndarray)
    assert comm.sum_path(buffer) == "none (one rank)"


def test_room_leaves_half_of_the_free_shared_memory(monkeypatch):
    free = 100 * 2**20
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    per_rank = 2**20  # float32 entries: 4 MB per buffer
    assert nodesum.room_for(per_rank, np.float32, 4)  # 5 x 4 MB <= 50 MB
    assert not nodesum.room_for(per_rank, np.float32, 12)  # 13 x 4 MB > 50 MB

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "statvfs", missing)
    assert nodesum.room_for(per_rank, np.float32, 4)  # no /dev/shm to read: MPI decides
