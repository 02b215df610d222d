"""The IDX format of MNIST and Fashion-MNIST, read in chunks so a large file never sits in
memory twice. numpy only.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order. `.gz` files
are read through gzip; both kinds are checked against the size their header promises.
"""

import gzip
import struct

import numpy as np

from .errors import DataError

TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CHUNK_BYTES = 8 << 20  # per read: bounds the memory of a conversion, whatever the file's size


def _open(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _read_header(handle, path):
    """(dtype, shape) from the header, leaving `handle` at the first value."""
    magic = handle.read(4)
    if len(magic) < 4:
        raise DataError(f"{path} is empty or truncated inside its header ({len(magic)} bytes); "
                       "copy or download the file again")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in TYPES or magic[3] == 0:
        raise DataError(
            f"{path} is not an IDX file (magic number 0x{magic.hex()}; IDX files start with "
            f"00 00, a type code among {', '.join(f'{code:02x}' for code in TYPES)}, and the "
            "number of dimensions); give MNIST-format files, e.g. train-images-idx3-ubyte[.gz]"
        )
    ndim = magic[3]
    dims = handle.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated inside its header ({ndim} dimensions promised); "
                       "copy or download the file again")
    return np.dtype(TYPES[magic[2]]), struct.unpack(f">{ndim}I", dims)


def read_header(path):
    """(dtype, shape) of an IDX file, reading only its header."""
    try:
        with _open(path) as handle:
            return _read_header(handle, path)
    except (OSError, EOFError) as error:  # gzip raises these for a damaged stream
        raise DataError(f"cannot read {path}: {error}; copy or download the file again") from error


def iter_chunks(path, rows_per_chunk=None):
    """Yield the file's values as arrays of whole rows (the first axis), in order, with the
    file's own dtype; then check that nothing follows the promised values."""
    try:
        with _open(path) as handle:
            dtype, shape = _read_header(handle, path)
            row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            if rows_per_chunk is None:
                rows_per_chunk = max(1, CHUNK_BYTES // max(row_bytes, 1))
            done = 0
            while done < shape[0]:
                rows = min(rows_per_chunk, shape[0] - done)
                raw = handle.read(rows * row_bytes)
                if len(raw) < rows * row_bytes:
                    got = done * row_bytes + len(raw)
                    raise DataError(
                        f"{path} is truncated: its header promises {shape[0]} x "
                        f"{'x'.join(map(str, shape[1:])) or '1'} values "
                        f"({shape[0] * row_bytes} bytes), the file holds {got}; copy or download it again"
                    )
                yield np.frombuffer(raw, dtype).reshape((rows,) + tuple(shape[1:]))
                done += rows
            if handle.read(1):
                raise DataError(f"{path} has bytes after the {shape[0]} rows its header promises; "
                               "it is not a clean IDX file: copy or download it again")
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"cannot read {path}: {error}; copy or download the file again") from error


def read_idx(path):
    """The whole file as one array (for labels and small files)."""
    dtype, shape = read_header(path)
    chunks = list(iter_chunks(path))
    return np.concatenate(chunks) if chunks else np.empty(shape, dtype)


def write_idx(path, array):
    """Write `array` as an IDX file (gzipped when `path` ends in .gz): tests and tools make
    small datasets with it."""
    codes = {np.dtype(value).newbyteorder(">") if np.dtype(value).itemsize > 1 else np.dtype(value): code
             for code, value in TYPES.items()}
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = codes.get(big_endian.dtype)
    if code is None:
        raise DataError(f"IDX has no type for {array.dtype}; use uint8, int8, int16, int32, float32 or float64")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as handle:
        handle.write(header + np.ascontiguousarray(big_endian).tobytes())
