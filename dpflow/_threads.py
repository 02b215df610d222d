"""One BLAS thread pool per rank, sized at run time when the communicator is created.

N ranks that each start a thread per core oversubscribe the node: on 2 shared cores that ran
8x to 250x slower than one thread per rank. Environment variables only work if they are set
before numpy first loads its BLAS, which a script that imports numpy before dpflow has
already done; so the pools are resized in the running process (threadpoolctl, which speaks
to OpenBLAS, MKL, BLIS and OpenMP alike), and the caller's environment is left untouched.
"""

import os
import re

from .errors import UsageError
from .launcher import cores

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def chosen_threads(environ=os.environ):
    """The thread count the user set in the environment, or None: unset, empty or 0 leaves
    the choice to dpflow (OpenBLAS too reads 0 as its default). OMP_NUM_THREADS may list the
    counts of nested levels (`4,2`): the first is this one's. Any other value is a typing
    mistake the BLAS would silently ignore: a UsageError names it."""
    for name in THREAD_VARIABLES:
        value = environ.get(name, "").strip()
        count = value.split(",")[0].strip() if name == "OMP_NUM_THREADS" else value
        if value and not re.fullmatch(r"[0-9]+", count):
            raise UsageError(f"{name}={environ[name]!r} is not a thread count; set it to a positive "
                             f"integer such as 1, or unset it to let dpflow divide the cores among the ranks")
        if value and int(count) > 0:
            return int(count)
    return None


def threads_per_rank(local_size, environ=os.environ):
    """The user's choice, or this process's cores divided by the ranks on its node (>= 1)."""
    return chosen_threads(environ) or max(1, cores() // max(local_size, 1))


def size_blas_threads(local_size, environ=os.environ):
    """Resize every BLAS and OpenMP pool loaded in this process to `threads_per_rank`.
    Returns the count now in effect. Libraries loaded later keep their own default."""
    from threadpoolctl import threadpool_limits

    threads = threads_per_rank(local_size, environ)
    threadpool_limits(limits=threads)
    return blas_threads_in_use() or threads


def blas_threads_in_use():
    """The thread count of the BLAS numpy calls (the largest, if several are loaded), read
    from the library itself; None when no BLAS is loaded."""
    import numpy  # noqa: F401 - loads the BLAS that is asked below
    from threadpoolctl import threadpool_info

    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return max(counts) if counts else None


def blas_description():
    """'openblas 0.3.31 (SkylakeX kernel)' for the BLAS numpy calls, or 'unknown'."""
    import numpy  # noqa: F401
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool["user_api"] == "blas":
            kernel = f" ({pool['architecture']} kernel)" if pool.get("architecture") else ""
            return f"{pool['internal_api']} {pool.get('version') or ''}".strip() + kernel
    return "unknown"
