"""When a rank fails: report it once, end every rank of the job, never hang.

An uncaught exception on one rank would leave the others waiting in a collective forever
(mpi4py finalizes MPI at exit, which waits for them). So:
- `end_command` maps the exception that ended a command to an exit status (`errors.exit_status`)
  and reports it: an agreed error (every rank raised it) by rank 0 alone, anything else by
  `crash`, which prints one line naming the rank and host and aborts the whole job;
- the `Watchdog` aborts the job when no step finishes for a while (a dead rank, a cut link),
  after rank 0's stall survey named the ranks that never answered.
"""

import os
import sys
import threading
import time
import traceback

from .errors import DpflowError, exit_status
from .launcher import launcher_rank

# Output written just before MPI_Abort can be overtaken by the abort on its way through the
# launcher (hydra forwards the ranks' output and the abort separately); this much grace lets
# the line arrive first.
ABORT_GRACE_SECONDS = 1.0
SURVEY_SECONDS = 3.0  # how long rank 0 waits for the other ranks to say where they are
# Callables a rank runs before it reports its failure or ends the job, called with
# `aborting` True by the rank that calls MPI_Abort: what each rank holds is left behind to
# read (the trace of the run up to the crash or the hang).
LAST_WORDS = []


def say_last_words(aborting=False):
    for last_words in list(LAST_WORDS):
        try:
            last_words(aborting)
        except Exception:  # noqa: BLE001 - the abort must go on whatever they do
            pass


def end_command(comm, error, spell=str):
    """Report `error`, which ended a command, and return the exit status; for an error that
    not every rank shares, end the whole job. `spell` shows a setting's name (as a flag)."""
    status = exit_status(error)
    rank = comm.rank if comm else launcher_rank()
    if isinstance(error, DpflowError) and error.agreed:
        if rank == 0:
            sys.stderr.write(f"dpflow: {error.prefix}{error.render(spell)}\n")
        return status
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stop now, unsaved
        sys.stderr.write("dpflow: interrupted again; stopping at once without a checkpoint\n")
        sys.stderr.flush()
        if comm is not None and comm.size > 1:
            comm.abort(status)
        return status
    return crash(comm, error)


def print_and_abort(comm, line):
    """Rank 0's end of a failure report: print it once, end the job."""
    say_last_words(aborting=True)
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
    what = (f"sys.exit({error.code!r}) was called during the run (code run by dpflow must return or "
            "raise, never exit: the other ranks would wait for this one)" if isinstance(error, SystemExit)
            else f"{type(error).__name__}: {error}")
    line = f"dpflow: rank {rank} on {host} failed: {what}"
    say_last_words()  # before the report: rank 0 may abort the job as soon as it has it
    if comm is None or comm.size == 1:
        sys.stderr.write(line + "\n")
        return 1
    if comm.report_failure_to_root(line):
        time.sleep(ABORT_GRACE_SECONDS + 3)  # rank 0 prints the line and aborts the job; if it cannot, we do
    print_and_abort(comm, line)


class SafetyNet:
    """While a command runs: an exception in any thread crashes the job, and the side
    channel carries other ranks' failure reports and answers rank 0's stall survey."""

    def __init__(self, comm):
        self.comm = comm
        self.watchdog = None  # the running Watchdog, which says where this rank is

    def where(self):
        return self.watchdog.describe() if self.watchdog else "not training"

    def __enter__(self):
        threading.excepthook = lambda hook_args: crash(self.comm, hook_args.exc_value)
        self.comm.start_listener(lambda line: print_and_abort(self.comm, line), self.where)
        return self

    def __exit__(self, exc_type, error, tb):
        # An error on this rank alone goes on to `crash`, which reports it to rank 0 over the
        # side channel and ends the job: rank 0 must still be listening then (it prints the
        # report, and merges the trace). The listener stops wherever the process goes on.
        crashing = self.comm.size > 1 and isinstance(error, Exception) and not (
            isinstance(error, DpflowError) and error.agreed)
        if not crashing:
            self.comm.stop_listener()

    def start_watchdog(self, timeout, what):
        """A Watchdog that, on a stall, reports and aborts the job. Rank 0 first asks every
        rank where it is, and names the ranks that never answer: dead, stopped, or cut off.
        `what` names the setting, for the message."""
        comm = self.comm

        def on_stall(waited, where):
            line = f"dpflow: rank {comm.rank} on {comm.hostname()}: no progress for {waited:.0f} s (stuck at {where})"
            if comm.is_root:
                answers = comm.survey(SURVEY_SECONDS)
                silent = [rank for rank, answer in answers.items() if answer is None]
                if silent:
                    line += f"; ranks {silent} never answered: dead, stopped or cut off"
                line += "".join(f"; rank {rank} is at {answer}" for rank, answer in answers.items() if answer)
            else:
                say_last_words()  # while rank 0 surveys: its report merges what we leave
                time.sleep(SURVEY_SECONDS + 3)  # rank 0 surveys and reports; if it cannot, we do
                line += "; another rank died or the network is cut"
            print_and_abort(comm, f"{line}. Aborting the job ({what} {timeout:g}).")

        self.watchdog = Watchdog(timeout if comm.size > 1 else 0, on_stall)
        return self.watchdog


class Watchdog:
    """Calls `on_stall` when no step has finished for `timeout` seconds (0: never).

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
