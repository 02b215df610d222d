"""Datasets: the bundled default, generated ones, and files. numpy only.

Every rank loads the same dataset description; `sharding` decides which rows each rank
reads. Large `.npy` files and uncompressed `.npz` archives are memory-mapped, so a rank
touches only the rows it trains on.
"""

import gzip
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from importlib import resources

import numpy as np

from .errors import DataError
from .normalize import FeatureStats, Normalizer


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # (n_train, n_features) rows, or (n_train, C, H, W) images
    y_train: np.ndarray  # (n_train,) integer class indices
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    image_shape: tuple = None  # (C, H, W) when the examples are images, fed as images or rows
    normalizer: Normalizer = field(default_factory=Normalizer)  # applied to every gathered batch
    files: tuple = ()  # the files read, for the banner
    cache: str = ""  # the cache entry mapped, if any
    warnings: tuple = ()  # things rank 0 should tell the user

    @property
    def input_shape(self):
        """The shape of one example: (features,) or (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self):
        return int(np.prod(self.input_shape))


# --- built-in datasets ----------------------------------------------------------------------

def digits_arrays():
    """The bundled UCI handwritten digits (see dpflow/bundled/README.md): 8x8 uint8 images, 0..16."""
    with resources.files("dpflow").joinpath("bundled/digits.npz").open("rb") as handle:
        arrays = dict(np.load(handle))
    arrays["x_train"] = arrays["x_train"].reshape(-1, 8, 8)
    arrays["x_test"] = arrays["x_test"].reshape(-1, 8, 8)
    return arrays


def load_digits():
    """The digits as rows of pixels scaled to [0, 1]."""
    arrays = {key: value.reshape(len(value), -1) if key.startswith("x") else value
              for key, value in digits_arrays().items()}
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


IDX_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def find_idx_files(path):
    """{array name: file} of an IDX dataset directory, each file plain or gzipped."""
    files = {}
    for name, stem in IDX_FILES.items():
        candidates = [os.path.join(path, stem + suffix) for suffix in ("", ".gz")]
        candidates += [os.path.join(path, stem.replace("-idx", ".idx") + suffix) for suffix in ("", ".gz")]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise DataError(
                f"{path} has no {stem}[.gz]; an IDX dataset directory needs "
                f"{', '.join(IDX_FILES.values())} (each optionally gzipped)"
            )
        files[name] = found
    return files


def load_idx_dir(path):
    from .idx import IDXError, read_idx

    arrays = {}
    for name, found in find_idx_files(path).items():
        try:
            array = read_idx(found)
        except IDXError as error:
            raise DataError(str(error)) from None
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
    if data.x_train.shape[1] == 0:
        raise DataError(f"{data.name}: x_train has no feature columns; give at least one")
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


# --- datasets in the training dtype: by name, cached, image-shaped --------------------------

MAX_CLASSES = 100_000  # labels beyond this are ids, not class indices (or need --classes)
LAYOUTS = ("rows", "images")


def as_layout(data, layout):
    """The dataset with examples as flat rows or as (C, H, W) images: views, never copies."""
    if layout not in LAYOUTS:
        raise DataError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "images" and not data.image_shape:
        raise DataError(
            f"{data.name} holds rows of {data.n_features} features, not images; this model needs "
            "images: give image data (IDX files, digits, or arrays shaped (N, C, H, W) or (N, H, W)) "
            "or choose a model for rows of features"
        )
    shape = data.image_shape if layout == "images" else (data.n_features,)
    return replace(data, x_train=data.x_train.reshape((len(data.x_train),) + tuple(shape)),
                   x_test=data.x_test.reshape((len(data.x_test),) + tuple(shape)))


def fingerprint(data):
    """The dataset's identity: a CRC-32 of its labels (as int64) and its shapes, so that
    `./x.npz`, `x.npz` and a copy elsewhere are the same dataset, and another file of the
    same name is not."""
    crc = zlib.crc32(np.ascontiguousarray(data.y_train, dtype=np.int64))
    crc = zlib.crc32(np.ascontiguousarray(data.y_test, dtype=np.int64), crc)
    return f"{crc:08x}/{len(data.y_train)}+{len(data.y_test)}/{data.n_features}/{data.n_classes}"


def check_labels(name, y_train, y_test, n_classes=None):
    """The class count (given, or max label + 1) and warnings; DataError names a bad label."""
    for split, y in (("y_train", y_train), ("y_test", y_test)):
        if y.size and y.min() < 0:
            raise DataError(f"{name}: {split} holds label {int(y.min())}; labels must be class indices 0..K-1")
    top = max((int(y.max()) for y in (y_train, y_test) if y.size), default=0)
    if n_classes:
        if top >= n_classes:
            split = "y_train" if y_train.size and int(y_train.max()) == top else "y_test"
            raise DataError(f"{name}: {split} holds label {top}, not below --classes {n_classes}; "
                            f"raise --classes to at least {top + 1} or fix the labels")
    else:
        if top + 1 > MAX_CLASSES:
            split = "y_train" if y_train.size and int(y_train.max()) == top else "y_test"
            raise DataError(
                f"{name}: {split} holds label {top}; labels must be class indices 0..K-1 with K at most "
                f"{MAX_CLASSES:,} (this looks like an id, not a class): renumber the classes 0..K-1, or "
                "pass --classes K if there really are that many"
            )
        n_classes = top + 1
    if n_classes < 2:
        raise DataError(f"{name}: the labels hold {n_classes} class; classification needs at least 2")
    warnings = []
    unseen = np.setdiff1d(np.unique(y_test), np.unique(y_train))
    if unseen.size:
        shown = ", ".join(map(str, unseen[:10])) + (", ..." if unseen.size > 10 else "")
        warnings.append(f"warning: {name}: y_test holds {unseen.size} class(es) never seen in y_train "
                        f"({shown}); the model cannot learn them, so test accuracy is capped")
    return n_classes, tuple(warnings)


def check_examples(name, arrays):
    """Shapes that can train: rows or images, matching counts, features, a test set."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{name}: x_{split} has shape {x.shape}; give rows (N, features) or images "
                            "(N, H, W) or (N, C, H, W)")
        if x.dtype.kind not in "fiu":
            raise DataError(f"{name}: x_{split} has dtype {x.dtype}; features must be numbers")
        if y.ndim != 1:
            raise DataError(f"{name}: y_{split} has shape {y.shape}; labels must be 1-D class indices")
        if y.dtype.kind not in "fiu":
            raise DataError(f"{name}: y_{split} has dtype {y.dtype}; labels must be integers")
        if len(x) != len(y):
            raise DataError(f"{name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}; "
                            "give one label per row")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{name}: one x_train example has shape {arrays['x_train'].shape[1:]} but one "
                        f"x_test example has {arrays['x_test'].shape[1:]}; both splits need the same")
    if 0 in arrays["x_train"].shape[1:]:
        raise DataError(f"{name}: the examples have 0 features (shape {arrays['x_train'].shape[1:]}); "
                        "give at least one feature per row")
    if len(arrays["x_train"]) == 0:
        raise DataError(f"{name}: the training split is empty; give x_train at least one row")
    if len(arrays["x_test"]) == 0:
        raise DataError(f"{name}: the test split is empty, so test accuracy would mean nothing; "
                        "give x_test and y_test rows (e.g. hold out a fifth of the data)")


def natural_shape(shape):
    """(N, H, W) grey images gain their channel axis; rows and (N, C, H, W) stay."""
    return (shape[0], 1) + tuple(shape[1:]) if len(shape) == 3 else tuple(shape)


def in_memory(name, arrays, dtype):
    """Small arrays: checked, then cast once to the training dtype (the only copy kept)."""
    check_examples(name, arrays)
    x = {}
    for split in ("train", "test"):
        source = arrays[f"x_{split}"]
        if source.dtype.kind == "f" and not np.isfinite(source).all():
            raise DataError(f"{name}: x_{split} has {np.count_nonzero(~np.isfinite(source))} NaN or "
                            "infinite values; clean or impute them before training")
        x[split] = np.ascontiguousarray(source, dtype=dtype).reshape(natural_shape(source.shape))
    labels = {}
    for key in ("y_train", "y_test"):
        y = np.asarray(arrays[key])
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise DataError(f"{name}: {key} holds non-integer values; labels must be class indices 0..K-1")
        labels[key] = y.astype(np.int64)
    return x["train"], labels["y_train"], x["test"], labels["y_test"]


def idx_plan(path):
    """The four IDX files of a directory: their paths and, for the cache, how to convert them."""
    from . import idx

    files = find_idx_files(path)

    def plan():
        shapes = {name: idx.read_header(found)[1] for name, found in files.items()}
        for split in ("train", "test"):
            images, labels = shapes[f"x_{split}"], shapes[f"y_{split}"]
            if len(labels) != 1 or len(images) < 2:
                raise DataError(f"{files[f'y_{split}']} has shape {labels} and {files[f'x_{split}']} has "
                                f"{images}; labels must be 1-D and images (N, ...): are the files swapped?")
            if images[0] != labels[0]:
                raise DataError(f"{files[f'x_{split}']} holds {images[0]} images but {files[f'y_{split}']} "
                                f"holds {labels[0]} labels; they must come in pairs: use files of one release")
        return {name: (natural_shape(shapes[name]), idx.iter_chunks(found), found) for name, found in files.items()}

    return list(files.values()), plan


def array_plan(path, arrays):
    """Arrays of a .npz or .npy directory (memory-mapped where stored so) converted in chunks."""
    def chunks(array, rows=4096):
        for start in range(0, len(array), rows):
            yield np.asarray(array[start:start + rows])

    def plan():
        check_examples(path, arrays)
        return {name: (natural_shape(array.shape), chunks(array), f"{path}: {name}")
                for name, array in arrays.items()}

    return plan


def open_dataset(spec="digits", *, dtype="float32", layout="rows", normalize="auto", n_classes=None,
                 samples=4000, features=20, classes=4, seed=0, is_writer=True, wait=None, cache_root=None):
    """A dataset ready to train: built-in, named (`fashion-mnist`, `mnist`), a .npz, or a
    directory of .npy or IDX files. Files are served from the node's memory-mapped cache in
    `dtype` (built by the rank with `is_writer` while the others `wait()`; every rank of a
    node must call this), built-ins from memory; either way the examples are in `layout`
    and raw, with the fitted `normalizer` to apply to each gathered batch."""
    from . import catalog, datacache

    dtype = np.dtype(dtype)
    files, cache, image_shape = (), "", None
    try:
        if spec in BUILTIN:
            if spec == "digits":
                arrays, name = digits_arrays(), "digits"
            else:
                made = (make_spirals(samples, classes, seed) if spec == "spirals"
                        else make_synthetic(samples, features, classes, seed))
                arrays = {key: getattr(made, key) for key in ARRAY_NAMES}
                name = spec
            x_train, y_train, x_test, y_test = in_memory(name, arrays, dtype)
            stats = FeatureStats.of(x_train)
        else:
            path = catalog.locate(spec) if spec in catalog.NAMED else os.fspath(spec)
            if not os.path.exists(path):
                raise DataError(
                    f"--dataset {spec!r} is neither a built-in dataset ({', '.join(BUILTIN + tuple(catalog.NAMED))}) "
                    "nor an existing file or directory; check the path"
                )
            name = spec if spec in catalog.NAMED else os.path.basename(os.path.normpath(path))
            if os.path.isdir(path) and "x_train.npy" in os.listdir(path):
                files = tuple(os.path.join(path, key + ".npy") for key in ARRAY_NAMES)
                plan = array_plan(path, load_npy_dir(path))
            elif os.path.isdir(path):
                files, plan = idx_plan(path)
            elif path.endswith(".npz"):
                files, plan = (path,), array_plan(path, load_npz(path))
            else:
                raise DataError(f"--dataset {spec!r}: expected a .npz file or a directory of .npy or IDX files")
            arrays, meta, cache = datacache.cached(name, list(files), dtype, plan, is_writer, wait, cache_root)
            x_train, y_train, x_test, y_test = (arrays[key] for key in ARRAY_NAMES)
            stats = datacache.stats_from_meta(meta)
    except (catalog.NotInstalled, datacache.CacheError) as error:
        raise DataError(str(error)) from None
    except ValueError as error:  # the IDX reader's
        if isinstance(error, DataError):
            raise
        raise DataError(str(error)) from None
    if x_train.ndim == 4:
        image_shape = tuple(x_train.shape[1:])
    n_classes, warnings = check_labels(name, y_train, y_test, n_classes)
    try:
        normalizer = Normalizer.fit(normalize, stats, image_shape)
    except ValueError as error:
        raise DataError(str(error)) from None
    data = Dataset(name, x_train, y_train, x_test, y_test, n_classes, image_shape, normalizer,
                   tuple(files), cache, warnings)
    return as_layout(data, layout)
