"""Run `dpflow` with a fault injected into one rank, for the failure tests.

    mpiexec -n 4 python tests/inject_fault.py RANK STEP KIND dpflow-args...

KIND: `raise` (an exception in the training step), `nan` (that rank's loss gradient becomes
NaN), `exit` (the rank calls os._exit(3) as if it crashed), `sigterm` (the rank sends itself
one SIGTERM, once, as a preempted job's rank receives it), `hold` (the rank creates
$DPFLOW_HOLD_DIR/held before step STEP and waits, for at most 60 s, until the test creates
$DPFLOW_HOLD_DIR/release: the whole job stands still at a known step while the test sends
its signals; it creates $DPFLOW_HOLD_DIR/signalled once it has a stop request). The fault fires on rank RANK when
the global step reaches STEP; every other rank runs dpflow unchanged, through the same
`dpflow.cli.main` the console script calls. With DPFLOW_INJECT_ONCE=FILE set, the fault
fires only if FILE does not exist yet, and creates it: a fault that a restart survives.
With DPFLOW_INJECT_AFTER=GLOB set, it fires at the first step from STEP on at which a file
matches GLOB (e.g. a checkpoint, which rank 0 writes in the background: a rank that died
before that write ended would leave no checkpoint to resume from).
"""

import glob
import os
import signal
import sys
import time

import numpy as np

from dpflow import cli, trainer

rank, step, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
original_step = trainer.Trainer.train_step
signalled = []


def ready():
    pattern = os.environ.get("DPFLOW_INJECT_AFTER")
    return not pattern or bool(glob.glob(pattern))


def first_time():
    marker = os.environ.get("DPFLOW_INJECT_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def faulty_step(self, permutation, micro_batches):
    if self.comm.rank == rank and self.global_step + 1 >= step and ready() and first_time():
        if kind == "raise":
            raise RuntimeError(f"injected failure at step {self.global_step + 1}")
        if kind == "exit":
            os._exit(3)
        if kind == "hold" and self.global_step + 1 == step:
            hold = os.environ["DPFLOW_HOLD_DIR"]
            open(os.path.join(hold, "held"), "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(hold, "release")) and time.monotonic() < deadline:
                time.sleep(0.01)  # signals are handled here, between sleeps
                if self.stop.signum and not os.path.exists(os.path.join(hold, "signalled")):
                    open(os.path.join(hold, "signalled"), "w").close()
        if kind == "nan":  # from now on this rank's batches are all NaN
            self.x_train = np.full_like(self.x_train, np.nan)
        if kind == "sigterm" and not signalled:
            signalled.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # handled before the step's forward starts
    return original_step(self, permutation, micro_batches)


trainer.Trainer.train_step = faulty_step
sys.exit(cli.main(sys.argv[4:]))
