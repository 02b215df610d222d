"""What MPI launchers tell a process through its environment, and whether this node's
/dev/shm has room for MPI: read before MPI starts.

No numpy and no mpi4py here: the CLI reads it before MPI is initialised (to print usage
errors once, from rank 0).
"""

import contextlib
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


# Set by MPICH's hydra for its ranks, never by Slurm's mpi/pmi2 plugin.
HYDRA_VARIABLES = ("PMI_HOSTNAME", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def started_by_slurm_pmi(environ=os.environ):
    """True when Slurm's mpi/pmi2 plugin started this process (`srun --mpi=pmi2`, or plain
    `srun` where the cluster sets MpiDefault=pmi2); not under hydra, whose ranks inherit
    SLURM_MPI_TYPE and PMI_JOBID when srun started its proxies inside an allocation."""
    return ("PMI_FD" in environ and environ.get("SLURM_MPI_TYPE", "").startswith("pmi2")
            and not any(name in environ for name in HYDRA_VARIABLES))


NETMOD_VARIABLE = "MPIR_CVAR_CH4_NETMOD"
# MPICH reads the allreduce algorithm under any of these names; the first is the documented one.
ALLREDUCE_VARIABLES = ("MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM", "MPICH_ALLREDUCE_INTRA_ALGORITHM",
                       "MPIR_PARAM_ALLREDUCE_INTRA_ALGORITHM")
# The names of the settings dpflow added (comma-separated), so that a user's own stay told apart.
CHOSEN_VARIABLE = "DPFLOW_MPICH_SETTINGS"
# MPICH's names of the allreduce algorithms the cost model knows ("auto" is MPICH's own choice).
MPICH_ALGORITHMS = {"auto": "rabenseifner", "reduce_scatter_allgather": "rabenseifner", "ring": "ring",
                    "recursive_doubling": "recursive doubling"}


def power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


def spans_hosts(environ=os.environ):
    """True when the job's ranks are on more than one host, False on one, None when the launcher
    does not say. The same answer on every rank: hydra's count of ranks on this host equals the
    world size on every rank or on none; Slurm's node count is the step's."""
    size, local = launcher_size(environ), _first_int(LOCAL_SIZE_VARIABLES, environ)
    if size and local:
        return local < size
    nodes = _first_int(("SLURM_STEP_NUM_NODES",), environ)
    return nodes > 1 if nodes else None


def prefers_ring(size, several_hosts):
    """dpflow's allreduce for MPICH: ring across a number of ranks that is not a power of two.

    MPICH's own choice for a gradient, Rabenseifner, first folds the ranks beyond a power of two
    into their neighbours, whole vectors in and whole results out: on 3 hosts over 1 Gbit/s links
    it took 45-47 ms for a 2.1 MB gradient where ring took 24-25 (each host sent 1, 2 and 1 times
    the gradient instead of 1.33; see dpflow.costmodel). On a power of two both move the same
    bytes and Rabenseifner takes fewer steps; on one host the ranks share memory, where ring was
    slower, so both are left to MPICH."""
    return bool(several_hosts) and not power_of_two(size)


def mpich_settings(environ=os.environ):
    """MPICH settings this process needs before MPI starts and does not have: {name: value}.
    Every rank must get the same ones: they decide the algorithms of collectives.

    Under Slurm's mpi/pmi2 plugin: the OFI netmod, not UCX. The plugin reads each PMI-1
    request with one read() of at most 1024 bytes, yet advertises 1024-byte values; the
    MPICH wheel's PMI-1 client (it has no PMI-2 one) sends values up to that size plus the
    command and key. A longer request is cut in two: the plugin keeps a truncated value,
    rejects the rest ("request not begin with 'cmd='"), and MPI_Init fails or hangs. UCX's
    address exchange sends 511-byte slices of padded addresses, hex-encoded and run-length
    compressed; the padding is leftover heap, so whether a slice passes the limit depends
    on the environment. OFI sends one short address per node (16 bytes over TCP).

    Across hosts, on a number of ranks that is not a power of two: the ring allreduce
    (`prefers_ring`). A netmod or an allreduce algorithm the user chose wins.
    """
    settings = {}
    if started_by_slurm_pmi(environ) and NETMOD_VARIABLE not in environ:
        settings[NETMOD_VARIABLE] = "ofi"
    size = launcher_size(environ)
    if (size and prefers_ring(size, spans_hosts(environ))
            and not any(name in environ for name in ALLREDUCE_VARIABLES)):
        settings[ALLREDUCE_VARIABLES[0]] = "ring"
    return settings


def apply_mpich_settings(environ=os.environ):
    """Add `mpich_settings` to `environ`, naming them in DPFLOW_MPICH_SETTINGS. Before MPI starts."""
    settings = mpich_settings(environ)
    if settings:
        environ.update(settings)
        environ[CHOSEN_VARIABLE] = ",".join(sorted(settings))
    return settings


def chosen_by_dpflow(name, environ=os.environ):
    """True when dpflow, not the user, set the environment variable `name`."""
    return name in environ.get(CHOSEN_VARIABLE, "").split(",")


def allreduce_setting(environ=os.environ):
    """(value, whose) of MPICH's allreduce algorithm variable: whose is "dpflow" or "user";
    (None, None) when neither set one."""
    for name in ALLREDUCE_VARIABLES:
        if name in environ:
            return environ[name], "dpflow" if chosen_by_dpflow(name, environ) else "user"
    return None, None


def allreduce_algorithm(library, hosts, environ=os.environ):
    """The cost model's name for the algorithm `library` runs for a gradient-sized allreduce
    across `hosts` hosts started by dpflow, or None for one the model does not know. MPICH: the
    user's setting, else dpflow's (`prefers_ring`), else its own, Rabenseifner. Open MPI: its
    tuned module's Rabenseifner (from 256 KB on 2-3 ranks, 8 KB from 4)."""
    if not str(library).startswith("MPICH"):
        return "rabenseifner"
    value, whose = allreduce_setting(environ)
    if whose != "user":
        return "ring" if prefers_ring(hosts, hosts > 1) else "rabenseifner"
    return MPICH_ALGORITHMS.get(value.strip().lower())


@contextlib.contextmanager
def open_mpi_settings(environ=os.environ):
    """Open MPI settings for MPI_Init, in `environ` while the block runs and gone after it (the
    caller's environment is the caller's): one-sided components other than UCX's.

    The gradient buffer of a one-node job is an MPI shared-memory window (see nodesum), which
    Open MPI serves with its `sm` component; its `ucx` component, asked first, prints "Error:
    OSC UCX component priority set inside component query failed" on every rank when it
    declines. Harmless under MPICH. A choice the user made wins.
    """
    added = {} if "OMPI_MCA_osc" in environ else {"OMPI_MCA_osc": "^ucx"}
    environ.update(added)
    try:
        yield added
    finally:
        for name in added:
            environ.pop(name, None)


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


# Ranks on this node, as hydra (MPI_LOCAL*) and Open MPI (OMPI_COMM_WORLD_LOCAL_*) say.
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
# MPICH maps about 1.06 MB of /dev/shm per rank on the node for the whole job (2.1 MB for
# 2 ranks, 4.2 MB for 4, measured); the warning starts at twice that, before the failure.
SHM_BYTES_PER_RANK = 2 * 2**20


def shared_memory_warning(path="/dev/shm", environ=os.environ):
    """A warning when `path` has too little room for this node's ranks, else None.

    MPI_Init maps a file there; on a full tmpfs a rank dies of SIGBUS before dpflow can say
    a word, and the launcher prints only "BAD TERMINATION". Docker gives a container 64 MB,
    and every killed job leaves its file behind, so this is where containers run out.
    Said by the node's first rank only."""
    if (_first_int(LOCAL_RANK_VARIABLES, environ) or 0) != 0:
        return None
    ranks = _first_int(LOCAL_SIZE_VARIABLES, environ) or 1
    try:
        stat = os.statvfs(path)
    except OSError:
        return None  # no /dev/shm: the MPI library uses something else
    free = stat.f_bavail * stat.f_frsize
    if free >= ranks * SHM_BYTES_PER_RANK:
        return None
    try:
        left = [os.path.join(path, name) for name in os.listdir(path) if name.startswith("mpich_shm_")]
        left_bytes = sum(os.stat(name).st_blocks * 512 for name in left)
    except OSError:
        left, left_bytes = [], 0
    message = (f"dpflow: warning: {path} has {free / 2**20:.1f} MB free and the {ranks} rank(s) on this "
               f"host need about {ranks * SHM_BYTES_PER_RANK / 2**20:.0f} MB there: MPI may die at start-up "
               "with a bus error.")
    if left:
        message += (f" {len(left)} file(s) of MPICH jobs hold {left_bytes / 2**20:.1f} MB of it ({path}/mpich_shm_*; "
                    "a killed job leaves its own: remove them when no job runs here).")
    return message + " In a container, give it more: docker run --shm-size 256m, or shm_size in compose."
