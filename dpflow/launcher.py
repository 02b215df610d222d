"""What MPI launchers tell a process through its environment, read before MPI starts.

No numpy and no mpi4py here: the CLI reads it before MPI is initialised (to print usage
errors once, from rank 0).
"""

import os

# mpiexec (MPICH hydra) and srun --mpi=pmi2 set PMI_*, PMIx launchers PMIX_RANK, Open MPI's
# mpirun OMPI_COMM_WORLD_*.
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _first_int(names, environ):
    for name in names:
        value = environ.get(name, "").split("(")[0]  # Slurm may say "2(x3)"
        if value.isdigit():
            return int(value)
    return None


def launched_by_mpi(environ=os.environ):
    """True when a launcher (mpiexec, mpirun, srun --mpi=...) started this process."""
    return _first_int(RANK_VARIABLES + SIZE_VARIABLES, environ) is not None


def launcher_rank(environ=os.environ):
    """This process's rank as the launcher exported it; 0 without a launcher."""
    return _first_int(RANK_VARIABLES, environ) or 0


def launcher_size(environ=os.environ):
    """The world size the launcher started, or None if it did not say."""
    return _first_int(SIZE_VARIABLES, environ)


def cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
