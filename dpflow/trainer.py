"""The training loop: the one place that composes model, flat buffers, optimizer and communicator.

The data-parallel invariant, as `train_step` carries it out through its phases (gather,
forward, backward, reduce, check, update):

    loss.normaliser = global_rows          # the same number on every rank
    forward_and_backward(graph)            # this rank's rows only
    comm.allreduce_sum(flat.grads)         # one fused, in-place sum over ranks
    optimizer.step(values, param_grads)    # identical on every rank

Only the root rank prints and writes files; every decision that ends or changes the run
(a stop request, a non-finite gradient) is read from reduced values, so all ranks take it
in the same step and no collective is ever left waiting. Errors name settings, not flags.
"""

import math
import signal
import sys
import time

import numpy as np

from . import checkpoint
from .agreement import ranks_that_differ
from .comm import fingerprint
from .config import early_stop_metric
from .data import available_memory, gather
from .errors import Interrupted, TrainingError, UsageError
from .evaluation import evaluate
from .flat import all_finite, squared_norm
from .graph import backward_pass, forward_pass
from .modelspec import build_model, builder_arguments
from .noise import NoiseScale, local_term, step_estimate
from .optim import create_optimizer
from .parallel import DataParallel
from .schedule import Schedule, scaled_lr
from .sharding import batch_bounds, epoch_permutation, shard_bounds
from .signals import StopRequest

# Trailing slots of the gradient buffer that ride along with the one allreduce: the loss, how
# many ranks were asked to stop, the noise scale's norm, how many of the stopping ranks were
# asked by SIGTERM (the scheduler's signal names the stop when both came), and rank 0's "a
# checkpoint is due" (its clock decides).
LOSS_SLOT, STOP_SLOT, NOISE_SLOT, TERM_SLOT, SAVE_SLOT = 0, 1, 2, 3, 4
EXTRA_SLOTS = 5
# The noise scale's two squared norms cost about 1.5 / (local rows) of a step (measured with
# a 784-128-64-10 MLP); `noise_scale` auto measures one step in ceil(NOISE_ROWS / local rows),
# which keeps that below 1% (SCALING.md has the figures).
NOISE_ROWS = 256


# The metrics `keep_best` and `early_stop` may watch: what each epoch's record holds.
BEST_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")


def best_epoch(history, metric):
    """The index of the best record by `metric` (highest accuracy, lowest loss; the earliest
    of ties), or None if no record has a finite value of it."""
    sign = -1.0 if metric.endswith("_loss") else 1.0
    scored = [(sign * record[metric], -index) for index, record in enumerate(history)
              if record.get(metric) is not None and math.isfinite(record[metric])]
    return -max(scored)[1] if scored else None


def check_batch_size(batch_size, size):
    if batch_size < size:
        raise UsageError(
            f"`batch_size` {batch_size} is the global batch and must be >= the number "
            f"of ranks ({size}); raise it or run with fewer ranks"
        )


def check_model_fits(sizes, dtype, rows=0):
    """Refuse a model whose parameters, gradients and optimizer state, and the activations of
    a batch of `rows` (each rank's), cannot fit in memory (a typo in `hidden`, or labels that
    are ids rather than class indices)."""
    parameters = sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes, sizes[1:]))
    need = parameters * np.dtype(dtype).itemsize * 5  # values, gradients, 2 optimizer slots, a copy
    need += rows * sum(sizes[1:]) * np.dtype(dtype).itemsize * 4  # values, gradients, softmax, its copy
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(
            f"the model {'-'.join(map(str, sizes))} has {parameters:,} parameters: {need / 2**30:.1f} GiB "
            f"with its gradients, optimizer state and a batch of {rows} rows, more than the {free / 2**30:.1f} "
            "GiB free here; lower `hidden` (or check that the labels are class indices 0..C-1)")


class Trainer:
    def __init__(self, config, comm, data, warn=None, model=None):
        self.config = config
        self.comm = comm
        self.data = data
        # Warnings (a skipped step, a damaged checkpoint passed over) come from rank 0 only.
        warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self.log = warn if comm.is_root else (lambda message: None)
        self.dtype = np.dtype(config.dtype)
        check_batch_size(config.batch_size, comm.size)
        # `model` SPEC's builder, seeded from `seed`: the same graph on every rank (checked
        # by the caller), or a Model given by `fit()`.
        self.model = model if model is not None else build_model(
            config.model, builder_arguments(config), data.input_shape, data.n_classes, config.seed, self.dtype)
        # Layers that need the global batch (BatchNorm) sum through the communicator.
        self.model.set_reduction(comm.allreduce_sum)
        self.model.train()
        self.parallel = DataParallel(self.model.params, comm, EXTRA_SLOTS, config.reducer)
        self.flat = self.parallel.flat
        # Datasets arrive in the training dtype (so this copies nothing); memory-mapped ones are
        # read a batch at a time.
        self.x_train = self.as_training_array(data.x_train)
        self.x_test = self.as_training_array(data.x_test)
        self.n_train = data.n_train
        self.schedule = Schedule(
            peak=self.scaled_lr(), epochs=config.epochs, steps_per_epoch=self.steps_per_epoch(),
            kind=config.lr_schedule, warmup_epochs=config.warmup_epochs,
            # Goyal et al. warm up from the unscaled lr; without scaling, warmup starts from 0.
            warmup_start=config.lr if config.lr_scaling != "none" else 0.0,
            decay_epochs=tuple(config.lr_decay_epochs), decay_factor=config.lr_decay_factor,
            power=config.lr_power, min_lr=config.min_lr)
        self.optimizer = create_optimizer(config.optimizer, self.flat.size, self.dtype, self.lr_at(0.0),
                                          config.momentum, config.weight_decay, slices=self.flat.slices,
                                          trust_coefficient=config.trust_coefficient,
                                          exclude=config.exclude_from_adaptation)
        self.accumulated = np.zeros(self.flat.size, self.dtype) if config.accumulate > 1 else None
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.stop = StopRequest()  # this rank's signal; install() it to receive them
        self.stop_agreed = False  # set when any rank was signalled, read from the allreduce
        self.checkpoints = checkpoint.CheckpointWriter(config.checkpoint_dir, config.keep_checkpoints, self.log)
        self.stop_signum = None  # the signal every rank agreed stopped the run
        self.save_agreed = False  # rank 0's timer said a checkpoint is due, read from the allreduce
        self.stopped_early = None  # why fit() stopped before the last epoch, if it did
        self.history = []
        self.batch_buffers = {}
        self.comm_seconds = 0.0
        self.beat = lambda where: None  # the watchdog's, once fit() is given one
        self.phase_seconds = np.zeros(4)  # forward, backward, waiting for the sync, update
        self.sync = True  # `dpflow bench --no-sync` turns the allreduce off
        self.tracer = None  # a trace.Tracer records every phase as a span (`trace`)
        # Overlap needs the gradients final when backward ends, which accumulation defers.
        self.overlap = config.bucket_mb > 0 and config.accumulate == 1 and config.reducer != "naive"
        if self.overlap:
            self.parallel.plan_buckets(self.model.graph, int(config.bucket_mb * 2**20))
        self.noise = NoiseScale() if self.measures_noise() else None
        self.noise_term = 0.0  # this rank's share of the noise slot, summed over micro-batches
        local_rows = config.batch_size * config.accumulate / comm.size
        self.noise_every = 1 if config.noise_scale == "on" else math.ceil(NOISE_ROWS / local_rows)
        self.noise_now = False  # whether this step is measured (the same on every rank)

    # --- set-up ----------------------------------------------------------------------------

    def as_training_array(self, x):
        if isinstance(x, np.memmap):
            return x
        return np.ascontiguousarray(x, dtype=self.dtype)

    def steps_per_epoch(self):
        n_batches = math.ceil(self.n_train / self.config.batch_size)
        return math.ceil(n_batches / self.config.accumulate)

    def scaled_lr(self):
        """The peak lr: `lr` scaled from `base_batch_size` to the rows of one update."""
        config = self.config
        return scaled_lr(config.lr, config.lr_scaling, config.batch_size * config.accumulate,
                         config.base_batch_size)

    def lr_at(self, epochs_done):
        """The learning rate after `epochs_done` (fractional) epochs: warmup, then the schedule."""
        return self.schedule.lr_at(epochs_done)

    def lr_of_step(self, epoch, step_in_epoch):
        """The lr of step `step_in_epoch` of `epoch`: from the integer position, so a resumed
        run continues the same sequence bit for bit."""
        return self.lr_at(epoch + step_in_epoch / self.steps_per_epoch())

    def measures_noise(self):
        """Whether the noise scale is measured: it needs gradients at two batch sizes before the
        sum (several ranks or micro-batches), which overlapping the allreduce does not leave."""
        setting = self.config.noise_scale
        possible = self.comm.size > 1 or self.config.accumulate > 1
        if setting == "on" and not possible:
            raise UsageError("`noise_scale` on needs gradients at two batch sizes: run on >= 2 ranks "
                             "or with `accumulate` >= 2")
        if setting == "on" and self.overlap:
            raise UsageError("`noise_scale` on reads the gradients before the allreduce, which "
                             "`bucket_mb` > 0 starts during backward; set `bucket_mb` 0")
        return setting != "off" and possible and not self.overlap

    @property
    def last_checkpoint(self):
        return self.checkpoints.last

    # --- one step: gather, forward, backward, reduce, check, update ---------------------------

    def train_step(self, permutation, micro_batches):
        """Forward and backward over this rank's share of each micro-batch, one allreduce,
        one update. Returns the global mean loss of the step (NaN if skipped). Collective."""
        seconds = self.phase_seconds
        global_rows = sum(stop - start for start, stop in micro_batches)
        self.model.loss.normaliser = global_rows
        loss_sum, requests = 0.0, None
        self.noise_now = self.noise is not None and self.global_step % self.noise_every == 0
        for index, (start, stop) in enumerate(micro_batches):
            t0 = time.perf_counter()
            self.gather(permutation, start, stop)
            gathered = time.perf_counter()
            loss_sum = self.forward(loss_sum)
            t1 = time.perf_counter()
            requests = self.backward(index, len(micro_batches))
            t2 = time.perf_counter()
            seconds[0] += t1 - t0
            seconds[1] += t2 - t1
            if self.tracer:
                self.tracer.add("gather", t0, gathered)
                self.tracer.add("forward", gathered, t1)
                self.tracer.add("backward", t1, t2)
        if self.noise_now:  # (never written under overlap: the slots may be in flight then)
            self.flat.extra[NOISE_SLOT] = self.noise_term
            self.noise_term = 0.0
        started = time.perf_counter()
        self.reduce(requests)
        reduced = time.perf_counter()
        seconds[2] += reduced - started
        self.comm_seconds += reduced - started
        global_loss, finite = self.check(global_rows)
        if finite:
            checked = time.perf_counter()
            if self.noise_now:
                self.measure_noise(micro_batches, global_rows)
            self.optimizer.step(self.flat.values, self.flat.param_grads)
            updated = time.perf_counter()
            seconds[3] += updated - checked
        if self.tracer:
            self.tracer.add("wait for buckets" if requests else "allreduce" if self.sync else "no sync",
                            started, reduced, "comm")
            if finite:
                self.tracer.add("check", reduced, checked)
                self.tracer.add("update", checked, updated)
        self.global_step += 1
        # Decided from the reduced slots, never from this rank's own flag: a signal that lands
        # after the allreduce must not make this rank stop one step before the others.
        extra = self.flat.extra
        self.stop_agreed = extra[STOP_SLOT] > 0
        if self.stop_agreed:
            self.stop_signum = signal.SIGTERM if extra[TERM_SLOT] > 0 else signal.SIGINT
        self.save_agreed = extra[SAVE_SLOT] > 0
        return global_loss if finite else float("nan")

    def gather(self, permutation, start, stop):
        """Feed this rank's contiguous block of the global batch [start, stop) of the permutation."""
        first, last = shard_bounds(stop - start, self.comm.rank, self.comm.size)
        index = permutation[start + first: start + last]
        # Per-row randomness (Dropout) is keyed by the step and the row's place in the epoch's
        # order, never by the rank that holds it.
        self.model.set_batch_position(self.global_step, start + first)
        x, rows = self.x_train, len(index)
        buffers = self.batch_buffers.get(rows)
        if buffers is None:
            buffers = self.batch_buffers[rows] = (np.empty((rows,) + x.shape[1:], self.dtype),
                                                  np.empty(rows, np.int64))
        X, y = buffers
        gather(x, index, self.data.normalizer, X)  # a memory-mapped x is read only at these rows
        y[...] = self.data.y_train[index]
        self.model.inputs.value, self.model.labels.value = X, y

    def forward(self, loss_sum):
        """Forward this rank's rows; the loss so far and the stop flag go in the extra slots."""
        forward_pass(self.model.graph)
        loss_sum += self.model.loss.loss_sum
        # The slots ride with the gradients; backward leaves them alone, so they are
        # ready before its first bucket of gradients may start its allreduce.
        self.flat.extra[LOSS_SLOT] = loss_sum
        self.flat.extra[STOP_SLOT] = 1.0 if self.stop.signum else 0.0
        self.flat.extra[NOISE_SLOT] = 0.0  # set after backward on the steps that measure it
        self.flat.extra[TERM_SLOT] = 1.0 if self.stop.signum == signal.SIGTERM else 0.0
        self.flat.extra[SAVE_SLOT] = 1.0 if self.checkpoint_due() else 0.0
        return loss_sum

    def backward(self, index, count):
        """Backward micro-batch `index` of `count`, summing gradients over micro-batches;
        with overlap, start the buckets' allreduces as they finish (returns the requests)."""
        requests = None
        if self.overlap and self.sync:
            requests = self.parallel.backward_and_start_allreduce(self.model.graph)
        else:
            backward_pass(self.model.graph)
        grads = self.flat.param_grads
        if self.noise_now:  # this micro-batch's gradient alone, before any sum
            self.noise_term += local_term(float(np.dot(grads, grads)), len(self.model.labels.value),
                                          self.model.loss.normaliser)
        if self.accumulated is not None and count > 1:
            if index == 0:
                np.copyto(self.accumulated, grads)
            elif index < count - 1:
                self.accumulated += grads
            else:
                grads += self.accumulated
        return requests

    def reduce(self, requests):
        """Sum the gradients and the extra slots over all ranks. Collective."""
        if requests is not None and self.tracer:
            # One bucket at a time, in launch order: each span ends when its wait returns.
            for number, (request, began) in enumerate(zip(requests, self.parallel.started_at)):
                self.comm.wait([request])
                self.tracer.add(f"bucket {number}", began, time.perf_counter(), "comm")
        elif requests is not None:
            self.comm.wait(requests)
        elif self.sync:
            self.parallel.allreduce_gradients()

    def check(self, global_rows):
        """(global mean loss, whether the step may update): the reduced buffer is the same on
        every rank, so every rank decides alike. Raises on a non-finite step unless skipping."""
        global_loss = float(self.flat.extra[LOSS_SLOT]) / global_rows
        # The squared norm of the reduced gradient: the check's one pass, which the noise
        # scale reads too (no second pass on the steps that measure it).
        self.grad_squared = squared_norm(self.flat.param_grads)
        finite = math.isfinite(global_loss) and all_finite(self.flat.param_grads, self.grad_squared)  # exact
        if finite:
            return global_loss, True
        if self.config.on_nonfinite == "stop":
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written")
            raise TrainingError(
                f"the loss or a gradient became NaN or infinite at step {self.global_step + 1} "
                f"(epoch {self.epoch + 1}); {where}. Lower `lr` (now {self.optimizer.lr:g}), "
                "add `warmup_epochs`, or pass `on_nonfinite` skip"
            )
        self.log(f"warning: step {self.global_step + 1}: non-finite loss or gradient; step skipped")
        return global_loss, False

    def measure_noise(self, micro_batches, global_rows):
        """Add this step's |G|^2 and tr(Sigma) estimates from the reduced noise slot and the
        global gradient. Every rank knows every piece's rows, so nothing more is sent."""
        pieces = [len(range(*shard_bounds(stop - start, rank, self.comm.size)))
                  for start, stop in micro_batches for rank in range(self.comm.size)]
        measured = step_estimate(float(self.flat.extra[NOISE_SLOT]), pieces, self.grad_squared, global_rows)
        if measured is not None:
            self.noise.add(*measured)

    def check_consistency(self):
        """All ranks must hold bit-identical parameters. Collective."""
        _, differ = ranks_that_differ(self.comm, fingerprint(self.flat.values))
        if differ:
            raise TrainingError(
                f"ranks {sorted(differ)} hold parameters that differ from rank 0's at step {self.global_step}; "
                "the ranks diverged (a non-deterministic reduction or a bug); "
                f"resume from the last checkpoint ({self.last_checkpoint or 'none written'})"
            )

    # --- checkpoints (the state and its I/O live in `checkpoint`) ------------------------------

    def samples_seen(self):
        done_batches = self.step_in_epoch * self.config.accumulate
        return self.epoch * self.n_train + min(done_batches * self.config.batch_size, self.n_train)

    def checkpoint_due(self):
        """Rank 0's clock: `checkpoint_every_seconds` since the last checkpoint began."""
        every = self.config.checkpoint_every_seconds
        return (bool(every) and self.comm.is_root and bool(self.config.checkpoint_dir)
                and time.monotonic() - self.checkpoints.started >= every)

    def save_checkpoint(self, regular=True, best=False):
        """Rank 0 starts writing in the background (a regular checkpoint, and/or best.dpf);
        the others go on at once. Non-finite parameters are never saved."""
        if not self.config.checkpoint_dir or not self.comm.is_root:
            return
        if not np.isfinite(self.flat.values).all():
            self.log("warning: parameters are not finite; checkpoint not written")
            return
        self.checkpoints.start(self.global_step, *checkpoint.training_state(self), self.beat,
                               regular=regular, best=best)

    def end_of_epoch(self, save_due=False):
        """Checkpoints due after an epoch (`save_due`: one fell due at its last step), and
        whether to stop early. Every rank reads the same history (its metrics were reduced),
        so every rank decides alike: no extra collective."""
        config = self.config
        watched = early_stop_metric(config)
        best = best_epoch(self.history, watched) if watched else None
        improved = best == len(self.history) - 1
        regular = self.epoch % config.checkpoint_every == 0 or self.epoch == config.epochs or save_due
        stale = len(self.history) - 1 - (best if best is not None else -1)
        if config.early_stop and stale >= config.early_stop and self.epoch < config.epochs:
            record = self.history[best] if best is not None else None
            self.stopped_early = (
                f"early stop: {watched} has not improved for {stale} epochs"
                + (f" (best {record[watched]:.4f} at epoch {record['epoch']})" if record else "")
            )
            regular = True  # the last state, so the run's end is on disk
        if config.checkpoint_dir and (regular or (improved and config.keep_best)):
            self.save_checkpoint(regular=regular, best=improved and bool(config.keep_best))

    # --- the loop --------------------------------------------------------------------------

    def fit(self, on_epoch=None, on_step=None, watchdog=None):
        """Train from the current position to the last epoch. Collective."""
        config = self.config
        if watchdog:
            self.beat = watchdog.beat
        beat = self.beat
        steps = self.steps_per_epoch()
        n_train = self.n_train
        while self.epoch < config.epochs and not self.stopped_early:
            permutation = epoch_permutation(n_train, config.seed, self.epoch)
            if self.data.train_rows is not None:  # positions in the permutation -> rows of x_train
                permutation = self.data.train_rows[permutation]
            batches = batch_bounds(n_train, config.batch_size)
            epoch_loss, epoch_rows, epoch_samples, epoch_started = 0.0, 0, 0, time.perf_counter()
            self.comm_seconds = 0.0
            save_due = False
            while self.step_in_epoch < steps:
                first = self.step_in_epoch * config.accumulate
                micro_batches = batches[first: first + config.accumulate]
                self.optimizer.lr = self.lr_of_step(self.epoch, self.step_in_epoch)
                beat(f"step {self.global_step + 1}")
                loss = self.train_step(permutation, micro_batches)
                rows = sum(stop - start for start, stop in micro_batches)
                epoch_samples += rows
                if math.isfinite(loss):  # a skipped step (on_nonfinite="skip") has no loss
                    epoch_loss += loss * rows
                    epoch_rows += rows
                self.step_in_epoch += 1
                if config.consistency_every and self.global_step % config.consistency_every == 0:
                    self.check_consistency()
                if on_step:
                    on_step(self, loss)
                if self.stop_agreed:
                    self.save_checkpoint()  # after the one in flight, if any
                    self.checkpoints.wait(beat)
                    raise Interrupted(self.stop_signum, self.interrupted_message())
                every = config.checkpoint_every_steps
                save_due = self.save_agreed or (every and self.global_step % every == 0)
                if save_due and self.step_in_epoch < steps:
                    self.save_checkpoint()
            elapsed = time.perf_counter() - epoch_started
            beat(f"evaluation after epoch {self.epoch + 1}")
            started = time.perf_counter()
            test_loss, test_accuracy = evaluate(self.model, self.x_test, self.data.y_test, self.comm,
                                                self.dtype, self.data.normalizer)
            if self.tracer:
                self.tracer.add("evaluation", started, time.perf_counter(), "epoch", epoch=self.epoch + 1)
            record = {
                "epoch": self.epoch + 1, "step": self.global_step,
                "train_loss": epoch_loss / epoch_rows if epoch_rows else float("nan"), "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "samples_per_sec": epoch_samples / elapsed if elapsed > 0 else None,
                "comm_fraction": self.comm_seconds / elapsed if elapsed > 0 else None,
                "lr": self.optimizer.lr, "seconds": elapsed,
                # A pure function of the position: also right for an epoch resumed half-way.
                "lrs": [self.lr_of_step(self.epoch, step) for step in range(steps)],
                "noise_scale": self.noise.value() if self.noise else None,
            }
            if self.data.validation_rows is not None:
                record["val_loss"], record["val_accuracy"] = evaluate(
                    self.model, self.x_train, self.data.y_train, self.comm, self.dtype,
                    self.data.normalizer, rows=self.data.validation_rows)
            if self.noise:
                self.noise.reset()
            self.history.append(record)
            self.epoch += 1
            self.step_in_epoch = 0
            if on_epoch:
                on_epoch(self, record)
            self.end_of_epoch(save_due)
        self.check_consistency()
        self.checkpoints.wait(beat)
        return self.history

    def interrupted_message(self):
        written = self.checkpoints.last_step == self.global_step
        if not self.config.checkpoint_dir:
            saved = "nothing saved (set `checkpoint_dir` to make runs resumable)"
        elif written:
            saved = f"checkpoint written to {self.last_checkpoint}; continue with `resume`"
        else:
            saved = (f"the stop checkpoint was not written ({self.checkpoints.last_error}); "
                     + (f"continue with `resume` from {self.last_checkpoint} (step {self.checkpoints.last_step})"
                        if self.last_checkpoint else "no checkpoint was written"))
        name = signal.Signals(self.stop_signum).name
        return f"stopped by {name} at step {self.global_step} (epoch {self.epoch + 1}); {saved}"

    def parameters(self):
        """Copies of the parameters and of the model's state (BatchNorm's running statistics)."""
        arrays = {name: np.array(value) for name, value in self.flat.as_dict().items()}
        arrays.update({name: np.array(value) for name, value in self.model.state().items()})
        return arrays
