"""A timeline of a run in the Chrome trace format: the JSON that the Perfetto UI
(ui.perfetto.dev) and chrome://tracing open. One track per rank, one span per phase.

The loop already reads the clock around every phase of a step (for its phase times), so a
span costs one tuple appended to a list; with tracing off the loop holds `None` and pays a
single `if`. Neither numpy nor MPI here: the collective parts take a communicator.

Clocks: every rank reads `time.perf_counter()` right after the same barrier, and rank 0's
reading becomes the common zero. Ranks leave a barrier within microseconds of each other on
one node and about one network latency apart across nodes: that is the alignment's error.
"""

import contextlib
import json
import os
import socket
import threading
import time


class Tracer:
    """This rank's spans: (name, category, start s, stop s, thread name, args)."""

    def __init__(self, rank=0):
        self.rank = rank
        self.host = socket.gethostname()
        self.spans = []
        self.zero = time.perf_counter()  # replaced by the aligned zero in align_clocks()
        self.run = None  # rank 0's token for this job, from align_clocks(): whose files to merge
        # Until its caller has checked the path, a failure must write nothing there.
        self.path_checked = False

    def add(self, name, start, stop, category="step", **args):
        """A span from two `time.perf_counter()` readings. Thread-safe (list.append)."""
        self.spans.append((name, category, start, stop, threading.current_thread().name, args))

    def span(self, name, category="step", **args):
        """`with tracer.span("evaluation"):` for phases outside the step's hot path."""
        return _Span(self, name, category, args)

    def align_clocks(self, comm, rounds=3):
        """The instant every rank leaves the same barrier becomes the zero of every rank's
        timeline. Collective."""
        self.run = comm.broadcast_object(f"{self.host}:{os.getpid()}:{time.time_ns()}" if comm.is_root else None)
        for _ in range(rounds):  # the first rounds warm up the connections
            comm.barrier()
        self.zero = time.perf_counter()

    def events(self):
        """This rank's spans as Chrome trace events (microseconds from the common zero)."""
        threads = {}
        events = [{"name": "process_name", "ph": "M", "pid": self.rank,
                   "args": {"name": f"rank {self.rank} ({self.host})"}},
                  {"name": "process_sort_index", "ph": "M", "pid": self.rank, "args": {"sort_index": self.rank}}]
        for name, category, start, stop, thread, args in self.spans:
            tid = threads.setdefault(thread, len(threads))
            event = {"name": name, "cat": category, "ph": "X", "pid": self.rank, "tid": tid,
                     "ts": round((start - self.zero) * 1e6, 3), "dur": round((stop - start) * 1e6, 3)}
            if args:
                event["args"] = args
            events.append(event)
        for thread, tid in threads.items():
            events.append({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid,
                           "args": {"name": thread}})
        return events

    def gather_and_write(self, comm, path):
        """Rank 0 writes every rank's spans to `path`. Collective."""
        every = comm.allgather_object(self.events())
        if comm.is_root:
            write_trace(path, [event for events in every for event in events])

    def write_partial(self, path):
        """This rank's spans alone, beside `path`: what an aborting job leaves to merge."""
        write_trace(partial_path(path, self.rank), self.events(), complete=False, shift=False, run=self.run)

    def merge_partials(self, path, size):
        """On a rank that ends the job: its own spans, every other rank's partial file found (a
        rank that hangs writes none: its track simply ends), and the tracks of a merge another
        rank of this job made first (when several ranks time out, each merges)."""
        events, merged, parts = self.events(), {self.rank}, []
        for rank in range(size):
            part = partial_path(path, rank)
            trace = read_trace(part, self.run)
            if trace is None:
                continue
            parts.append(part)
            if rank != self.rank:
                events += trace["traceEvents"]
                merged.add(rank)
        earlier = read_trace(path, self.run)
        if earlier is not None and not earlier["otherData"].get("complete", True):
            events += [event for event in earlier["traceEvents"] if event.get("pid") not in merged]
        write_trace(path, events, complete=False, shift=False, run=self.run)
        # Only now: a rank merging at the same time finds each track in a partial file or here.
        for part in parts:
            with contextlib.suppress(OSError):
                os.remove(part)


class _Span:
    __slots__ = ("tracer", "name", "category", "args", "start")

    def __init__(self, tracer, name, category, args):
        self.tracer, self.name, self.category, self.args = tracer, name, category, args

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.tracer.add(self.name, self.start, time.perf_counter(), self.category, **self.args)
        return False


def partial_path(path, rank):
    return f"{path}.rank{rank}"


def read_trace(path, run):
    """The trace file at `path` if this job (`run`) wrote it, else None (missing, unreadable, or
    another run's: never merged)."""
    try:
        with open(path) as handle:
            trace = json.load(handle)
    except (OSError, ValueError):
        return None
    return trace if trace.get("otherData", {}).get("run") == run else None


def write_trace(path, events, complete=True, shift=True, run=None):
    """Atomically: a reader never sees half a file. Spans from before the clocks were
    aligned (start-up) would start before 0: the whole timeline shifts to start at 0 (not in
    the files an abort leaves, which other ranks merge on the same zero)."""
    earliest = min((event["ts"] for event in events if "ts" in event), default=0.0)
    if shift and earliest < 0:
        for event in events:
            if "ts" in event:
                event["ts"] = round(event["ts"] - earliest, 3)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                       "otherData": {"complete": complete, "writer": "dpflow", "run": run}}, handle)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a full disk leaves no half file behind
            os.remove(tmp)
        raise
