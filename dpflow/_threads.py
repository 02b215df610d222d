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
# The variables each library (threadpoolctl's internal_api) reads, in the order it reads them:
# a site's OMP_NUM_THREADS=1 does not undo a user's OPENBLAS_NUM_THREADS=2 in OpenBLAS itself.
LIBRARY_VARIABLES = {"openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
                     "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
                     "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
                     "openmp": ("OMP_NUM_THREADS",)}


def thread_count(name, environ=os.environ):
    """The count in the variable `name`, or None: unset, empty or 0 leaves the choice to
    dpflow (OpenBLAS too reads 0 as its default). OMP_NUM_THREADS may list the counts of
    nested levels (`4,2`): the first is this one's. Any other value is a typing mistake the
    BLAS would silently ignore: a UsageError names it."""
    value = environ.get(name, "").strip()
    count = value.split(",")[0].strip() if name == "OMP_NUM_THREADS" else value
    if value and not re.fullmatch(r"[0-9]+", count):
        raise UsageError(f"{name}={environ[name]!r} is not a thread count; set it to a positive "
                         f"integer such as 1, or unset it to let dpflow divide the cores among the ranks")
    return int(count) if value and int(count) > 0 else None


def check_thread_variables(environ=os.environ):
    """A UsageError for the first of the thread variables that is set but is not a count."""
    for name in THREAD_VARIABLES:
        thread_count(name, environ)


def chosen_threads(environ=os.environ, library=None):
    """The thread count the user set in the environment (for `library`, in the order it reads
    its variables), or None."""
    for name in LIBRARY_VARIABLES.get(library, THREAD_VARIABLES):
        count = thread_count(name, environ)
        if count:
            return count
    return None


def threads_per_rank(local_size, environ=os.environ, library=None):
    """The user's choice, or this process's cores divided by the ranks on its node (>= 1)."""
    return chosen_threads(environ, library) or max(1, cores() // max(local_size, 1))


def import_threadpoolctl():
    """threadpoolctl, imported without the KMP_DUPLICATE_LIB_OK=True that its import leaves in
    os.environ (for every process the caller starts to inherit: a flag that lets two OpenMP
    runtimes run in one process, which Intel warns may crash or give wrong results). It only
    finds and resizes libraries already loaded, so it does not need the flag afterwards."""
    unset = "KMP_DUPLICATE_LIB_OK" not in os.environ
    import threadpoolctl

    if unset:
        os.environ.pop("KMP_DUPLICATE_LIB_OK", None)
    return threadpoolctl


def size_blas_threads(local_size, environ=os.environ):
    """Resize every BLAS and OpenMP pool loaded in this process to its `threads_per_rank`.
    Returns the count now in effect. Libraries loaded later keep their own default."""
    threadpoolctl = import_threadpoolctl()
    limits = {pool["filepath"]: threads_per_rank(local_size, environ, pool["internal_api"])
              for pool in threadpoolctl.threadpool_info()}
    threadpoolctl.threadpool_limits(limits=limits)
    return blas_threads_in_use() or threads_per_rank(local_size, environ)


def blas_threads_in_use():
    """The thread count of the BLAS numpy calls (the largest, if several are loaded), read
    from the library itself; None when no BLAS is loaded."""
    import numpy  # noqa: F401 - loads the BLAS that is asked below

    counts = [pool["num_threads"] for pool in import_threadpoolctl().threadpool_info() if pool["user_api"] == "blas"]
    return max(counts) if counts else None


def numpy_blas():
    """threadpoolctl's description of the BLAS numpy calls, or None."""
    import numpy  # noqa: F401

    return next((pool for pool in import_threadpoolctl().threadpool_info() if pool["user_api"] == "blas"), None)


def blas_description():
    """'openblas 0.3.31 (SkylakeX kernel)' for the BLAS numpy calls, or 'unknown'."""
    pool = numpy_blas()
    if pool is None:
        return "unknown"
    kernel = f" ({pool['architecture']} kernel)" if pool.get("architecture") else ""
    return f"{pool['internal_api']} {pool.get('version') or ''}".strip() + kernel
