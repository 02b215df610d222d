"""Stop requests: SIGINT or SIGTERM ask every rank to stop at the next step boundary.

A signal only sets this rank's flag; the trainer sends it through the gradient allreduce
and stops when the reduced flag says any rank was signalled, so all ranks stop at the same
step and no collective is left waiting. A second signal stops at once (KeyboardInterrupt).
"""

import signal


class StopRequest:
    """This rank's stop request: the signal that asked for it, or None."""

    def __init__(self):
        self.signum = None

    def install(self):
        """Handle SIGINT and SIGTERM in this process (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.request)

    def request(self, signum, frame=None):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a signal to another rank"
