"""`dpflow train | eval | info | plot | bench`: the parser, one table of commands, and `main` (a
training run itself is `run.train`).

Exit status: 0 success; 2 bad usage, config or data (one message from rank 0, no traceback);
1 a failure during training; 3 training finished but its last checkpoint is older than its
end (checkpoint writes failed: disk full, read-only or vanished directory); 128 + N after
signal N. Any other exception on any rank prints
one line naming the rank and host, then aborts every rank (see `failure`), so the job can
never hang on it. The library's errors name settings; here they are shown as flags.
"""

import argparse
import io
import os
import sys

import numpy as np

from . import __version__, _threads, bench, output
from .agreement import agree
from .checkpoint import READ_FIX, atomic_write, load_checkpoint, load_checkpoint_source
from .config import FIELDS, TrainConfig, add_setting_arguments, build_config, given_settings, load_toml, spell_flag
from .errors import UsageError
from .evaluation import evaluate
from .failure import SafetyNet, end_command
from .launcher import apply_mpich_settings, launcher_rank
from .run import (build_run_model, check_output_path, check_separate_files, load_data, model_layout, run_files,
                  train)


class ArgumentParser(argparse.ArgumentParser):
    """Errors become UsageError (printed once, by rank 0); help is printed by rank 0 only."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def _print_message(self, message, file=None):
        if launcher_rank() == 0:
            super()._print_message(message, file)


# --- train --------------------------------------------------------------------------------

def add_train_arguments(parser):
    parser.add_argument("--config", metavar="FILE.toml",
                        help="TOML file with the same keys as these flags; flags override it")
    add_setting_arguments(parser)


def train_config(args):
    file_values = load_toml(args.config) if args.config is not None else {}  # "" is a path that is not there
    flag_values = given_settings(args)
    if "model_args" in flag_values:  # each KEY=VALUE overrides that key of the file's [model] table
        flag_values["model_args"] = {**file_values.get("model_args", {}), **flag_values["model_args"]}
    config = build_config(file_values, flag_values)
    check_separate_files({"--config": args.config, **run_files(config)})
    return config


def save_array(path, array):
    """One array as a .npy, written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, buffer.getvalue())


def run_train(args, comm, safety):
    trainer, status = train(agree(comm, lambda: train_config(args)), comm, safety)
    return status


# --- eval, info, plot ---------------------------------------------------------------------

def run_eval(args, comm, safety):
    from .trainer import Trainer

    def read():
        """Rank 0 reads the checkpoint once: its stored settings build the model."""
        if not os.path.exists(args.checkpoint):
            raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory")
        return load_checkpoint_source(args.checkpoint, warn=lambda m: print(m, file=sys.stderr), fix=READ_FIX)

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
    # Built as `train` builds it: a builder file missing on one node stops every rank together.
    trainer = Trainer(config, comm, data, model=build_run_model(comm, config, data))
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
        if args.output:  # before the work, and never a device: the write renames over the path
            check_output_path("--output", args.output)
            check_separate_files({"--checkpoint": args.checkpoint, "--input": args.input, "--output": args.output})
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

        _threads.check_thread_variables()  # a thread count that is not one stops every rank before MPI starts
        apply_mpich_settings()  # read by MPI_Init: before the communicator
        comm = create_communicator()
        with SafetyNet(comm) as safety:
            return COMMANDS[args.command][0](args, comm, safety)
    except SystemExit as error:
        if comm is None or comm.size == 1:
            raise
        # Once the ranks run together, only the user's code (a layer, a builder, a callback)
        # exits: passed through, it would end this rank alone while the others wait.
        return end_command(comm, error, spell_flag)
    except BaseException as error:  # noqa: BLE001 - every other failure must end the whole job
        return end_command(comm, error, spell_flag)
