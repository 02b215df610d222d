"""Large-batch training in the loop: schedules, LARS and LAMB keep the data-parallel
invariant (N ranks == 1 process, with accumulation too), resume mid-schedule is bitwise, the
noise scale rides in the allreduce without changing the run, and bad settings are refused.
The MPI tests run under `mpiexec -n 2/3/4 pytest --with-mpi`."""

import json
import signal

import numpy as np
import pytest

from dpflow.checkpoint import load_checkpoint
from dpflow.comm import LocalCommunicator, fingerprint
from dpflow.config import TrainConfig, build_config, load_toml
from dpflow.data import Dataset
from dpflow.errors import CheckpointError, Interrupted, UsageError
from dpflow.trainer import Trainer
from test_parallel import mpi_comm

RULES = [  # (settings, what they exercise)
    dict(optimizer="lars", lr=2.0, lr_schedule="cosine", warmup_epochs=1, lr_scaling="sqrt", weight_decay=1e-3),
    dict(optimizer="lamb", lr=0.01, lr_schedule="poly", lr_power=2.0, min_lr=1e-4, weight_decay=0.01),
    dict(optimizer="momentum", lr=0.05, lr_schedule="step", lr_decay_epochs=[1.5, 2.5], lr_decay_factor=0.3,
         lr_scaling="linear", base_batch_size=4, warmup_epochs=0.5),
]
IDS = ["lars-cosine", "lamb-poly", "momentum-step"]


def data(train_rows=43, seed=5):
    """Gaussian classes; 43 rows leave uneven last batches (some ranks hold none)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 6))
    labels = rng.integers(0, 3, train_rows + 12)
    x = centres[labels] + rng.normal(size=(len(labels), 6))
    return Dataset("blobs", x[:train_rows], labels[:train_rows], x[train_rows:], labels[train_rows:], 3)


def config(**overrides):
    values = dict(dataset="blobs", hidden=[7, 5], epochs=3, batch_size=13, dtype="float64", seed=11,
                  consistency_every=2, noise_scale="off")
    values.update(overrides)
    return TrainConfig(**values)


def train(comm, dataset=None, **overrides):
    trainer = Trainer(config(**overrides), comm, dataset or data())
    trainer.fit()
    return trainer


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("rule", RULES, ids=IDS)
@pytest.mark.parametrize("batch_size, accumulate", [(13, 1), (5, 3)])
def test_n_ranks_equal_one_process(rule, batch_size, accumulate):
    comm = mpi_comm()
    parallel = train(comm, batch_size=batch_size, accumulate=accumulate, **rule)
    reference = train(LocalCommunicator(), batch_size=batch_size, accumulate=accumulate, **rule)
    assert parallel.global_step == reference.global_step > 0
    assert np.max(np.abs(parallel.flat.values - reference.flat.values)) < 1e-10
    assert [r["lrs"] for r in parallel.history] == [r["lrs"] for r in reference.history]
    initial = Trainer(config(**rule), LocalCommunicator(), data())
    assert np.max(np.abs(initial.flat.values - reference.flat.values)) > 1e-3  # it trained
    assert len(set(comm.allgather_object(fingerprint(parallel.flat.values)))) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("rule", RULES[:2], ids=IDS[:2])
def test_accumulation_on_n_ranks_equals_the_whole_batch_in_one_process(rule):
    comm = mpi_comm()
    accumulated = train(comm, batch_size=5, accumulate=3, **rule)
    whole = train(LocalCommunicator(), batch_size=15, **rule)
    assert accumulated.global_step == whole.global_step
    assert np.max(np.abs(accumulated.flat.values - whole.flat.values)) < 1e-10


@pytest.mark.mpi(min_size=2)
def test_noise_scale_is_the_same_from_ranks_or_micro_batches():
    """N ranks of b rows and one process accumulating N micro-batches of b rows hold the same
    pieces of each global batch, so they measure the same noise scale."""
    comm = mpi_comm()
    rows = 4
    dataset = data(train_rows=rows * comm.size * 6)  # whole batches only: the same pieces
    ranks = train(comm, dataset, batch_size=rows * comm.size, noise_scale="on", optimizer="momentum")
    micro = train(LocalCommunicator(), dataset, batch_size=rows, accumulate=comm.size, noise_scale="on",
                  optimizer="momentum")
    assert np.max(np.abs(ranks.flat.values - micro.flat.values)) < 1e-10
    got = [r["noise_scale"] for r in ranks.history]
    want = [r["noise_scale"] for r in micro.history]
    # None: an epoch whose |G|^2 estimate was not positive (tiny data); it must agree too.
    assert [value is None for value in got] == [value is None for value in want]
    assert any(value is not None and value > 0 for value in got), got
    assert [v for v in got if v is not None] == pytest.approx([v for v in want if v is not None], rel=1e-8)
    assert len(set(comm.allgather_object(json.dumps(ranks.noise.state())))) == 1


@pytest.mark.mpi(min_size=2)
def test_measuring_the_noise_scale_changes_nothing_else():
    comm = mpi_comm()
    measured = train(comm, noise_scale="on", optimizer="lamb", lr=0.01)
    plain = train(comm, noise_scale="off", optimizer="lamb", lr=0.01)
    assert np.array_equal(measured.flat.values, plain.flat.values)
    assert all(r["noise_scale"] is not None for r in measured.history)
    assert all(r["noise_scale"] is None for r in plain.history)


def interrupted_then_resumed(comm, directory, stop_after, **settings):
    """Run until a stop request after step `stop_after` (mid-epoch), then resume in a new
    trainer from the checkpoint that stop wrote, and finish."""
    first = Trainer(config(checkpoint_dir=directory, **settings), comm, data())

    def request_stop(trainer, loss):
        if trainer.global_step == stop_after:
            trainer.stop.signum = signal.SIGTERM

    with pytest.raises(Interrupted):
        first.fit(on_step=request_stop)
    resumed = Trainer(config(checkpoint_dir=directory, resume=True, **settings), comm, data())
    load_checkpoint(resumed, directory)
    assert resumed.global_step == stop_after + 1 and resumed.step_in_epoch > 0  # mid-epoch
    resumed.fit()
    return resumed


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_resume_mid_schedule_is_bitwise(tmp_path, rule):
    settings = dict(batch_size=5, accumulate=2, noise_scale="on", **rule)
    straight = train(LocalCommunicator(), **settings)
    resumed = interrupted_then_resumed(LocalCommunicator(), str(tmp_path), stop_after=6, **settings)
    assert np.array_equal(straight.flat.values, resumed.flat.values)
    assert [r["lrs"] for r in straight.history] == [r["lrs"] for r in resumed.history]
    assert [r["noise_scale"] for r in straight.history] == [r["noise_scale"] for r in resumed.history]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("rule", RULES[:2], ids=IDS[:2])
def test_resume_mid_schedule_is_bitwise_on_n_ranks(tmp_path, rule):
    comm = mpi_comm()
    directory = comm.broadcast_object(str(tmp_path))  # rank 0 writes and reads the checkpoints
    straight = train(comm, **rule)
    resumed = interrupted_then_resumed(comm, directory, stop_after=4, **rule)
    assert np.array_equal(straight.flat.values, resumed.flat.values)
    assert [r["lrs"] for r in straight.history] == [r["lrs"] for r in resumed.history]


def test_resume_refuses_another_schedule(tmp_path):
    directory = str(tmp_path)
    train(LocalCommunicator(), checkpoint_dir=directory, lr_schedule="cosine")
    for changed, message in [(dict(lr_schedule="poly"), "`lr_schedule` 'cosine' (now 'poly')"),
                             (dict(lr_schedule="cosine", epochs=5), "`epochs` 3 (now 5)")]:
        other = Trainer(config(checkpoint_dir=directory, resume=True, **changed), LocalCommunicator(), data())
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_checkpoint(other, directory)


def test_lr_of_every_step_follows_the_schedule():
    trainer = train(LocalCommunicator(), **RULES[2])
    steps = trainer.steps_per_epoch()
    lrs = [lr for record in trainer.history for lr in record["lrs"]]
    assert len(lrs) == 3 * steps
    # linear scaling 13/4, warmup over half an epoch from 0.05, x0.3 at 1.5 and 2.5 epochs
    peak = 0.05 * 13 / 4
    assert lrs[0] < peak and lrs[steps // 2 + 1] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * 0.09)
    assert trainer.history[-1]["lr"] == lrs[-1]


# --- bad settings: one message naming the value and the fix ----------------------------------

@pytest.mark.parametrize("values, message", [
    (dict(lr_decay_factor=-0.1), "`lr_decay_factor` must be > 0"),
    (dict(lr_decay_factor=1.5), "`lr_decay_factor` must be <= 1"),
    (dict(lr_schedule="step"), "`lr_schedule` step needs `lr_decay_epochs`"),
    (dict(lr_schedule="step", lr_decay_epochs=[60, 30], epochs=90), "`lr_decay_epochs` must increase"),
    (dict(lr_schedule="step", lr_decay_epochs=[30, 30], epochs=90), "`lr_decay_epochs` must increase"),
    (dict(lr_schedule="step", lr_decay_epochs=[30], epochs=20), "before the end (20 epochs)"),
    (dict(lr_schedule="step", lr_decay_epochs=[1], warmup_epochs=2), "after the warmup (2 epochs)"),
    (dict(lr_decay_epochs=[30], epochs=90), "applies to `lr_schedule` step only"),
    (dict(lr_schedule="linear"), "`lr_schedule` must be one of constant, cosine, step, poly"),
    (dict(lr_power=0.0, lr_schedule="poly"), "`lr_power` must be > 0"),
    (dict(min_lr=-1.0), "`min_lr` must be >= 0"),
    (dict(min_lr=0.5, lr=0.1, lr_schedule="cosine"), "`min_lr` 0.5 must be below the lr after scaling (0.1)"),
    (dict(optimizer="lars", trust_coefficient=0.0), "`trust_coefficient` must be > 0"),
    (dict(optimizer="lamb", trust_coefficient=-1.0), "`trust_coefficient` must be > 0"),
    (dict(optimizer="momentum", trust_coefficient=0.01), "applies to `optimizer` lars or lamb"),
    (dict(optimizer="lion"), "`optimizer` must be one of sgd, momentum, adam, lars, lamb"),
    (dict(lr_scaling="cubic"), "`lr_scaling` must be one of none, linear, sqrt"),
])
def test_bad_settings_are_refused(values, message):
    with pytest.raises(UsageError) as error:
        build_config({}, values)
    assert message in str(error.value)


def test_toml_takes_the_same_settings(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('optimizer = "lars"\ntrust-coefficient = 0.02\nlr-schedule = "step"\n'
                    'lr-decay-epochs = [10, 15]\nexclude-from-adaptation = "*.b"\n')
    settings = build_config(load_toml(path), {})
    assert (settings.trust_coefficient, settings.lr_decay_epochs, settings.exclude_from_adaptation) == (0.02, [10.0, 15.0], "*.b")
    path.write_text('lr-decay-epochs = ["ten"]\n')
    with pytest.raises(UsageError, match="`lr_decay_epochs` must be comma-separated epochs"):
        load_toml(path)


def test_noise_scale_on_needs_two_batch_sizes():
    with pytest.raises(UsageError, match="needs gradients at two batch sizes"):
        Trainer(config(noise_scale="on"), LocalCommunicator(), data())
    assert Trainer(config(noise_scale="auto"), LocalCommunicator(), data()).noise is None
    assert Trainer(config(noise_scale="auto", accumulate=2), LocalCommunicator(), data()).noise is not None


@pytest.mark.mpi(min_size=2)
def test_noise_scale_is_not_measured_while_overlapping():
    comm = mpi_comm()
    with pytest.raises(UsageError, match="`bucket_mb` 0"):
        Trainer(config(noise_scale="on", bucket_mb=1.0), comm, data())
    assert Trainer(config(noise_scale="auto", bucket_mb=1.0), comm, data()).noise is None
    assert Trainer(config(noise_scale="auto"), comm, data()).noise is not None


@pytest.mark.parametrize("flags, message", [
    (["--lr-schedule", "step", "--lr-decay-epochs", "3,2"], "--lr-decay-epochs must increase"),
    (["--optimizer", "lars", "--trust-coefficient", "0"], "--trust-coefficient must be > 0"),
    (["--lr-decay-factor", "-0.1"], "--lr-decay-factor must be > 0"),
    (["--lr-schedule", "exp"], "invalid choice: 'exp'"),
])
def test_bad_flags_exit_2_with_one_message(dpflow, flags, message):
    result = dpflow("train", "--epochs", "4", *flags, timeout=60)
    assert result.returncode == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error") == 1


def test_cli_reports_the_rule_and_writes_each_steps_lr(dpflow, tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = dpflow("train", "--epochs", "2", "--optimizer", "lamb", "--lr", "0.01", "--lr-scaling", "sqrt",
                    "--batch-size", "128", "--lr-schedule", "cosine", "--accumulate", "2", "--log-every", "1",
                    "--metrics", metrics, timeout=120)
    assert result.returncode == 0, result
    assert "lr 0.02 (lamb trust 1 on 3 of 6 parameters, sqrt scaling from 0.01, cosine to 0)" in result.stdout
    assert "gradient noise scale (last epoch):" in result.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if r.get("test_loss") is None]
    epochs = [r for r in records if r.get("test_loss") is not None]
    assert [r["lr"] for r in steps] == [lr for r in epochs for lr in r["lrs"]]
    assert steps[0]["lr"] == pytest.approx(0.02) and steps[-1]["lr"] < 0.01
    assert all(r["noise_scale"] > 0 for r in epochs)
