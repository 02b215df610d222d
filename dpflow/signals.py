"""Stop requests: SIGINT or SIGTERM ask every rank to stop at the next step boundary.

A signal only sets this rank's flag; the trainer sends it through the gradient allreduce
and stops when the reduced flag says any rank was signalled, so all ranks stop at the same
step, rank 0 writes the stop checkpoint, and no collective is left waiting.

Signals that arrive together are one request. A scheduler's `scancel` or time limit sends
SIGTERM to every process of the job, and MPICH's `mpiexec` forwards its own copy to each
rank, so a rank gets the same SIGTERM twice within milliseconds, in either order; a
terminal's Ctrl-C reaches mpiexec and the ranks alike. None of these may skip the
checkpoint. Only a second Ctrl-C (SIGINT) at least IMPATIENT_SECONDS after the first is
taken as a person who will not wait: it stops at once (KeyboardInterrupt) without the
stop checkpoint; the checkpoints already written stay whole (they are written atomically).
"""

import signal
import time

IMPATIENT_SECONDS = 5.0


class StopRequest:
    """This rank's stop request: the signal that asked for it first, or None."""

    def __init__(self, clock=time.monotonic):
        self.signum = None
        self.first = None
        self.clock = clock

    def install(self):
        """Handle SIGINT and SIGTERM in this process (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.request)
        return self

    def request(self, signum, frame=None):
        now = self.clock()
        if self.signum is None:
            self.signum, self.first = signum, now
        elif signum == signal.SIGINT and now - self.first >= IMPATIENT_SECONDS:
            raise KeyboardInterrupt
        # Anything else is the same request again: the launcher's copy of the scheduler's
        # SIGTERM, or a Ctrl-C right after it.

    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a signal to another rank"
