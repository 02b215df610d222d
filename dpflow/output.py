"""What rank 0 shows and writes: the banner, per-epoch lines or a progress bar, the metrics
file, `dpflow info`, and `dpflow plot`'s curves. The loop calls `Reporter` back; it never prints."""

import json
import math
import os
import platform
import sys
from collections import Counter

import numpy as np

from . import __version__, _threads, launcher
from .comm import mpi4py_version
from .errors import UsageError
from .sharding import shard_bounds


def describe_hosts(comm):
    """'host-a (2 ranks), host-b (2 ranks)' in rank order. Collective."""
    counts = Counter(comm.allgather_object(comm.hostname()))
    return ", ".join(f"{host} ({n} rank{'s' if n > 1 else ''})" for host, n in counts.items())


def mpi_description(comm):
    """The MPI library, and the MPICH settings that change how it runs: the netmod (dpflow
    chooses OFI under `srun --mpi=pmi2`) and the allreduce algorithm (dpflow chooses ring across
    hosts on a number of ranks that is not a power of two); see `launcher.mpich_settings`."""
    library = comm.library()
    if not str(library).startswith("MPICH"):
        return library
    settings = []
    netmod = os.environ.get(launcher.NETMOD_VARIABLE)
    if netmod:
        settings.append(f"netmod {netmod}")
    algorithm, whose = launcher.allreduce_setting()
    if algorithm:
        settings.append(f"allreduce {algorithm}, chosen by " + (f"dpflow for {comm.size} ranks across hosts"
                                                                 if whose == "dpflow" else "the environment"))
    return f"{library} ({'; '.join(settings)})" if settings else library


def banner_lines(trainer, comm, hosts):
    """What this run is: versions, MPI and hosts, data, model, batch, lr and threads."""
    config = trainer.config
    per_rank = [len(range(*shard_bounds(config.batch_size, r, comm.size))) for r in range(comm.size)]
    share = f"{min(per_rank)}" if min(per_rank) == max(per_rank) else f"{min(per_rank)}-{max(per_rank)}"
    data = trainer.data
    lines = [
        f"dpflow {__version__} | MPI: {mpi_description(comm)} | {comm.size} rank{'s' if comm.size > 1 else ''} on {hosts}"
        + (f" | gradients summed by {trainer.parallel.sum_path()}" if comm.size > 1 else ""),
        f"data: {data.name}, {data.n_train} train"
        + (f" + {len(data.validation_rows)} validation" if data.validation_rows is not None else "")
        + f" / {len(data.y_test)} test rows, "
        + (f"{'x'.join(map(str, data.image_shape))} images" if data.image_shape else f"{data.n_features} features")
        + f", {data.n_classes} classes | normalize: {data.normalizer.describe()}",
        *model_lines(trainer),
        f"batch: {config.batch_size} global = {share} per rank x {comm.size}"
        + (f", accumulated x{config.accumulate}" if config.accumulate > 1 else "")
        + f" | lr {trainer.scaled_lr():g} ({update_rule(trainer)})"
        + f" | BLAS threads per rank: {_threads.blas_threads_in_use() or '?'}",
    ]
    if data.files:
        folder = os.path.dirname(data.files[0])
        if len(data.files) > 1 and all(os.path.dirname(path) == folder for path in data.files):
            shown = f"{folder}/{{{', '.join(os.path.basename(path) for path in data.files)}}}"
        else:
            shown = ", ".join(data.files)
        lines[2:2] = [f"files: {shown}", f"cache: {data.cache} (memory-mapped, {data.x_train.dtype.name})"]
    return lines


def update_rule(trainer):
    """'lars trust 0.001 on 3 of 6 parameters, linear scaling from 0.05, 2 warmup epochs,
    cosine to 0'."""
    config, optimizer = trainer.config, trainer.optimizer
    parts = [config.optimizer]
    if hasattr(optimizer, "parameters"):  # layer-wise: say which parameters adapt
        adapted = sum(adapt for _, adapt in optimizer.parameters)
        parts[0] += f" trust {optimizer.trust_coefficient:g} on {adapted} of {len(optimizer.parameters)} parameters"
    if config.lr_scaling != "none":
        parts.append(f"{config.lr_scaling} scaling from {config.lr:g}")
    if config.warmup_epochs:
        parts.append(f"{config.warmup_epochs:g} warmup epochs")
    if config.lr_schedule == "step":
        parts.append(f"x{config.lr_decay_factor:g} at epochs {','.join(f'{e:g}' for e in config.lr_decay_epochs)}")
    elif config.lr_schedule in ("cosine", "poly"):
        shape = "cosine" if config.lr_schedule == "cosine" else f"poly {config.lr_power:g}"
        parts.append(f"{shape} to {config.min_lr:g}")
    return ", ".join(parts)


def noise_line(noise_scale, batch):
    """The last epoch's gradient noise scale beside the global batch, read for the user."""
    if noise_scale >= batch:
        verdict = "a larger global batch would still cut the steps needed"
    else:
        verdict = "the batch is above it, so more rows per step buy little"
    return f"gradient noise scale (last epoch): {noise_scale:,.0f} rows; global batch {batch:,}: {verdict}"


def model_lines(trainer):
    """The model: its SPEC and parameter count; for any model but the MLP, a table of its
    layers (name, type, output shape per example, parameters)."""
    model, config = trainer.model, trainer.config
    count = f"{model.parameter_count():,} parameters, {config.dtype}"
    if config.model == "mlp" and hasattr(model, "sizes"):
        # The model's own: a [model] table or --model-arg activation=... overrides `activation`.
        activation = getattr(model, "activation", config.activation)
        return [f"model: MLP {'-'.join(map(str, model.sizes))} {activation}, {count}"]
    args = ", ".join(f"{key}={value}" for key, value in config.model_args.items())
    lines = [f"model: {config.model or 'given in Python'}{f' ({args})' if args else ''}, {count}"]
    rows = model.summary(trainer.data.input_shape, trainer.dtype)
    width = max([14] + [len(name) for name, *_ in rows])
    for name, kind, shape, params in rows:
        shown = "x".join(map(str, shape)) if shape else "-"
        line = f"  {name:<{width}} {kind:<20} {shown:>12}"
        lines.append(f"{line} {params:>10,}" if params else line)
    return lines


EPOCH_HEADER = f"{'epoch':>7} {'step':>7} {'train_loss':>10} {'test_loss':>10} {'test_acc':>8} {'samples/s':>10} {'comm':>6}"
VALIDATION_HEADER = f" {'val_loss':>10} {'val_acc':>8}"


def epoch_header(validation=False):
    return EPOCH_HEADER + (VALIDATION_HEADER if validation else "")


def epoch_line(record, epochs):
    line = (f"{record['epoch']:>3}/{epochs:<3} {record['step']:>7} {record['train_loss']:>10.4f} "
            f"{record['test_loss']:>10.4f} {record['test_accuracy']:>8.2%} "
            f"{record['samples_per_sec'] or 0:>10,.0f} {record['comm_fraction'] or 0:>6.1%}")
    if "val_loss" in record:
        line += f" {record['val_loss']:>10.4f} {record['val_accuracy']:>8.2%}"
    return line


def truncate_metrics(path, step):
    """Drop the records past `step` (the checkpoint a resume starts from) and any line a
    crash cut short, so that the resumed run appends without writing an epoch twice."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    if len(kept) != len(lines):
        from .checkpoint import atomic_write

        atomic_write(path, "".join(kept).encode())


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
            try:
                self.metrics.write(json.dumps(full) + "\n")
                self.metrics.flush()
            except OSError as error:  # a full disk must not end the run: the metrics are a log
                print(f"warning: --metrics {self.config.metrics} cannot be written ({error.strerror}); "
                      "training goes on without it", file=sys.stderr, flush=True)
                try:
                    self.metrics.close()
                except OSError:
                    pass
                self.metrics = None

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
            self.write_metrics({"epoch": trainer.epoch + 1, "step": trainer.global_step, "train_loss": loss,
                                "lr": trainer.optimizer.lr})

    def on_epoch(self, trainer, record):
        self.close_bar()
        self.print(epoch_line(record, self.config.epochs))
        self.write_metrics(record)

    def close(self):
        self.close_bar()
        if self.metrics:
            try:
                self.metrics.close()
            except OSError:
                pass


def confusion_lines(confusion):
    """The confusion matrix as text: a row per true class, a column per predicted class."""
    counts = np.asarray(confusion, np.int64)
    width = max(5, len(f"{counts.max():,}") + 1)
    lines = ["confusion (rows: true class, columns: predicted class; the diagonal is correct)",
             "true\\pred" + "".join(f"{k:>{width}}" for k in range(len(counts))) + f"{'recall':>8}"]
    for k, row in enumerate(counts):
        recall = row[k] / row.sum() if row.sum() else float("nan")
        lines.append(f"{k:>9}" + "".join(f"{n:>{width},}" for n in row) + f"{recall:>8.1%}")
    return lines


def info_lines(comm, hosts, threads):
    """`dpflow info`: versions, the MPI library, the world, and BLAS threads per rank
    (`threads`: every rank's count, read from its BLAS)."""
    chosen = _threads.chosen_threads(library=(_threads.numpy_blas() or {}).get("internal_api"))
    return [
        f"dpflow      {__version__}",
        f"python      {platform.python_version()}",
        f"numpy       {np.__version__}",
        f"mpi4py      {mpi4py_version()}",
        f"MPI         {mpi_description(comm)}",
        f"world size  {comm.size}",
        f"hosts       {hosts}",
        f"BLAS        {_threads.blas_description()}, {' or '.join(map(str, sorted(set(threads), key=str)))} "
        f"thread(s) per rank ({f'as the environment asks: {chosen}' if chosen else 'the cores of a node / its ranks'})",
    ]


METRIC_NUMBERS = ("epoch", "step", "train_loss", "test_loss", "test_accuracy")


def read_metrics(path):
    """The records of a --metrics file, each a JSON object whose numbers are numbers."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"{path} is not a regular file; pass the file written by --metrics")
        with open(path, encoding="utf-8") as handle:
            lines = list(handle)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; pass the file written by --metrics") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or any(
                record.get(key) is not None and (isinstance(record[key], bool) or not isinstance(record[key], (int, float)))
                for key in METRIC_NUMBERS):
            raise UsageError(f"{path}:{number} is not a metrics record (a JSON object of numbers); "
                             "pass the file written by --metrics")
        records.append(record)
    return records


def plot(metrics, output):
    """Loss and accuracy curves from a --metrics file, as a PNG."""
    # The file first: what is wrong with it is said whether or not matplotlib is installed.
    if os.path.realpath(output) == os.path.realpath(metrics):
        raise UsageError(f"-o {output} is the metrics file itself: writing the plot would replace it; "
                         "choose another path, e.g. curves.png")
    records = read_metrics(metrics)
    epochs = [r for r in records if r.get("test_loss") is not None]
    if not epochs:
        raise UsageError(f"{metrics} has no per-epoch records; train with --metrics PATH first")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("dpflow plot needs matplotlib: from the checkout, pip install -e '.[plot]' "
                         "(not `pip install dpflow`: that name belongs to an unrelated project)") from None
    steps = [r for r in records if r.get("test_loss") is None and r.get("train_loss") is not None]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    kind = os.path.splitext(output)[1][1:].lower()  # none: matplotlib writes a PNG
    if kind and kind not in figure.canvas.get_supported_filetypes():
        raise UsageError(f"-o {output}: matplotlib cannot write .{kind} files; give a name ending in .png "
                         f"(or .{', .'.join(sorted(figure.canvas.get_supported_filetypes()))})")
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
    try:
        figure.savefig(output, dpi=110)
    except OSError as error:
        raise UsageError(f"-o {output}: cannot write it ({error.strerror}); choose another path") from None
    print(f"wrote {output}")
