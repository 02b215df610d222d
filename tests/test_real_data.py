"""Real data through the whole command line: a named dataset (small IDX files written here,
never the Debian package), its memory-mapped cache, validation rows, normalisation, the best
checkpoint, early stopping and resume by content. Real processes under mpiexec, each with
a timeout."""

import shutil

import numpy as np
import pytest

from dpflow import idx
from dpflow.checkpoint import read_checkpoint
from test_cli import load, max_difference, records


def write_fashion(directory, n_train=150, n_test=40, seed=0):
    """A learnable stand-in for Fashion-MNIST: 6x5 grey images whose brightest quadrant
    is the class, as the four IDX files (gzipped) in DIRECTORY/fashion-mnist."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 120, (n, 6, 5)).astype(np.uint8)
    for i, label in enumerate(labels):
        rows, cols = divmod(int(label), 2)
        images[i, rows * 3:rows * 3 + 3, cols * 3:cols * 3 + 2] += 120
    target = directory / "fashion-mnist"
    target.mkdir(parents=True)
    idx.write_idx(target / "train-images-idx3-ubyte.gz", images[:n_train])
    idx.write_idx(target / "train-labels-idx1-ubyte.gz", labels[:n_train])
    idx.write_idx(target / "t10k-images-idx3-ubyte.gz", images[n_train:])
    idx.write_idx(target / "t10k-labels-idx1-ubyte.gz", labels[n_train:])
    return target


@pytest.fixture
def data_home(tmp_path):
    """DPFLOW_DATA with a small fashion-mnist in it; the system's datasets hidden."""
    write_fashion(tmp_path / "data")
    return {"DPFLOW_DATA": str(tmp_path / "data"), "DPFLOW_SYSTEM_DATA": ""}


def test_a_named_dataset_trains_from_its_cache_and_the_banner_names_the_files(dpflow, tmp_path, data_home):
    result = dpflow("train", "--dataset", "fashion-mnist", "--epochs", "3", "--hidden", "32",
                    "--progress", "plain", ranks=2, env=data_home, timeout=120)
    assert result.returncode == 0, result
    folder = tmp_path / "data" / "fashion-mnist"
    assert (f"files: {folder}/{{train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz}") in result.stdout
    assert f"cache: {tmp_path / 'data' / 'cache'}/fashion-mnist-float32-" in result.stdout
    assert "150 train / 40 test rows, 1x6x5 images, 4 classes | normalize: scale (x / 239)" in result.stdout
    entries = list((tmp_path / "data" / "cache").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == [
        "meta.json", "x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    accuracy = float(result.stdout.split("done: test accuracy ")[1].split("%")[0])
    assert accuracy > 60  # chance is 25%


def test_a_missing_named_dataset_says_how_to_get_it(dpflow, tmp_path):
    (tmp_path / "empty").mkdir()
    result = dpflow("train", "--dataset", "fashion-mnist", ranks=2, timeout=60,
                    env={"DPFLOW_DATA": str(tmp_path / "empty"), "DPFLOW_SYSTEM_DATA": ""})
    assert result.returncode == 2 and result.stderr.count("dpflow: error:") == 1, result
    assert f"--dataset fashion-mnist: not found; looked in {tmp_path / 'empty' / 'fashion-mnist'}" in result.stderr
    assert "apt-get install dataset-fashion-mnist" in result.stderr and "Traceback" not in result.stderr


EXACT = ["--dataset", "fashion-mnist", "--validation-split", "0.2", "--normalize", "standardize",
         "--dtype", "float64", "--epochs", "2", "--batch-size", "25", "--hidden", "16", "--progress", "plain"]


def test_ranks_equal_one_process_with_validation_rows_and_standardisation(dpflow, tmp_path, data_home):
    saved = {}
    for ranks in (None, 2, 3, 4):
        result = dpflow("train", *EXACT, "--save", tmp_path / f"{ranks}.npz", "--metrics",
                        tmp_path / f"{ranks}.jsonl", ranks=ranks, env=data_home, timeout=120)
        assert result.returncode == 0, result
        assert "120 train + 30 validation / 40 test rows" in result.stdout
        assert "standardize (per-channel mean and std of the training set)" in result.stdout
        saved[ranks] = load(tmp_path / f"{ranks}.npz")
        last = records(tmp_path / f"{ranks}.jsonl")[-1]
        assert abs(last["val_loss"] - records(tmp_path / "None.jsonl")[-1]["val_loss"]) < 1e-10
    for ranks in (2, 3, 4):
        assert max_difference(saved[None], saved[ranks]) < 1e-10


# The built-in cnn asks the loader for images: the cached IDX files come as (N, 1, 6, 5).
CNN = ["--dataset", "fashion-mnist", "--model", "cnn", "--model-arg", "channels=[4]", "--model-arg", "dense=8",
       "--model-arg", "dropout=0.25", "--dtype", "float64", "--batch-size", "25", "--progress", "plain"]


def test_the_cnn_on_image_files_on_n_ranks_equals_one_process_and_resumes_bitwise(dpflow, tmp_path, data_home):
    saved = {}
    for ranks in (None, 2, 3, 4):
        result = dpflow("train", *CNN, "--epochs", "2", "--save", tmp_path / f"{ranks}.npz", ranks=ranks,
                        env=data_home, timeout=120)
        assert result.returncode == 0, result
        assert "1x6x5 images" in result.stdout and "conv0          Conv2D                      4x6x5" in result.stdout
        assert "Reshape" not in result.stdout  # images arrive in their shape, not as rows to reshape
        saved[ranks] = load(tmp_path / f"{ranks}.npz")
    for ranks in (2, 3, 4):
        assert max_difference(saved[None], saved[ranks]) < 1e-10
    first = dpflow("train", *CNN, "--epochs", "1", "--checkpoint-dir", tmp_path / "ck", ranks=3, env=data_home)
    resumed = dpflow("train", *CNN, "--epochs", "2", "--checkpoint-dir", tmp_path / "ck", "--resume",
                     "--save", tmp_path / "resumed.npz", ranks=3, env=data_home)
    assert first.returncode == 0 and resumed.returncode == 0, (first, resumed)
    assert max_difference(saved[3], load(tmp_path / "resumed.npz")) == 0.0


def test_resume_is_bitwise_and_the_best_checkpoint_survives_pruning(dpflow, tmp_path, data_home):
    common = [*EXACT, "--keep-best", "val_accuracy", "--keep-checkpoints", "1"]
    straight = dpflow("train", *common, "--epochs", "5", "--checkpoint-dir", tmp_path / "a", "--save",
                      tmp_path / "straight.npz", "--metrics", tmp_path / "m.jsonl", ranks=2, env=data_home)
    assert straight.returncode == 0, straight
    first = dpflow("train", *common, "--epochs", "2", "--checkpoint-dir", tmp_path / "b", ranks=2, env=data_home)
    resumed = dpflow("train", *common, "--epochs", "5", "--checkpoint-dir", tmp_path / "b", "--resume",
                     "--save", tmp_path / "resumed.npz", ranks=2, env=data_home)
    assert first.returncode == 0 and resumed.returncode == 0, (first, resumed)
    assert max_difference(load(tmp_path / "straight.npz"), load(tmp_path / "resumed.npz")) == 0.0
    # best.dpf is the epoch with the best validation accuracy; only it and the last remain.
    history = records(tmp_path / "m.jsonl")
    best = max(range(5), key=lambda i: (history[i]["val_accuracy"], -i))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["best.dpf", "ckpt-000000025.dpf", "latest"]
    (a_arrays, a_meta), (b_arrays, b_meta) = (read_checkpoint(str(tmp_path / run / "best.dpf")) for run in "ab")
    assert a_meta["epoch"] == b_meta["epoch"] == best + 1 and max_difference(a_arrays, b_arrays) == 0.0
    assert f"best val_accuracy {history[best]['val_accuracy']:.4f} at epoch {best + 1}" in straight.stdout
    # eval transforms the test set with the checkpoint's statistics: it finds that epoch's accuracy.
    evaluated = dpflow("eval", "--checkpoint", tmp_path / "a" / "best.dpf", ranks=3, env=data_home)
    assert evaluated.returncode == 0, evaluated
    assert f"test_accuracy {history[best]['test_accuracy']:.2%}" in evaluated.stdout


def test_early_stop_ends_every_rank_together(dpflow, tmp_path):
    result = dpflow("train", "--dataset", "synthetic", "--samples", "150", "--features", "30", "--hidden", "256",
                    "--lr", "0.1", "--epochs", "40", "--validation-split", "0.3", "--early-stop", "3",
                    "--dtype", "float64", "--progress", "plain", "--checkpoint-dir", tmp_path / "ck",
                    "--metrics", tmp_path / "m.jsonl", ranks=2, timeout=120)
    assert result.returncode == 0, result
    history = records(tmp_path / "m.jsonl")
    best = min(range(len(history)), key=lambda i: (history[i]["val_loss"], i))
    assert len(history) == best + 1 + 3 < 40
    assert f"early stop: val_loss has not improved for 3 epochs (best {history[best]['val_loss']:.4f}" in result.stdout
    assert (tmp_path / "ck" / "latest").read_text().strip() == f"ckpt-{history[-1]['step']:09d}.dpf"


def test_resume_knows_a_dataset_by_its_content_not_its_path(dpflow, tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.normal(size=(60, 4)), "y_train": np.arange(60) % 3,
              "x_test": rng.normal(size=(20, 4)), "y_test": np.arange(20) % 3}
    np.savez(tmp_path / "x.npz", **arrays)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "x.npz", tmp_path / "elsewhere" / "x.npz")
    run = ["train", "--checkpoint-dir", "ck", "--progress", "plain", "--dtype", "float64"]
    assert dpflow(*run, "--dataset", "x.npz", "--epochs", "1", cwd=tmp_path).returncode == 0
    for epochs, spelling in ((2, "./x.npz"), (3, str(tmp_path / "elsewhere" / "x.npz"))):
        again = dpflow(*run, "--dataset", spelling, "--epochs", epochs, "--resume", cwd=tmp_path)
        assert again.returncode == 0 and "resumed from" in again.stdout, again
    arrays["y_train"] = arrays["y_train"][::-1].copy()
    np.savez(tmp_path / "x.npz", **arrays)
    refused = dpflow(*run, "--dataset", "x.npz", "--epochs", "4", "--resume", cwd=tmp_path)
    assert refused.returncode == 2 and "holding other data" in refused.stderr, refused
    assert "now 'x.npz': " in refused.stderr and "Traceback" not in refused.stderr


def test_the_data_settings_in_a_config_file(dpflow, tmp_path, data_home):
    (tmp_path / "run.toml").write_text(
        '[train]\ndataset = "fashion-mnist"\nnormalize = "standardize"\nvalidation-split = 0.2\n'
        'keep-best = "val_loss"\nearly-stop = 50\nclasses = 6\nepochs = 2\ncheckpoint-dir = "ck"\n')
    result = dpflow("train", "--config", tmp_path / "run.toml", "--progress", "plain", env=data_home, cwd=tmp_path)
    assert result.returncode == 0, result
    assert "120 train + 30 validation / 40 test rows, 1x6x5 images, 6 classes | normalize: standardize" in result.stdout
    assert (tmp_path / "ck" / "best.dpf").exists() and "val_loss" in result.stdout
    (tmp_path / "bad.toml").write_text('normalize = "zscore"\n')
    bad = dpflow("train", "--config", tmp_path / "bad.toml", env=data_home, cwd=tmp_path)
    assert bad.returncode == 2 and "--normalize must be one of auto, none, scale, standardize, got 'zscore'" in bad.stderr
