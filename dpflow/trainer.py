"""The training loop: the one place that composes model, flat buffers, optimizer and communicator.

The data-parallel invariant, in four lines of `train_step`:

    loss.normaliser = global_rows          # the same number on every rank
    forward_and_backward(graph)            # this rank's rows only
    comm.allreduce_sum(flat.grads)         # one fused, in-place sum over ranks
    optimizer.step(values, param_grads)    # identical on every rank

Only the root rank prints and writes files; every decision that ends or changes the run
(a stop request, a non-finite gradient) is read from reduced values, so all ranks take it
in the same step and no collective is ever left waiting.
"""

import math
import signal
import sys
import threading
import time

import numpy as np

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint_source, save_checkpoint
from .comm import fingerprint
from .config import UsageError, config_dict
from .sharding import batch_bounds, epoch_permutation, shard_bounds
from .parallel import DataParallel
from .graph import backward_pass, forward_pass
from .model import MLP
from .optim import create_optimizer

# Trailing slots of the gradient buffer that ride along with the one allreduce.
LOSS_SLOT, STOP_SLOT = 0, 1
EXTRA_SLOTS = 2
EVAL_CHUNK = 4096  # rows per evaluation forward pass: bounds memory on large test sets


class TrainingError(RuntimeError):
    """A failure every rank agrees on (divergence, inconsistent ranks): exit status 1."""


class Interrupted(Exception):
    """Every rank stopped at a step boundary after SIGINT or SIGTERM."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class Watchdog:
    """Aborts the job when no step has finished for `timeout` seconds.

    MPI never notices a cut network link: a rank waits in the allreduce for as long as TCP
    retries (minutes). A thread that watches the step counter bounds that wait, as Horovod's
    stall check does.
    """

    def __init__(self, timeout, on_stall):
        self.timeout = timeout
        self.on_stall = on_stall
        self.last_beat = time.monotonic()
        self.where = "start-up"
        self.stopped = threading.Event()
        self.thread = None
        if timeout > 0:
            self.thread = threading.Thread(target=self.run, name="dpflow-watchdog", daemon=True)
            self.thread.start()

    def beat(self, where):
        self.last_beat = time.monotonic()
        self.where = where

    def describe(self):
        return f"{self.where}, {time.monotonic() - self.last_beat:.0f} s since its last progress"

    def run(self):
        while not self.stopped.wait(min(1.0, self.timeout / 4)):
            waited = time.monotonic() - self.last_beat
            if waited > self.timeout:
                self.on_stall(waited, self.where)
                return

    def stop(self):
        self.stopped.set()


def check_batch_size(batch_size, size):
    if batch_size < size:
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must be >= the number "
            f"of ranks ({size}); raise it or run with fewer ranks"
        )


class Trainer:
    def __init__(self, config, comm, data, warn=None):
        self.config = config
        self.comm = comm
        self.data = data
        # Warnings (a skipped step, a damaged checkpoint passed over) come from rank 0 only.
        warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self.log = warn if comm.is_root else (lambda message: None)
        self.dtype = np.dtype(config.dtype)
        check_batch_size(config.batch_size, comm.size)
        self.model = MLP(data.n_features, config.hidden, data.n_classes, config.activation,
                         seed=config.seed, dtype=self.dtype)
        self.parallel = DataParallel(self.model.params, comm, EXTRA_SLOTS, config.reducer)
        self.flat = self.parallel.flat
        # In-memory data is cast to the training dtype once; memory-mapped data is cast per batch.
        self.x_train = self.as_training_array(data.x_train)
        self.x_test = self.as_training_array(data.x_test)
        self.optimizer = create_optimizer(config.optimizer, self.flat.size, self.dtype, self.lr_at(0.0),
                                          config.momentum, config.weight_decay)
        self.accumulated = np.zeros(self.flat.size, self.dtype) if config.accumulate > 1 else None
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.stop_signal = None  # set by this rank's signal handler
        self.stop_agreed = False  # set when any rank was signalled, read from the allreduce
        self.last_checkpoint = None
        self.pending_write = None
        self.history = []
        self.batch_buffers = {}
        self.comm_seconds = 0.0
        self.beat = lambda where: None  # the watchdog's, once fit() is given one
        self.phase_seconds = np.zeros(4)  # forward, backward, waiting for the sync, update
        self.sync = True  # `dpflow bench --no-sync` turns the allreduce off
        # Overlap needs the gradients final when backward ends, which accumulation defers.
        self.overlap = config.bucket_mb > 0 and config.accumulate == 1 and config.reducer == "flat"
        if self.overlap:
            self.parallel.plan_buckets(self.model.graph, int(config.bucket_mb * 2**20))

    # --- set-up ----------------------------------------------------------------------------

    def as_training_array(self, x):
        if isinstance(x, np.memmap):
            return x
        return np.ascontiguousarray(x, dtype=self.dtype)

    def steps_per_epoch(self):
        n_batches = math.ceil(len(self.x_train) / self.config.batch_size)
        return math.ceil(n_batches / self.config.accumulate)

    def scaled_lr(self):
        config = self.config
        if config.lr_scaling == "linear":
            return config.lr * config.batch_size * config.accumulate / config.base_batch_size
        return config.lr

    def lr_at(self, epochs_done):
        """The learning rate after `epochs_done` (fractional) epochs, with linear warmup.

        Warmup ramps from the unscaled lr to the scaled one (Goyal et al.) under linear
        scaling, and from 0 otherwise.
        """
        target = self.scaled_lr()
        warmup = self.config.warmup_epochs
        if warmup <= 0 or epochs_done >= warmup:
            return target
        start = self.config.lr if self.config.lr_scaling == "linear" else 0.0
        progress = min(1.0, (epochs_done + 1.0 / max(self.steps_per_epoch(), 1)) / warmup)
        return start + (target - start) * progress

    # --- one step --------------------------------------------------------------------------

    def local_rows(self, permutation, start, stop, x, labels):
        """This rank's contiguous block of the global batch [start, stop) of the permutation."""
        first, last = shard_bounds(stop - start, self.comm.rank, self.comm.size)
        index = permutation[start + first: start + last]
        rows = len(index)
        key = (id(x), rows)
        buffers = self.batch_buffers.get(key)
        if buffers is None:
            buffers = self.batch_buffers[key] = (np.empty((rows, x.shape[1]), self.dtype),
                                                 np.empty(rows, np.int64))
        X, y = buffers
        if isinstance(x, np.memmap):
            X[...] = x[index]  # reads only these rows from the file
        else:
            np.take(x, index, axis=0, out=X)
        np.take(labels, index, axis=0, out=y)
        return X, y

    def train_step(self, permutation, micro_batches):
        """Forward and backward over this rank's share of each micro-batch, one allreduce,
        one update. Returns the global mean loss of the step. Collective."""
        model, flat, seconds = self.model, self.flat, self.phase_seconds
        global_rows = sum(stop - start for start, stop in micro_batches)
        model.loss.normaliser = global_rows
        loss_sum = 0.0
        requests = None
        for index, (start, stop) in enumerate(micro_batches):
            t0 = time.perf_counter()
            model.inputs.value, model.labels.value = self.local_rows(
                permutation, start, stop, self.x_train, self.data.y_train)
            forward_pass(model.graph)
            loss_sum += model.loss.loss_sum
            # The slots ride with the gradients; backward leaves them alone, so they are
            # ready before its first bucket of gradients may start its allreduce.
            flat.extra[LOSS_SLOT] = loss_sum
            flat.extra[STOP_SLOT] = 1.0 if self.stop_signal else 0.0
            t1 = time.perf_counter()
            if self.overlap and self.sync:
                requests = self.parallel.backward_and_start_allreduce(model.graph)
            else:
                backward_pass(model.graph)
            if self.accumulated is not None and len(micro_batches) > 1:
                if index == 0:
                    np.copyto(self.accumulated, flat.param_grads)
                elif index < len(micro_batches) - 1:
                    self.accumulated += flat.param_grads
                else:
                    flat.param_grads += self.accumulated
            t2 = time.perf_counter()
            seconds[0] += t1 - t0
            seconds[1] += t2 - t1

        started = time.perf_counter()
        if requests is not None:
            self.comm.wait(requests)
        elif self.sync:
            self.parallel.allreduce_gradients()
        waited = time.perf_counter() - started
        seconds[2] += waited
        self.comm_seconds += waited

        # The reduced buffer is the same on every rank, so these decisions are too.
        global_loss = float(flat.extra[LOSS_SLOT]) / global_rows
        # max and min are exact (no rounding, unlike a sum or a BLAS dot whose result may
        # differ with the thread count), so every rank decides alike; NaN propagates through
        # both. Two passes without temporaries: about 0.05 ms for 2 MB.
        finite = (math.isfinite(global_loss) and math.isfinite(float(flat.param_grads.max()))
                  and math.isfinite(float(flat.param_grads.min())))
        if not finite:
            if self.config.on_nonfinite == "stop":
                where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                         else "no checkpoint was written")
                if isinstance(self.x_train, np.memmap):
                    where += ("; memory-mapped data is not scanned for NaN or inf before training, "
                              "so check it too (numpy.isfinite)")
                raise TrainingError(
                    f"the loss or a gradient became NaN or infinite at step {self.global_step + 1} "
                    f"(epoch {self.epoch + 1}); {where}. Lower --lr (now {self.optimizer.lr:g}), "
                    "add --warmup-epochs, or pass --on-nonfinite skip"
                )
            self.log(f"warning: step {self.global_step + 1}: non-finite loss or gradient; step skipped")
        else:
            started = time.perf_counter()
            self.optimizer.step(flat.values, flat.param_grads)
            seconds[3] += time.perf_counter() - started
        self.global_step += 1
        # Decided from the reduced slot, never from this rank's own flag: a signal that lands
        # after the allreduce must not make this rank stop one step before the others.
        self.stop_agreed = flat.extra[STOP_SLOT] > 0
        return global_loss if finite else float("nan")

    def check_consistency(self):
        """All ranks must hold bit-identical parameters. Collective."""
        checksums = self.comm.allgather_object(fingerprint(self.flat.values))
        differ = [rank for rank, value in enumerate(checksums) if value != checksums[0]]
        if differ:
            raise TrainingError(
                f"ranks {differ} hold parameters that differ from rank 0's at step {self.global_step}; "
                "the ranks diverged (a non-deterministic reduction or a bug); "
                f"resume from the last checkpoint ({self.last_checkpoint or 'none written'})"
            )

    # --- evaluation ------------------------------------------------------------------------

    def evaluate(self, x=None, y=None):
        """(mean loss, accuracy) over the test set: each rank its block, each row counted once.
        Collective."""
        x = self.x_test if x is None else x
        y = self.data.y_test if y is None else y
        model = self.model
        saved_normaliser = model.loss.normaliser
        model.loss.normaliser = None
        first, last = shard_bounds(len(y), self.comm.rank, self.comm.size)
        totals = np.zeros(3, np.float64)  # loss sum, correct, rows
        for start in range(first, last, EVAL_CHUNK):
            stop = min(start + EVAL_CHUNK, last)
            X = np.asarray(x[start:stop], dtype=self.dtype)
            labels = np.asarray(y[start:stop])
            model.inputs.value, model.labels.value = X, labels
            forward_pass(model.graph)
            totals[0] += model.loss.loss_sum
            totals[1] += np.count_nonzero(model.logits.value.argmax(axis=1) == labels)
            totals[2] += len(labels)
        model.loss.normaliser = saved_normaliser
        self.comm.allreduce_sum(totals)
        loss_sum, correct, rows = totals
        return loss_sum / max(rows, 1), correct / max(rows, 1)

    # --- checkpoints -----------------------------------------------------------------------

    def state(self):
        """The global training state as named arrays and metadata (a copy: safe to write later)."""
        arrays = {f"param/{name}": np.array(value) for name, value in self.flat.as_dict().items()}
        meta = {"dpflow_version": __version__, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "optimizer_steps": self.optimizer.steps,
                "samples_seen": self.samples_seen(), "seed": self.config.seed,
                "config": config_dict(self.config), "history": list(self.history),
                "model": {"sizes": self.model.sizes, "activation": self.model.activation,
                          "dtype": self.dtype.name}}
        for key, value in self.optimizer.state_dict().items():
            if isinstance(value, np.ndarray):
                arrays[f"optim/{key}"] = np.array(value)
        return arrays, meta

    def samples_seen(self):
        done_batches = self.step_in_epoch * self.config.accumulate
        return self.epoch * len(self.x_train) + min(done_batches * self.config.batch_size, len(self.x_train))

    def save_checkpoint(self):
        """Rank 0 writes; the others go on at once. The write runs in a thread on rank 0 so
        that its I/O never holds the next collective. Non-finite parameters are never saved."""
        if not self.config.checkpoint_dir or not self.comm.is_root:
            return
        if not np.isfinite(self.flat.values).all():
            self.log("warning: parameters are not finite; checkpoint not written")
            return
        self.wait_for_checkpoint()
        arrays, meta = self.state()
        directory, step, keep = self.config.checkpoint_dir, self.global_step, self.config.keep_checkpoints

        def write():
            self.last_checkpoint = save_checkpoint(directory, step, arrays, meta, keep)

        self.pending_write = threading.Thread(target=write, name="dpflow-checkpoint")
        self.pending_write.start()

    def wait_for_checkpoint(self):
        """Rank 0 waits for its checkpoint write; the watchdog knows it is busy, not stuck."""
        if self.pending_write is not None:
            while self.pending_write.is_alive():
                self.beat("writing a checkpoint")
                self.pending_write.join(timeout=1.0)
            self.pending_write = None

    # Settings a run must share with the checkpoint it resumes: they shape the parameters,
    # the optimizer state or the data every step sees.
    MUST_MATCH_ON_RESUME = ("dataset", "samples", "features", "classes", "hidden", "activation",
                            "optimizer", "dtype")

    def load_checkpoint(self, source, for_training=True, loaded=None):
        """Rank 0 reads `source` (a checkpoint file, or a directory's newest valid one) unless
        it already holds `loaded` = (path, arrays, meta); every rank receives the parameters
        (and, for training, the optimizer state and position) by broadcast. Returns the
        checkpoint's path. Collective."""
        payload = None
        if self.comm.is_root:
            try:
                path, arrays, meta = loaded or load_checkpoint_source(source, warn=self.log)
                payload = {"path": path, "meta": meta,
                           "shapes": {name: array.shape for name, array in arrays.items()}}
            except CheckpointError as error:
                payload = {"error": str(error)}
        payload = self.comm.broadcast_object(payload)
        if "error" in payload:
            raise UsageError(payload["error"])
        meta, shapes, path = payload["meta"], payload["shapes"], payload["path"]
        self.check_compatible(path, meta, shapes, for_training)
        buffers = [(f"param/{name}", self.flat.view(self.flat.values, name)) for name in self.flat.names]
        if for_training:
            # state_dict() hands out the optimizer's live arrays: filling them restores it.
            buffers += [(f"optim/{key}", value) for key, value in self.optimizer.state_dict().items()
                        if isinstance(value, np.ndarray)]
        for key, target in buffers:
            if self.comm.is_root:
                target[...] = arrays[key]
            self.comm.broadcast(target)
        if for_training:
            self.optimizer.steps = int(meta["optimizer_steps"])
            self.epoch, self.step_in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
            self.global_step = int(meta["global_step"])
            self.history = list(meta.get("history", []))
            self.last_checkpoint = path
        return path

    def check_compatible(self, path, meta, shapes, for_training):
        """The checkpoint must fit this model (and, to resume, this run's settings)."""
        expected = {f"param/{name}": tuple(shape) for name, shape in self.flat.shapes.items()}
        got = {name: tuple(shape) for name, shape in shapes.items() if name.startswith("param/")}
        if got != expected:
            raise UsageError(
                f"the checkpoint {path} is from a different model (layer sizes {meta['model']['sizes']}; "
                f"this run builds {self.model.sizes}); use the --hidden and dataset it was trained "
                "with, or a fresh --checkpoint-dir"
            )
        if not for_training:
            return
        stored = meta["config"]
        differ = [f"--{key.replace('_', '-')} {stored.get(key)!r} (now {getattr(self.config, key)!r})"
                  for key in self.MUST_MATCH_ON_RESUME if stored.get(key) != getattr(self.config, key)]
        if differ:
            raise UsageError(
                f"the checkpoint {path} was trained with {', '.join(differ)}; resume with the same "
                "settings, or start a new run in a fresh --checkpoint-dir"
            )

    def resume(self):
        """Continue from the newest valid checkpoint in --checkpoint-dir. Collective."""
        return self.load_checkpoint(self.config.checkpoint_dir)

    # --- the loop --------------------------------------------------------------------------

    def fit(self, on_epoch=None, on_step=None, watchdog=None):
        """Train from the current position to the last epoch. Collective."""
        config = self.config
        if watchdog:
            self.beat = watchdog.beat
        beat = self.beat
        steps = self.steps_per_epoch()
        n_train = len(self.x_train)
        while self.epoch < config.epochs:
            permutation = epoch_permutation(n_train, config.seed, self.epoch)
            batches = batch_bounds(n_train, config.batch_size)
            epoch_loss, epoch_rows, epoch_samples, epoch_started = 0.0, 0, 0, time.perf_counter()
            self.comm_seconds = 0.0
            while self.step_in_epoch < steps:
                first = self.step_in_epoch * config.accumulate
                micro_batches = batches[first: first + config.accumulate]
                self.optimizer.lr = self.lr_at(self.epoch + self.step_in_epoch / steps)
                beat(f"step {self.global_step + 1}")
                loss = self.train_step(permutation, micro_batches)
                rows = sum(stop - start for start, stop in micro_batches)
                epoch_samples += rows
                if math.isfinite(loss):  # a skipped step (--on-nonfinite skip) has no loss
                    epoch_loss += loss * rows
                    epoch_rows += rows
                self.step_in_epoch += 1
                if config.consistency_every and self.global_step % config.consistency_every == 0:
                    self.check_consistency()
                if on_step:
                    on_step(self, loss)
                if self.stop_agreed:
                    self.save_checkpoint()
                    self.wait_for_checkpoint()
                    raise Interrupted(self.stop_signal or signal.SIGTERM, self.interrupted_message())
            elapsed = time.perf_counter() - epoch_started
            beat(f"evaluation after epoch {self.epoch + 1}")
            test_loss, test_accuracy = self.evaluate()
            record = {
                "epoch": self.epoch + 1, "step": self.global_step,
                "train_loss": epoch_loss / epoch_rows if epoch_rows else float("nan"), "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "samples_per_sec": epoch_samples / elapsed if elapsed > 0 else None,
                "comm_fraction": self.comm_seconds / elapsed if elapsed > 0 else None,
                "lr": self.optimizer.lr, "seconds": elapsed,
            }
            self.history.append(record)
            self.epoch += 1
            self.step_in_epoch = 0
            if on_epoch:
                on_epoch(self, record)
            if config.checkpoint_dir and (self.epoch % config.checkpoint_every == 0 or self.epoch == config.epochs):
                self.save_checkpoint()
        self.check_consistency()
        self.wait_for_checkpoint()
        return self.history

    def interrupted_message(self):
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another rank"
        if self.last_checkpoint and self.config.checkpoint_dir:
            saved = f"checkpoint written to {self.last_checkpoint}; continue with --resume"
        else:
            saved = "nothing saved (pass --checkpoint-dir DIR to make runs resumable)"
        return f"stopped by {name} at step {self.global_step} (epoch {self.epoch + 1}); {saved}"

    def install_signal_handlers(self):
        """SIGINT/SIGTERM ask every rank to stop at the next step boundary; a second one
        stops at once."""

        def request_stop(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, request_stop)

    def parameters(self):
        return {name: np.array(value) for name, value in self.flat.as_dict().items()}
