"""The timeline: Chrome trace events per rank, merged by rank 0, partial files on an abort."""

import json
import time

import pytest

from dpflow.comm import LocalCommunicator
from dpflow.trace import Tracer, partial_path


def test_spans_become_complete_events_on_the_ranks_track(tmp_path):
    tracer = Tracer(rank=0)
    tracer.align_clocks(LocalCommunicator())
    start = time.perf_counter()
    tracer.add("forward", start, start + 0.002, rows=128)
    with tracer.span("evaluation", "epoch"):
        pass
    path = tmp_path / "trace.json"
    tracer.gather_and_write(LocalCommunicator(), str(path))
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in spans] == ["forward", "evaluation"]
    forward = spans[0]
    assert forward["pid"] == 0 and forward["dur"] == pytest.approx(2000, abs=1)
    assert forward["args"] == {"rows": 128} and forward["ts"] >= 0
    assert spans[1]["ts"] >= forward["ts"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {f"rank 0 ({tracer.host})"}


def test_spans_before_alignment_shift_the_timeline_to_start_at_zero(tmp_path):
    tracer = Tracer(rank=0)
    early = time.perf_counter()
    tracer.add("start-up", early, early + 0.001)
    tracer.align_clocks(LocalCommunicator())
    path = tmp_path / "trace.json"
    tracer.gather_and_write(LocalCommunicator(), str(path))
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert spans[0]["ts"] == 0


def test_an_aborting_job_merges_the_partial_files_it_finds(tmp_path):
    path = str(tmp_path / "trace.json")
    zero = time.perf_counter()
    other = Tracer(rank=2)
    other.zero = zero
    other.add("backward", zero + 0.001, zero + 0.002)
    other.write_partial(path)
    root = Tracer(rank=0)
    root.zero = zero
    root.add("sync", zero, zero + 0.003)
    root.merge_partials(path, size=3)  # rank 1 wrote nothing: it hangs
    trace = json.loads(open(path).read())
    assert trace["otherData"]["complete"] is False
    tracks = {(e["pid"], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert tracks == {(0, "sync"), (2, "backward")}
    assert partial_path(path, 2).endswith(".rank2")


def test_two_ranks_that_both_end_the_job_keep_each_others_spans(tmp_path):
    """With rank 0 stopped, ranks 1 and 2 both time out and both merge: the one that merged
    second found the first one's partial file already merged away and wrote its own spans
    alone over the first merge. Files of another run (another token) are never merged."""
    path = str(tmp_path / "trace.json")
    zero = time.perf_counter()
    ranks = {rank: Tracer(rank=rank) for rank in (1, 2)}
    for rank, tracer in ranks.items():
        tracer.zero, tracer.run = zero, "job-a"
        tracer.add("forward", zero + rank * 1e-3, zero + rank * 1e-3 + 1e-4)
        tracer.write_partial(path)
    stale = Tracer(rank=0)
    stale.zero, stale.run = zero, "an earlier job"
    stale.add("forward", zero, zero + 1e-4)
    stale.write_partial(path)
    ranks[2].merge_partials(path, size=3)
    ranks[1].merge_partials(path, size=3)
    trace = json.loads(open(path).read())
    tracks = sorted({e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"})
    assert tracks == [1, 2], tracks
    assert trace["otherData"]["complete"] is False
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 2  # each rank's span once


# --- the timeline of real runs -------------------------------------------------------------

import contextlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402

from helpers import INJECT, run  # noqa: E402



def spans_by_rank(path):
    trace = json.loads(open(path).read())
    by_rank = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            by_rank.setdefault(event["pid"], []).append(event)
    return trace, by_rank


def test_train_trace_has_every_phase_on_every_rank(dpflow, tmp_path):
    path = tmp_path / "run.json"
    result = dpflow("train", "--epochs", "2", "--checkpoint-dir", tmp_path / "ckpt", "--trace", path,
                    "--bucket-mb", "0.01", ranks=2, timeout=120)
    assert result.returncode == 0, result
    trace, by_rank = spans_by_rank(path)
    assert trace["otherData"]["complete"] is True
    assert sorted(by_rank) == [0, 1]
    for rank, spans in by_rank.items():
        names = {span["name"] for span in spans}
        assert {"gather", "forward", "backward", "wait for buckets", "check", "update", "evaluation",
                "load the dataset", "build the model, broadcast rank 0's parameters"} <= names, (rank, names)
        assert any(name.startswith("bucket ") for name in names), names
        steps = [s for s in spans if s["name"] == "forward"]
        assert all(a["ts"] < b["ts"] for a, b in zip(steps, steps[1:]))  # in order, one per step
    writes = [s for s in by_rank[0] if s["name"] == "checkpoint write"]
    assert len(writes) == 2 and writes[0]["args"]["step"] > 0
    # Ranks' clocks share a zero: rank 1's first step starts near rank 0's, not seconds apart.
    first = {rank: min(s["ts"] for s in spans if s["name"] == "forward") for rank, spans in by_rank.items()}
    assert abs(first[0] - first[1]) < 1e6, first


def test_a_crashed_rank_leaves_its_trace(tmp_path):
    path = tmp_path / "crash.json"
    result = run([sys.executable, INJECT, "1", "5", "raise", "train", "--epochs", "50", "--trace", str(path)],
                 ranks=2, timeout=60)
    assert result.returncode != 0 and "injected failure" in result.stderr, result
    trace, by_rank = spans_by_rank(path)
    assert trace["otherData"]["complete"] is False
    assert len([s for s in by_rank[1] if s["name"] == "forward"]) == 4  # steps 1-4, then the fault
    # Rank 0, told over the side channel, ends the job and merges its own spans with rank 1's.
    assert sorted(by_rank) == [0, 1], sorted(by_rank)
    assert not [p for p in os.listdir(tmp_path) if ".rank" in p], "partial files are merged away"


@contextlib.contextmanager
def killed_at_exit(pid):
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_hang_can_be_read_from_the_trace(tmp_path):
    from test_faults import finish, rank_of, rank_pids, start_training, steps_logged, wait_for

    path = tmp_path / "hang.json"
    process, metrics = start_training(tmp_path, "--epochs", "400", "--stall-timeout", "3", "--trace", path, ranks=3)
    wait_for(lambda: steps_logged(metrics) > 10, 60, "training to start")
    victim = next(pid for pid in rank_pids(str(metrics)) if rank_of(pid) == 2)
    os.kill(victim, signal.SIGSTOP)  # alive but silent
    with contextlib.suppress(ProcessLookupError), killed_at_exit(victim):
        code, stdout, stderr, _ = finish(process, 30)
    assert code != 0 and "no progress for" in stderr, stderr
    trace, by_rank = spans_by_rank(path)  # rank 0 merged what it had, and rank 1's partial
    assert trace["otherData"]["complete"] is False
    assert sorted(by_rank) == [0, 1], sorted(by_rank)
    last_step = {rank: max(s["ts"] for s in spans if s["name"] == "forward") for rank, spans in by_rank.items()}
    waits = [s for s in by_rank[0] if s["name"] == "allreduce"]
    assert waits and waits[-1]["ts"] <= last_step[0] + 1e6  # the spans stop where rank 0 got stuck


def test_bench_trace_and_its_cost(dpflow, tmp_path):
    path = tmp_path / "bench.json"
    result = dpflow("bench", "--features", "20", "--hidden", "16", "--classes", "3", "--batch-size", "16",
                    "--steps", "7", "--warmup", "2", "--json", "--trace", path, ranks=2, timeout=60)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    _, by_rank = spans_by_rank(path)
    for spans in by_rank.values():
        assert len([s for s in spans if s["name"] == "step"]) == 7  # the timed steps only
    assert report["trace_spans_per_step"] == 7  # step, gather, forward, backward, allreduce, check, update
    assert 0 < report["trace_cost_ms_per_step"] < report["step_ms"]


@pytest.mark.parametrize("command", ["train", "bench"])
def test_a_trace_path_that_cannot_be_written_is_bad_usage(dpflow, tmp_path, command):
    """Refused before any work, exit 2, one line: a directory, a missing parent, and a file
    that is not a regular one (a FIFO here; as root, /dev/null was replaced by a regular file)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    small = ["--epochs", "1"] if command == "train" else ["--features", "20", "--hidden", "16", "--steps", "3",
                                                           "--warmup", "1"]
    for path, said in [(tmp_path, f"is a directory; give a file path, e.g. {tmp_path / 'trace.json'}"), (tmp_path / "missing" / "t.json", "does not exist"),
                       (fifo, "not a regular file")]:
        result = dpflow(command, *small, "--trace", path, ranks=2, timeout=60)
        assert result.returncode == 2, result
        assert "--trace" in result.stderr and said in result.stderr, result
        assert "Traceback" not in result.stderr and "failed:" not in result.stderr, result
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]  # no temporary file left


FIT_TWICE = """
import sys
import dpflow
from dpflow import trainer

dpflow.fit("mlp", "digits", epochs=1, quiet=True, trace=sys.argv[1])
original = trainer.Trainer.train_step

def faulty(self, *args):
    if self.comm.rank == 1 and self.global_step == 3:
        raise RuntimeError("a bug on rank 1")
    return original(self, *args)

trainer.Trainer.train_step = faulty
dpflow.fit("mlp", "digits", epochs=1, quiet=True)  # no trace this time
"""


def test_a_later_run_that_fails_leaves_an_earlier_runs_trace_alone(tmp_path):
    script, path = tmp_path / "fit_twice.py", tmp_path / "first.json"
    script.write_text(FIT_TWICE)
    result = run([sys.executable, str(script), str(path)], ranks=2, timeout=60)
    assert result.returncode != 0 and "a bug on rank 1" in result.stderr, result
    trace, by_rank = spans_by_rank(path)
    assert trace["otherData"]["complete"] is True and sorted(by_rank) == [0, 1]
    assert sorted(os.listdir(tmp_path)) == ["first.json", "fit_twice.py"]


def test_a_trace_that_cannot_be_written_at_the_end_costs_the_run_nothing(tmp_path, monkeypatch, capsys):
    # A full disk when the trace is written: a warning, and the final save still happens.
    import errno

    import dpflow.trace
    from dpflow.cli import main

    def full_disk(path, events, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(dpflow.trace, "write_trace", full_disk)
    status = main(["train", "--epochs", "1", "--quiet", "--trace", str(tmp_path / "run.json"),
                   "--save", str(tmp_path / "p.npz")])
    stderr = capsys.readouterr().err
    assert status == 0, stderr
    assert "warning: the trace could not be written to `trace`" in stderr and "No space left" in stderr, stderr
    assert (tmp_path / "p.npz").exists() and not (tmp_path / "run.json").exists()
