"""Datasets: the bundled digits, generated ones, named ones (Fashion-MNIST, MNIST) and files,
each served in the training dtype and never copied twice. numpy only.

Small datasets live in memory, cast once to the training dtype. Files (IDX, .npz, .npy) are
converted once into a memory-mapped cache (`datacache`) that the ranks of a node share, so a
rank holds no private copy of the data and reads only the rows it gathers. Examples stay
raw in the dataset (pixels stay 0..255) and images keep their (C, H, W) shape; `gather` copies
a batch's rows into a buffer and applies the dataset's `Normalizer` there. `sharding` decides
which rows each rank gathers.
"""

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from importlib import resources

import numpy as np

from .errors import DataError
from .normalize import KINDS as NORMALIZE, FeatureStats, Normalizer


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
    train_rows: np.ndarray = None  # rows of x_train trained on (None: all of them)
    validation_rows: np.ndarray = None  # rows of x_train held out for validation (None: none)

    @property
    def input_shape(self):
        """The shape of one example: (features,) or (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self):
        return int(np.prod(self.input_shape))

    @property
    def n_train(self):
        """Rows trained on: the training set less any validation rows."""
        return len(self.x_train) if self.train_rows is None else len(self.train_rows)


# --- built-in datasets ----------------------------------------------------------------------

BUILTIN = ("digits", "spirals", "synthetic")
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")


def digits_arrays():
    """The bundled UCI handwritten digits (see dpflow/bundled/README.md): 8x8 uint8 images, 0..16."""
    with resources.files("dpflow").joinpath("bundled/digits.npz").open("rb") as handle:
        arrays = dict(np.load(handle))
    arrays["x_train"] = arrays["x_train"].reshape(-1, 8, 8)
    arrays["x_test"] = arrays["x_test"].reshape(-1, 8, 8)
    return arrays


def split_train_test(x, y, rng, test_fraction=0.2):
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def available_memory():
    """Bytes this machine can still give (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_generated_fits(spec, samples, features, classes):
    """MemoryError before drawing a spirals or synthetic dataset that cannot fit: numpy maps
    far more than the machine holds, then spends minutes filling it before it fails."""
    if spec == "spirals":
        need = 12 * 8 * samples  # radius, labels, theta, x and the split copies, float64
    else:
        need = 8 * (4 * samples * features + classes * features + 2 * samples)  # noise, x, its sum, the split
    free = available_memory()
    if free is not None and need > free:
        raise MemoryError(f"{spec} needs {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free here")


def make_spirals(samples=1500, classes=3, seed=0, noise=0.2):
    """Interleaved 2-D spiral arms, one per class (CS231n's toy problem); seeded."""
    rng = np.random.default_rng(seed)
    per_class = max(samples // classes, 1)
    radius = np.tile(np.linspace(0.0, 1.0, per_class), classes)
    labels = np.repeat(np.arange(classes), per_class)
    theta = labels * 4.0 + radius * 4.0 + rng.normal(0.0, noise, labels.size)
    x = np.column_stack([radius * np.sin(theta), radius * np.cos(theta)])
    return split_train_test(x, labels, rng)


def make_synthetic(samples=4000, features=20, classes=4, seed=0):
    """Gaussian clusters around random class centres; the same on every rank for one seed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    labels = rng.integers(0, classes, samples)
    x = centres[labels] + rng.normal(0.0, 1.0, (samples, features))
    return split_train_test(x, labels, rng)


# --- files ----------------------------------------------------------------------------------

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


def idx_plan(path):
    """The four IDX files of a directory, and how the cache converts them."""
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


# --- checks ---------------------------------------------------------------------------------

MAX_CLASSES = 100_000  # labels beyond this are ids, not class indices (or need `classes`)


def check_labels(name, y_train, y_test, n_classes=None):
    """The class count (given, or max label + 1) and warnings; DataError names a bad label."""
    for split, y in (("y_train", y_train), ("y_test", y_test)):
        if y.size and y.min() < 0:
            raise DataError(f"{name}: {split} holds label {int(y.min())}; labels must be class indices 0..K-1")
    top = max((int(y.max()) for y in (y_train, y_test) if y.size), default=0)
    if n_classes:
        if top >= n_classes:
            split = "y_train" if y_train.size and int(y_train.max()) == top else "y_test"
            raise DataError(f"{name}: {split} holds label {top}, not below `classes` {n_classes}; "
                            f"raise `classes` to at least {top + 1} or fix the labels")
    else:
        if top + 1 > MAX_CLASSES:
            split = "y_train" if y_train.size and int(y_train.max()) == top else "y_test"
            raise DataError(
                f"{name}: {split} holds label {top}; labels must be class indices 0..K-1 with K at most "
                f"{MAX_CLASSES:,} (this looks like an id, not a class): renumber the classes 0..K-1, or "
                "set `classes` to K if there really are that many"
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


# --- loading --------------------------------------------------------------------------------

def load_dataset(spec="digits", samples=4000, features=20, classes=0, seed=0, *, dtype="float32",
                 layout="rows", normalize="auto", is_writer=True, wait=None, cache_root=None):
    """A dataset ready to train: `digits`, `spirals`, `synthetic`, a named one
    (`fashion-mnist`, `mnist`), a .npz, or a directory of .npy or IDX files.

    `classes` is how many classes `spirals` and `synthetic` make (0: 4), and for every other
    dataset the class count when it is not max label + 1. Files are served from the node's
    memory-mapped cache in `dtype`, built by the rank with `is_writer` while the others
    `wait()` (so every rank of a node must call this); built-ins from memory. Either way the
    examples are raw, in `layout`, with the fitted `normalizer` for each gathered batch."""
    from . import catalog, datacache

    dtype = np.dtype(dtype)
    files, cache = (), ""
    if spec in BUILTIN:
        if spec == "digits":
            arrays = digits_arrays()
        elif spec == "spirals":
            check_generated_fits(spec, samples, 2, classes or 4)
            arrays = make_spirals(samples, classes or 4, seed)
        else:
            check_generated_fits(spec, samples, features, classes or 4)
            arrays = make_synthetic(samples, features, classes or 4, seed)
        name = spec
        x_train, y_train, x_test, y_test = in_memory(name, arrays, dtype)
        stats = FeatureStats.of(x_train)
    else:
        path = catalog.locate(spec) if spec in catalog.NAMED else os.fspath(spec)
        if not os.path.exists(path):
            raise DataError(
                f"`dataset` {spec!r} is neither a built-in dataset ({', '.join(BUILTIN + tuple(catalog.NAMED))}) "
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
            raise DataError(f"`dataset` {spec!r}: expected a .npz file or a directory of .npy or IDX files")
        arrays, meta, cache = datacache.cached(name, list(files), dtype, plan, is_writer, wait, cache_root,
                                               beside=spec not in catalog.NAMED)
        x_train, y_train, x_test, y_test = (arrays[key] for key in ARRAY_NAMES)
        stats = datacache.stats_from_meta(meta)
    image_shape = tuple(x_train.shape[1:]) if x_train.ndim == 4 else None
    n_classes, warnings = check_labels(name, y_train, y_test, classes or None)
    if normalize not in NORMALIZE:
        raise DataError(f"`normalize` must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    data = Dataset(name, x_train, y_train, x_test, y_test, n_classes, image_shape,
                   Normalizer.fit(normalize, stats, image_shape), tuple(files), cache, warnings)
    return as_layout(data, layout)


# --- views, identity, validation rows, batches ----------------------------------------------

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


def split_validation(n_train, fraction, seed):
    """(training rows, validation rows): a fraction of the training set held out, chosen from
    `seed` alone, so every rank (and every resume) holds out the same rows. Both sorted."""
    if not 0 <= fraction < 1:
        raise DataError(f"`validation_split` must be in [0, 1), got {fraction}")
    n_validation = int(round(n_train * fraction))
    if fraction > 0 and (n_validation == 0 or n_validation == n_train):
        raise DataError(f"`validation_split` {fraction} of {n_train} training rows leaves "
                        f"{n_validation} validation and {n_train - n_validation} training rows; "
                        "choose a fraction that leaves both non-empty")
    # A stream of its own (not seed + epoch, which shuffles the epochs).
    order = np.random.default_rng([seed, 1]).permutation(n_train)
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def hold_out(data, fraction, seed):
    """The dataset with `fraction` of its training rows held out for validation (see
    `split_validation`); the normaliser is refitted on the rows trained on, so no validation
    row shapes it."""
    if not fraction:
        return data
    train, validation = split_validation(len(data.x_train), fraction, seed)
    normalizer = data.normalizer
    if normalizer.kind != "none":
        normalizer = Normalizer.fit(normalizer.kind, FeatureStats.of(data.x_train, train), data.image_shape)
    return replace(data, train_rows=train, validation_rows=validation, normalizer=normalizer)


def gather(x, rows, normalizer, out):
    """Rows `rows` (an index array or a slice) of `x` into the batch buffer `out`, normalised
    there; a memory-mapped `x` is read only at those rows. The one way batches are made."""
    if isinstance(rows, slice) or isinstance(x, np.memmap) or x.dtype != out.dtype:
        out[...] = x[rows]
    else:
        # mode="clip" (the rows are a permutation's or a split's, always in range): with the
        # default "raise", np.take gathers into a temporary and copies it into `out`, a
        # second pass (128 rows of 784 float32: 26 us against 6).
        np.take(x, rows, axis=0, out=out, mode="clip")
    return normalizer(out)
