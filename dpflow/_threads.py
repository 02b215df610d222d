"""One BLAS thread pool per rank, sized at run time when the communicator is created.

N ranks that each start a thread per core oversubscribe the node: on 2 shared cores that ran
8x to 250x slower than one thread per rank. Environment variables only work if they are set
before numpy first loads its BLAS, which a script that imports numpy before dpflow has
already done; so the pools are resized in the running process (threadpoolctl, which speaks
to OpenBLAS, MKL, BLIS and OpenMP alike), and the caller's environment is left untouched.
"""

import os

from .launcher import cores

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def chosen_threads(environ=os.environ):
    """The thread count the user set in the environment, or None."""
    for name in THREAD_VARIABLES:
        if environ.get(name, "").isdigit() and int(environ[name]) > 0:
            return int(environ[name])
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
