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
