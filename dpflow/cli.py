"""`dpflow train | eval | info | plot | bench`: the command line, and the job's safety net.

Exit status: 0 success; 2 bad usage, config or data (one message from rank 0, no traceback);
1 a failure during training. An unexpected exception on any rank prints one line naming the
rank and host, then aborts every rank (MPI_Abort), so the job can never hang on it.
"""

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback
import zlib
from collections import Counter

import numpy as np

from . import __version__
from .checkpoint import CheckpointError
from .comm import MismatchedMPI
from .config import CHOICES, FIELDS, UsageError, build_config, coerce, config_dict, flag, load_toml
from .data import DataError
from .sharding import shard_bounds
from .launcher import launcher_rank

class ArgumentParser(argparse.ArgumentParser):
    """Errors become UsageError (printed once, by rank 0); help is printed by rank 0 only."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def _print_message(self, message, file=None):
        if launcher_rank() == 0:
            super()._print_message(message, file)


# --- train --------------------------------------------------------------------------------

TRAIN_HELP = {
    "dataset": "digits (default, bundled), spirals, synthetic, a .npz with x_train/y_train/"
               "x_test/y_test, or a directory of .npy or MNIST IDX files",
    "samples": "rows of the spirals/synthetic dataset (default %(default)s)",
    "features": "features of the synthetic dataset (default %(default)s)",
    "classes": "classes of the spirals/synthetic dataset (default %(default)s)",
    "hidden": "hidden layer sizes, comma-separated (default 128,64); '' for none",
    "activation": "hidden activation (default %(default)s)",
    "epochs": "passes over the training set (default %(default)s)",
    "batch_size": "GLOBAL batch, split across ranks (default %(default)s)",
    "lr": "learning rate before scaling (default %(default)s)",
    "optimizer": "update rule (default %(default)s)",
    "momentum": "momentum coefficient for --optimizer momentum (default %(default)s)",
    "weight_decay": "L2 penalty added to the gradient (default %(default)s)",
    "lr_scaling": "linear: lr x global batch x accumulate / --base-batch-size (Goyal et al.)",
    "base_batch_size": "the batch the lr was tuned for, with --lr-scaling linear (default %(default)s)",
    "warmup_epochs": "epochs of linear lr warmup, fractional allowed (default %(default)s)",
    "accumulate": "micro-batches summed before each allreduce and update (default %(default)s)",
    "dtype": "parameter and activation dtype (default %(default)s)",
    "seed": "initialisation and shuffling seed (default %(default)s)",
    "checkpoint_dir": "directory for checkpoints (none by default)",
    "checkpoint_every": "epochs between checkpoints (default %(default)s)",
    "keep_checkpoints": "checkpoints kept in the directory (default %(default)s)",
    "resume": "continue from the newest valid checkpoint in --checkpoint-dir",
    "metrics": "write JSON lines of metrics to this file",
    "log_every": "also log a metrics record every N steps (default: per epoch only)",
    "save": "write the final parameters to this .npz (one array per parameter name)",
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
    for name, help_text in TRAIN_HELP.items():
        default = FIELDS[name].default
        if isinstance(default, bool):
            parser.add_argument(flag(name), action="store_const", const=True, default=None, help=help_text)
            continue
        if default is None or not isinstance(default, (int, float, str)):
            shown = None
        else:
            shown = default
        metavar = None if name in CHOICES else name.upper()  # choices show as {a,b,c}
        parser.add_argument(flag(name), default=None, metavar=metavar, choices=CHOICES.get(name),
                            help=help_text % {"default": shown} if "%(default)s" in help_text else help_text)


def train_config(args):
    file_values = load_toml(args.config) if args.config else {}
    flag_values = {name: coerce(name, getattr(args, name)) for name in TRAIN_HELP
                   if getattr(args, name) is not None}
    return build_config(file_values, flag_values)


def agree(comm, action):
    """Run `action` on every rank; if it fails with bad input anywhere, fail everywhere.

    A file may exist on one node and not another: each rank's own verdict is shared, so all
    ranks stop together with the same message instead of some waiting forever. Collective.
    """
    try:
        result, message = action(), None
    except (UsageError, DataError, CheckpointError) as error:
        result, message = None, str(error)
    messages = comm.allgather_object(message)
    for rank, message in enumerate(messages):
        if message:
            raise UsageError(message if rank == 0 or messages[0] == message else f"on rank {rank}: {message}")
    return result


def check_checkpoint_dir(directory, resume):
    """Create the checkpoint directory if needed and prove a file can be written there.
    A new run never writes into another run's checkpoints: pruning would delete them."""
    from .checkpoint import list_checkpoints

    if not resume and list_checkpoints(directory):
        raise UsageError(
            f"--checkpoint-dir {directory} already holds checkpoints of another run; pass --resume to "
            "continue that run, or choose an empty directory"
        )
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as error:
        raise UsageError(
            f"--checkpoint-dir {directory} is not writable ({error.strerror}); "
            "choose a directory you can write to"
        ) from None


def check_output_path(name, path):
    """--metrics and --save name files that can be written, checked before any training."""
    if os.path.isdir(path):
        raise UsageError(f"{flag(name)} {path} is a directory; give a file path, e.g. {os.path.join(path, 'run.npz' if name == 'save' else 'metrics.jsonl')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag(name)} {path}: the directory {parent} does not exist or is not "
                         "writable; create it or choose another path")


def describe_hosts(comm):
    """'host-a (2 ranks), host-b (2 ranks)' in rank order. Collective."""
    counts = Counter(comm.allgather_object(comm.hostname()))
    return ", ".join(f"{host} ({n} rank{'s' if n > 1 else ''})" for host, n in counts.items())


def banner_lines(trainer, comm, hosts):
    from . import _threads

    config = trainer.config
    per_rank = [len(range(*shard_bounds(config.batch_size, r, comm.size))) for r in range(comm.size)]
    share = f"{min(per_rank)}" if min(per_rank) == max(per_rank) else f"{min(per_rank)}-{max(per_rank)}"
    data = trainer.data
    lines = [
        f"dpflow {__version__} | MPI: {comm.library()} | {comm.size} rank{'s' if comm.size > 1 else ''} on {hosts}",
        f"data: {data.name}, {len(data.y_train)} train / {len(data.y_test)} test rows, "
        f"{data.n_features} features, {data.n_classes} classes",
        f"model: MLP {'-'.join(map(str, trainer.model.sizes))} {config.activation}, "
        f"{trainer.model.parameter_count():,} parameters, {config.dtype}",
        f"batch: {config.batch_size} global = {share} per rank x {comm.size}"
        + (f", accumulated x{config.accumulate}" if config.accumulate > 1 else "")
        + f" | lr {trainer.scaled_lr():g} ({config.optimizer}"
        + (f", linear scaling from {config.lr:g}" if config.lr_scaling == "linear" else "")
        + (f", {config.warmup_epochs:g} warmup epochs" if config.warmup_epochs else "") + ")"
        + f" | BLAS threads per rank: {_threads.blas_threads()}",
    ]
    return lines


EPOCH_HEADER = f"{'epoch':>7} {'step':>7} {'train_loss':>10} {'test_loss':>10} {'test_acc':>8} {'samples/s':>10} {'comm':>6}"


def epoch_line(record, epochs):
    return (f"{record['epoch']:>3}/{epochs:<3} {record['step']:>7} {record['train_loss']:>10.4f} "
            f"{record['test_loss']:>10.4f} {record['test_accuracy']:>8.2%} "
            f"{record['samples_per_sec'] or 0:>10,.0f} {record['comm_fraction'] or 0:>6.1%}")


class Reporter:
    """Rank 0's output: banner, progress bar or plain lines, metrics file."""

    def __init__(self, config, comm, append):
        self.config = config
        self.enabled = comm.is_root and not config.quiet
        self.metrics = None
        if comm.is_root and config.metrics:
            self.metrics = open(config.metrics, "a" if append else "w")
        use_bar = config.progress == "bar" or (config.progress == "auto" and sys.stdout.isatty())
        self.use_bar = self.enabled and use_bar
        self.bar = None

    def print(self, *lines):
        if self.enabled:
            self.close_bar()
            for line in lines:
                print(line, flush=True)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write_metrics(self, record):
        if self.metrics:
            keys = ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "samples_per_sec", "comm_fraction")
            full = {key: record.get(key) for key in keys} | record
            # JSON has no NaN: a value that is not a finite number is written as null.
            full = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                    for key, value in full.items()}
            self.metrics.write(json.dumps(full) + "\n")
            self.metrics.flush()

    def on_step(self, trainer, loss):
        if self.use_bar:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=trainer.steps_per_epoch(), initial=trainer.step_in_epoch - 1,
                                desc=f"epoch {trainer.epoch + 1}/{self.config.epochs}", leave=False,
                                unit="step", dynamic_ncols=True)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.config.log_every and trainer.global_step % self.config.log_every == 0:
            self.write_metrics({"epoch": trainer.epoch + 1, "step": trainer.global_step, "train_loss": loss})

    def on_epoch(self, trainer, record):
        self.close_bar()
        self.print(epoch_line(record, self.config.epochs))
        self.write_metrics(record)

    def close(self):
        self.close_bar()
        if self.metrics:
            self.metrics.close()


def check_same_on_every_rank(comm, config, data):
    """Every rank must train the same run: the same resolved settings and the same dataset
    (a stale config file or dataset copy on one node would otherwise hang the job, or train
    on rows shuffled differently). Collective."""
    labels = zlib.crc32(np.ascontiguousarray(data.y_train)) ^ zlib.crc32(np.ascontiguousarray(data.y_test))
    summary = {**config_dict(config),
               "dataset shape": (len(data.y_train), len(data.y_test), data.n_features, data.n_classes),
               "dataset labels checksum": labels}
    summaries = comm.allgather_object(summary)
    for rank, other in enumerate(summaries):
        differ = [f"{key} {other[key]!r} (rank 0: {summaries[0][key]!r})" for key in summary
                  if other[key] != summaries[0][key]]
        if differ:
            raise UsageError(
                f"rank {rank} was given a different run: {'; '.join(differ[:3])}; every rank needs "
                "the same flags, config file and dataset"
            )


class Whereabouts:
    """What this rank is doing, for rank 0's stall survey."""

    watchdog = None

    def __call__(self):
        return self.watchdog.describe() if self.watchdog else "not training"


WHEREABOUTS = Whereabouts()
SURVEY_SECONDS = 3.0


def make_watchdog(comm, timeout):
    """A Watchdog that, on a stall, reports and aborts the job. Rank 0 first asks every rank
    where it is, and names the ranks that never answer: dead, stopped, or cut off."""
    from .trainer import Watchdog

    def on_stall(waited, where):
        line = f"dpflow: rank {comm.rank} on {comm.hostname()}: no progress for {waited:.0f} s (stuck at {where})"
        if comm.is_root:
            answers = comm.survey(SURVEY_SECONDS)
            silent = [rank for rank, answer in answers.items() if answer is None]
            if silent:
                line += f"; ranks {silent} never answered: dead, stopped or cut off"
            line += "".join(f"; rank {rank} is at {answer}" for rank, answer in answers.items() if answer)
        else:
            time.sleep(SURVEY_SECONDS + 3)  # rank 0 surveys and reports; if it cannot, we do
            line += "; another rank died or the network is cut"
        print_and_abort(comm, f"{line}. Aborting the job (--stall-timeout {timeout:g}).")

    watchdog = Watchdog(timeout if comm.size > 1 else 0, on_stall)
    WHEREABOUTS.watchdog = watchdog
    return watchdog


def run_train(args, comm):
    from .checkpoint import save_parameters
    from .data import load_dataset
    from .trainer import Trainer, check_batch_size

    config = agree(comm, lambda: train_config(args))
    # From here on every wait is bounded: start-up reads files and talks to every rank too.
    watchdog = make_watchdog(comm, config.stall_timeout)
    reporter = None
    try:
        watchdog.beat("loading the dataset")
        data = agree(comm, lambda: load_dataset(config.dataset, config.samples, config.features,
                                                config.classes, config.seed))
        watchdog.beat("start-up checks")
        check_same_on_every_rank(comm, config, data)
        agree(comm, lambda: check_batch_size(config.batch_size, comm.size))
        if config.checkpoint_dir:
            agree(comm, lambda: check_checkpoint_dir(config.checkpoint_dir, config.resume) if comm.is_root else None)
        for name in ("metrics", "save"):
            if getattr(config, name):
                agree(comm, lambda: check_output_path(name, getattr(config, name)) if comm.is_root else None)
        trainer = Trainer(config, comm, data)  # collective: checks the model, broadcasts rank 0's
        watchdog.beat("resuming")
        resumed_from = trainer.resume() if config.resume else None
        hosts = describe_hosts(comm)
        reporter = Reporter(config, comm, append=bool(resumed_from))
        reporter.print(*banner_lines(trainer, comm, hosts))
        if resumed_from:
            reporter.print(f"resumed from {resumed_from} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        reporter.print(EPOCH_HEADER)
        trainer.install_signal_handlers()
        history = trainer.fit(on_epoch=reporter.on_epoch, on_step=reporter.on_step, watchdog=watchdog)
    finally:
        watchdog.stop()
        if reporter:
            reporter.close()
    if config.save and comm.is_root:
        save_parameters(config.save, trainer.parameters())
    if history:
        last = history[-1]
        reporter.print(f"done: test accuracy {last['test_accuracy']:.2%}, test loss {last['test_loss']:.4f}"
                       + (f"; parameters saved to {config.save}" if config.save else ""))
    return 0


# --- eval, info, plot ---------------------------------------------------------------------

def run_eval(args, comm):
    from .checkpoint import load_checkpoint_source
    from .config import TrainConfig
    from .data import load_dataset
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
    data = agree(comm, lambda: load_dataset(config.dataset, config.samples, config.features,
                                            config.classes, config.seed))
    trainer = Trainer(config, comm, data)
    path = trainer.load_checkpoint(args.checkpoint, for_training=False, loaded=loaded)
    loss, accuracy = trainer.evaluate()
    if comm.is_root:
        print(f"test_loss {loss:.4f}  test_accuracy {accuracy:.2%}  rows {len(data.y_test)}  "
              f"ranks {comm.size}  dataset {data.name}  checkpoint {path}")
    return 0


def run_info(args, comm):
    import numpy as np
    import platform

    from . import _threads

    hosts = describe_hosts(comm)
    if not comm.is_root:
        return 0
    try:
        import mpi4py
        mpi4py_version = mpi4py.__version__
    except ImportError:
        mpi4py_version = "not installed"
    blas = "unknown"
    try:
        config = np.show_config(mode="dicts")
        info = config["Build Dependencies"]["blas"]
        blas = f"{info.get('name')} {info.get('version', '')}".strip()
    except Exception:  # numpy < 1.25 has no dict mode; the rest still helps
        pass
    print(f"dpflow      {__version__}")
    print(f"python      {platform.python_version()}")
    print(f"numpy       {np.__version__}")
    print(f"mpi4py      {mpi4py_version}")
    print(f"MPI         {comm.library()}")
    print(f"world size  {comm.size}")
    print(f"hosts       {hosts}")
    print(f"BLAS        {blas}, {_threads.blas_threads()} thread(s) per rank "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    return 0


def run_plot(args, comm):
    if not comm.is_root:
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("dpflow plot needs matplotlib: pip install 'dpflow[plot]'") from None
    records = []
    try:
        with open(args.metrics) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise UsageError(f"{args.metrics}:{number} is not a JSON line; "
                                         "pass the file written by --metrics") from None
    except OSError as error:
        raise UsageError(f"cannot read {args.metrics}: {error.strerror}") from None
    epochs = [r for r in records if r.get("test_loss") is not None]
    if not epochs:
        raise UsageError(f"{args.metrics} has no per-epoch records; train with --metrics PATH first")
    steps = [r for r in records if r.get("test_loss") is None and r.get("train_loss") is not None]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        loss_axis.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], alpha=0.35,
                       label="train (per step)")
    loss_axis.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="train (epoch)")
    loss_axis.plot([r["step"] for r in epochs], [r["test_loss"] for r in epochs], "s-", label="test")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    loss_axis.legend()
    accuracy_axis.plot([r["epoch"] for r in epochs], [100 * r["test_accuracy"] for r in epochs], "s-")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    accuracy_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


# --- entry point ----------------------------------------------------------------------------

def build_parser():
    parser = ArgumentParser(prog="dpflow", description="Data-parallel MLP training over MPI, MiniFlow-style. "
                            "Start with `mpirun -n 4 dpflow train`; `dpflow COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"dpflow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    train = commands.add_parser(
        "train", help="train an MLP data-parallel (run under mpirun -n N)",
        description="Train an MLP, data-parallel across the ranks of `mpirun -n N dpflow train`. "
                    "Exit status: 0 success, 1 failure during training, 2 bad usage, config or data.")
    add_train_arguments(train)
    evaluate = commands.add_parser("eval", help="test loss and accuracy of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH",
                          help="a checkpoint file, or a checkpoint directory (its newest valid one)")
    evaluate.add_argument("--dataset", help="evaluate on this dataset instead of the training one")
    commands.add_parser("info", help="versions, MPI library, world size, hosts and BLAS threads")
    plot = commands.add_parser("plot", help="loss and accuracy curves from a --metrics file as a PNG")
    plot.add_argument("metrics", metavar="METRICS.jsonl")
    plot.add_argument("-o", "--output", default="curves.png", help="PNG to write (default %(default)s)")
    from .bench import add_bench_arguments

    add_bench_arguments(commands.add_parser(
        "bench", help="measure step time, its parts and the gradient sync (run under mpirun)"))
    return parser


COMMANDS = {"train": run_train, "eval": run_eval, "info": run_info, "plot": run_plot}


# Output written just before MPI_Abort can be overtaken by the abort on its way through the
# launcher (hydra forwards the ranks' output and the abort separately); this much grace lets
# the line arrive first.
ABORT_GRACE_SECONDS = 1.0


def print_and_abort(comm, line):
    """Rank 0's end of a failure report: print it once, end the job."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_SECONDS)
    comm.abort(1)


def crash(comm, error):
    """One line naming the rank, the host and the error (the traceback only with
    DPFLOW_DEBUG=1), then end every rank of the job. Never returns with several ranks."""
    rank = comm.rank if comm else launcher_rank()
    host = comm.hostname() if comm else os.uname().nodename
    if os.environ.get("DPFLOW_DEBUG"):
        traceback.print_exception(error)
    line = f"dpflow: rank {rank} on {host} failed: {type(error).__name__}: {error}"
    if comm is None or comm.size == 1:
        sys.stderr.write(line + "\n")
        return 1
    if comm.report_failure_to_root(line):
        time.sleep(ABORT_GRACE_SECONDS + 3)  # rank 0 prints the line and aborts the job; if it cannot, we do
    print_and_abort(comm, line)


def main(argv=None):
    comm = None
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        from .comm import create_communicator

        comm = create_communicator()
        threading.excepthook = lambda hook_args: crash(comm, hook_args.exc_value)
        comm.start_listener(lambda line: print_and_abort(comm, line), WHEREABOUTS)
        try:
            if args.command == "bench":
                from .bench import run_bench

                return run_bench(args, comm)
            return COMMANDS[args.command](args, comm)
        finally:
            comm.stop_listener()
    except (UsageError, MismatchedMPI) as error:
        if (comm.rank if comm else launcher_rank()) == 0:
            sys.stderr.write(f"dpflow: error: {error}\n")
        return 2
    except BaseException as error:  # noqa: BLE001 - every other failure must end the whole job
        from .trainer import Interrupted, TrainingError

        if isinstance(error, SystemExit):
            raise
        if isinstance(error, Interrupted):
            if comm.is_root:
                sys.stderr.write(f"dpflow: {error}\n")
            return 128 + int(error.signum)
        if isinstance(error, TrainingError):
            if comm.is_root:
                sys.stderr.write(f"dpflow: training failed: {error}\n")
            return 1
        if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stop now, unsaved
            sys.stderr.write("dpflow: interrupted again; stopping at once without a checkpoint\n")
            sys.stderr.flush()
            if comm is not None and comm.size > 1:
                comm.abort(130)
            return 130
        return crash(comm, error)
