"""One training run, as `dpflow train` and `dpflow.fit` make it: the data, the model, the
start-up checks every rank agrees on, resume, the loop, the final save.

`train` is collective: every rank calls it with the same settings. Its errors name settings
(in backquotes); the command line shows them as flags.
"""

import contextlib
import os
import stat
import sys
import zipfile

import numpy as np

from . import failure, output
from .agreement import agree, check_same_model, check_same_run
from .checkpoint import check_checkpoint_dir, load_checkpoint, save_parameters
from .config import config_dict, flag
from .data import load_dataset
from .errors import DataError, DpflowError, TrainingError, UsageError
from .modelspec import build_model, builder_arguments


def check_output_path(name, path):
    """`metrics`, `save` and `trace` (or a command's own flag, e.g. `--output`) name files that
    can be written, checked before any training."""
    shown = name if name.startswith("-") else f"`{name}`"
    if os.path.isdir(path):
        example = {"save": "run.npz", "trace": "trace.json", "metrics": "metrics.jsonl"}.get(name, "out.npy")
        raise UsageError(f"{shown} {path} is a directory; give a file path, e.g. {os.path.join(path, example)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"{shown} {path}: the directory {parent} does not exist or is not "
                         "writable; create it or choose another path")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UsageError(f"{shown} {path} exists and is not a regular file; give a file path")
    if os.path.exists(path) and not os.access(path, os.W_OK):  # the rename would replace it all the same
        raise UsageError(f"{shown} {path} exists and is read-only: it is kept; choose another path, or "
                         "make it writable to replace it")
    limit = os.pathconf(parent, "PC_NAME_MAX")
    if len(os.fsencode(os.path.basename(path))) > limit:
        raise UsageError(f"{shown}: the file name {os.path.basename(path)[:40]}... is longer than "
                         f"the {limit} bytes this filesystem allows")


def check_separate_files(paths):
    """{how it was named: path}: no two name one file, or the later write replaces the other,
    an input read before (the dataset, the config file) or another output. Empty paths are unset."""
    seen = {}
    for what, path in paths.items():
        if not path:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise UsageError(f"{what} {path} is the file {seen[key]} names too: writing it would replace that "
                             "file; give each its own path")
        seen[key] = what


def run_files(config):
    """{setting: path} of the files a run reads or writes by name."""
    dataset = config.dataset if os.path.isfile(config.dataset) else ""  # a built-in or a directory: no one file
    return {f"`{name}`": path for name, path in (("dataset", dataset), ("metrics", config.metrics),
                                                 ("save", config.save), ("trace", config.trace))}


CHECKPOINT_BEHIND = 3  # trained to the end, but the last checkpoint writes failed


def load_data(comm, config, normalizer_state=None, layout="rows"):
    """The run's dataset, loaded by every rank (a file's cache is built by one rank per node
    while the others wait), with any validation rows held out; bad data stops every rank.
    Every rank then applies rank 0's normaliser (or the checkpoint's, `normalizer_state`), so
    all transform their batches with the same bits. Collective."""
    from .normalize import Normalizer

    data = agree(comm, lambda: read_dataset(config, comm, layout))
    state = normalizer_state or comm.broadcast_object(data.normalizer.state())
    data.normalizer = Normalizer.from_state(state)
    return data


# What reading a file the user named can raise when its bytes are not what they should be.
UNREADABLE = (OSError, EOFError, ValueError, KeyError, IndexError, ArithmeticError, MemoryError,
              UnicodeError, zipfile.BadZipFile)


def read_dataset(config, comm, layout="rows"):
    """load_dataset (and the validation rows), with any failure that the dataset's contents
    cause reported as bad data (exit 2, naming the dataset) rather than as a crash. Images
    come as (C, H, W) when the model's `layout` asks for them; data that holds no images
    stays rows, for the model to refuse or reshape (the cnn takes rows of square images)."""
    from .data import as_layout, hold_out

    try:
        data = load_dataset(config.dataset, config.samples, config.features, config.classes, config.seed,
                            dtype=config.dtype, normalize=config.normalize,
                            is_writer=comm.local_rank == 0, wait=comm.node_barrier)
        if layout == "images" and data.image_shape:
            data = as_layout(data, "images")
        return hold_out(data, config.validation_split, config.seed)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"`dataset` {config.dataset} does not fit in this machine's memory; use a "
                        "smaller one (or smaller `samples`/`features`/`classes`)") from None
    except UNREADABLE as error:
        raise DataError(f"`dataset` {config.dataset} cannot be used: {type(error).__name__}: {error}") from None


def start_trace(comm, path):
    """A Tracer on every rank with clocks aligned, or None without `trace`. If the job
    aborts, each rank that can leaves what it holds, and the rank that ends the job (rank 0
    on a stall) merges what it finds. Collective."""
    if not path:
        return None
    from .trace import Tracer

    tracer = Tracer(comm.rank)
    tracer.align_clocks(comm)
    def last_words(aborting):
        if not tracer.path_checked:  # a directory, a missing one, or a device to be renamed over
            return
        tracer.write_partial(path)
        if aborting:  # whichever rank ends the job merges what every rank left
            tracer.merge_partials(path, comm.size)

    failure.LAST_WORDS.append(last_words)
    tracer.last_words = last_words
    return tracer


def finish_trace(comm, tracer, path):
    """Rank 0 writes the whole trace; the abort's last words are done with, so a later run in
    this process (a script's next `fit`) that fails cannot overwrite it. A trace that cannot
    be written is a warning. Collective."""
    try:
        tracer.gather_and_write(comm, path)
    except OSError as error:  # rank 0's write; the gather is done: no rank is left waiting
        # The trace is a diagnosis: a full disk must not cost the run its final save.
        sys.stderr.write(f"dpflow: warning: the trace could not be written to `trace` {path} "
                         f"({error.strerror}); the run goes on without it\n")
    failure.LAST_WORDS.remove(tracer.last_words)


def model_layout(config, model):
    """`rows` or `images`: what the model (a SPEC's builder, or the builder or Model `fit()`
    was given) declares with its `input_layout`; rows when it says nothing. A SPEC that does
    not resolve is reported when the model is built, after the data: rows until then."""
    from .modelspec import input_layout, resolve_builder

    if model is not None:
        return input_layout(model)
    try:
        return input_layout(resolve_builder(config.model))
    except UsageError:
        return "rows"


def build_run_model(comm, config, data, model=None):
    """`model` SPEC's model (or the Model `fit()` was given), built on every rank, checked
    against the data and to be the same graph everywhere. Collective."""
    from .model import Model
    from .modelspec import check_model

    def build():
        if model is None or callable(model) and not isinstance(model, Model):
            return build_model(config.model, builder_arguments(config), data.input_shape,
                               data.n_classes, config.seed, config.dtype, builder=model)
        check_model("(given to fit)", model, data.input_shape, data.n_classes, np.dtype(config.dtype))
        return model

    built = agree(comm, build)
    check_same_model(comm, config.model, built)
    return built


def train(config, comm, safety, data=None, model=None):
    """One training run: the data, the model, the start-up checks, resume, the loop, the final
    save. `fit()` passes a dataset and a Model of its own. Returns (the Trainer, the exit
    status). Collective."""
    from .checkpoint import BEST, check_room, training_state
    from .launch import ProgressFile
    from .signals import StopRequest
    from .trainer import Trainer, best_epoch, check_batch_size, check_model_fits

    # From the start a signal is a stop request for the first step boundary, never a crash.
    stop = StopRequest().install()
    # From here on every wait is bounded: start-up reads files and talks to every rank too.
    watchdog = safety.start_watchdog(config.stall_timeout, flag("stall_timeout"))
    tracer = start_trace(comm, config.trace)
    phase = (lambda name: tracer.span(name, "start-up")) if tracer else (lambda name: contextlib.nullcontext())
    reporter = lock = None
    try:
        watchdog.beat("loading the dataset")
        with phase("load the dataset"):
            data = load_data(comm, config, layout=model_layout(config, model)) if data is None else data
        watchdog.beat("start-up checks")
        with phase("start-up checks"):
            check_same_run(comm, config_dict(config), data)
        agree(comm, lambda: check_batch_size(config.batch_size, comm.size))
        if config.checkpoint_dir:  # rank 0 holds the directory's lock until it exits
            lock = agree(comm, lambda: check_checkpoint_dir(config.checkpoint_dir, config.resume)
                         if comm.is_root else None)
        # After the checkpoint directory is made: outputs may go into it.
        agree(comm, lambda: check_separate_files(run_files(config)) if comm.is_root else None)
        for name in ("metrics", "save", "trace"):
            if getattr(config, name):
                agree(comm, lambda: check_output_path(name, getattr(config, name)) if comm.is_root else None)
        if tracer:
            tracer.path_checked = True
        if config.model == "mlp" and model is None:
            # Free memory may differ between nodes: every rank's verdict is shared.
            micro_batch = -(-min(config.batch_size, data.n_train) // config.accumulate)
            rows = -(-micro_batch // comm.size)  # this rank's share, rounded up
            agree(comm, lambda: check_model_fits([data.n_features, *config.hidden, data.n_classes], config.dtype, rows))
        watchdog.beat("building the model")
        with phase("build the model, broadcast rank 0's parameters"):
            model = build_run_model(comm, config, data, model)
            trainer = Trainer(config, comm, data, model=model)  # collective: broadcasts rank 0's parameters
        trainer.tracer = trainer.checkpoints.tracer = tracer
        trainer.stop = stop
        if config.checkpoint_dir:
            agree(comm, lambda: check_room(config.checkpoint_dir, training_state(trainer)[0])
                  if comm.is_root else None)
        watchdog.beat("resuming")
        with phase("resume"):
            resumed_from = load_checkpoint(trainer, config.checkpoint_dir) if config.resume else None
        if resumed_from and config.metrics and comm.is_root:
            output.truncate_metrics(config.metrics, trainer.global_step)
        hosts = output.describe_hosts(comm)
        reporter = output.Reporter(config, comm, append=bool(resumed_from))
        reporter.print(*output.banner_lines(trainer, comm, hosts))
        if resumed_from and trainer.epoch >= config.epochs:  # finished: a user who resumes wants more
            reporter.print(f"resumed from {resumed_from}: it has finished all {config.epochs} epochs "
                           f"(step {trainer.global_step}), so there is nothing left to train; raise "
                           f"{flag('epochs')} to train further")
        elif resumed_from:
            reporter.print(f"resumed from {resumed_from} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        for warning in data.warnings:
            trainer.log(warning)
        reporter.print(output.epoch_header(data.validation_rows is not None))
        # `dpflow launch` reads rank 0's step from this file to count the steps a restart redoes.
        progress = ProgressFile() if comm.is_root else ProgressFile({})
        progress.step(trainer.global_step)

        def on_step(trainer, loss):
            reporter.on_step(trainer, loss)
            progress.step(trainer.global_step)

        history = trainer.fit(on_epoch=reporter.on_epoch, on_step=on_step, watchdog=watchdog)
        if tracer:
            finish_trace(comm, tracer, config.trace)
    except DpflowError as error:
        if tracer and tracer.path_checked and error.agreed:  # every rank is here: collect them all
            finish_trace(comm, tracer, config.trace)
        raise
    finally:
        watchdog.stop()
        if reporter:
            reporter.close()
        if lock:
            lock.release()
    trainer.parallel.release_shared_memory()  # a script's next dpflow.fit() gets it again
    save_error = None
    if config.save and comm.is_root:
        try:
            save_parameters(config.save, trainer.parameters())
        except OSError as error:
            from .checkpoint import free_space

            where = os.path.dirname(os.path.abspath(config.save))
            save_error = (f"the final parameters could not be written to `save` {config.save} "
                          f"({error.strerror}; {free_space(where)})"
                          + (f"; the last checkpoint is {trainer.last_checkpoint}" if trainer.last_checkpoint else ""))
    save_error = comm.broadcast_object(save_error)
    if save_error:
        raise TrainingError(save_error)
    progress.done(trainer.global_step)
    if trainer.stopped_early:
        reporter.print(trainer.stopped_early)
    best = best_epoch(history, config.keep_best) if config.keep_best else None
    if best is not None:
        reporter.print(f"best {config.keep_best} {history[best][config.keep_best]:.4f} at epoch "
                       f"{history[best]['epoch']}: {os.path.join(config.checkpoint_dir, BEST)}")
    if history:
        last = history[-1]
        reporter.print(f"done: test accuracy {last['test_accuracy']:.2%}, test loss {last['test_loss']:.4f}"
                       + (f"; parameters saved to {config.save}" if config.save else ""))
        if last.get("noise_scale") is not None:
            reporter.print(output.noise_line(last["noise_scale"], config.batch_size * config.accumulate))
    behind = trainer.checkpoints.behind(trainer.global_step) if comm.is_root else None
    if comm.broadcast_object(behind):
        if comm.is_root:
            sys.stderr.write(f"dpflow: warning: training finished, but {behind}\n")
        return trainer, CHECKPOINT_BEHIND
    return trainer, 0
