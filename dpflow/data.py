"""Datasets: the bundled default, generated ones, and files. numpy only.

Every rank loads the same dataset description; `sharding` decides which rows each rank
reads. Large `.npy` files and uncompressed `.npz` archives are memory-mapped, so a rank
touches only the rows it trains on.
"""

import gzip
import os
import struct
import zipfile
from dataclasses import dataclass
from importlib import resources

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be used: missing, unreadable, truncated or mis-shaped."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # (n_train, n_features)
    y_train: np.ndarray  # (n_train,) integer class indices
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self):
        return self.x_train.shape[1]


# --- built-in datasets ----------------------------------------------------------------------

def load_digits():
    """The bundled UCI handwritten digits (see dpflow/bundled/README.md), pixels scaled to [0, 1]."""
    with resources.files("dpflow").joinpath("bundled/digits.npz").open("rb") as handle:
        arrays = dict(np.load(handle))
    return Dataset(
        "digits",
        arrays["x_train"] / 16.0, arrays["y_train"].astype(np.int64),
        arrays["x_test"] / 16.0, arrays["y_test"].astype(np.int64),
        n_classes=10,
    )


def split_train_test(name, x, y, n_classes, rng, test_fraction=0.2):
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], n_classes)


def make_spirals(samples=1500, classes=3, seed=0, noise=0.2):
    """Interleaved 2-D spiral arms, one per class (CS231n's toy problem); seeded."""
    rng = np.random.default_rng(seed)
    per_class = max(samples // classes, 1)
    radius = np.tile(np.linspace(0.0, 1.0, per_class), classes)
    labels = np.repeat(np.arange(classes), per_class)
    theta = labels * 4.0 + radius * 4.0 + rng.normal(0.0, noise, labels.size)
    x = np.column_stack([radius * np.sin(theta), radius * np.cos(theta)])
    return split_train_test("spirals", x, labels, classes, rng)


def make_synthetic(samples=4000, features=20, classes=4, seed=0):
    """Gaussian clusters around random class centres; the same on every rank for one seed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    labels = rng.integers(0, classes, samples)
    x = centres[labels] + rng.normal(0.0, 1.0, (samples, features))
    return split_train_test("synthetic", x, labels, classes, rng)


# --- files ----------------------------------------------------------------------------------

ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")


def _memmap_npz_member(path, archive, member):
    """A read-only memmap of an uncompressed .npz member, or None if it is compressed."""
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: {member} holds Python objects; save plain numeric arrays")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran_order else "C")


def load_npz(path):
    """A .npz with x_train, y_train, x_test, y_test; members stored uncompressed are memory-mapped."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy") for name in archive.namelist()}
            missing = [name for name in ARRAY_NAMES if name not in members]
            if missing:
                raise DataError(
                    f"{path} has no {', '.join(missing)} (it holds {sorted(members)}); "
                    f"save it with np.savez(path, {'=..., '.join(ARRAY_NAMES)}=...)"
                )
            arrays = {}
            for name in ARRAY_NAMES:
                arrays[name] = _memmap_npz_member(path, archive, name + ".npy")
            if any(value is None for value in arrays.values()):
                with np.load(path, allow_pickle=False) as loaded:
                    for name in ARRAY_NAMES:
                        if arrays[name] is None:
                            arrays[name] = loaded[name]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as error:
        raise DataError(
            f"cannot read {path} as a .npz archive ({type(error).__name__}: {error}); "
            "the file may be truncated or not made by np.savez; re-create it"
        ) from error
    return arrays


def load_npy_dir(path):
    """A directory with x_train.npy, y_train.npy, x_test.npy, y_test.npy, memory-mapped."""
    arrays = {}
    for name in ARRAY_NAMES:
        try:
            arrays[name] = np.load(os.path.join(path, name + ".npy"), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f"cannot read {os.path.join(path, name + '.npy')}: {error}") from error
    return arrays


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path):
    """One MNIST-format IDX file (gzipped or not) as an array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); use MNIST-format files")
    dtype, ndim = np.dtype(IDX_TYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]) if len(raw) >= 4 + 4 * ndim else None
    expected = None if shape is None else 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if expected is None or len(raw) != expected:
        raise DataError(
            f"{path} is truncated or padded: {len(raw)} bytes, the header promises {expected}; "
            "download or copy the file again"
        )
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)


def load_idx_dir(path):
    arrays = {}
    for name, stem in IDX_FILES.items():
        candidates = [os.path.join(path, stem + suffix) for suffix in ("", ".gz")]
        candidates += [os.path.join(path, stem.replace("-idx", ".idx") + suffix) for suffix in ("", ".gz")]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise DataError(
                f"{path} has no {stem}[.gz]; an IDX dataset directory needs "
                f"{', '.join(IDX_FILES.values())} (each optionally gzipped)"
            )
        array = read_idx(found)
        if name.startswith("x"):
            # Images (n, rows, cols) become rows of pixels scaled to [0, 1].
            array = array.reshape(len(array), -1)
            array = array / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
        arrays[name] = array
    return arrays


# --- loading and checking -------------------------------------------------------------------

BUILTIN = ("digits", "spirals", "synthetic")


def load_dataset(spec="digits", samples=4000, features=20, classes=4, seed=0):
    """`digits`, `spirals`, `synthetic`, a .npz, a directory of .npy files, or of IDX files."""
    if spec == "digits":
        return check_dataset(load_digits())
    if spec == "spirals":
        return check_dataset(make_spirals(samples, classes, seed))
    if spec == "synthetic":
        return check_dataset(make_synthetic(samples, features, classes, seed))
    path = os.fspath(spec)
    if not os.path.exists(path):
        raise DataError(
            f"--dataset {spec!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
            "nor an existing file or directory; check the path"
        )
    if os.path.isdir(path):
        names = os.listdir(path)
        arrays = load_npy_dir(path) if "x_train.npy" in names else load_idx_dir(path)
    elif path.endswith(".npz"):
        arrays = load_npz(path)
    else:
        raise DataError(f"--dataset {spec!r}: expected a .npz file or a directory of .npy or IDX files")
    return check_dataset(dataset_from_arrays(os.path.basename(os.path.normpath(path)), arrays, spec))


def dataset_from_arrays(name, arrays, source):
    for key in ("y_train", "y_test"):
        labels = arrays[key]
        if labels.ndim != 1:
            raise DataError(f"{source}: {key} has shape {labels.shape}; labels must be 1-D class indices")
        if labels.dtype.kind == "f":
            labels = np.asarray(labels)
            if not np.all(labels == np.round(labels)):
                raise DataError(f"{source}: {key} holds non-integer values; labels must be class indices 0..C-1")
        elif labels.dtype.kind not in "iu":
            raise DataError(f"{source}: {key} has dtype {labels.dtype}; labels must be integers")
        arrays[key] = np.asarray(labels).astype(np.int64)
    top = max((int(arrays[k].max()) for k in ("y_train", "y_test") if arrays[k].size), default=0)
    return Dataset(name, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], top + 1)


def check_dataset(data):
    """Refuse a dataset that cannot train, naming the array, the value and the fix."""
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if x.ndim != 2:
            raise DataError(f"{data.name}: x_{split} has shape {x.shape}; it must be 2-D (rows, features)")
        if x.dtype.kind not in "fiu":
            raise DataError(f"{data.name}: x_{split} has dtype {x.dtype}; features must be numbers")
        if len(x) != len(y):
            raise DataError(
                f"{data.name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}; "
                "give one label per row"
            )
        if y.size and (y.min() < 0 or y.max() >= data.n_classes):
            bad = y[(y < 0) | (y >= data.n_classes)][0]
            raise DataError(
                f"{data.name}: y_{split} holds label {bad}, outside 0..{data.n_classes - 1}; "
                "labels must be class indices starting at 0"
            )
        if not isinstance(x, np.memmap) and x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(
                f"{data.name}: x_{split} has {np.count_nonzero(~np.isfinite(x))} NaN or infinite "
                "values; clean or impute them before training"
            )
    if data.x_test.shape[1] != data.x_train.shape[1]:
        raise DataError(
            f"{data.name}: x_train has {data.x_train.shape[1]} features but x_test has "
            f"{data.x_test.shape[1]}; both splits need the same columns"
        )
    if len(data.x_train) == 0:
        raise DataError(f"{data.name}: the training split is empty")
    if data.n_classes < 2:
        raise DataError(f"{data.name}: the labels hold {data.n_classes} class; classification needs at least 2")
    return data
