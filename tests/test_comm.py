"""Communicator behaviour, written once as check_* bodies: run for the local communicator
always, and for MPI under mpiexec (pytest --with-mpi)."""

import numpy as np
import pytest

from dpflow.comm import LocalCommunicator, create_communicator, fingerprint


def check_allreduce_sum(comm):
    buffer = np.arange(5, dtype=np.float64) + comm.rank
    comm.allreduce_sum(buffer)
    expected = np.arange(5) * comm.size + sum(range(comm.size))
    assert np.array_equal(buffer, expected)


def check_naive_equals_flat(comm):
    rng = np.random.default_rng(comm.rank)
    flat = rng.normal(size=30).astype(np.float32)
    views = [flat[:10].reshape(2, 5), flat[10:12], flat[12:]]
    copies = [v.copy() for v in views]
    comm.allreduce_sum(flat)
    comm.allreduce_sum_each(copies)
    for view, copy in zip(views, copies):
        assert np.array_equal(view, copy)


def check_nonblocking_allreduce(comm):
    buffer = np.full(1000, comm.rank + 1.0)
    request = comm.start_allreduce_sum(buffer)
    comm.wait([request] if request is not None else [])
    assert np.all(buffer == comm.size * (comm.size + 1) / 2)


def check_broadcast(comm):
    buffer = np.full(4, float(comm.rank))
    comm.broadcast(buffer, root=0)
    assert np.all(buffer == 0)


def check_allreduce_max(comm):
    buffer = np.array([comm.rank, -comm.rank], dtype=np.float64)
    comm.allreduce_max(buffer)
    assert list(buffer) == [comm.size - 1, 0]


def check_objects(comm):
    assert comm.allgather_object(comm.rank) == list(range(comm.size))
    assert comm.broadcast_object({"rank": comm.rank}) == {"rank": 0}


CHECKS = [check_allreduce_sum, check_naive_equals_flat, check_nonblocking_allreduce,
          check_broadcast, check_allreduce_max, check_objects]


@pytest.mark.parametrize("check", CHECKS)
def test_local(check):
    check(LocalCommunicator())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("check", CHECKS)
def test_mpi(check):
    comm = create_communicator("mpi")
    assert comm.size >= 2  # a size-1 world here would mean N separate one-rank jobs
    check(comm)


def test_local_communicator_without_a_launcher(monkeypatch):
    for name in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "DPFLOW_COMM"):
        monkeypatch.delenv(name, raising=False)
    comm = create_communicator()
    assert isinstance(comm, LocalCommunicator) and comm.size == 1 and comm.rank == 0


def test_fingerprint_sees_one_flipped_bit():
    a = np.linspace(0, 1, 1000, dtype=np.float32)
    b = a.copy()
    b.view(np.uint32)[500] ^= 1
    assert fingerprint(a) == fingerprint(a.copy()) != fingerprint(b)


def test_a_nearly_full_dev_shm_is_named_before_mpi_starts(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dpflow import launcher

    (tmp_path / "mpich_shm_1a2b3c4d_0").write_bytes(b"\1" * 2**20)  # what a killed job left
    (tmp_path / "other").write_bytes(b"\0" * 8192)
    free = {"bytes": 3 * 2**20}
    monkeypatch.setattr(launcher.os, "statvfs", lambda path: SimpleNamespace(f_bavail=free["bytes"] // 4096,
                                                                             f_frsize=4096))
    node = {"MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"}
    warning = launcher.shared_memory_warning(str(tmp_path), node)
    assert warning.startswith(f"dpflow: warning: {tmp_path} has 3.0 MB free and the 4 rank(s) on this host need about 8 MB")
    assert "1 file(s) of MPICH jobs hold 1.0 MB" in warning and "--shm-size" in warning, warning
    assert launcher.shared_memory_warning(str(tmp_path), {**node, "MPI_LOCALRANKID": "1"}) is None  # said once
    open_mpi = {"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert "the 2 rank(s) on this host need about 4 MB" in launcher.shared_memory_warning(str(tmp_path), open_mpi)
    assert launcher.shared_memory_warning(str(tmp_path), {}) is None  # one rank: 3 MB is enough
    (tmp_path / "mpich_shm_1a2b3c4d_0").unlink()
    assert "file(s)" not in launcher.shared_memory_warning(str(tmp_path), node)
    free["bytes"] = 8 * 2**20
    assert launcher.shared_memory_warning(str(tmp_path), node) is None
