"""Preemption never loses work: signals sent the way schedulers send them, checkpoints by
steps and by time, and checkpoint writes that fail.

The job is held still at a fixed step (tests/inject_fault.py `hold`: rank 0 waits before
step HOLD_STEP until the test has sent its signals), so every pattern stops at the same
step, and `--resume` must then end bitwise equal to an uninterrupted run. Every process
started here has a timeout; the tests wait for conditions, not for fixed times.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import INJECT, dpflow_command, mpiexec, run, start_job, wait_for
from dpflow.checkpoint import list_checkpoints, load_latest_valid, read_checkpoint
from dpflow.signals import IMPATIENT_SECONDS, StopRequest

HOLD_STEP = 30
# A small model: three of its checkpoints (two kept, one being written) fit the 2 MB disk below.
COMMON = ["train", "--epochs", "3", "--dtype", "float64", "--batch-size", "32", "--hidden", "128,64", "--quiet"]


# --- one stop request, however many signals ------------------------------------------------

def test_signals_that_arrive_together_are_one_request():
    now = [100.0]
    stop = StopRequest(clock=lambda: now[0])
    stop.request(signal.SIGTERM)
    now[0] += 0.05
    stop.request(signal.SIGTERM)  # the launcher's copy
    now[0] += 1.0
    stop.request(signal.SIGINT)  # a Ctrl-C right after
    assert stop.signum == signal.SIGTERM and stop.name() == "SIGTERM"
    now[0] += IMPATIENT_SECONDS
    stop.request(signal.SIGTERM)  # SIGTERM never skips the checkpoint
    with pytest.raises(KeyboardInterrupt):
        stop.request(signal.SIGINT)  # a person who will not wait


def rank_pids(marker):
    """The rank processes (python) whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in command and os.path.basename(command[0]).startswith(b"python"):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    done = run([*dpflow_command(), *COMMON, "--save", str(directory / "p.npz")], ranks=4, timeout=180)
    assert done.returncode == 0, done
    return dict(np.load(directory / "p.npz"))


def send(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


PATTERNS = {
    # scancel or a time limit: every process of the job step at once
    "everyone at once": lambda job, ranks: os.killpg(job.pid, signal.SIGTERM),
    "the launcher only": lambda job, ranks: os.kill(job.pid, signal.SIGTERM),
    "the ranks only": lambda job, ranks: send(ranks, signal.SIGTERM),
    "the ranks 50 ms before the launcher": lambda job, ranks: (
        send(ranks, signal.SIGTERM), time.sleep(0.05), os.kill(job.pid, signal.SIGTERM)),
    "everyone twice within 0.2 s": lambda job, ranks: (
        os.killpg(job.pid, signal.SIGTERM), time.sleep(0.15), os.killpg(job.pid, signal.SIGTERM)),
    "SIGTERM then Ctrl-C": lambda job, ranks: (
        os.killpg(job.pid, signal.SIGTERM), time.sleep(0.5), os.killpg(job.pid, signal.SIGINT)),
}


class Job:
    """mpiexec -n 4 of dpflow train with rank 0 held before HOLD_STEP; stderr is read as it comes."""

    def __init__(self, tmp_path, *args, directory=None):
        self.hold = tmp_path / "hold"
        self.hold.mkdir()
        self.directory = str(directory or tmp_path / "ck")
        command = [mpiexec(), "-n", "4", sys.executable, INJECT, "0", str(HOLD_STEP), "hold", *COMMON,
                   "--checkpoint-dir", self.directory, *args]
        self.process = start_job(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, DPFLOW_HOLD_DIR=str(self.hold)))
        self.pid = self.process.pid
        self.err = ""
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()
        wait_for(lambda: (self.hold / "held").exists() or self.process.poll() is not None, 90,
                 "rank 0 to reach the held step")
        assert self.process.poll() is None, self.err
        self.ranks = rank_pids(self.directory)
        assert len(self.ranks) == 4, self.ranks

    def read(self):
        for line in self.process.stderr:
            self.err += line

    def release(self, signalled=False):
        """Let rank 0 go on; with `signalled`, once it has received its stop request (its
        own signal, or the copy the launcher forwards), so the job stops at HOLD_STEP."""
        if signalled:
            wait_for(lambda: (self.hold / "signalled").exists(), 30, "rank 0 to receive the signal")
        (self.hold / "release").touch()

    def finish(self, timeout=60):
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"the job did not stop within {timeout} s\n{self.err}")
        self.reader.join(timeout=10)
        return self.process.returncode, self.err


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_preemption_writes_the_checkpoint_and_resumes_bitwise(tmp_path, straight, pattern):
    job = Job(tmp_path)
    PATTERNS[pattern](job, job.ranks)
    job.release(signalled=True)
    status, err = job.finish()
    assert status == 128 + signal.SIGTERM, (status, err)
    assert f"stopped by SIGTERM at step {HOLD_STEP}" in err and "continue with --resume" in err, err
    assert "interrupted again" not in err and "Traceback" not in err, err
    path, arrays, meta = load_latest_valid(str(tmp_path / "ck"))
    assert meta["global_step"] == HOLD_STEP, path
    assert not (tmp_path / "ck" / ".lock").exists()
    resumed = run([*dpflow_command(), *COMMON, "--checkpoint-dir", str(tmp_path / "ck"), "--resume",
                   "--save", str(tmp_path / "p.npz")], ranks=4, timeout=180)
    assert resumed.returncode == 0, resumed
    got = np.load(tmp_path / "p.npz")
    assert all(np.array_equal(got[name], straight[name]) for name in straight)


def test_ctrl_c_names_sigint_and_exits_130(tmp_path):
    job = Job(tmp_path)
    os.killpg(job.pid, signal.SIGINT)
    job.release(signalled=True)
    status, err = job.finish()
    assert status == 130 and f"stopped by SIGINT at step {HOLD_STEP}" in err, (status, err)
    assert load_latest_valid(str(tmp_path / "ck"))[2]["global_step"] == HOLD_STEP


def test_a_deliberate_second_ctrl_c_stops_at_once_and_corrupts_nothing(tmp_path):
    job = Job(tmp_path, "--checkpoint-every-steps", "10")
    assert len(list_checkpoints(job.directory)) == 2  # steps 10 and 20, before the hold at step 30
    os.killpg(job.pid, signal.SIGINT)
    time.sleep(IMPATIENT_SECONDS + 0.5)  # the rule itself is about time: a person who waited
    os.killpg(job.pid, signal.SIGINT)
    job.release()
    status, err = job.finish()
    # The ranks stop at once (130); MPICH's mpiexec, given its own second Ctrl-C, may end the
    # job itself first, with a status of its own (255, even 0). Either way no stop checkpoint
    # is written and nothing is left half-written.
    assert status != 128 + signal.SIGINT or "stopping at once without a checkpoint" in err, (status, err)
    assert "Traceback" not in err and "stopped by SIGINT" not in err, err
    for path in list_checkpoints(str(tmp_path / "ck")):
        read_checkpoint(path)  # every checkpoint left is whole
    path, arrays, meta = load_latest_valid(str(tmp_path / "ck"))
    assert meta["global_step"] == 20


# --- checkpoints by steps and by time --------------------------------------------------------

def test_checkpoint_every_steps(dpflow, tmp_path):
    result = dpflow(*COMMON, "--epochs", "1", "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every-steps", "20",
                    "--keep-checkpoints", "10", ranks=3)
    assert result.returncode == 0, result
    steps = sorted(read_checkpoint(p)[1]["global_step"] for p in list_checkpoints(str(tmp_path / "ck")))
    assert steps == [20, 40, 45], steps  # 1437 rows / 32 = 45 steps: every 20, and the epoch's end


def test_checkpoint_every_seconds_is_agreed_by_every_rank(tmp_path):
    """Rank 0's clock decides; the decision rides the allreduce. The job is held for longer
    than the interval at step 30, so the step after it must be checkpointed."""
    job = Job(tmp_path, "--checkpoint-every-seconds", "2", "--checkpoint-every", "100",
              "--keep-checkpoints", "50")
    time.sleep(2.5)  # longer than the interval: the rule is about time
    job.release()
    status, err = job.finish(timeout=120)
    assert status == 0, err
    steps = [read_checkpoint(p)[1]["global_step"] for p in list_checkpoints(str(tmp_path / "ck"))]
    assert HOLD_STEP in steps, steps


# --- checkpoints that cannot be written -------------------------------------------------------

def test_a_vanished_checkpoint_dir_warns_keeps_training_and_says_so_at_the_end(tmp_path):
    job = Job(tmp_path, "--checkpoint-every-steps", "10")
    assert list_checkpoints(job.directory)
    os.rename(tmp_path / "ck", tmp_path / "ck-moved")
    (tmp_path / "ck").write_text("a file where the checkpoint directory was")
    job.release()
    status, err = job.finish(timeout=120)
    assert status == 3, (status, err)
    assert "warning: checkpoint at step 40 not written" in err and str(tmp_path / "ck") in err, err
    assert "Training goes on" in err
    assert "training finished, but the last checkpoint is older than the end of the run (step 135)" in err, err
    assert load_latest_valid(str(tmp_path / "ck-moved"))[2]["global_step"] == 20  # the old ones are intact


def need_root_mounts():
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs root and mount(8)")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    need_root_mounts()
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "dpflow-test", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_directory_without_room_for_two_checkpoints_is_refused(dpflow, small_disk):
    # About 660k float32 parameters and as much momentum: 5 MB a checkpoint, on a 2 MB disk.
    result = dpflow("train", "--epochs", "1", "--hidden", "2048,256", "--checkpoint-dir", small_disk / "ck", ranks=2)
    assert result.returncode == 2 and result.stderr.count("dpflow: error:") == 1, result
    assert "MB free; two checkpoints of this model need" in result.stderr and "--checkpoint-dir" in result.stderr


def test_a_full_disk_costs_no_checkpoint_and_the_next_write_succeeds(tmp_path, small_disk, straight):
    job = Job(tmp_path, "--checkpoint-every-steps", "10", "--keep-checkpoints", "2",
              "--save", str(tmp_path / "p.npz"), directory=small_disk / "ck")
    ck = job.directory
    before = {name: open(os.path.join(ck, name), "rb").read() for name in os.listdir(ck)}
    assert "ckpt-000000020.dpf" in before and "latest" in before
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to its last byte
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    job.release()
    wait_for(lambda: "checkpoint at step 30 not written" in job.err, 60, "the failed write's warning")
    for name, data in before.items():  # nothing already saved was lost, `latest` included
        assert open(os.path.join(ck, name), "rb").read() == data, name
    os.unlink(filler)  # room again: the next checkpoint is written
    status, err = job.finish(timeout=120)
    assert status == 0, err
    assert "No space left on device" in err and "MB free" in err and "Training goes on" in err, err
    assert load_latest_valid(ck)[2]["global_step"] == 135
    assert not [n for n in os.listdir(ck) if n.startswith(".tmp-")]
    got = np.load(tmp_path / "p.npz")
    assert all(np.array_equal(got[name], straight[name]) for name in straight)


# --- one run per directory; what a crash leaves behind ---------------------------------------

def test_a_second_run_is_refused_then_a_crash_leaves_nothing_in_the_way(tmp_path, straight):
    metrics = tmp_path / "m.jsonl"
    job = Job(tmp_path, "--checkpoint-every-steps", "10", "--metrics", str(metrics), "--log-every", "1")
    second = run([*dpflow_command(), *COMMON, "--checkpoint-dir", job.directory, "--resume"], ranks=2, timeout=120)
    assert second.returncode == 2 and second.stderr.count("dpflow: error:") == 1, second
    assert f"--checkpoint-dir {job.directory} is in use by another run (pid " in second.stderr, second
    assert f" on {os.uname().nodename}, since " in second.stderr
    os.killpg(job.pid, signal.SIGKILL)  # a crash: no handler runs, the lock file stays behind
    job.finish()
    (tmp_path / "ck" / ".tmp-killed.part").write_bytes(b"half a checkpoint")
    assert (tmp_path / "ck" / ".lock").exists()
    resumed = run([*dpflow_command(), *COMMON, "--checkpoint-dir", job.directory, "--resume", "--metrics",
                   str(metrics), "--log-every", "1", "--save", str(tmp_path / "p.npz")], ranks=4, timeout=180)
    assert resumed.returncode == 0, resumed
    assert sorted(os.listdir(tmp_path / "ck")) == ["ckpt-000000045.dpf", "ckpt-000000090.dpf",
                                                    "ckpt-000000135.dpf", "latest"]
    got = np.load(tmp_path / "p.npz")
    assert all(np.array_equal(got[name], straight[name]) for name in straight)
    records = [json.loads(line) for line in open(metrics)]
    steps = [r["step"] for r in records if r.get("test_loss") is None]
    assert steps == list(range(1, 136)), steps  # steps 21-29 of the crashed run are not there twice
    assert [r["epoch"] for r in records if r.get("test_loss") is not None] == [1, 2, 3]
