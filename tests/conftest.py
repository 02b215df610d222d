"""Fixtures shared by the test files; plain helpers live in helpers.py."""

import contextlib
import os
import signal
import subprocess
import time

import pytest

from helpers import STARTED, dpflow_command, run

# tests/containers/ checks a running cluster of containers: scripts/test-containers starts
# one, then runs those tests with DPFLOW_CT_COMPOSE set. Everywhere else (./scripts/test,
# the test service inside a container) they are not collected at all.
collect_ignore = [] if os.environ.get("DPFLOW_CT_COMPOSE") else ["containers"]


@pytest.fixture
def dpflow():
    """Run `dpflow ARGS...` (optionally under mpiexec) with a timeout."""

    def runner(*args, ranks=None, timeout=120, env=None, cwd=None):
        return run([*dpflow_command(), *map(str, args)], timeout=timeout, ranks=ranks, env=env, cwd=cwd)

    return runner


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """A job that a failed test left running would spin its ranks on the cores (MPI waits by
    polling), or train on from a held step, under the tests that follow and fail them too."""
    yield
    while STARTED:
        process = STARTED.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the ranks too, even if mpiexec has ended
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)


# --- what the suite's killed jobs leave in /dev/shm -------------------------------------------

SHM = "/dev/shm"


def mpich_segments():
    try:
        return {os.path.join(SHM, name) for name in os.listdir(SHM) if name.startswith("mpich_shm_")}
    except OSError:
        return set()


SEGMENTS_BEFORE = mpich_segments()


def mapped_files(pids="*"):
    """The files that processes on this machine (those we may look into) have mapped."""
    mapped = set()
    for entry in os.listdir("/proc") if pids == "*" else pids:
        if entry.isdigit() or entry == "self":
            try:
                with open(f"/proc/{entry}/maps") as maps:
                    mapped.update(line.split(None, 5)[-1].strip() for line in maps if "/" in line)
            except OSError:
                continue
    return mapped


def owned(path):
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:  # its job has just ended and removed it
        return False


def pytest_sessionfinish(session):
    """Remove the MPICH files that the suite's killed jobs left in /dev/shm (about 35 MB a
    run): on a host they hold memory until a reboot, in a container they fill its 64 MB.
    MPI_Init maps its file as it creates it and MPI_Finalize removes it, so a file of ours
    that no process maps belongs to a dead job. A job still dying gets up to 3 s."""
    ours = mapped_files(["self"])  # under mpiexec, this rank's own job is still running
    for _ in range(30):
        left = {path for path in mpich_segments() - SEGMENTS_BEFORE - ours if owned(path)}
        busy = mapped_files()
        for path in left - busy:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if not left & busy:
            return
        time.sleep(0.1)
