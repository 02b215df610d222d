"""One BLAS thread pool per rank, sized before numpy is first imported.

N ranks that each start a thread per core oversubscribe the machine and run slower than
one process (NOTES.md). So, unless the user already chose, each rank gets the cores of its
node divided by the ranks on that node (launchers export that count), and at least one.
"""

import os

from .launcher import cores, local_ranks

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def blas_threads(environ=os.environ):
    """The thread count the user chose, or cores // ranks on this node."""
    for name in THREAD_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return max(1, cores() // local_ranks(environ))


def configure_blas_threads(environ=os.environ):
    """Set the thread variables the user left unset (only effective before numpy loads)."""
    if any(name in environ for name in THREAD_VARIABLES):
        return
    threads = str(blas_threads(environ))
    for name in THREAD_VARIABLES:
        environ[name] = threads
