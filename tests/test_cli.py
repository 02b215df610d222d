"""`dpflow train | eval | info | plot` as users run them: real processes under mpiexec, each
with a timeout."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import load, run


QUICK = ["--epochs", "2", "--dtype", "float64"]


def max_difference(a, b):
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[name] - b[name]))) for name in a)


def records(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("ranks", [None, 4])
def test_default_run_reaches_the_accuracy_bar(dpflow, tmp_path, ranks):
    result = dpflow("train", "--metrics", tmp_path / "m.jsonl", ranks=ranks, timeout=120)
    assert result.returncode == 0, result
    epochs = records(tmp_path / "m.jsonl")
    assert len(epochs) == 20
    assert epochs[-1]["test_accuracy"] >= 0.97
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] / 10
    for key in ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "samples_per_sec", "comm_fraction"):
        assert key in epochs[-1]
    # Only rank 0 prints: one banner, one line per epoch.
    assert result.stdout.count("dpflow 0.1.0 |") == 1
    assert result.stdout.count("/20 ") == 20
    assert f"{ranks or 1} rank" in result.stdout and "BLAS threads per rank" in result.stdout


def test_one_and_four_ranks_save_equal_parameters(dpflow, tmp_path):
    one = dpflow("train", *QUICK, "--save", tmp_path / "one.npz")
    four = dpflow("train", *QUICK, "--save", tmp_path / "four.npz", ranks=4)
    assert one.returncode == 0 and four.returncode == 0, (one, four)
    a, b = load(tmp_path / "one.npz"), load(tmp_path / "four.npz")
    assert sorted(a) == ["fc0.W", "fc0.b", "fc1.W", "fc1.b", "fc2.W", "fc2.b"]
    assert max_difference(a, b) < 1e-10


def test_resume_continues_the_exact_trajectory(dpflow, tmp_path):
    straight = dpflow("train", "--epochs", "4", "--dtype", "float64", "--save", tmp_path / "straight.npz", ranks=2)
    assert straight.returncode == 0, straight
    first = dpflow("train", "--epochs", "2", "--dtype", "float64", "--checkpoint-dir", tmp_path / "ck", ranks=2)
    assert first.returncode == 0, first
    shutil.copytree(tmp_path / "ck", tmp_path / "ck3")  # the same checkpoint, resumed on 3 ranks below
    same = dpflow("train", "--epochs", "4", "--dtype", "float64", "--checkpoint-dir", tmp_path / "ck",
                  "--resume", "--save", tmp_path / "same.npz", ranks=2)
    assert same.returncode == 0 and "resumed from" in same.stdout, same
    assert max_difference(load(tmp_path / "straight.npz"), load(tmp_path / "same.npz")) == 0.0
    # A different world size continues the same trajectory to rounding.
    other = dpflow("train", "--epochs", "4", "--dtype", "float64", "--checkpoint-dir", tmp_path / "ck3",
                   "--resume", "--save", tmp_path / "other.npz", ranks=3)
    assert other.returncode == 0, other
    assert max_difference(load(tmp_path / "straight.npz"), load(tmp_path / "other.npz")) < 1e-10
    # Resumed once more with the same --epochs: finished, nothing to train, and it says how to go on.
    again = dpflow("train", "--epochs", "4", "--dtype", "float64", "--checkpoint-dir", tmp_path / "ck", "--resume")
    assert again.returncode == 0, again
    assert "it has finished all 4 epochs" in again.stdout and "raise --epochs to train further" in again.stdout, again


def test_config_file_with_flag_override(dpflow, tmp_path):
    (tmp_path / "run.toml").write_text('epochs = 1\nhidden = "16"\nlr = 0.1\noptimizer = "adam"\nbatch-size = 100\n')
    result = dpflow("train", "--config", tmp_path / "run.toml", "--epochs", "3", "--metrics", tmp_path / "m.jsonl", ranks=2)
    assert result.returncode == 0, result
    assert "MLP 64-16-10" in result.stdout and "adam" in result.stdout and "100 global = 50 per rank" in result.stdout
    assert len(records(tmp_path / "m.jsonl")) == 3  # the flag won over the file


def write_npz_dataset(path, rng, features=6, classes=3):
    centres = rng.normal(0, 3, (classes, features))
    y = rng.integers(0, classes, 120)
    x = centres[y] + rng.normal(size=(120, features))
    np.savez(path, x_train=x[:90], y_train=y[:90], x_test=x[90:], y_test=y[90:])


def write_idx_dataset(directory, rng):
    import gzip
    import struct

    directory.mkdir()
    images = rng.integers(0, 256, (60, 3, 3)).astype(np.uint8)
    labels = (images.reshape(60, -1).mean(axis=1) > 127).astype(np.uint8)
    for stem, array in [("train-images-idx3-ubyte", images[:40]), ("train-labels-idx1-ubyte", labels[:40]),
                        ("t10k-images-idx3-ubyte", images[40:]), ("t10k-labels-idx1-ubyte", labels[40:])]:
        with gzip.open(directory / f"{stem}.gz", "wb") as handle:
            handle.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.mark.parametrize("kind", ["npz", "idx", "synthetic", "spirals"])
def test_each_dataset_kind_trains(dpflow, tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "npz":
        write_npz_dataset(tmp_path / "d.npz", rng)
        args, shape = ["--dataset", tmp_path / "d.npz"], "MLP 6-"
    elif kind == "idx":
        write_idx_dataset(tmp_path / "mnist", rng)
        args, shape = ["--dataset", tmp_path / "mnist"], "MLP 9-"
    elif kind == "synthetic":
        args, shape = ["--dataset", "synthetic", "--samples", "500", "--features", "7", "--classes", "5"], "MLP 7-256-128-5"
    else:
        args, shape = ["--dataset", "spirals", "--samples", "300", "--classes", "3"], "MLP 2-256-128-3"
    result = dpflow("train", *args, "--epochs", "2", ranks=2)
    assert result.returncode == 0, result
    assert shape in result.stdout and "done: test accuracy" in result.stdout


def test_eval_counts_each_test_row_once_on_any_world_size(dpflow, tmp_path):
    trained = dpflow("train", *QUICK, "--checkpoint-dir", tmp_path / "ck", "--metrics", tmp_path / "m.jsonl")
    assert trained.returncode == 0, trained
    final = records(tmp_path / "m.jsonl")[-1]
    for ranks in (None, 3):
        result = dpflow("eval", "--checkpoint", tmp_path / "ck", ranks=ranks)
        assert result.returncode == 0, result
        assert f"test_accuracy {final['test_accuracy']:.2%}" in result.stdout
        assert "rows 360" in result.stdout and f"ranks {ranks or 1}" in result.stdout


def test_info(dpflow):
    result = dpflow("info", ranks=2)
    assert result.returncode == 0, result
    assert "world size  2" in result.stdout and "MPICH" in result.stdout
    assert "numpy" in result.stdout and "thread(s) per rank" in result.stdout
    assert result.stdout.count("dpflow      0.1.0") == 1


def test_plot_writes_a_png(dpflow, tmp_path):
    pytest.importorskip("matplotlib")
    trained = dpflow("train", "--epochs", "3", "--log-every", "5", "--metrics", tmp_path / "m.jsonl")
    assert trained.returncode == 0
    steps = [r for r in records(tmp_path / "m.jsonl") if r["test_loss"] is None]
    assert [r["step"] for r in steps][:3] == [5, 10, 15]
    result = dpflow("plot", tmp_path / "m.jsonl", "-o", tmp_path / "curves.png")
    assert result.returncode == 0, result
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_python_m_dpflow_and_version(tmp_path):
    import sys

    result = run([sys.executable, "-m", "dpflow", "--version"], timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "dpflow 0.1.0"


def test_linear_scaling_and_warmup_are_reported(dpflow, tmp_path):
    result = dpflow("train", "--epochs", "3", "--batch-size", "256", "--lr-scaling", "linear", "--base-batch-size", "64",
                    "--lr", "0.02", "--warmup-epochs", "2", "--metrics", tmp_path / "m.jsonl", ranks=2)
    assert result.returncode == 0, result
    assert "lr 0.08 (momentum, linear scaling from 0.02, 2 warmup epochs)" in result.stdout
    lrs = [r["lr"] for r in records(tmp_path / "m.jsonl")]
    assert lrs[-1] == pytest.approx(0.08)
    assert lrs[0] == pytest.approx(0.05)  # halfway through the warmup


def test_blas_threads_default_to_the_cores_per_rank(dpflow):
    unset = {name: None for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    expected = max(1, len(os.sched_getaffinity(0)) // 4)
    result = dpflow("info", ranks=4, env=unset)
    assert f" {expected} thread(s) per rank (the cores of a node / its ranks)" in result.stdout, result
    chosen = dpflow("info", ranks=2, env={**unset, "OMP_NUM_THREADS": "3"})
    assert " 3 thread(s) per rank (as the environment asks: 3)" in chosen.stdout, chosen
