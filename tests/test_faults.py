"""Never hang, never lose work: each failure mode launched for real under mpiexec, with a
hard timeout, asserting the exit status, the time to exit, the message, and what was saved."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import INJECT, OPENMPI_ENV, dpflow_command, finish, launch_prefix, mpiexec, run, start_job, wait_for
from dpflow.checkpoint import list_checkpoints, load_latest_valid, read_checkpoint



def snapshot(directory):
    """name -> sha256 of every file in a directory: to prove nothing saved was touched."""
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
def test_exception_on_rank_2_of_4_aborts_the_job_fast(flavor):
    launcher, _, python = launch_prefix(flavor, 4)
    result = run([*launcher, python, INJECT, "2", "5", "raise", "train", "--epochs", "50"], timeout=60,
                 env=OPENMPI_ENV)
    assert result.returncode != 0
    assert result.seconds < 15, result
    line = "dpflow: rank 2 on "
    assert result.stderr.count(line) == 1 and "failed: RuntimeError: injected failure at step 5" in result.stderr
    assert "Traceback" not in result.stderr


def start_training(tmp_path, *args, ranks=4, flavor="mpich"):
    """mpiexec dpflow train in the background; returns the Popen and the metrics path."""
    launcher, dpflow, _ = launch_prefix(flavor, ranks)
    metrics = tmp_path / "m.jsonl"
    command = [*launcher, *dpflow, "train", "--metrics", str(metrics), "--log-every", "1", *map(str, args)]
    process = start_job(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, **OPENMPI_ENV})
    return process, metrics


def steps_logged(metrics):
    try:
        return sum(1 for _ in open(metrics))
    except FileNotFoundError:
        return 0


def rank_pids(marker):
    """PIDs of the dpflow rank processes whose command line contains `marker`."""
    output = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, output.split()):
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(command[0]).startswith(b"python"):  # not the launcher's processes
            pids.append(pid)
    return pids


def rank_of(pid):
    """The MPI rank of a process, from the environment its launcher gave it."""
    environ = dict(item.split(b"=", 1) for item in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in item)
    return int(environ.get(b"PMI_RANK", environ.get(b"OMPI_COMM_WORLD_RANK", b"-1")))


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
def test_a_rank_killed_mid_run_ends_the_job_and_keeps_the_checkpoint(tmp_path, flavor):
    process, metrics = start_training(tmp_path, "--epochs", "400", "--checkpoint-dir", tmp_path / "ck",
                                      "--checkpoint-every", "1", flavor=flavor)
    wait_for(lambda: len(list_checkpoints(str(tmp_path / "ck"))) >= 2, 60, "two checkpoints")
    victims = rank_pids(str(metrics))
    assert len(victims) == 4, victims
    os.kill(victims[-1], signal.SIGKILL)
    code, stdout, stderr, seconds = finish(process, 30)
    assert code != 0 and seconds < 15, (code, seconds, stderr)
    assert "done:" not in stdout  # the survivors did not carry on as if nothing happened
    path, arrays, meta = load_latest_valid(str(tmp_path / "ck"))
    assert meta["global_step"] > 0 and all(np.isfinite(a).all() for a in arrays.values())


def test_a_stalled_rank_is_caught_by_the_watchdog(tmp_path):
    process, metrics = start_training(tmp_path, "--epochs", "400", "--stall-timeout", "3")
    wait_for(lambda: steps_logged(metrics) > 20, 60, "training to start")
    victim = rank_pids(str(metrics))[-1]
    victim_rank = rank_of(victim)
    assert victim_rank != 0  # rank 0 surveys; the test stops another one
    os.kill(victim, signal.SIGSTOP)  # alive but silent, as behind a cut link
    try:
        code, stdout, stderr, seconds = finish(process, 30)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code != 0 and seconds < 15, (code, seconds, stderr)
    assert "no progress for" in stderr and "--stall-timeout 3" in stderr, stderr
    # Rank 0 names the rank that never answered, as Horovod's stall check does.
    assert f"ranks [{victim_rank}] never answered: dead, stopped or cut off" in stderr, stderr


BAD_INPUTS = [
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--hidden", "64,abc"], "--hidden must be comma-separated integers"),
    (["--batch-size", "3"], "--batch-size 3 is the global batch and must be >= the number of ranks (4)"),
    (["--dataset", "missing.npz"], "'missing.npz' is neither a built-in dataset"),
    (["--config", "nope.toml"], "--config nope.toml: no such file"),
    (["--normalize", "zscore"], "invalid choice: 'zscore'"),
    (["--validation-split", "1"], "--validation-split must be < 1, got 1.0 (the fraction of training rows held out, in [0, 1)"),
    (["--validation-split", "-0.2"], "--validation-split must be >= 0, got -0.2"),
    (["--keep-best", "val_accuracy", "--checkpoint-dir", "ck"], "--keep-best val_accuracy needs validation rows"),
    (["--keep-best", "test_loss"], "--keep-best test_loss needs --checkpoint-dir DIR"),
    (["--early-stop", "3"], "--early-stop 3 (it watches val_loss) needs validation rows"),
    (["--early-stop", "-1"], "--early-stop must be >= 0, got -1"),
    (["--classes", "1"], "--classes must be 0 (count them from the labels) or >= 2, got 1"),
    (["--classes", "3", "--dataset", "digits"], "y_train holds label 9, not below --classes 3; raise --classes"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_flags_exit_2_with_one_message(dpflow, args, message):
    result = dpflow("train", *args, ranks=4, timeout=60)
    assert result.returncode == 2, result
    assert result.stderr.count("dpflow: error:") == 1 and message in result.stderr, result
    assert "Traceback" not in result.stderr + result.stdout


def bad_dataset(tmp_path, kind):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    path = tmp_path / "d.npz"
    if kind == "truncated":
        np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "misshaped":
        np.savez(path, x_train=x.reshape(50, 1, 1, 2, 2), y_train=y, x_test=x, y_test=y)
    elif kind == "labels":
        np.savez(path, x_train=x, y_train=y - 5, x_test=x, y_test=y)
    elif kind == "huge label":
        np.savez(path, x_train=x, y_train=np.where(np.arange(50) == 7, 10**9, y), x_test=x, y_test=y)
    elif kind == "empty test":
        np.savez(path, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    elif kind == "no features":
        np.savez(path, x_train=x[:, :0], y_train=y, x_test=x[:, :0], y_test=y)
    elif kind == "nan, memory-mapped":
        x[31, 2] = np.nan
        np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)  # stored uncompressed: memory-mapped
    elif kind == "features":
        np.savez(path, x_train=x, y_train=y, x_test=x[:, :3], y_test=y)
    elif kind == "unreadable":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind,message", [
    ("truncated", "truncated"), ("misshaped", "give rows (N, features) or images"),
    ("labels", "y_train holds label -5"),
    ("features", "one x_train example has shape (4,) but one x_test example has (3,)"),
    ("unreadable", "has no train-images-idx3-ubyte"),
    ("huge label", "y_train holds label 1000000000; labels must be class indices 0..K-1 with K at most 100,000"),
    ("empty test", "the test split is empty"), ("no features", "0 features"),
    ("nan, memory-mapped", "x_train holds NaN or inf (1 in rows 0..49, the first in row 31)"),
])
def test_bad_datasets_exit_2_with_one_message(dpflow, tmp_path, kind, message):
    result = dpflow("train", "--dataset", bad_dataset(tmp_path, kind), ranks=3, timeout=60)
    assert result.returncode == 2 and result.stderr.count("dpflow: error:") == 1, result
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_config_key(dpflow, tmp_path):
    (tmp_path / "c.toml").write_text("learning_rate = 0.1\n")
    result = dpflow("train", "--config", tmp_path / "c.toml", ranks=2, timeout=60)
    assert result.returncode == 2 and "unknown key 'learning_rate'" in result.stderr, result


def test_unwritable_checkpoint_dir(dpflow, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = dpflow("train", "--checkpoint-dir", tmp_path / "file" / "ck", ranks=2, timeout=60)
    assert result.returncode == 2 and "--checkpoint-dir" in result.stderr and "not writable" in result.stderr, result


@pytest.fixture(scope="module")
def trained_checkpoints(tmp_path_factory):
    """The checkpoint directory of one short run with --optimizer sgd, for the refusals."""
    directory = tmp_path_factory.mktemp("trained") / "ck"
    first = run([*dpflow_command(), "train", "--epochs", "1", "--optimizer", "sgd",
                 "--checkpoint-dir", directory], ranks=2, timeout=120)
    assert first.returncode == 0, first
    return directory


@pytest.mark.parametrize("args,messages", [
    (["--epochs", "1"], ["already holds checkpoints", "--resume"]),  # a new run never prunes them
    (["--optimizer", "sgd", "--hidden", "32", "--resume"], ["from a different model", "--hidden"]),
    (["--resume"], ["was trained with --optimizer 'sgd' (now 'momentum')"]),
], ids=["new-run", "other-model", "other-optimizer"])
def test_refused_resumes_leave_the_checkpoints_intact(dpflow, tmp_path, trained_checkpoints, args, messages):
    shutil.copytree(trained_checkpoints, tmp_path / "ck")
    before = snapshot(tmp_path / "ck")
    result = dpflow("train", "--epochs", "2", *args, "--checkpoint-dir", tmp_path / "ck", ranks=2)
    assert result.returncode == 2 and result.stderr.count("dpflow: error:") == 1, result
    assert all(message in result.stderr for message in messages), result
    assert snapshot(tmp_path / "ck") == before


def test_divergence_stops_every_rank_at_the_same_step_naming_the_checkpoint(dpflow, tmp_path):
    result = dpflow("train", "--epochs", "5", "--lr", "1e6", "--optimizer", "sgd", "--checkpoint-dir",
                    tmp_path / "ck", ranks=4, timeout=60)
    assert result.returncode == 1, result
    assert "NaN or infinite at step" in result.stderr and result.stderr.count("training failed") == 1
    for path in list_checkpoints(str(tmp_path / "ck")):
        arrays, meta = read_checkpoint(path)
        assert all(np.isfinite(a).all() for a in arrays.values())


def test_nan_on_one_rank_is_seen_by_all_and_can_be_skipped():
    stopped = run([sys.executable, INJECT, "1", "3", "nan", "train", "--epochs", "2"], ranks=3, timeout=60)
    assert stopped.returncode == 1 and "NaN or infinite at step 3" in stopped.stderr, stopped
    skipped = run([sys.executable, INJECT, "1", "3", "nan", "train", "--epochs", "2", "--on-nonfinite", "skip"],
                  ranks=3, timeout=60)
    assert skipped.returncode == 0, skipped
    assert "step 3: non-finite loss or gradient; step skipped" in skipped.stderr


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(dpflow, tmp_path):
    common = ["--epochs", "6", "--dtype", "float64", "--batch-size", "16"]
    straight = dpflow("train", *common, "--save", tmp_path / "straight.npz", ranks=4)
    assert straight.returncode == 0, straight
    # One SIGTERM to rank 2 before step 100 (epoch 2 has 90 steps): every rank stops after it.
    stopped = run([sys.executable, INJECT, "2", "100", "sigterm", "train", *common,
                   "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "100"], ranks=4, timeout=90)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped
    assert "stopped by SIGTERM at step 100 (epoch 2)" in stopped.stderr, stopped
    assert "continue with --resume" in stopped.stderr
    path, arrays, meta = load_latest_valid(str(tmp_path / "ck"))
    assert (meta["global_step"], meta["epoch"], meta["step_in_epoch"]) == (100, 1, 10)  # mid-epoch
    shutil.copytree(tmp_path / "ck", tmp_path / "ck-copy")
    resumed = dpflow("train", *common, "--checkpoint-dir", tmp_path / "ck", "--resume",
                     "--save", tmp_path / "resumed.npz", ranks=4)
    assert resumed.returncode == 0, resumed
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert all(np.array_equal(a[name], b[name]) for name in a.files)
    # And from the same checkpoint on another world size, to rounding.
    other = dpflow("train", *common, "--checkpoint-dir", tmp_path / "ck-copy", "--resume",
                   "--save", tmp_path / "other.npz", ranks=3)
    assert other.returncode == 0, other
    c = np.load(tmp_path / "other.npz")
    assert max(np.max(np.abs(a[name] - c[name])) for name in a.files) < 1e-10


def test_damaged_checkpoints_fall_back_or_stop_clearly(dpflow, tmp_path):
    trained = dpflow("train", "--epochs", "3", "--checkpoint-dir", tmp_path / "ck", ranks=2)
    assert trained.returncode == 0
    newest, middle, oldest = list_checkpoints(str(tmp_path / "ck"))
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)
    data = bytearray(open(middle, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(middle, "wb").write(bytes(data))
    result = dpflow("train", "--epochs", "4", "--checkpoint-dir", tmp_path / "ck", "--resume", ranks=2)
    assert result.returncode == 0, result
    assert "ckpt-000000069.dpf is damaged" in result.stderr and "ckpt-000000046.dpf is damaged" in result.stderr
    assert "resumed from" in result.stdout and "ckpt-000000023.dpf" in result.stdout
    # With every checkpoint damaged: a clear error, exit 2, and the files are left alone.
    for path in list_checkpoints(str(tmp_path / "ck")):
        with open(path, "r+b") as handle:
            handle.truncate(100)
    before = snapshot(tmp_path / "ck")
    result = dpflow("train", "--epochs", "6", "--checkpoint-dir", tmp_path / "ck", "--resume", ranks=2)
    assert result.returncode == 2 and "no valid checkpoint" in result.stderr, result
    assert snapshot(tmp_path / "ck") == before


def test_ranks_with_different_core_counts_still_agree_on_the_collectives(tmp_path):
    """One rank pinned to one core thinks its node is oversubscribed, the other not: they
    must still call the same collective (a mismatch hangs at step 1)."""
    if not shutil.which("taskset"):
        pytest.skip("taskset is not installed")
    train = [*dpflow_command(), "train", "--epochs", "2", "--stall-timeout", "20"]
    result = run([mpiexec(), "-n", "1", "taskset", "-c", "0", *train, ":", "-n", "1", *train], timeout=60)
    assert result.returncode == 0, result
    assert "done: test accuracy" in result.stdout


@pytest.mark.parametrize("first,second,message", [
    (["--epochs", "1"], ["--epochs", "2"], "rank 1 was given a different run: --epochs 2 (rank 0: 1)"),
    (["--seed", "0"], ["--seed", "1"], "seed 1 (rank 0: 0)"),
    (["--samples", "400"], ["--samples", "410"], "samples 410 (rank 0: 400)"),
])
def test_ranks_given_different_runs_are_refused(first, second, message):
    """MPMD launches stand in for a stale config file or dataset on one node."""
    base = [*dpflow_command(), "train", "--dataset", "synthetic"]
    result = run([mpiexec(), "-n", "1", *base, *first, ":", "-n", "1", *base, *second], timeout=60)
    assert result.returncode == 2 and result.stderr.count("dpflow: error:") == 1, result
    assert message in result.stderr and "same flags, config file and dataset" in result.stderr


def test_mpi4py_on_another_mpi_than_the_launcher_is_a_clear_error(dpflow):
    # As under Debian's python3-mpi4py with MPICH's mpiexec: the launcher says 3 ranks,
    # but MPI initialises a world of 1.
    result = dpflow("info", env={"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0"})
    assert result.returncode == 2, result
    assert "the launcher started 3 ranks but MPI sees a world of 1" in result.stderr


def test_a_garbled_latest_pointer_falls_back_to_the_checkpoints(dpflow, tmp_path):
    first = dpflow("train", "--epochs", "2", "--checkpoint-dir", tmp_path / "ck", ranks=2)
    assert first.returncode == 0
    (tmp_path / "ck" / "latest").write_bytes(b"\xff\x00garbage")
    result = dpflow("train", "--epochs", "3", "--checkpoint-dir", tmp_path / "ck", "--resume", ranks=2)
    assert result.returncode == 0, result
    assert "resumed from" in result.stdout and "ckpt-000000046.dpf" in result.stdout


@pytest.mark.parametrize("option", ["--metrics", "--save"])
def test_output_paths_that_are_directories_are_refused_before_training(dpflow, tmp_path, option):
    result = dpflow("train", option, tmp_path, ranks=2)
    assert result.returncode == 2 and f"{option} {tmp_path} is a directory" in result.stderr, result
    assert "epoch" not in result.stdout


def test_skipped_steps_leave_the_epoch_loss_finite_and_the_metrics_valid_json(tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = run([sys.executable, INJECT, "1", "3", "nan", "train", "--epochs", "2", "--on-nonfinite", "skip",
                  "--metrics", str(metrics)], ranks=3, timeout=60)
    assert result.returncode == 0, result
    import json

    records = [json.loads(line) for line in open(metrics)]  # strict JSON: no NaN literals
    assert records[0]["train_loss"] is not None and records[0]["train_loss"] > 0
    assert records[1]["train_loss"] is None  # every step of epoch 2 was skipped


def test_eval_on_more_ranks_than_the_training_batch(dpflow, tmp_path):
    trained = dpflow("train", "--epochs", "1", "--batch-size", "2", "--checkpoint-dir", tmp_path / "ck")
    assert trained.returncode == 0, trained
    result = dpflow("eval", "--checkpoint", tmp_path / "ck", ranks=3)
    assert result.returncode == 0 and "rows 360" in result.stdout, result
    missing = dpflow("eval", "--checkpoint", tmp_path / "nothing-here", ranks=2)
    assert missing.returncode == 2 and "--checkpoint" in missing.stderr and "no such file" in missing.stderr


def test_ctrl_c_stops_every_rank_with_a_checkpoint(tmp_path):
    process, metrics = start_training(tmp_path, "--epochs", "400", "--checkpoint-dir", tmp_path / "ck",
                                      "--checkpoint-every", "1000")
    wait_for(lambda: steps_logged(metrics) > 30, 60, "training to start")
    os.killpg(process.pid, signal.SIGINT)
    code, stdout, stderr, seconds = finish(process, 30)
    assert code == 130 and "stopped by SIGINT" in stderr, (code, stderr)
    path, arrays, meta = load_latest_valid(str(tmp_path / "ck"))
    assert meta["global_step"] >= 30
