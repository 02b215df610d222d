"""Every dataset kind, including the bad ones."""

import gzip
import struct

import numpy as np
import pytest

from dpflow.data import DataError, load_dataset


def test_bundled_digits():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.n_classes == 10 and 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert sorted(set(data.y_train)) == list(range(10))


def test_generated_datasets_are_seeded():
    a = load_dataset("synthetic", samples=300, features=7, classes=3, seed=1)
    b = load_dataset("synthetic", samples=300, features=7, classes=3, seed=1)
    assert a.x_train.shape == (240, 7) and a.n_classes == 3
    assert np.array_equal(a.x_train, b.x_train)
    spirals = load_dataset("spirals", samples=300, classes=3)
    assert spirals.n_features == 2 and spirals.n_classes == 3


def arrays(rng, n_train=40, n_test=10, features=5, classes=3):
    return {"x_train": rng.normal(size=(n_train, features)), "y_train": rng.integers(0, classes, n_train),
            "x_test": rng.normal(size=(n_test, features)), "y_test": rng.integers(0, classes, n_test)}


def test_npz_compressed_and_uncompressed(tmp_path):
    rng = np.random.default_rng(0)
    values = arrays(rng)
    values["y_train"][0] = 2  # make sure the class count is 3
    np.savez_compressed(tmp_path / "c.npz", **values)
    np.savez(tmp_path / "u.npz", **values)
    compressed = load_dataset(str(tmp_path / "c.npz"))
    mapped = load_dataset(str(tmp_path / "u.npz"))
    assert isinstance(mapped.x_train, np.memmap)  # a rank reads only the rows it indexes
    for data in (compressed, mapped):
        assert np.array_equal(data.x_train, values["x_train"]) and data.n_classes == 3
        assert np.array_equal(data.y_test, values["y_test"])


def test_directory_of_npy_files_is_memory_mapped(tmp_path):
    values = arrays(np.random.default_rng(1))
    for name, value in values.items():
        np.save(tmp_path / f"{name}.npy", value)
    data = load_dataset(str(tmp_path))
    assert isinstance(data.x_train, np.memmap)
    assert np.array_equal(data.x_test, values["x_test"])


def write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_directory(tmp_path, suffix):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (20, 4, 4)).astype(np.uint8)
    labels = (np.arange(20) % 10).astype(np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images[:6])
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels[:6])
    data = load_dataset(str(tmp_path))
    assert data.x_train.shape == (20, 16) and data.n_classes == 10
    assert np.allclose(data.x_train, images.reshape(20, 16) / 255.0)


def test_truncated_idx_file_is_named(tmp_path):
    images = np.zeros((5, 2, 2), np.uint8)
    for stem, array in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", np.zeros(5, np.uint8)),
                        ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))]:
        write_idx(tmp_path / stem, array)
    with open(tmp_path / "train-images-idx3-ubyte", "r+b") as handle:
        handle.truncate(20)
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated"):
        load_dataset(str(tmp_path))


def test_missing_dataset_names_the_choices():
    with pytest.raises(DataError, match="'nope.npz' is neither a built-in dataset \\(digits, spirals, synthetic\\)"):
        load_dataset("nope.npz")


def test_truncated_npz(tmp_path):
    np.savez(tmp_path / "d.npz", **arrays(np.random.default_rng(3)))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(str(tmp_path / "d.npz"))


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.ones((3, 2)))
    with pytest.raises(DataError, match="has no y_train, x_test, y_test"):
        load_dataset(str(tmp_path / "d.npz"))


@pytest.mark.parametrize("change,message", [
    (lambda v: v.update(y_train=-v["y_train"] - 1), "label -"),
    (lambda v: v.update(x_test=v["x_test"][:, :3]), "x_train has 5 features but x_test has 3"),
    (lambda v: v.update(y_train=v["y_train"][:-1]), "x_train has 40 rows but y_train has 39"),
    (lambda v: v.update(x_train=v["x_train"].reshape(40, 5, 1)), "must be 2-D"),
    (lambda v: v.update(y_train=v["y_train"] + 0.5), "non-integer"),
    (lambda v: v["x_train"].__setitem__((3, 1), np.inf), "NaN or infinite"),
])
def test_bad_arrays_are_refused_with_the_fix(tmp_path, change, message):
    values = arrays(np.random.default_rng(4))
    change(values)
    np.savez_compressed(tmp_path / "d.npz", **values)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "d.npz"))
