"""`dpflow train | eval | info | plot | bench`: the parser, one table of commands, and `main`.

Exit status: 0 success; 2 bad usage, config or data (one message from rank 0, no traceback);
1 a failure during training; 3 training finished but its last checkpoint is older than its
end (checkpoint writes failed: disk full, read-only or vanished directory); 128 + N after
signal N. Any other exception on any rank prints
one line naming the rank and host, then aborts every rank (see `failure`), so the job can
never hang on it. The library's errors name settings; here they are shown as flags.
"""

import argparse
import contextlib
import io
import os
import stat
import sys
import zipfile

import numpy as np

from . import __version__, _threads, bench, failure, output
from .agreement import agree, check_same_model, check_same_run
from .checkpoint import (
    atomic_write, check_checkpoint_dir, load_checkpoint, load_checkpoint_source, save_parameters,
)
from .config import FIELDS, CHOICES, TrainConfig, build_config, coerce, config_dict, flag, load_toml
from .data import load_dataset
from .errors import DataError, DpflowError, TrainingError, UsageError
from .evaluation import evaluate
from .failure import SafetyNet, end_command
from .launcher import launcher_rank
from .modelspec import build_model, builder_arguments, parse_model_args


class ArgumentParser(argparse.ArgumentParser):
    """Errors become UsageError (printed once, by rank 0); help is printed by rank 0 only."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def _print_message(self, message, file=None):
        if launcher_rank() == 0:
            super()._print_message(message, file)


# --- train --------------------------------------------------------------------------------

TRAIN_HELP = {
    "dataset": "digits (default, bundled), spirals, synthetic, fashion-mnist or mnist (found in "
               "$DPFLOW_DATA/NAME or where Debian's dataset packages put them), a .npz with "
               "x_train/y_train/x_test/y_test, or a directory of .npy or MNIST IDX files",
    "samples": "rows of the spirals/synthetic dataset (default %(default)s)",
    "features": "features of the synthetic dataset (default %(default)s)",
    "classes": "class count: spirals/synthetic make this many (default 4); for other data 0 "
               "(default) counts max label + 1, more allows classes absent from the labels",
    "normalize": "auto (default): scale images to [0, 1], leave rows of features; scale: divide by "
                 "the largest |x|; standardize: training-set mean and std per channel (images) or "
                 "per feature; none",
    "validation_split": "fraction of the training rows held out for validation, the same rows on "
                        "every rank (from --seed); 0 off (default %(default)s)",
    "model": "mlp (default), cnn, or a builder of your own: path/to/file.py:function or "
             "package.module:function, called as function(input_shape, n_classes, rng, dtype, **args)",
    "hidden": "mlp: hidden layer sizes, comma-separated (default 128,64); '' for none",
    "activation": "mlp: hidden activation (default %(default)s)",
    "epochs": "passes over the training set (default %(default)s)",
    "batch_size": "GLOBAL batch, split across ranks (default %(default)s)",
    "lr": "learning rate before scaling (default %(default)s)",
    "optimizer": "update rule (default %(default)s)",
    "momentum": "momentum coefficient for --optimizer momentum (default %(default)s)",
    "weight_decay": "L2 penalty added to the gradient (default %(default)s)",
    "lr_scaling": "linear: lr x global batch x accumulate / --base-batch-size (Goyal et al.); "
                  "sqrt: x the square root of that ratio (LAMB's rule)",
    "base_batch_size": "the batch the lr was tuned for, with --lr-scaling linear (default %(default)s)",
    "warmup_epochs": "epochs of linear lr warmup, fractional allowed (default %(default)s)",
    "lr_schedule": "after warmup: constant, cosine or poly decay to --min-lr at the last epoch, "
                   "or step: x --lr-decay-factor at each of --lr-decay-epochs (default %(default)s)",
    "lr_decay_epochs": "epochs where --lr-schedule step multiplies the lr by --lr-decay-factor, e.g. 30,60",
    "lr_decay_factor": "the step schedule's factor, in (0, 1] (default %(default)s)",
    "lr_power": "the poly schedule's power: lr x (1 - progress)^power (default %(default)s)",
    "min_lr": "the lr every decay ends at or stays above (default %(default)s)",
    "trust_coefficient": "lars/lamb: eta in eta x ||w|| / ||update|| (default 0.001 for lars, 1 for lamb)",
    "exclude_from_adaptation": "lars/lamb: comma-separated name patterns of the parameters that keep "
                               "plain steps and no weight decay (default %(default)s)",
    "noise_scale": "measure the gradient noise scale per epoch (metrics key noise_scale); auto: "
                   "when there are >= 2 ranks or micro-batches and no --bucket-mb (default %(default)s)",
    "accumulate": "micro-batches summed before each allreduce and update (default %(default)s)",
    "dtype": "parameter and activation dtype (default %(default)s)",
    "seed": "initialisation and shuffling seed (default %(default)s)",
    "checkpoint_dir": "directory for checkpoints (none by default)",
    "checkpoint_every": "epochs between checkpoints (default %(default)s)",
    "checkpoint_every_steps": "also a checkpoint every N steps; 0 off (default %(default)s)",
    "checkpoint_every_seconds": "also a checkpoint when this many seconds passed since the last one "
                                "(a preempted run loses at most this much); 0 off (default %(default)s)",
    "keep_checkpoints": "checkpoints kept in the directory (default %(default)s)",
    "keep_best": "also keep DIR/best.dpf, the epoch best by this metric, never pruned (off by default)",
    "early_stop": "stop every rank after this many epochs without improvement of --keep-best's "
                  "metric (val_loss without it); 0 off (default %(default)s)",
    "resume": "continue from the newest valid checkpoint in --checkpoint-dir",
    "metrics": "write JSON lines of metrics to this file",
    "log_every": "also log a metrics record every N steps (default: per epoch only)",
    "save": "write the final parameters to this .npz (one array per parameter name)",
    "trace": "write a timeline of every rank's phases to this JSON file (Chrome trace format: "
             "open it in ui.perfetto.dev or chrome://tracing)",
    "quiet": "print nothing but warnings and errors",
    "progress": "bar (tqdm), plain lines, or auto: a bar on a terminal (default %(default)s)",
    "consistency_every": "steps between checks that all ranks hold identical parameters; 0 off "
                         "(default %(default)s)",
    "stall_timeout": "abort the job when no step finishes for this many seconds (a dead rank, "
                     "a cut link); 0 off (default %(default)s)",
    "on_nonfinite": "on a NaN/inf loss or gradient: stop with an error, or skip the step "
                    "(default %(default)s)",
    "reducer": "flat: one fused allreduce of all gradients; naive: one per parameter "
               "(default %(default)s)",
    "bucket_mb": "overlap communication with backward: allreduce buckets of this many MB as "
                 "soon as backward finishes them; 0 waits for the whole backward (default %(default)s)",
}


def add_train_arguments(parser):
    parser.add_argument("--config", metavar="FILE.toml",
                        help="TOML file with the same keys as these flags; flags override it")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", dest="model_arg",
                        help="a keyword argument of the model's builder, repeatable (--model-arg "
                             "dropout=0.25 --model-arg channels=[16,32]); a [model] table in --config")
    for name, help_text in TRAIN_HELP.items():
        default = FIELDS[name].default
        if isinstance(default, bool):
            parser.add_argument(flag(name), action="store_const", const=True, default=None, help=help_text)
            continue
        if default is None or not isinstance(default, (int, float, str)):
            shown = None
        else:
            shown = default
        choices = tuple(choice for choice in CHOICES.get(name, ()) if choice) or None  # "" is "off"
        metavar = None if choices else name.upper()  # choices show as {a,b,c}
        parser.add_argument(flag(name), default=None, metavar=metavar, choices=choices,
                            help=help_text % {"default": shown} if "%(default)s" in help_text else help_text)


def train_config(args):
    file_values = load_toml(args.config) if args.config else {}
    flag_values = {name: coerce(name, getattr(args, name)) for name in TRAIN_HELP
                   if getattr(args, name) is not None}
    if args.model_arg:  # each KEY=VALUE overrides that key of the file's [model] table
        flag_values["model_args"] = {**file_values.get("model_args", {}), **parse_model_args(args.model_arg)}
    return build_config(file_values, flag_values)


def save_array(path, array):
    """One array as a .npy, written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, buffer.getvalue())


def check_output_path(name, path):
    """--metrics and --save name files that can be written, checked before any training."""
    if os.path.isdir(path):
        raise UsageError(f"{flag(name)} {path} is a directory; give a file path, e.g. {os.path.join(path, 'run.npz' if name == 'save' else 'metrics.jsonl')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag(name)} {path}: the directory {parent} does not exist or is not "
                         "writable; create it or choose another path")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UsageError(f"{flag(name)} {path} exists and is not a regular file; give a file path")
    limit = os.pathconf(parent, "PC_NAME_MAX")
    if len(os.fsencode(os.path.basename(path))) > limit:
        raise UsageError(f"{flag(name)}: the file name {os.path.basename(path)[:40]}... is longer than "
                         f"the {limit} bytes this filesystem allows")


CHECKPOINT_BEHIND = 3  # trained to the end, but the last checkpoint writes failed


def spell_setting(name):
    """A setting's name as the command line spells it (`batch_size` -> --batch-size)."""
    return flag(name) if name in FIELDS else None


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
        raise DataError(f"--dataset {config.dataset} does not fit in this machine's memory; use a "
                        "smaller one (or smaller --samples/--features)") from None
    except UNREADABLE as error:
        raise DataError(f"--dataset {config.dataset} cannot be used: {type(error).__name__}: {error}") from None


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
        tracer.write_partial(path)
        if aborting:  # whichever rank ends the job merges what every rank left
            tracer.merge_partials(path, comm.size)

    failure.LAST_WORDS.append(last_words)
    return tracer


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


def run_train(args, comm, safety):
    trainer, status = train(agree(comm, lambda: train_config(args)), comm, safety)
    return status


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
        for name in ("metrics", "save", "trace"):
            if getattr(config, name):
                agree(comm, lambda: check_output_path(name, getattr(config, name)) if comm.is_root else None)
        if config.model == "mlp" and model is None:
            # Free memory may differ between nodes: every rank's verdict is shared.
            agree(comm, lambda: check_model_fits([data.n_features, *config.hidden, data.n_classes], config.dtype))
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
        if resumed_from:
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
            tracer.gather_and_write(comm, config.trace)
    except DpflowError as error:
        if tracer and error.agreed:  # every rank is here, at the same point: collect them all
            tracer.gather_and_write(comm, config.trace)
        raise
    finally:
        watchdog.stop()
        if reporter:
            reporter.close()
        if lock:
            lock.release()
    save_error = None
    if config.save and comm.is_root:
        try:
            save_parameters(config.save, trainer.parameters())
        except OSError as error:
            from .checkpoint import free_space

            where = os.path.dirname(os.path.abspath(config.save))
            save_error = (f"the final parameters could not be written to --save {config.save} "
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


# --- eval, info, plot ---------------------------------------------------------------------

def run_eval(args, comm, safety):
    from .trainer import Trainer

    def read():
        """Rank 0 reads the checkpoint once: its stored settings build the model."""
        if not os.path.exists(args.checkpoint):
            raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory")
        return load_checkpoint_source(args.checkpoint, warn=lambda m: print(m, file=sys.stderr))

    loaded = agree(comm, lambda: read() if comm.is_root else None)
    stored = comm.broadcast_object(loaded[2]["config"] if comm.is_root else None)
    # Keys this version does not know (a checkpoint from another version) are left out.
    config = TrainConfig(**{key: value for key, value in stored.items() if key in FIELDS})
    if args.dataset:
        config.dataset = args.dataset
    # Evaluation takes no training steps: any number of ranks may share the test set.
    config.resume, config.checkpoint_dir = False, ""
    config.batch_size = max(config.batch_size, comm.size)
    # The test set is transformed exactly as the checkpoint's training batches were.
    normalizer = comm.broadcast_object(loaded[2].get("normalizer") if comm.is_root else None)
    data = load_data(comm, config, normalizer, layout=model_layout(config, None))
    trainer = Trainer(config, comm, data)
    path = load_checkpoint(trainer, args.checkpoint, for_training=False, loaded=loaded)
    confusion = np.zeros((data.n_classes, data.n_classes)) if args.confusion else None
    loss, accuracy = evaluate(trainer.model, trainer.x_test, data.y_test, comm, trainer.dtype,
                              data.normalizer, confusion=confusion)
    if comm.is_root:
        print(f"test_loss {loss:.4f}  test_accuracy {accuracy:.2%}  rows {len(data.y_test)}  "
              f"ranks {comm.size}  dataset {data.name}  checkpoint {path}")
        if confusion is not None:
            print("\n".join(output.confusion_lines(confusion)))
    return 0


def run_predict(args, comm, safety):
    """Rank 0 predicts (a forward pass needs no data parallelism); bad input stops every rank."""
    from .predict import load_model, predict, read_examples

    def run():
        if not comm.is_root:
            return None
        model = load_model(args.checkpoint)
        x = read_examples(args.input, model.input_shape)
        return model, predict(model, x, args.probabilities)

    done = agree(comm, run)
    if comm.is_root:
        model, outputs = done
        if args.output:
            save_array(args.output, outputs)
            kind = "probabilities" if args.probabilities else "class indices"
            print(f"predicted {len(outputs)} rows with {model.description} ({model.checkpoint}); "
                  f"{kind} written to {args.output}", file=sys.stderr)
        else:
            rows = outputs if args.probabilities else outputs[:, None]
            np.savetxt(sys.stdout, rows, fmt="%.6f" if args.probabilities else "%d")
    return 0


def run_info(args, comm, safety):
    hosts = output.describe_hosts(comm)
    # Read from the library in every rank: what runs, not what the environment asked for.
    threads = comm.allgather_object(_threads.blas_threads_in_use())
    if comm.is_root:
        print("\n".join(output.info_lines(comm, hosts, threads)))
    return 0


def run_plot(args, comm, safety):
    if comm.is_root:
        output.plot(args.metrics, args.output)
    return 0


def run_bench(args, comm, safety):
    return bench.run_bench(args, comm)


def add_eval_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint file, or a checkpoint directory (its newest valid one)")
    parser.add_argument("--dataset", help="evaluate on this dataset instead of the training one")
    parser.add_argument("--confusion", action="store_true",
                        help="also print the confusion matrix (rows: true class, columns: predicted)")


def add_predict_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint file, or a checkpoint directory (its newest valid one)")
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="examples to classify: .npy, .npz (x_test, x, or its only array) or IDX")
    parser.add_argument("--output", metavar="FILE.npy",
                        help="write the predictions here (default: print one per line)")
    parser.add_argument("--probabilities", action="store_true",
                        help="the softmax probability of every class instead of the class index")


def add_plot_arguments(parser):
    parser.add_argument("metrics", metavar="METRICS.jsonl")
    parser.add_argument("-o", "--output", default="curves.png", help="PNG to write (default %(default)s)")


# --- entry point ----------------------------------------------------------------------------

# name: (run, add_arguments, help, description)
COMMANDS = {
    "train": (run_train, add_train_arguments, "train an MLP data-parallel (run under mpirun -n N)",
              "Train an MLP, data-parallel across the ranks of `mpirun -n N dpflow train`. "
              "Exit status: 0 success, 1 failure during training, 2 bad usage, config or data."),
    "eval": (run_eval, add_eval_arguments, "test loss and accuracy of a checkpoint", None),
    "predict": (run_predict, add_predict_arguments, "class predictions of a checkpoint's model for a file "
                "of examples", None),
    "info": (run_info, None, "versions, MPI library, world size, hosts and BLAS threads", None),
    "plot": (run_plot, add_plot_arguments, "loss and accuracy curves from a --metrics file as a PNG", None),
    "bench": (run_bench, bench.add_bench_arguments,
              "measure step time, its parts and the gradient sync (run under mpirun)", None),
    # Dispatched by main before MPI starts; listed here for --help.
    "launch": (None, None, "run train under mpiexec and restart it on the hosts left when it fails "
                           "(dpflow launch --help)", None),
}


def build_parser():
    parser = ArgumentParser(prog="dpflow", description="Data-parallel MLP training over MPI, MiniFlow-style. "
                            "Start with `mpirun -n 4 dpflow train`; `dpflow COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"dpflow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (_, add_arguments, help_text, description) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=description)
        if add_arguments:
            add_arguments(command)
    return parser


def main(argv=None):
    """The console script. Every exception ends here, mapped to one exit status for the
    whole job (`failure.end_command`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # a supervisor of mpiexec: no MPI in this process
        from .launch import main as launch_main

        return launch_main(argv[1:])
    comm = None
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        from .comm import create_communicator

        comm = create_communicator()
        with SafetyNet(comm) as safety:
            return COMMANDS[args.command][0](args, comm, safety)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - every other failure must end the whole job
        return end_command(comm, error, spell_setting)
