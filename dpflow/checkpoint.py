"""Checkpoints that survive crashes: atomic writes, a checksum, a `latest` pointer, fallback;
and a trainer's state in them: what is saved, rank 0's background writes, loading by
broadcast, and the checks that a checkpoint fits the run that loads it.

A checkpoint file is one header line `DPFLOW-CHECKPOINT 1 <sha256 of the rest>` followed by
an `.npz` archive. It holds the global state only (parameters by name, optimizer state,
position in the data, the resolved settings), so any number of ranks can resume from it.
Rank 0 reads and writes; the other ranks receive what it read by broadcast.
"""

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time

import numpy as np

from . import __version__
from .data import fingerprint
from .errors import CheckpointError

MAGIC = b"DPFLOW-CHECKPOINT 1 "
NAME = re.compile(r"^ckpt-(\d{9})\.dpf$")
LATEST = "latest"
BEST = "best.dpf"  # `keep_best`: the best epoch so far; not a ckpt-*.dpf, so never pruned or resumed


def current_umask():
    """The process's umask, read without changing it (Linux's /proc); elsewhere set and
    restored at once. Read when writing, never at import: importing changes nothing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600, widened to what open() would give
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


def save_checkpoint(directory, step, arrays, meta, keep=3, regular=True, best=False):
    """Write checkpoint `step`, then move `latest` to it, then prune beyond `keep`; with
    `best`, also (or only, without `regular`) replace best.dpf, which pruning never touches.

    Old checkpoints are deleted only after the new one and the pointer are committed. The
    directory is never created here: one that vanished during the run (deleted, unmounted)
    is a failed write, not a new place to write into. Returns the regular checkpoint's path
    (None if only best.dpf was written).
    """
    data = encode(arrays, meta)
    path = None
    if regular:
        path = checkpoint_path(directory, step)
        atomic_write(path, data)
        atomic_write(os.path.join(directory, LATEST), os.path.basename(path).encode() + b"\n")
        for old in list_checkpoints(directory)[keep:]:
            os.unlink(old)
    if best:
        atomic_write(os.path.join(directory, BEST), data)
    return path


def read_checkpoint(path):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # /dev/zero would be read until memory ran out
            raise CheckpointError(f"{path} is not a regular file; give a checkpoint file (ckpt-*.dpf) or "
                                  "the directory that holds them")
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    try:
        arrays, meta = decode(data, path)
    except CheckpointError:
        raise
    except Exception as error:  # a checksum that matches but content numpy rejects
        raise CheckpointError(f"{path} is damaged: {error}") from None
    check_contents(path, arrays, meta)
    return arrays, meta


# What a checkpoint's metadata must hold, and of which kind. A file whose checksum matches
# can still hold impossible values (written by another tool, edited by hand, a bug): it is
# treated like a damaged file, so `--resume` falls back to an older one.
COUNTERS = ("epoch", "step_in_epoch", "global_step", "optimizer_steps")
CONFIG_KEYS = ("dataset", "hidden", "activation", "optimizer", "dtype", "batch_size")


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_contents(path, arrays, meta):
    """CheckpointError naming the first impossible value in a decoded checkpoint."""
    from .config import FIELDS, coerce
    from .errors import UsageError

    def damaged(what):
        raise CheckpointError(f"{path} is damaged: {what}")

    if not isinstance(meta, dict):
        damaged(f"its metadata is a {type(meta).__name__}, not a table")
    for key in COUNTERS:
        if key not in meta:
            damaged(f"its metadata has no {key!r}")
        if not is_count(meta[key]):
            damaged(f"{key} is {meta[key]!r}, not a count >= 0")
    if "samples_seen" in meta and not is_count(meta["samples_seen"]):
        damaged(f"samples_seen is {meta['samples_seen']!r}, not a count >= 0")
    if "seed" in meta and (not isinstance(meta["seed"], int) or isinstance(meta["seed"], bool)):
        damaged(f"seed is {meta['seed']!r}, not an integer")
    if meta["step_in_epoch"] > meta["global_step"] or meta["optimizer_steps"] > meta["global_step"]:
        damaged(f"step_in_epoch {meta['step_in_epoch']} and optimizer_steps {meta['optimizer_steps']} "
                f"cannot exceed global_step {meta['global_step']}")
    named = NAME.match(os.path.basename(path))
    if named and int(named.group(1)) != meta["global_step"]:
        damaged(f"it says global_step {meta['global_step']} but its name says {int(named.group(1))}")
    config, model = meta.get("config"), meta.get("model")
    if not isinstance(config, dict):
        damaged("its metadata has no config table")
    for key in CONFIG_KEYS:
        if key not in config:
            damaged(f"its config has no {key!r}")
    for key, value in config.items():
        if key in FIELDS and value is not None:  # None: an optional setting left unset
            try:
                coerce(key, value)
            except UsageError as error:
                damaged(f"its config: {error}")
    if not isinstance(model, dict):
        damaged("its metadata has no model table")
    if "spec" in model:  # a model built from its SPEC: what rebuilds it must be there
        shape, classes = model.get("input_shape"), model.get("n_classes")
        if not isinstance(model["spec"], str) or not isinstance(model.get("args", {}), dict):
            damaged(f"model spec {model['spec']!r} or its arguments are not a name and a table")
        if not (isinstance(shape, list) and shape and all(is_count(n) and n > 0 for n in shape)):
            damaged(f"model input_shape {shape!r} is not a list of positive sizes")
        if not (is_count(classes) and classes > 0):
            damaged(f"model n_classes {classes!r} is not a positive count")
    else:  # older checkpoints: always an MLP, described by its layer sizes
        sizes = model.get("sizes")
        if not (isinstance(sizes, list) and len(sizes) >= 2 and all(is_count(n) and n > 0 for n in sizes)):
            damaged(f"model sizes {sizes!r} are not a list of positive layer sizes")
    if model.get("dtype") not in ("float32", "float64"):
        damaged(f"model dtype {model.get('dtype')!r} is not float32 or float64")
    if meta.get("normalizer") is not None:
        from .normalize import Normalizer

        try:
            Normalizer.from_state(meta["normalizer"])
        except ValueError as error:
            damaged(f"its normalizer: {error}")
    if meta.get("last_epoch") is not None and not isinstance(meta["last_epoch"], dict):
        damaged(f"last_epoch is {meta['last_epoch']!r}, not a table")
    if not any(name.startswith("param/") for name in arrays):
        damaged("it holds no parameters")
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            damaged(f"{name} holds {array.dtype} values, not floating point")
        if name.startswith("param/") and array.dtype != np.dtype(model["dtype"]):
            damaged(f"{name} is {array.dtype} but the model is {model['dtype']}")
        if not np.isfinite(array).all():
            damaged(f"{name} holds NaN or infinite values")


RESUME_FIX = "Start again without `resume` (and a fresh `checkpoint_dir`)"
READ_FIX = "Give another checkpoint file or directory"  # for eval and predict, which train nothing


def load_latest_valid(directory, warn=print, fix=RESUME_FIX):
    """(path, arrays, meta) of the newest checkpoint that verifies; warn about each skipped one.
    `fix` ends the message when none does.

    Every checkpoint from the highest step down: `latest` may point at an older one than
    the newest that was written (a run killed between writing a checkpoint and moving the
    pointer), and a damaged pointer must not hide the files themselves.
    """
    candidates = list_checkpoints(directory)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint (ckpt-*.dpf) in {directory}; point at the directory a run with "
            "`checkpoint_dir` wrote"
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
        + f". {fix}"
    )


def load_checkpoint_source(source, warn=print, fix=RESUME_FIX):
    """(path, arrays, meta) of a checkpoint file, or of a directory's newest valid one."""
    if os.path.isdir(source):
        return load_latest_valid(source, warn=warn, fix=fix)
    return (source, *read_checkpoint(source))


TEMPORARY = re.compile(r"^\.tmp-.*\.part$")


def remove_temporaries(directory):
    """Delete the temporary files of writes that were killed before their rename (they are
    never a checkpoint). Only for the run that holds the directory's lock. Returns their names."""
    try:
        names = [name for name in os.listdir(directory) if TEMPORARY.match(name)]
    except OSError:
        return []
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    return names


def save_parameters(path, named_arrays):
    """The final parameters as a plain .npz, one array per parameter name, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **named_arrays)
    atomic_write(path, buffer.getvalue())


def check_checkpoint_dir(directory, resume):
    """Create the checkpoint directory if needed, take its lock for this run (rank 0 only;
    returned, to hold), remove the temporaries of writes that were killed, and prove a file
    can be written there. A new run never writes into another run's checkpoints: pruning
    would delete them."""
    from .lock import LOCK_NAME, DirectoryBusy, DirectoryLock

    try:
        os.makedirs(directory, exist_ok=True)
        lock = DirectoryLock(directory).acquire()
    except DirectoryBusy as busy:
        raise CheckpointError(f"`checkpoint_dir` {busy}") from None
    except OSError as error:
        lock_file = os.path.join(directory, LOCK_NAME)
        if os.path.isdir(directory) and os.path.lexists(lock_file):  # a directory, a FIFO, a file not ours
            raise CheckpointError(
                f"`checkpoint_dir` {directory}: its lock file {lock_file} cannot be used ({error.strerror}); "
                "remove it if no run uses the directory"
            ) from None
        raise CheckpointError(
            f"`checkpoint_dir` {directory} is not writable ({error.strerror}); "
            "choose a directory you can write to"
        ) from None
    try:
        if not resume and list_checkpoints(directory):
            raise CheckpointError(
                f"`checkpoint_dir` {directory} already holds checkpoints of another run; pass `resume` "
                "to continue that run, or choose an empty directory"
            )
        remove_temporaries(directory)
        for name in (LATEST, BEST):  # each write renames a file over these: a directory there fails them all
            path = os.path.join(directory, name)
            if os.path.lexists(path) and not os.path.isfile(path):
                raise CheckpointError(f"`checkpoint_dir` {directory} holds {name}, which is not a file: every "
                                      f"checkpoint write would fail; remove {path}")
        try:
            probe = os.path.join(directory, f".write-test-{os.getpid()}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as error:
            raise CheckpointError(
                f"`checkpoint_dir` {directory} is not writable ({error.strerror}); "
                "choose a directory you can write to"
            ) from None
    except BaseException:
        lock.release()
        raise
    return lock


def check_room(directory, arrays):
    """Refuse a directory without room for two checkpoints of this size: the next one is
    written beside the last before the older is deleted."""
    need = 2 * (sum(array.nbytes for array in arrays.values()) + 64 * 1024)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise CheckpointError(
            f"`checkpoint_dir` {directory} has {free / 2**20:.1f} MB free; two checkpoints of this "
            f"model need {need / 2**20:.1f} MB. Free some space or choose another directory"
        )


def free_space(directory):
    """'N MB free' on the filesystem of `directory`, or why that cannot be said."""
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MB free"
    except OSError as error:
        return f"the directory cannot be read: {error.strerror}"


# --- a trainer's state ----------------------------------------------------------------------

# Settings a run must share with the checkpoint it resumes: they shape the parameters,
# the optimizer state or the data every step sees.
# The dataset itself is matched by content (`data.fingerprint`), not by its path string.
MUST_MATCH_ON_RESUME = ("samples", "features", "classes", "normalize", "validation_split", "model",
                        "model_args", "hidden",
                        "activation", "optimizer", "dtype", "lr_schedule", "lr_decay_epochs",
                        "lr_decay_factor", "lr_power", "min_lr", "warmup_epochs")


def resume_keys(stored):
    """The settings a resume must keep: cosine and poly decay over the run's epochs, so with
    them `epochs` too (the schedule would jump otherwise)."""
    if stored.get("lr_schedule") in ("cosine", "poly"):
        return MUST_MATCH_ON_RESUME + ("epochs",)
    return MUST_MATCH_ON_RESUME


def model_meta(trainer):
    """What rebuilds the model: its SPEC (and, for a file, where it was), the builder's
    arguments, the data's example shape and class count, the dtype."""
    from .modelspec import builder_arguments, spec_file

    config, data = trainer.config, trainer.data
    meta = {"spec": config.model, "args": builder_arguments(config) if config.model else {},
            "input_shape": list(data.input_shape), "n_classes": int(data.n_classes),
            "dtype": trainer.dtype.name, "parameters": int(trainer.flat.size)}
    path = spec_file(config.model)
    if path:
        meta["source"] = os.path.abspath(path)
    return meta


def training_state(trainer):
    """The global training state as named arrays and metadata (a copy: safe to write later)."""
    arrays = {f"param/{name}": np.array(value) for name, value in trainer.flat.as_dict().items()}
    # Non-trainable state (BatchNorm's running statistics): the same on every rank.
    arrays.update({f"state/{name}": np.array(value) for name, value in trainer.model.state().items()})
    meta = {"dpflow_version": __version__, "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch,
            "global_step": trainer.global_step, "optimizer_steps": trainer.optimizer.steps,
            "samples_seen": trainer.samples_seen(), "seed": trainer.config.seed,
            "config": dataclasses.asdict(trainer.config),
            # The last epoch's record only: the whole history lives in the metrics file, and a
            # checkpoint must not grow with the length of the run.
            "last_epoch": trainer.history[-1] if trainer.history else None,
            "model": model_meta(trainer),
            "noise": trainer.noise.state() if trainer.noise else None,
            # What eval and predict need to see the data as training did, and what it was.
            "normalizer": trainer.data.normalizer.state(), "dataset_fingerprint": fingerprint(trainer.data)}
    for key, value in trainer.optimizer.state_dict().items():
        if isinstance(value, np.ndarray):
            arrays[f"optim/{key}"] = np.array(value)
    return arrays, meta


class CheckpointWriter:
    """Rank 0's checkpoint writes, each in a thread so that its I/O never holds the next
    collective.

    A write that fails (disk full, a read-only or vanished directory) never costs an older
    checkpoint: the new file is written beside them and `latest` moves only after it is
    complete. Such a failure is not the end of the run either: it is reported with the
    path and the free space, training goes on, the next checkpoint tries again, and the run
    ends saying how old its last checkpoint is (`behind`).
    """

    def __init__(self, directory, keep, warn=print):
        self.directory, self.keep, self.warn = directory, keep, warn
        self.last = None  # the newest checkpoint written or resumed from
        self.last_step = None
        self.failures = 0
        self.last_error = None
        self.started = time.monotonic()  # when the last write began (or the run did)
        self.thread = None
        self.tracer = None  # a trace.Tracer shows each write on the writer thread's track

    def start(self, step, arrays, meta, beat, regular=True, best=False):
        self.wait(beat)
        self.started = time.monotonic()

        def write():
            started = time.perf_counter()
            try:
                path = save_checkpoint(self.directory, step, arrays, meta, self.keep, regular, best)
            except OSError as error:
                self.failures += 1
                where = error.filename or self.directory
                self.last_error = f"{error.strerror or error} ({where}; {free_space(self.directory)})"
                kept = f"the last checkpoint is still {self.last}" if self.last else "no checkpoint was written yet"
                self.warn(f"warning: checkpoint at step {step} not written: {self.last_error}; {kept}. "
                          "Training goes on; the next checkpoint tries again")
                return
            if path:
                self.last, self.last_step = path, step
            if self.tracer:
                self.tracer.add("checkpoint write", started, time.perf_counter(), "checkpoint", step=step)

        self.thread = threading.Thread(target=write, name="dpflow-checkpoint")
        self.thread.start()

    def wait(self, beat):
        """Wait for the write in flight; `beat` tells the watchdog we are busy, not stuck."""
        if self.thread is not None:
            while self.thread.is_alive():
                beat("writing a checkpoint")
                self.thread.join(timeout=1.0)
            self.thread = None

    def behind(self, step):
        """Why the last checkpoint is older than `step` after failed writes, or None."""
        if not self.failures or self.last_step == step:
            return None
        last = f"{self.last} (step {self.last_step})" if self.last else "none"
        return (f"the last checkpoint is older than the end of the run (step {step}): {last}; "
                f"{self.failures} checkpoint write(s) failed, the last with {self.last_error}")


def load_checkpoint(trainer, source, for_training=True, loaded=None):
    """Rank 0 reads `source` (a checkpoint file, or a directory's newest valid one) unless
    it already holds `loaded` = (path, arrays, meta); every rank receives the parameters
    (and, for training, the optimizer state and position) by broadcast. Returns the
    checkpoint's path. Collective."""
    comm, flat, optimizer = trainer.comm, trainer.flat, trainer.optimizer
    payload = None
    if comm.is_root:
        try:
            path, arrays, meta = loaded or load_checkpoint_source(source, warn=trainer.log)
            payload = {"path": path, "meta": meta,
                       "shapes": {name: array.shape for name, array in arrays.items()}}
        except CheckpointError as error:
            payload = {"error": str(error)}
    payload = comm.broadcast_object(payload)
    if "error" in payload:
        raise CheckpointError(payload["error"])
    meta, shapes, path = payload["meta"], payload["shapes"], payload["path"]
    check_compatible(trainer, path, meta, shapes, for_training)
    buffers = [(f"param/{name}", flat.view(flat.values, name)) for name in flat.names]
    # Running statistics count for evaluation too.
    buffers += [(f"state/{name}", value) for name, value in trainer.model.state().items()]
    if for_training:
        # state_dict() hands out the optimizer's live arrays: filling them restores it.
        buffers += [(f"optim/{key}", value) for key, value in optimizer.state_dict().items()
                    if isinstance(value, np.ndarray)]
    for key, target in buffers:
        if comm.is_root:
            target[...] = arrays[key]
        comm.broadcast(target)
    if for_training:
        optimizer.steps = int(meta["optimizer_steps"])
        trainer.epoch, trainer.step_in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
        trainer.global_step = int(meta["global_step"])
        last = meta.get("last_epoch") or (meta.get("history") or [None])[-1]  # older files: "history"
        trainer.history = [last] if last else []
        if trainer.noise and meta.get("noise"):
            trainer.noise.load_state(meta["noise"])
        trainer.checkpoints.last, trainer.checkpoints.last_step = path, trainer.global_step
    return path


def describe_model(model_meta):
    """'cnn {'dropout': 0.25}, 225,034 parameters' from a checkpoint's model record (older
    checkpoints hold an MLP's layer sizes)."""
    if "sizes" in model_meta and "spec" not in model_meta:
        return f"mlp, layer sizes {model_meta['sizes']}"
    args = model_meta.get("args") or {}
    shown = " " + ", ".join(f"{key}={value}" for key, value in args.items()) if args else ""
    return (f"{model_meta.get('spec') or 'a model given in Python'}{shown}, "
            f"{model_meta.get('parameters', 0):,} parameters")


def check_compatible(trainer, path, meta, shapes, for_training):
    """The checkpoint must fit this model; to resume, the run's settings must be the
    checkpoint's. A refusal names the settings that differ."""
    # A key an older checkpoint lacks had its default then (`model` was always mlp).
    stored = {**dataclasses.asdict(type(trainer.config)()), **meta["config"]}
    differ = [f"`{key}` {stored.get(key)!r} (now {getattr(trainer.config, key)!r})"
              for key in resume_keys(stored) if stored.get(key) != getattr(trainer.config, key)]
    expected = {f"param/{name}": tuple(shape) for name, shape in trainer.flat.shapes.items()}
    expected.update({f"state/{name}": tuple(value.shape) for name, value in trainer.model.state().items()})
    got = {name: tuple(shape) for name, shape in shapes.items() if name.startswith(("param/", "state/"))}
    if got != expected:
        arrays = sorted(set(got) ^ set(expected)) or [name for name in expected if got[name] != expected[name]]
        raise CheckpointError(
            f"the checkpoint {path} is from a different model ({describe_model(meta.get('model', {}))}); "
            f"this run builds {describe_model(model_meta(trainer))}, and they differ in "
            f"{', '.join(arrays[:3])}" + (f"; it was trained with {', '.join(differ)}" if differ else "")
            + "; use the `model`, `model_args` and `dataset` it was trained with"
            + (", or a fresh `checkpoint_dir`" if for_training else "")
        )
    if not for_training:  # eval may use another dataset, with the checkpoint's normaliser
        return
    was = meta.get("dataset_fingerprint")
    if was is None and stored.get("dataset") != trainer.config.dataset:  # a checkpoint from before fingerprints
        differ.append(f"`dataset` {stored.get('dataset')!r} (now {trainer.config.dataset!r})")
    elif was is not None and was != fingerprint(trainer.data):
        differ.append(f"`dataset` {stored.get('dataset')!r} holding other data (labels checksum/"
                      f"rows/features/classes {was}; now {trainer.config.dataset!r}: {fingerprint(trainer.data)})")
    elif meta.get("normalizer") not in (None, trainer.data.normalizer.state()):
        differ.append(f"`dataset` {stored.get('dataset')!r} with other examples (the same labels, but "
                      "the training set's statistics differ)")
    if differ:
        raise CheckpointError(
            f"the checkpoint {path} was trained with {', '.join(differ)}; resume with the same "
            "settings, or start a new run in a fresh `checkpoint_dir`"
        )
