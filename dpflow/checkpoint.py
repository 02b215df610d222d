"""Checkpoints that survive crashes: atomic writes, a checksum, a `latest` pointer, fallback.

A checkpoint file is one header line `DPFLOW-CHECKPOINT 1 <sha256 of the rest>` followed by
an `.npz` archive. It holds the global state only (parameters by name, optimizer state,
position in the data, the resolved config), so any number of ranks can resume from it.
numpy only: the trainer decides who writes (rank 0) and broadcasts what was read.
"""

import hashlib
import io
import json
import os
import re
import tempfile

import numpy as np

MAGIC = b"DPFLOW-CHECKPOINT 1 "
NAME = re.compile(r"^ckpt-(\d{9})\.dpf$")
LATEST = "latest"
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once at import: the process's umask, unchanged


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or from another model."""


def fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data):
    """Write bytes so that `path` is either the old file or the complete new one, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600, widened to what open() would give
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def encode(arrays, meta):
    """The bytes of a checkpoint file: header with checksum, then an npz of arrays + meta."""
    body = io.BytesIO()
    np.savez(body, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    payload = body.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode(data, path="checkpoint"):
    """(arrays, meta) from checkpoint bytes; CheckpointError if damaged."""
    header, _, payload = data.partition(b"\n")
    if not header.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a dpflow checkpoint (bad header)")
    expected = header[len(MAGIC):].decode(errors="replace")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path} is damaged: checksum {actual[:12]}... does not match {expected[:12]}...")
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files if name != "__meta__"}
        meta = json.loads(archive["__meta__"].tobytes().decode())
    return arrays, meta


def checkpoint_path(directory, step):
    return os.path.join(directory, f"ckpt-{step:09d}.dpf")


def list_checkpoints(directory):
    """Checkpoint paths in the directory, newest (highest step) first."""
    try:
        names = os.listdir(directory)
    except OSError:  # missing, not a directory, unreadable: no checkpoints to find there
        return []
    found = sorted((int(m.group(1)), name) for name in names if (m := NAME.match(name)))
    return [os.path.join(directory, name) for _, name in reversed(found)]


def save_checkpoint(directory, step, arrays, meta, keep=3):
    """Write checkpoint `step`, then move `latest` to it, then prune beyond `keep`.

    Old checkpoints are deleted only after the new one and the pointer are committed.
    """
    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, step)
    atomic_write(path, encode(arrays, meta))
    atomic_write(os.path.join(directory, LATEST), os.path.basename(path).encode() + b"\n")
    for old in list_checkpoints(directory)[keep:]:
        os.unlink(old)
    return path


def read_checkpoint(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    try:
        return decode(data, path)
    except CheckpointError:
        raise
    except Exception as error:  # a checksum that matches but content numpy rejects
        raise CheckpointError(f"{path} is damaged: {error}") from None


def load_latest_valid(directory, warn=print):
    """(path, arrays, meta) of the newest checkpoint that verifies; warn about each skipped one.

    Tries the `latest` pointer first, then every checkpoint from newest to oldest.
    """
    candidates = []
    try:
        with open(os.path.join(directory, LATEST), "rb") as handle:
            pointer = handle.read().decode("ascii", errors="replace").strip()
        if NAME.match(pointer):  # a damaged pointer is ignored: the files themselves remain
            candidates.append(os.path.join(directory, pointer))
    except OSError:
        pass
    candidates += [path for path in list_checkpoints(directory) if path not in candidates]
    if not candidates:
        raise CheckpointError(
            f"no checkpoint (ckpt-*.dpf) in {directory}; point at the directory a run with "
            "--checkpoint-dir wrote"
        )
    problems = []
    for path in candidates:
        try:
            arrays, meta = read_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            warn(f"warning: skipping {error}; trying an older checkpoint")
            continue
        return path, arrays, meta
    raise CheckpointError(
        f"no valid checkpoint in {directory}: " + "; ".join(problems)
        + ". Start again without --resume (and a fresh --checkpoint-dir)"
    )


def load_checkpoint_source(source, warn=print):
    """(path, arrays, meta) of a checkpoint file, or of a directory's newest valid one."""
    if os.path.isdir(source):
        return load_latest_valid(source, warn=warn)
    return (source, *read_checkpoint(source))


def save_parameters(path, named_arrays):
    """The final parameters as a plain .npz, one array per parameter name, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **named_arrays)
    atomic_write(path, buffer.getvalue())
