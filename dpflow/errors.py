"""Every exception dpflow raises on purpose, each with the exit status the command line gives it.

The library raises these in its own words: the names of settings, in backquotes
(`batch_size`), never command-line flags, so a Python user is told what to change in their
code; the command line shows each named setting as its flag (`--batch-size`).

`agreed` errors are raised by every rank together (at the same step, or after the ranks
shared their verdicts), so rank 0 alone reports them and every rank exits with the status;
any other exception on one rank ends the whole job (see `failure`).
"""

import re


def spell_settings(text, spell):
    """`text` with each `name` in backquotes spelled by `spell(name)` (e.g. as a flag); a
    name `spell` does not know (None) stays as it is."""
    return re.sub(r"`([A-Za-z_]\w*)`", lambda match: spell(match.group(1)) or match.group(0), text)


class DpflowError(Exception):
    """Base class: a failure dpflow expected and can explain."""

    exit_status = 1
    agreed = True
    prefix = "error: "  # how the command line introduces the message

    def render(self, spell):
        """The message with each setting named by `spell` (see `spell_settings`)."""
        return spell_settings(str(self), spell)


class UsageError(DpflowError, ValueError):
    """Bad settings, flags or config file: one message, exit status 2, no traceback."""

    exit_status = 2


class DataError(UsageError):
    """A dataset that cannot be used: missing, unreadable, truncated or mis-shaped."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, damaged or from another model."""


class MismatchedMPI(UsageError, RuntimeError):
    """mpi4py's MPI library is not the launcher's: fix the environment, exit status 2."""


class TrainingError(DpflowError, RuntimeError):
    """A failure every rank agrees on (divergence, ranks that drifted apart): exit status 1."""

    prefix = "training failed: "


class Interrupted(DpflowError):
    """Every rank stopped at the same step boundary after SIGINT or SIGTERM: 128 + signal."""

    prefix = ""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_status = 128 + self.signum


class GraphError(DpflowError, ValueError):
    """A graph that cannot run: a cycle, a shape that does not fit, a bad value fed in.
    Raised by one rank's own graph, so it is not agreed: it ends the job like any crash."""

    agreed = False


def exit_status(error):
    """The process exit status for an exception that ended a command (cf. mpi4py's
    `run.set_abort_status`): the error's own status, 130 for a Ctrl-C, 1 for anything else."""
    if isinstance(error, DpflowError):
        return error.exit_status
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1
