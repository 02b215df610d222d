"""Datasets in the training dtype: built-in and named ones, IDX files (written here, gz and
plain), the memory-mapped cache, image shapes, normalisation, validation rows, labels, and
every bad input."""

import gzip
import os
import struct
import threading

import numpy as np
import pytest

from dpflow import datacache, idx
from dpflow.data import DataError, as_layout, fingerprint, gather, hold_out, load_dataset, split_validation
from dpflow.normalize import FeatureStats, Normalizer


@pytest.fixture(autouse=True)
def no_installed_datasets(monkeypatch, tmp_path):
    """Tests see only the data they write: no Debian datasets, caches under tmp_path."""
    monkeypatch.setenv("DPFLOW_SYSTEM_DATA", "")
    monkeypatch.delenv("DPFLOW_DATA", raising=False)


def write_idx_dir(path, n_train=30, n_test=12, suffix=".gz", shape=(6, 5), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n_train + n_test,) + shape).astype(np.uint8)
    labels = (np.arange(n_train + n_test) % classes).astype(np.uint8)
    idx.write_idx(path / f"train-images-idx3-ubyte{suffix}", images[:n_train])
    idx.write_idx(path / f"train-labels-idx1-ubyte{suffix}", labels[:n_train])
    idx.write_idx(path / f"t10k-images-idx3-ubyte{suffix}", images[n_train:])
    idx.write_idx(path / f"t10k-labels-idx1-ubyte{suffix}", labels[n_train:])
    return images, labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_idx_directory_is_cached_in_the_training_dtype_and_keeps_its_image_shape(tmp_path, suffix, dtype):
    images, labels = write_idx_dir(tmp_path / "d", suffix=suffix)
    data = load_dataset(str(tmp_path / "d"), dtype=dtype, layout="images")
    assert data.x_train.shape == (30, 1, 6, 5) and data.image_shape == (1, 6, 5)
    assert isinstance(data.x_train, np.memmap) and data.x_train.dtype == np.dtype(dtype)
    assert np.array_equal(data.x_train[:, 0], images[:30]) and np.array_equal(data.y_test, labels[30:])
    assert data.n_classes == 10 and data.normalizer.describe() == "scale (x / 255)"
    assert os.path.dirname(data.cache) == str(tmp_path / "d" / ".dpflow-cache")  # beside the data
    rows = as_layout(data, "rows")
    assert rows.x_train.shape == (30, 30) and np.shares_memory(rows.x_train, data.x_train)
    assert load_dataset(str(tmp_path / "d"), dtype=dtype).x_train.shape == (30, 30)  # rows by default


def test_the_cache_is_reused_until_a_source_changes(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "d")
    monkeypatch.setenv("DPFLOW_DATA", str(tmp_path / "home"))
    first = load_dataset(str(tmp_path / "d"))
    assert first.cache.startswith(str(tmp_path / "home" / "cache"))
    stamp = os.stat(os.path.join(first.cache, "meta.json")).st_mtime_ns
    assert load_dataset(str(tmp_path / "d")).cache == first.cache
    assert os.stat(os.path.join(first.cache, "meta.json")).st_mtime_ns == stamp  # not rebuilt
    source = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10**9))
    assert load_dataset(str(tmp_path / "d")).cache != first.cache


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", {
    "an array truncated": lambda entry: truncate(entry / "x_train.npy"),
    "an array removed": lambda entry: (entry / "y_test.npy").unlink(),
    "meta.json not JSON": lambda entry: (entry / "meta.json").write_text("{garbage"),
    "meta.json empty": lambda entry: (entry / "meta.json").write_text(""),
    "meta.json of another version": lambda entry: (entry / "meta.json").write_text('{"version": 0}'),
    "an array of another shape": lambda entry: np.save(entry / "x_test.npy", np.zeros((1, 30), np.float32)),
}.items(), ids=lambda item: item[0] if isinstance(item, tuple) else item)
def test_a_damaged_cache_entry_is_built_again(tmp_path, damage):
    """A cache entry that cannot be used (edited, truncated, another version's) is dpflow's own
    derived data: it is set aside and built again from the sources, not reported as a dataset
    that 'cannot be used' or a cache that 'cannot be written'."""
    write_idx_dir(tmp_path / "d")
    first = load_dataset(str(tmp_path / "d"))
    expected = [np.array(array) for array in (first.x_train, first.y_train, first.x_test, first.y_test)]
    del first
    entry = next((tmp_path / "d" / ".dpflow-cache").iterdir())
    damage[1](entry)
    again = load_dataset(str(tmp_path / "d"))
    assert again.cache == str(entry)
    arrays = (again.x_train, again.y_train, again.x_test, again.y_test)
    assert all(np.array_equal(array, wanted) for array, wanted in zip(arrays, expected))
    assert sorted(os.listdir(tmp_path / "d" / ".dpflow-cache")) == [entry.name]  # nothing left aside


def test_one_writer_per_node_while_the_others_wait(tmp_path):
    """Two 'ranks' of one node as threads: the reader must not look before the writer is done."""
    write_idx_dir(tmp_path / "d", n_train=2000)
    barrier = threading.Barrier(2, timeout=60)
    results = {}

    def rank(is_writer):
        results[is_writer] = load_dataset(str(tmp_path / "d"), is_writer=is_writer, wait=barrier.wait)

    threads = [threading.Thread(target=rank, args=(flag,)) for flag in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results[True].cache == results[False].cache
    assert np.array_equal(results[True].x_train, results[False].x_train)
    leftovers = [name for name in os.listdir(tmp_path / "d" / ".dpflow-cache") if ".part-" in name]
    assert leftovers == []


def test_a_failed_writer_fails_the_readers_with_a_message(tmp_path):
    write_idx_dir(tmp_path / "d")
    with pytest.raises(DataError, match="the rank that writes it on this node failed"):
        load_dataset(str(tmp_path / "d"), is_writer=False, wait=lambda: None)


def test_an_unwritable_cache_names_the_fix(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "d")
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("DPFLOW_DATA", str(tmp_path / "file"))
    with pytest.raises(DataError, match="cannot write the data cache .* set DPFLOW_DATA to a writable directory"):
        load_dataset(str(tmp_path / "d"))


def test_named_dataset_from_dpflow_data(tmp_path, monkeypatch):
    images, _ = write_idx_dir(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("DPFLOW_DATA", str(tmp_path / "data"))
    data = load_dataset("fashion-mnist", layout="images")
    assert data.name == "fashion-mnist" and data.x_test.shape == (12, 1, 6, 5)
    assert data.files[0] == str(tmp_path / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz")


def test_named_dataset_from_the_system_directories(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "usr-share" / "mnist", suffix="")
    monkeypatch.setenv("DPFLOW_SYSTEM_DATA", f"{tmp_path / 'nowhere'}:{tmp_path / 'usr-share'}")
    monkeypatch.setenv("DPFLOW_DATA", str(tmp_path / "writable"))  # the cache goes there
    assert load_dataset("mnist").cache.startswith(str(tmp_path / "writable" / "cache"))
    monkeypatch.delenv("DPFLOW_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    data = load_dataset("mnist")  # never into the package manager's directory
    assert data.cache.startswith(str(tmp_path / "home-cache" / "dpflow")) and data.n_features == 30


@pytest.mark.parametrize("name,install", [("fashion-mnist", "apt-get install dataset-fashion-mnist"),
                                          ("mnist", None)])
def test_a_missing_named_dataset_says_how_to_get_it(tmp_path, monkeypatch, name, install):
    monkeypatch.setenv("DPFLOW_DATA", str(tmp_path))
    with pytest.raises(DataError) as caught:
        load_dataset(name)
    message = str(caught.value)
    assert f"looked in {tmp_path / name}" in message and "train-images-idx3-ubyte" in message
    assert "downloads nothing" in message
    assert (install in message) if install else ("apt-get" not in message)


def corrupt(path, data):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("damage,message", [
    (lambda raw: b"\x1f\x8b" + raw[2:], "not an IDX file \\(magic number 0x1f8b"),
    (lambda raw: raw[:2], "truncated inside its header"),
    (lambda raw: raw[:4] + raw[4:8], "truncated inside its header"),
    (lambda raw: raw[:-7], "truncated: its header promises 30 x 6x5 values"),
    (lambda raw: raw + b"\0\0", "has bytes after the 30 rows"),
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "not an IDX file"),
])
def test_damaged_idx_files_are_named(tmp_path, suffix, damage, message):
    write_idx_dir(tmp_path / "d", suffix=suffix)
    path = tmp_path / "d" / f"train-images-idx3-ubyte{suffix}"
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    corrupt(path, damage(raw))
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(str(tmp_path / "d"))
    assert str(path) in str(caught.value)
    assert not any(".part-" in n for n in os.listdir(tmp_path / "d" / ".dpflow-cache"))


def test_a_truncated_gzip_stream_is_named(tmp_path):
    write_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset(str(tmp_path / "d"))


def test_images_and_labels_that_do_not_pair_up(tmp_path):
    write_idx_dir(tmp_path / "d")
    idx.write_idx(tmp_path / "d" / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="holds 30 images but .*train-labels-idx1-ubyte.gz holds 29 labels"):
        load_dataset(str(tmp_path / "d"))


def test_swapped_idx_files(tmp_path):
    write_idx_dir(tmp_path / "d")
    d = tmp_path / "d"
    os.rename(d / "train-images-idx3-ubyte.gz", d / "tmp")
    os.rename(d / "train-labels-idx1-ubyte.gz", d / "train-images-idx3-ubyte.gz")
    os.rename(d / "tmp", d / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="labels must be 1-D .* are the files swapped"):
        load_dataset(str(d))


def test_a_missing_idx_file(tmp_path):
    write_idx_dir(tmp_path / "d")
    os.unlink(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte\\[.gz\\]"):
        load_dataset(str(tmp_path / "d"))


def test_nan_in_a_float_idx_file_is_found_while_caching(tmp_path):
    write_idx_dir(tmp_path / "d")
    images = np.ones((30, 6, 5), np.float32)
    images[17, 2, 3] = np.nan
    idx.write_idx(tmp_path / "d" / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds NaN or inf .*the first in row 17"):
        load_dataset(str(tmp_path / "d"))


def arrays(rng, n_train=40, n_test=10, features=5, classes=3):
    return {"x_train": rng.normal(size=(n_train, features)), "y_train": np.arange(n_train) % classes,
            "x_test": rng.normal(size=(n_test, features)), "y_test": np.arange(n_test) % classes}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_nan_inf_and_overflow_in_npz_files_memory_mapped_or_not(tmp_path, save, bad):
    values = arrays(np.random.default_rng(0))
    values["x_test"][7, 2] = bad
    save(tmp_path / "d.npz", **values)
    expected = "values too large for float32" if bad == 1e300 else "NaN or inf"
    with pytest.raises(DataError, match=f"x_test holds {expected} .*the first in row 7"):
        load_dataset(str(tmp_path / "d.npz"))


def test_npz_and_npy_directories_are_cached(tmp_path):
    values = arrays(np.random.default_rng(1))
    np.savez(tmp_path / "d.npz", **values)
    (tmp_path / "npy").mkdir()
    for key, value in values.items():
        np.save(tmp_path / "npy" / f"{key}.npy", value)
    for spec in (tmp_path / "d.npz", tmp_path / "npy"):
        data = load_dataset(str(spec), dtype="float64")
        assert isinstance(data.x_train, np.memmap) and data.image_shape is None
        assert np.array_equal(data.x_train, values["x_train"]) and data.n_classes == 3
        assert data.normalizer.kind == "none"  # auto: rows of features are left alone


@pytest.mark.parametrize("change,message", [
    (lambda v: v.update(y_train=np.where(np.arange(40) == 3, 10**9, v["y_train"])),
     "y_train holds label 1000000000; labels must be class indices 0..K-1 with K at most 100,000"),
    (lambda v: v.update(y_test=v["y_test"] - 1), "y_test holds label -1"),
    (lambda v: v.update(x_train=np.ones((40, 0)), x_test=np.ones((10, 0))), "0 features"),
    (lambda v: v.update(x_test=np.ones((0, 5)), y_test=np.ones(0, int)), "the test split is empty"),
    (lambda v: v.update(x_train=np.ones((0, 5)), y_train=np.ones(0, int)), "the training split is empty"),
    (lambda v: v.update(y_train=v["y_train"][:-1]), "x_train has 40 rows but y_train has 39"),
    (lambda v: v.update(x_test=v["x_test"][:, :3]), "x_train example has shape \\(5,\\) but one x_test example has \\(3,\\)"),
    (lambda v: v.update(y_train=v["y_train"] + 0.5), "non-integer"),
    (lambda v: v.update(y_train=v["y_train"] * 0, y_test=v["y_test"] * 0), "at least 2"),
])
@pytest.mark.parametrize("spec", ["npz", "digits-like"])
def test_bad_arrays_exit_with_the_value_and_the_fix(tmp_path, change, message, spec, monkeypatch):
    values = arrays(np.random.default_rng(4))
    change(values)
    np.savez(tmp_path / "d.npz", **values)
    if spec == "npz":
        with pytest.raises(DataError, match=message):
            load_dataset(str(tmp_path / "d.npz"))
    else:  # the same checks on the in-memory path of the built-in datasets
        from dpflow import data as data_module

        monkeypatch.setattr(data_module, "make_synthetic", lambda *a: values)
        with pytest.raises(DataError, match=message):
            load_dataset("synthetic")


def test_classes_may_override_the_label_count(tmp_path):
    values = arrays(np.random.default_rng(5))
    values["y_train"][0] = 150_000
    np.savez(tmp_path / "d.npz", **values)
    assert load_dataset(str(tmp_path / "d.npz"), classes=150_001).n_classes == 150_001
    with pytest.raises(DataError, match="y_train holds label 150000, not below `classes` 20; raise `classes`"):
        load_dataset(str(tmp_path / "d.npz"), classes=20)


def test_a_test_class_never_seen_in_training_is_a_warning(tmp_path):
    values = arrays(np.random.default_rng(6))
    values["y_test"][4] = 7
    np.savez(tmp_path / "d.npz", **values)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.n_classes == 8
    assert len(data.warnings) == 1 and "1 class(es) never seen in y_train (7)" in data.warnings[0]


def test_identity_is_the_content_not_the_path(tmp_path, monkeypatch):
    values = arrays(np.random.default_rng(7))
    np.savez(tmp_path / "x.npz", **values)
    (tmp_path / "elsewhere").mkdir()
    np.savez(tmp_path / "elsewhere" / "x.npz", **values)
    monkeypatch.chdir(tmp_path)
    same = {fingerprint(load_dataset(spec)) for spec in ("x.npz", "./x.npz", str(tmp_path / "elsewhere/x.npz"))}
    assert len(same) == 1
    values["y_train"] = values["y_train"][::-1].copy()
    np.savez(tmp_path / "x.npz", **values)
    assert fingerprint(load_dataset("x.npz")) not in same
    digits = load_dataset("digits")
    assert fingerprint(digits) == fingerprint(as_layout(load_dataset("digits", layout="images"), "rows"))


def test_digits_as_images_in_the_training_dtype():
    data = load_dataset("digits", layout="images", dtype="float32")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_train.dtype == np.float32
    assert data.x_train.max() == 16 and data.normalizer.describe() == "scale (x / 16)"
    with pytest.raises(DataError, match="holds rows of 20 features, not images"):
        load_dataset("synthetic", layout="images")


def test_feature_stats_in_chunks_equal_the_direct_formula(monkeypatch):
    from dpflow import normalize

    monkeypatch.setattr(normalize, "STATS_CHUNK_ROWS", 7)
    x = np.random.default_rng(8).normal(3.0, 2.0, (50, 2, 3, 4))
    stats = FeatureStats.of(x)
    rows = x.reshape(50, -1)
    assert np.allclose(stats.mean, rows.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(stats.std(), rows.std(0), rtol=1e-12)
    pooled = stats.per_channel(2)
    by_channel = x.transpose(1, 0, 2, 3).reshape(2, -1)
    assert np.allclose(pooled.mean, by_channel.mean(1), atol=1e-12)
    assert np.allclose(pooled.std(), by_channel.std(1), rtol=1e-12)
    assert stats.max_abs == np.abs(x).max()


def test_normalizer_standardizes_and_round_trips_through_json():
    import json

    rng = np.random.default_rng(9)
    x = rng.normal(5.0, 3.0, (64, 1, 4, 4)).astype(np.float64)
    x[:, :, 0, 0] = 2.0  # a constant pixel
    per_channel = Normalizer.fit("standardize", FeatureStats.of(x), (1, 4, 4))
    images = per_channel(x.copy())
    assert abs(images.mean()) < 1e-12 and abs(images.std() - 1) < 1e-12
    flat = per_channel(x.reshape(64, 16).copy())  # the same transform when fed as rows
    assert np.array_equal(flat, images.reshape(64, 16))
    per_feature = Normalizer.fit("standardize", FeatureStats.of(x.reshape(64, 16)), None)
    rows = per_feature(x.reshape(64, 16).copy())
    assert np.allclose(rows[:, 1:].mean(0), 0, atol=1e-12) and np.allclose(rows[:, 1:].std(0), 1)
    assert np.array_equal(rows[:, 0], np.zeros(64))  # constant: shifted, scale 1
    for normalizer in (per_channel, per_feature, Normalizer.fit("scale", FeatureStats.of(x), None),
                       Normalizer.fit("none", FeatureStats.of(x), None)):
        again = Normalizer.from_state(json.loads(json.dumps(normalizer.state())))
        assert again == normalizer
        assert np.array_equal(again(x.reshape(64, 16).copy()), normalizer(x.reshape(64, 16).copy()))
    with pytest.raises(ValueError, match="one of auto, none, scale, standardize, got 'zscore'"):
        Normalizer.fit("zscore", FeatureStats.of(x), None)


def test_a_row_is_normalised_the_same_whatever_batch_it_is_in():
    x = np.random.default_rng(10).normal(size=(33, 7)).astype(np.float32)
    normalizer = Normalizer.fit("standardize", FeatureStats.of(x), None)
    whole = normalizer(x.copy())
    parts = np.concatenate([normalizer(x[a:b].copy()) for a, b in ((0, 5), (5, 6), (6, 33))])
    assert np.array_equal(whole, parts)


def test_write_idx_round_trips_every_type(tmp_path):
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        for name in ("a", "a.gz"):
            idx.write_idx(tmp_path / name, array)
            back = idx.read_idx(str(tmp_path / name))
            assert back.shape == array.shape and np.array_equal(back, array)
    with pytest.raises(DataError, match="no type for int64"):
        idx.write_idx(tmp_path / "b", np.zeros(3, np.int64))


def test_generated_datasets_are_seeded():
    a = load_dataset("synthetic", samples=300, features=7, classes=3, seed=1, dtype="float64")
    b = load_dataset("synthetic", samples=300, features=7, classes=3, seed=1, dtype="float64")
    assert a.x_train.shape == (240, 7) and a.n_classes == 3 and a.x_train.dtype == np.float64
    assert np.array_equal(a.x_train, b.x_train)
    spirals = load_dataset("spirals", samples=300, classes=3)
    assert spirals.n_features == 2 and spirals.n_classes == 3
    assert load_dataset("synthetic", samples=300).n_classes == 4  # classes 0: the default 4


def test_an_unknown_dataset_names_the_choices():
    with pytest.raises(DataError, match="'nope.npz' is neither a built-in dataset \\(digits, spirals, synthetic, fashion-mnist, mnist\\)"):
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


def test_validation_rows_depend_on_the_seed_alone():
    train, validation = split_validation(100, 0.2, seed=3)
    assert len(validation) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, validation])) == list(range(100))
    again = split_validation(100, 0.2, seed=3)
    assert np.array_equal(again[1], validation)
    assert not np.array_equal(split_validation(100, 0.2, seed=4)[1], validation)
    assert len(split_validation(100, 0.0, seed=3)[1]) == 0
    for fraction, message in ((1.0, "must be in \\[0, 1\\)"), (-0.1, "must be in"), (0.001, "leaves 0 validation")):
        with pytest.raises(DataError, match=message):
            split_validation(100, fraction, seed=3)


def test_held_out_rows_do_not_shape_the_normaliser():
    data = load_dataset("synthetic", samples=200, normalize="standardize", dtype="float64")
    held = hold_out(data, 0.25, seed=0)
    assert held.n_train == 120 and len(held.validation_rows) == 40
    train_only = data.x_train[held.train_rows]
    assert np.allclose(held.normalizer.shift, train_only.mean(0), atol=1e-12)
    assert not np.allclose(held.normalizer.shift, data.normalizer.shift, atol=1e-6)
    assert hold_out(data, 0.0, seed=0) is data


def test_gather_copies_and_normalises_without_touching_the_data(tmp_path):
    images, _ = write_idx_dir(tmp_path / "d", suffix="")
    for spec in (str(tmp_path / "d"), "digits"):
        data = load_dataset(spec, layout="images", dtype="float64")
        before = np.array(data.x_train)
        out = np.empty((3,) + data.input_shape)
        gather(data.x_train, np.array([4, 0, 2]), data.normalizer, out)
        assert np.array_equal(out, before[[4, 0, 2]] / data.normalizer.scale[0])
        gather(data.x_train, slice(1, 4), data.normalizer, out)
        assert np.array_equal(out, before[1:4] / data.normalizer.scale[0])
        assert np.array_equal(np.asarray(data.x_train), before)


@pytest.mark.mpi(min_size=2)
def test_one_rank_per_node_writes_the_cache_while_the_others_wait(tmp_path):
    """Real ranks of one node: local rank 0 converts, the others wait at the node barrier,
    then every rank maps the one entry."""
    from pathlib import Path

    from dpflow.comm import create_communicator

    comm = create_communicator()
    root = Path(comm.broadcast_object(str(tmp_path)))  # rank 0's directory, shared by the node
    if comm.rank == 0:
        write_idx_dir(root / "d", n_train=3000)
    comm.barrier()
    data = load_dataset(str(root / "d"), is_writer=comm.local_rank == 0, wait=comm.node_barrier)
    assert comm.allgather_object((data.cache, fingerprint(data))) == [(data.cache, fingerprint(data))] * comm.size
    entries = sorted(p.name for p in (root / "d" / ".dpflow-cache").iterdir())
    assert len(entries) == 1 and ".part-" not in entries[0]
    assert isinstance(data.x_train, np.memmap)
    comm.barrier()  # rank 0's tmp_path outlives every rank's reads
