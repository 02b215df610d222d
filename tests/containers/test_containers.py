"""The container checks: dpflow's image run as a cluster of 4 containers.

scripts/test-containers starts what these tests need (its own Docker daemon, the image, the
head and 3 workers of docker/compose.yaml with ssh between them), then runs this file with
the cluster named in the environment. The suite leaves this folder out (tests/conftest.py).
The tests run in file order: the image, the healthy cluster, the faults, the whole suite
inside a container. Each prints what it measured, shown under pytest -s.
"""

import json
import os
import re
import shlex
import subprocess
import time

import pytest

from helpers import run, start_job

# The compose command with its project and file, shell-quoted by scripts/test-containers.
COMPOSE = shlex.split(os.environ.get("DPFLOW_CT_COMPOSE", ""))
NETWORK = os.environ.get("DPFLOW_CT_NETWORK", "")
IMAGE = os.environ.get("DPFLOW_IMAGE", "")
pytestmark = pytest.mark.skipif(not COMPOSE, reason="needs the containers that scripts/test-containers starts")

HOSTS = ["head", "worker1", "worker2", "worker3"]
MPIEXEC = ["mpiexec", "-hosts", ",".join(HOSTS), "-n", "4"]  # one rank on each node
# A bound for every command that talks to the cluster, so that no hang can hold CI.
STEP_TIMEOUT = 300
# digits has 1437 training rows: the last batch of each epoch holds 29, split 8/7/7/7, so
# the comparison covers uneven shards too.
TRAIN = ["dpflow", "train", "--dataset", "digits", "--batch-size", "64", "--dtype", "float64",
         "--seed", "7", "--progress", "plain"]


def compose(*args, timeout=STEP_TIMEOUT):
    # compose exec forwards stdin to the container: give it none, as CI has none.
    return run([*COMPOSE, *args], timeout=timeout, stdin=subprocess.DEVNULL)


def on_head(*command, timeout=STEP_TIMEOUT):
    return compose("exec", "-T", "head", *command, timeout=timeout)


def last_lines(text, n=20):
    return "\n".join(text.splitlines()[-n:])


def test_the_image_runs_as_dpflow_with_one_blas_thread_and_the_wheels_mpiexec():
    out = run(["docker", "run", "--rm", "--network", "none", IMAGE, "sh", "-c",
               'echo "$(id -un) $(id -u) $OMP_NUM_THREADS $OPENBLAS_NUM_THREADS $(command -v mpiexec)"'],
              timeout=STEP_TIMEOUT)
    assert out.stdout.strip() == "dpflow 1000 1 1 /opt/venv/bin/mpiexec", out


def test_the_images_default_command_runs_dpflow_help():
    out = run(["docker", "run", "--rm", "--network", "none", IMAGE], timeout=STEP_TIMEOUT)
    assert out.returncode == 0 and "train" in out.stdout + out.stderr, out


def test_mpiexec_on_the_head_runs_one_rank_on_each_of_the_4_containers():
    # A 4-rank world on 4 hosts: an mpi4py built for another MPI would give four 1-rank
    # worlds instead. One os.write per rank: print() under PYTHONUNBUFFERED writes piece
    # by piece, and mpiexec interleaves the pieces of different ranks.
    out = on_head(*MPIEXEC, "python", "-c",
                  "import os, socket; from mpi4py import MPI; c = MPI.COMM_WORLD; "
                  "os.write(1, f'{c.Get_rank()} {c.Get_size()} {socket.gethostname()}\\n'.encode())")
    placed = re.findall(r"^(\d+) (\d+) (\S+)$", out.stdout, re.M)
    assert out.returncode == 0, out
    assert sorted(rank for rank, _, _ in placed) == ["0", "1", "2", "3"], out
    assert {size for _, size, _ in placed} == {"4"}, out
    assert sorted(host for _, _, host in placed) == HOSTS, out


# Run on the head: for every parameter array in both files, the largest difference.
DIFFERENCES = """
import json, numpy as np
a, b = np.load("runs/ranks4.npz"), np.load("runs/ranks1.npz")
print(json.dumps({
    "names": [sorted(a.files), sorted(b.files)],
    "worst": {k: float(np.max(np.abs(a[k] - b[k]))) for k in a.files
              if k in b.files and a[k].shape == b[k].shape},
    "values": int(sum(a[k].size for k in a.files)),
}))
"""


def test_4_ranks_on_4_containers_give_the_parameters_of_one_process():
    four = on_head(*MPIEXEC, *TRAIN, "--epochs", "2", "--save", "runs/ranks4.npz")
    assert four.returncode == 0, f"4-rank training across the containers failed:\n{four}"
    one = on_head(*TRAIN, "--epochs", "2", "--save", "runs/ranks1.npz")
    assert one.returncode == 0, f"single-process training failed:\n{one}"
    compared = on_head("python", "-c", DIFFERENCES)
    assert compared.returncode == 0, compared
    found = json.loads(compared.stdout)
    names4, names1 = found["names"]
    assert names4 and names4 == names1, f"parameter names differ: {names4} vs {names1}"
    assert sorted(found["worst"]) == names4, f"parameter shapes differ: {found}"
    worst = max(found["worst"].values())
    assert worst < 1e-10, f"4-rank and 1-process parameters differ: max abs diff {worst:.3g} (limit 1e-10)"
    print(f"4 ranks on 4 containers ({four.seconds:.1f} s) = 1 process ({one.seconds:.1f} s): "
          f"max abs diff {worst:.3g} over {len(names4)} arrays, {found['values']} values")


def start_long_training(log_path, *options, launch=None, epochs=5000, started_epoch=1):
    """A 4-rank training on the head (of minutes, by default; under `dpflow launch LAUNCH...`
    if given), its output in log_path, returned once its epoch table has reached
    `started_epoch` (so that a fault hits it mid-run)."""
    started = rf"^ *{started_epoch}/{epochs} "
    job = (["dpflow", "launch", *launch, "--", *TRAIN[1:]] if launch else [*MPIEXEC, *TRAIN])
    with open(log_path, "w") as log:
        process = start_job([*COMPOSE, "exec", "-T", "head", "env", "MPIEXEC_TIMEOUT=240", *job,
                             "--epochs", str(epochs), *options],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if re.search(started, log_path.read_text(), re.M):
            return process
        time.sleep(0.25)
    pytest.fail(f"the long training ended, or had not reached {started!r} within 60 s:\n"
                f"{last_lines(log_path.read_text())}")


def seconds_until_it_ends(process, since, log_path, timeout=90):
    """(exit status, seconds from `since`) of a job that a fault should end (or, under `dpflow
    launch`, survive) within `timeout` seconds; conftest kills it if it does not."""
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still ran {timeout} s after the fault:\n{last_lines(log_path.read_text())}")
    return status, time.monotonic() - since


def leftover_ranks(*hosts):
    """Ranks left behind on the surviving nodes would keep the cores busy and hold memory."""
    found = []
    for host in hosts:
        listed = compose("exec", "-T", host, "pgrep", "-a", "-f", "dpflow train", timeout=30)
        found += [f"{host}: {line}" for line in listed.stdout.splitlines()]
    return found


@pytest.fixture
def worker2():
    """worker2's container; afterwards back on the network and restarted (which ends
    whatever was stuck there; a killed one starts again), so that the next test has 4 healthy
    nodes."""
    container = compose("ps", "-q", "worker2").stdout.strip()
    assert container, "worker2 is not running"
    yield container
    run(["docker", "network", "connect", "--alias", "worker2", NETWORK, container], timeout=60)
    restarted = compose("restart", "--timeout", "1", "worker2", timeout=60)
    assert restarted.returncode == 0, f"could not restart worker2 after the fault:\n{restarted}"
    deadline = time.monotonic() + 30
    while on_head("ssh", "worker2", "true", timeout=30).returncode != 0:
        assert time.monotonic() < deadline, "the head cannot ssh to worker2 within 30 s of its restart"
        time.sleep(0.5)


def test_a_cut_link_ends_the_job_through_the_stall_timeout(worker2, tmp_path):
    # MPI never notices a cut link (it has no timeout of its own): the ranks would wait in
    # the allreduce forever. dpflow's --stall-timeout must end the job.
    log_path = tmp_path / "cut.log"
    process = start_long_training(log_path, "--stall-timeout", "10")
    cut_at = time.monotonic()
    cut = run(["docker", "network", "disconnect", NETWORK, worker2], timeout=60)
    assert cut.returncode == 0, cut
    status, seconds = seconds_until_it_ends(process, cut_at, log_path)
    left = leftover_ranks("head", "worker1", "worker3")
    output = log_path.read_text()
    assert status != 0 and seconds < 60 and not left, (
        f"cut worker2's link mid-run: status {status} after {seconds:.1f} s (want non-zero, < 60 s, "
        f"no ranks left); leftover ranks: {left or 'none'}; last lines:\n{last_lines(output)}")
    # The message is reported, not required: the rank whose watchdog fires first aborts the
    # job, and mpiexec may tear it down before that rank's stderr has been forwarded.
    reason = next((line for line in output.splitlines() if "no progress for" in line),
                  "(no stall message reached mpiexec's output)")
    print(f"cut worker2's link mid-run: --stall-timeout 10 ended the job in {seconds:.1f} s "
          f"with status {status}: {reason}")


def test_a_killed_node_ends_the_job_quickly_with_no_ranks_left(worker2, tmp_path):
    # SIGKILL to every process in worker2, as a power-off would. No --stall-timeout is
    # needed: hydra's proxy on the node is gone, and mpiexec ends the job.
    log_path = tmp_path / "kill.log"
    process = start_long_training(log_path)
    killed_at = time.monotonic()
    killed = compose("kill", "worker2", timeout=60)
    assert killed.returncode == 0, killed
    status, seconds = seconds_until_it_ends(process, killed_at, log_path)
    left = leftover_ranks("head", "worker1", "worker3")
    output = log_path.read_text()
    assert status != 0 and seconds < 60 and not left, (
        f"killed worker2 mid-run: status {status} after {seconds:.1f} s (want non-zero, < 60 s, "
        f"no ranks left); leftover ranks: {left or 'none'}; last lines:\n{last_lines(output)}")
    # MPICH's own lines name no host ("control_cb ... assert (!closed) failed"). ssh's
    # "Connection to worker2 closed by remote host." is in the output only when mpiexec
    # forwarded it before exiting, which it does not always (2 of 3 CI runs): reported here,
    # not required. `dpflow launch` names the node every time (the next test).
    reason = next((line for line in output.splitlines() if "worker2" in line and " ranks on " not in line),
                  "(ssh's line naming worker2 did not reach mpiexec's output)")
    print(f"killed worker2 mid-run: the job ended in {seconds:.1f} s with status {status}: {reason}")


def test_dpflow_launch_names_a_killed_node_and_finishes_on_the_nodes_left(worker2, tmp_path):
    # The same power-off under `dpflow launch`: it probes the hosts when the job fails, names
    # the one that does not answer, and resumes from the last checkpoint on the other three
    # (the checkpoint directory is on the runs volume, which every node mounts).
    log_path = tmp_path / "launch.log"
    checkpoints = f"/home/dpflow/runs/launch-{os.getpid()}-{int(time.time())}"
    process = start_long_training(
        log_path, "--checkpoint-dir", checkpoints, launch=["--hosts", ",".join(HOSTS), "--max-restarts", "1"],
        epochs=40, started_epoch=3)
    killed_at = time.monotonic()
    killed = compose("kill", "worker2", timeout=60)
    assert killed.returncode == 0, killed
    status, seconds = seconds_until_it_ends(process, killed_at, log_path, timeout=180)
    left = leftover_ranks("head", "worker1", "worker3")
    on_head("rm", "-rf", checkpoints, timeout=60)
    output = log_path.read_text()
    restart = re.search(r"^dpflow launch: restart 1/1: attempt 1 failed \(exit status \d+, host worker2 "
                        r"did not answer, at step \d+\); resuming from \S+ \(step \d+\); 3 ranks on 3 hosts.*$",
                        output, re.M)
    assert status == 0 and restart and "hosts lost: worker2" in output and not left, (
        f"killed worker2 under dpflow launch: status {status} after {seconds:.1f} s (want 0, a restart "
        f"naming worker2 on the 3 hosts left, no ranks left); leftover ranks: {left or 'none'}; "
        f"last lines:\n{last_lines(output)}")
    print(f"killed worker2 under dpflow launch: finished {seconds:.1f} s later on 3 nodes: {restart.group(0)}")


@pytest.mark.timeout(1000)  # the test service's own bound is 900 s, above the suite-wide 600
def test_the_whole_suite_passes_inside_a_container_as_the_non_root_user():
    # The test service (docker/compose.yaml): the serial suite, then the MPI suite under
    # mpiexec -n 2, each run even if the other failed.
    out = compose("run", "--rm", "-T", "test", timeout=900)
    output = out.stdout + out.stderr
    # pytest's closing lines: the serial run's, then one per MPI rank.
    summaries = [line.strip("= ") for line in output.splitlines()
                 if re.search(r"(passed|failed|error).* in [0-9.]+s", line)]
    failing = sorted(set(re.findall(r"^(?:FAILED|ERROR) .*$", output, re.M)))
    # pytest's "E   " lines: what each failing assertion saw.
    seen = re.findall(r"^E .*$", output, re.M)[:20]
    assert out.returncode == 0, (
        f"test service: status {out.returncode} inside the container ({'; '.join(summaries) or 'no pytest summary'}); "
        "failing tests:\n" + "\n".join(failing + seen) + f"\nlast lines:\n{last_lines(output)}")
    assert len([line for line in summaries if re.search(r"\d+ passed", line)]) >= 2, (
        f"the serial and the MPI suite should each report passed tests: {summaries}")
    print(f"test service: serial suite and mpiexec -n 2 MPI suite in {out.seconds:.1f} s "
          f"({'; '.join(summaries)})")
