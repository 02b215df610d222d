"""Shared test helpers: gradient checking, process launching with hard timeouts."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests/containers/ checks a running cluster of containers: scripts/test-containers starts
# one, then runs those tests with DPFLOW_CT_COMPOSE set. Everywhere else (./scripts/test,
# the test service inside a container) they are not collected at all.
collect_ignore = [] if os.environ.get("DPFLOW_CT_COMPOSE") else ["containers"]


def numeric_gradient(f, x, eps=1e-6):
    """Central differences of scalar f() with respect to array x (changed in place, restored)."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + eps
        plus = f()
        flat_x[i] = saved - eps
        minus = f()
        flat_x[i] = saved
        flat_g[i] = (plus - minus) / (2 * eps)
    return grad


def relative_error(a, b):
    """||a - b|| / (||a|| + ||b||): insensitive to entries that are tiny in both."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)


def mpiexec():
    path = shutil.which("mpiexec")
    if path is None:
        pytest.skip("mpiexec is not on PATH (run through ./scripts/test)")
    return path


class Result:
    def __init__(self, completed, seconds):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.seconds = seconds

    def __repr__(self):
        return f"<exit {self.returncode} after {self.seconds:.1f}s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}>"


def run(args, timeout=120, ranks=None, env=None, cwd=None, **kwargs):
    """Run a command (under `mpiexec -n ranks` if given) and fail the test if it outlives
    `timeout`: a test never hangs."""
    command = [mpiexec(), "-n", str(ranks), *args] if ranks else list(args)
    full_env = {**os.environ, **(env or {})}
    full_env = {name: value for name, value in full_env.items() if value is not None}  # None unsets
    started = time.monotonic()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   env=full_env, cwd=cwd, **kwargs)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} did not finish within {timeout}s (a hang?)\n"
                    f"stdout: {error.stdout}\nstderr: {error.stderr}")
    return Result(completed, time.monotonic() - started)


# Jobs started in the background by `start_job`, for `no_job_outlives_its_test`.
STARTED = []


def start_job(command, **kwargs):
    """Popen `command` in a session of its own, for a test that watches it while it runs.
    If the test ends first (it failed half-way), its whole process group is killed."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    STARTED.append(process)
    return process


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


def dpflow_command():
    path = shutil.which("dpflow")
    return [path] if path else [sys.executable, "-m", "dpflow"]


@pytest.fixture
def dpflow():
    """Run `dpflow ARGS...` (optionally under mpiexec) with a timeout."""

    def runner(*args, ranks=None, timeout=120, env=None, cwd=None):
        return run([*dpflow_command(), *map(str, args)], timeout=timeout, ranks=ranks, env=env, cwd=cwd)

    return runner


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
