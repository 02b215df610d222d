"""The data-parallel invariant: T steps on N ranks equal T steps in one process on the same
global batches. These run under `mpiexec -n 2/3/4 pytest --with-mpi`; each rank also runs
the one-process reference itself, with the local communicator."""

import os
import runpy

import numpy as np
import pytest

from helpers import ROOT
from dpflow.checkpoint import load_checkpoint
from dpflow.comm import LocalCommunicator, create_communicator, fingerprint
from dpflow.config import TrainConfig
from dpflow.data import load_dataset
from dpflow.errors import TrainingError, UsageError
from dpflow.evaluation import evaluate
from dpflow.model import MLP
from dpflow.parallel import DataParallel
from dpflow.trainer import Trainer

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def small_data():
    # 41 training rows: batches of 13 leave a last batch of 2 rows (ranks 2 and 3 get none).
    return load_dataset("synthetic", samples=51, features=6, classes=3, seed=5)


def train(comm, **overrides):
    values = dict(dataset="synthetic", hidden=[7, 5], epochs=2, batch_size=13, lr=0.1,
                  optimizer="sgd", dtype="float64", seed=11, consistency_every=3)
    values.update(overrides)
    trainer = Trainer(TrainConfig(**values), comm, small_data())
    trainer.fit()
    return trainer


def mpi_comm():
    comm = create_communicator("mpi")
    assert comm.size >= 2, "expected several ranks: is mpi4py using the launcher's MPI?"
    return comm


def assert_bitwise_identical_across_ranks(comm, trainer):
    checksums = comm.allgather_object(fingerprint(trainer.flat.values))
    assert len(set(checksums)) == 1, checksums


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("batch_size", [12, 13, 41])
def test_n_ranks_equal_one_process(dtype, optimizer, batch_size):
    comm = mpi_comm()
    parallel = train(comm, dtype=dtype, optimizer=optimizer, batch_size=batch_size)
    reference = train(LocalCommunicator(), dtype=dtype, optimizer=optimizer, batch_size=batch_size)
    assert parallel.global_step == reference.global_step > 0
    difference = np.max(np.abs(parallel.flat.values.astype(np.float64) - reference.flat.values))
    assert difference < TOLERANCE[dtype]
    # The training actually moved the parameters (a test that cannot fail is a defect).
    initial = Trainer(TrainConfig(dataset="synthetic", hidden=[7, 5], dtype=dtype, seed=11, batch_size=batch_size),
                      LocalCommunicator(), small_data())
    assert np.max(np.abs(initial.flat.values - reference.flat.values)) > 1e-3
    assert parallel.history[-1]["train_loss"] == pytest.approx(reference.history[-1]["train_loss"], rel=1e-4)
    assert_bitwise_identical_across_ranks(comm, parallel)


@pytest.mark.mpi(min_size=2)
def test_naive_reducer_gives_the_same_parameters_as_the_flat_one():
    comm = mpi_comm()
    flat = train(comm, reducer="flat")
    naive = train(comm, reducer="naive")
    assert np.array_equal(flat.flat.values, naive.flat.values)


@pytest.mark.mpi(min_size=2)
def test_accumulation_on_n_ranks_equals_a_larger_batch_in_one_process():
    comm = mpi_comm()
    accumulated = train(comm, batch_size=5, accumulate=3, optimizer="momentum")
    reference = train(LocalCommunicator(), batch_size=15, optimizer="momentum")
    assert accumulated.global_step == reference.global_step
    assert np.max(np.abs(accumulated.flat.values - reference.flat.values)) < 1e-10


def test_accumulation_equals_a_larger_batch_serial():
    accumulated = train(LocalCommunicator(), batch_size=4, accumulate=3)
    reference = train(LocalCommunicator(), batch_size=12)
    assert accumulated.global_step == reference.global_step == 8
    assert np.max(np.abs(accumulated.flat.values - reference.flat.values)) < 1e-12


@pytest.mark.mpi(min_size=2)
def test_evaluation_counts_every_test_row_once():
    comm = mpi_comm()
    parallel = train(comm, epochs=1)
    reference = train(LocalCommunicator(), epochs=1)
    def test_set(trainer):
        return evaluate(trainer.model, trainer.x_test, trainer.data.y_test, trainer.comm, trainer.dtype)

    assert test_set(parallel) == pytest.approx(test_set(reference), rel=1e-12)
    assert parallel.history[-1]["test_accuracy"] * 10 == pytest.approx(round(parallel.history[-1]["test_accuracy"] * 10))


@pytest.mark.mpi(min_size=2)
def test_broadcast_overrides_different_initial_parameters():
    comm = mpi_comm()
    model = MLP(4, [3], 2, seed=100 + comm.rank, dtype=np.float64)
    before = fingerprint(np.concatenate([p.value.ravel() for p in model.params.values()]))
    assert len(set(comm.allgather_object(before))) == comm.size  # really different at first
    dp = DataParallel(model.params, comm)
    assert len(set(comm.allgather_object(fingerprint(dp.flat.values)))) == 1
    rank0 = MLP(4, [3], 2, seed=100, dtype=np.float64)
    for name, param in model.params.items():
        assert np.array_equal(param.value, rank0.params[name].value)


@pytest.mark.mpi(min_size=2)
def test_consistency_check_catches_an_injected_divergence():
    comm = mpi_comm()
    trainer = Trainer(TrainConfig(dataset="synthetic", hidden=[4], dtype="float64"), comm, small_data())
    trainer.check_consistency()  # identical after the broadcast
    if comm.rank == 1:
        trainer.flat.values[3] += 1e-12
    with pytest.raises(TrainingError, match=r"ranks \[1\] hold parameters that differ from rank 0's at step 0"):
        trainer.check_consistency()


@pytest.mark.mpi(min_size=2)
def test_mismatched_parameter_shape_is_an_error_on_every_rank():
    comm = mpi_comm()
    model = MLP(4, [3 if comm.rank != 1 else 5], 2, dtype=np.float64)
    with pytest.raises(UsageError, match=r"rank 1 builds a different model from rank 0 \(\('fc0.W', \(4, 3\)\) vs \('fc0.W', \(4, 5\)\)"):
        DataParallel(model.params, comm)


@pytest.mark.mpi(min_size=2)
def test_batch_smaller_than_the_world_is_refused():
    comm = mpi_comm()
    with pytest.raises(UsageError, match=f"`batch_size` 1 is the global batch and must be >= the number of ranks \\({comm.size}\\)"):
        Trainer(TrainConfig(dataset="synthetic", batch_size=1), comm, small_data())


@pytest.mark.mpi(min_size=2)
def test_data_parallel_example_equals_one_process():
    comm = mpi_comm()
    example = runpy.run_path(os.path.join(ROOT, "examples", "data_parallel_regression.py"))
    losses, params = example["main"](epochs=3, verbose=False, comm=comm)
    ref_losses, ref_params = example["main"](epochs=3, verbose=False, comm=LocalCommunicator())
    assert np.allclose(losses, ref_losses, rtol=1e-10)
    assert losses[-1] < losses[0]
    for name in params:
        assert np.max(np.abs(params[name] - ref_params[name])) < 1e-10


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bucket_mb", [1e-4, 3e-4, 100.0])
def test_overlapped_bucket_allreduce_equals_one_process(bucket_mb):
    comm = mpi_comm()
    overlapped = train(comm, bucket_mb=bucket_mb, optimizer="momentum")
    assert overlapped.overlap and len(overlapped.parallel.buckets) >= (2 if bucket_mb < 1 else 1)
    reference = train(LocalCommunicator(), optimizer="momentum")
    assert np.max(np.abs(overlapped.flat.values - reference.flat.values)) < 1e-10
    assert overlapped.history[-1]["train_loss"] == pytest.approx(reference.history[-1]["train_loss"], rel=1e-10)
    assert_bitwise_identical_across_ranks(comm, overlapped)


def test_buckets_cover_the_gradient_buffer_from_its_end():
    trainer = train(LocalCommunicator(), bucket_mb=1e-4, epochs=1)
    buckets = trainer.parallel.buckets
    assert buckets[0][1] == trainer.flat.grads.size  # the extra slots ride with the first
    assert buckets[-1][0] == 0
    for (start, _, _), (_, stop, _) in zip(buckets, buckets[1:]):
        assert stop == start  # contiguous, no gaps, no overlaps
    reference = train(LocalCommunicator(), epochs=1)
    assert np.array_equal(trainer.flat.values, reference.flat.values)


@pytest.mark.parametrize("warmup_epochs", [0.25, 1.0, 2.5])
def test_warmup_rises_to_the_target_and_never_past_it(warmup_epochs):
    trainer = Trainer(TrainConfig(dataset="synthetic", lr=0.1, batch_size=4, warmup_epochs=warmup_epochs),
                      LocalCommunicator(), small_data())
    steps = trainer.steps_per_epoch()
    lrs = [trainer.lr_at(step / steps) for step in range(4 * steps)]
    assert max(lrs) == pytest.approx(0.1) and lrs[0] < 0.1
    assert all(a <= b + 1e-15 for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("settings", [
    dict(dtype="float32", optimizer="adam", accumulate=2),
    dict(dtype="float32", optimizer="momentum", bucket_mb=3e-4),
    dict(dtype="float64", optimizer="sgd", weight_decay=0.01),
])
def test_resume_from_a_checkpoint_is_bitwise_exact(tmp_path, settings):
    common = dict(dataset="synthetic", hidden=[7, 5], batch_size=5, seed=3, consistency_every=0, **settings)
    straight = Trainer(TrainConfig(epochs=4, **common), LocalCommunicator(), small_data())
    straight.fit()
    first = Trainer(TrainConfig(epochs=2, checkpoint_dir=str(tmp_path), **common), LocalCommunicator(), small_data())
    first.fit()
    resumed = Trainer(TrainConfig(epochs=4, checkpoint_dir=str(tmp_path), resume=True, **common),
                      LocalCommunicator(), small_data())
    load_checkpoint(resumed, str(tmp_path))
    assert resumed.epoch == 2 and resumed.global_step == first.global_step
    resumed.fit()
    assert np.array_equal(straight.flat.values, resumed.flat.values)
    # A checkpoint keeps only the last epoch's record (the metrics file keeps them all).
    assert [r["train_loss"] for r in straight.history[1:]] == [r["train_loss"] for r in resumed.history]
