"""A memory-mappable copy of a file dataset in the training dtype, one per node.

The first run converts the source files (IDX, .npz, .npy) once into plain `.npy` files of
the training dtype. Every later run, and every rank of a node, maps those files read-only:
the pages live once in the page cache, whatever the number of ranks, and a rank reads only
the rows it gathers. NaN and inf are looked for while converting, and the training set's
statistics (for normalisation) are computed then, so both are free afterwards.

An entry is a directory named for the dataset, the dtype and a key of the sources' paths,
sizes and modification times; `meta.json` inside also records each source's CRC-32. It is
written into a temporary directory and renamed into place, so a reader sees a complete entry
or none. One rank per node writes (`is_writer`) while the others `wait()`; the caller
supplies both (the communicator knows which ranks share a node, this module knows no MPI).
numpy only.
"""

import hashlib
import json
import os
import shutil
import socket
import zlib

import numpy as np

from .errors import DataError
from .normalize import FeatureStats

VERSION = 1
META = "meta.json"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def cache_root(source_dir, beside=True):
    """$DPFLOW_DATA/cache when DPFLOW_DATA is set; else beside the data (`beside`, and the
    directory is writable); else the user's cache directory. A dataset found by name in a
    system directory is not `beside`: the package manager owns that directory."""
    if os.environ.get("DPFLOW_DATA"):
        return os.path.join(os.environ["DPFLOW_DATA"], "cache")
    if beside and os.access(source_dir, os.W_OK):
        return os.path.join(source_dir, ".dpflow-cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dpflow")


def describe_sources(paths):
    """What the key is made of: each source's absolute path, size and mtime."""
    described = []
    for path in paths:
        stat = os.stat(path)
        described.append({"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return described


def entry_path(root, name, dtype, sources):
    key = json.dumps([VERSION, np.dtype(dtype).name, sources], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(root, f"{name}-{np.dtype(dtype).name}-{digest}")


def file_crc32(path):
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def open_entry(entry):
    """(arrays as read-only memmaps, meta) of a complete entry, or None if there is none, or
    none this version can use: another version's, or one damaged since it was written (a
    file truncated, edited or removed by hand)."""
    try:
        with open(os.path.join(entry, META)) as handle:
            meta = json.load(handle)
        if meta.get("version") != VERSION:
            return None
        arrays = {name: np.load(os.path.join(entry, name + ".npy"), mmap_mode="r", allow_pickle=False)
                  for name in ARRAYS}
        if any(list(arrays[name].shape) != meta["shapes"][name] for name in ARRAYS):
            return None
        stats_from_meta(meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return arrays, meta


def discard_entry(entry):
    """Move an entry that cannot be used out of the way (readers that mapped it keep their
    pages), so that it is built again."""
    if not os.path.lexists(entry) or open_entry(entry) is not None:  # gone, or rebuilt by another node
        return
    aside = f"{entry}.unusable-{socket.gethostname()}-{os.getpid()}"
    os.rename(entry, aside)
    if os.path.isdir(aside):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.remove(aside)


def stats_from_meta(meta):
    stats = meta["x_train_stats"]
    return FeatureStats(stats["count"], np.array(stats["mean"]), np.array(stats["m2"]), stats["max_abs"])


def convert_into(path, shape, chunks, dtype, label):
    """Write the chunks (arrays of rows, any numeric dtype) into the .npy `path` as `dtype`,
    refusing NaN and inf; float labels must hold whole numbers."""
    target = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    done = 0
    for chunk in chunks:
        rows = len(chunk)
        if done + rows > shape[0]:
            raise DataError(f"{label} holds more rows than its header or shape says ({shape[0]})")
        converted = target[done:done + rows]
        if np.dtype(dtype).kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                converted[...] = chunk.reshape(converted.shape)
            bad = ~np.isfinite(converted)
            if bad.any():
                row = done + int(np.argwhere(bad)[0][0])
                overflow = chunk.dtype.kind == "f" and np.isfinite(chunk).all()
                what = f"values too large for {np.dtype(dtype).name}" if overflow else "NaN or inf"
                raise DataError(
                    f"{label} holds {what} ({np.count_nonzero(bad)} in rows {done}..{done + rows - 1}, "
                    f"the first in row {row}); clean, impute or rescale them (numpy.isfinite finds "
                    "them) before training"
                )
        else:
            if np.issubdtype(chunk.dtype, np.floating):
                if not np.all(chunk == np.round(chunk)):
                    raise DataError(f"{label} holds non-integer values; labels must be class indices 0..K-1")
            converted[...] = chunk.reshape(converted.shape)
        done += rows
    if done != shape[0]:
        raise DataError(f"{label} ended after {done} of the {shape[0]} rows it promises; the file is truncated")
    target.flush()
    del target


def fsync_tree(directory):
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_entry(entry, name, dtype, sources, plan):
    """Convert `plan` ({array name: (shape, chunk iterable, label for messages)}) into a new
    entry, atomically: a temporary directory renamed into place."""
    temporary = f"{entry}.part-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        for array in ARRAYS:
            shape, chunks, label = plan[array]
            convert_into(os.path.join(temporary, array + ".npy"), shape, chunks,
                         dtype if array.startswith("x") else np.int64, label)
        x_train = np.load(os.path.join(temporary, "x_train.npy"), mmap_mode="r")
        stats = FeatureStats.of(x_train)
        del x_train
        meta = {
            "version": VERSION, "name": name, "dtype": np.dtype(dtype).name,
            "sources": [{**source, "crc32": file_crc32(source["path"])} for source in sources],
            "shapes": {array: list(plan[array][0]) for array in ARRAYS},
            "finite": True,  # convert_into refused anything else
            "x_train_stats": {"count": stats.count, "mean": stats.mean.tolist(), "m2": stats.m2.tolist(),
                              "max_abs": stats.max_abs},
        }
        with open(os.path.join(temporary, META), "w") as handle:
            json.dump(meta, handle)
        fsync_tree(temporary)
        try:
            os.rename(temporary, entry)
        except OSError:
            if open_entry(entry) is None:  # not another node's identical entry: a real failure
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def cached(name, paths, dtype, plan, is_writer=True, wait=None, root=None, beside=True):
    """The cache entry of `paths` converted by `plan()` (called only when building), as
    (arrays, meta, entry). The writer builds a missing entry; every rank then waits, then
    opens it. Collective over the ranks that share `wait`."""
    sources = describe_sources(paths)
    root = root or cache_root(os.path.dirname(os.path.abspath(paths[0])), beside)
    entry = entry_path(root, name, dtype, sources)
    error = None
    if is_writer and open_entry(entry) is None:
        try:
            os.makedirs(root, exist_ok=True)
            discard_entry(entry)
            build_entry(entry, name, dtype, sources, plan())
        except OSError as failure:
            error = DataError(
                f"cannot write the data cache {entry} ({failure.strerror or failure}); set DPFLOW_DATA to "
                "a writable directory with room for the data in the training dtype (the cache goes "
                "to $DPFLOW_DATA/cache)"
            )
        except DataError as failure:  # bad data found while converting
            error = failure
    if wait is not None:
        wait()  # every rank of the node, writer included, even when the build failed
    if error is not None:
        raise error
    opened = open_entry(entry)
    if opened is None:
        raise DataError(f"the data cache {entry} is missing: the rank that writes it on this node "
                         "failed (see its message) or the directory is not shared by this node's ranks")
    arrays, meta = opened
    return arrays, meta, entry
