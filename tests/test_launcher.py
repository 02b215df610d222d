"""What dpflow reads from, and adds to, the environment a launcher gives it (pure functions)."""

from dpflow import launcher
from dpflow.launcher import mpich_settings, open_mpi_settings, started_by_slurm_pmi

# As Slurm's mpi/pmi2 plugin and MPICH's hydra set them (seen on the test cluster).
SRUN_PMI2 = {"PMI_FD": "11", "PMI_JOBID": "1.0", "PMI_RANK": "0", "PMI_SIZE": "4",
             "SLURM_MPI_TYPE": "pmi2", "SLURM_JOB_ID": "1"}
HYDRA = {"PMI_FD": "9", "PMI_RANK": "0", "PMI_SIZE": "4", "PMI_HOSTNAME": "node0",
         "HYDI_CONTROL_FD": "7", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0"}
# mpiexec inside `salloc -N 2`: hydra's proxies started by srun, the ranks by the proxies.
HYDRA_IN_SLURM = {"PMI_FD": "5", "PMI_RANK": "0", "PMI_SIZE": "4", "PMI_HOSTNAME": "node0",
                  "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0", "PMI_JOBID": "1.0",
                  "SLURM_MPI_TYPE": "pmi2", "SLURM_JOB_ID": "1"}


def test_srun_pmi2_gets_the_ofi_netmod():
    assert started_by_slurm_pmi(SRUN_PMI2)
    assert mpich_settings(SRUN_PMI2) == {"MPIR_CVAR_CH4_NETMOD": "ofi"}


def test_a_netmod_the_user_chose_wins():
    assert mpich_settings({**SRUN_PMI2, "MPIR_CVAR_CH4_NETMOD": "ucx"}) == {}


def test_other_launchers_get_nothing():
    # hydra, also inside an allocation; srun --mpi=pmix or none; no launcher at all.
    for environ in (HYDRA, HYDRA_IN_SLURM,
                    {**SRUN_PMI2, "SLURM_MPI_TYPE": "pmix_v4"},
                    {"SLURM_MPI_TYPE": "none", "SLURM_JOB_ID": "1"}, {}):
        assert not started_by_slurm_pmi(environ), environ
        assert mpich_settings(environ) == {}, environ


def test_open_mpi_gets_its_shared_memory_windows_during_init_only():
    environ = {"PATH": "/bin"}
    with open_mpi_settings(environ) as added:
        assert environ["OMPI_MCA_osc"] == "^ucx" and added == {"OMPI_MCA_osc": "^ucx"}
    assert environ == {"PATH": "/bin"}  # the caller's environment, as it was
    chosen = {"OMPI_MCA_osc": "rdma"}
    with open_mpi_settings(chosen) as added:
        assert chosen == {"OMPI_MCA_osc": "rdma"} and added == {}
    assert chosen == {"OMPI_MCA_osc": "rdma"}


# Three hosts with one rank each, as hydra starts them (scripts/cluster --hosts 3).
HYDRA_3_HOSTS = {**HYDRA, "PMI_SIZE": "3", "MPI_LOCALNRANKS": "1"}


def test_ring_across_a_number_of_hosts_that_is_not_a_power_of_two():
    assert mpich_settings(HYDRA_3_HOSTS) == {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"}
    assert mpich_settings({**HYDRA, "PMI_SIZE": "6", "MPI_LOCALNRANKS": "2"})["MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM"] == "ring"
    srun_3 = {**SRUN_PMI2, "PMI_SIZE": "3", "SLURM_STEP_NUM_NODES": "3"}
    assert mpich_settings(srun_3) == {"MPIR_CVAR_CH4_NETMOD": "ofi", "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"}
    # A power of two (MPICH's Rabenseifner moves ring's bytes in fewer steps), one host (shared
    # memory), or a launcher that does not say where the ranks are: MPICH decides.
    for environ in ({**HYDRA_3_HOSTS, "PMI_SIZE": "4"}, {**HYDRA_3_HOSTS, "MPI_LOCALNRANKS": "3"},
                    {"PMI_RANK": "0", "PMI_SIZE": "3"}, {**srun_3, "SLURM_STEP_NUM_NODES": "1"}):
        assert "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM" not in mpich_settings(environ), environ


def test_an_allreduce_algorithm_the_user_chose_wins():
    for name in launcher.ALLREDUCE_VARIABLES:
        assert mpich_settings({**HYDRA_3_HOSTS, name: "auto"}) == {}
    environ = {**HYDRA_3_HOSTS, "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "auto"}
    assert launcher.allreduce_algorithm("MPICH Version: 5.0.2", 3, environ) == "rabenseifner"
    environ["MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM"] = "recursive_doubling"
    assert launcher.allreduce_algorithm("MPICH Version: 5.0.2", 3, environ) == "recursive doubling"
    environ["MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM"] = "tree"  # not in the cost model
    assert launcher.allreduce_algorithm("MPICH Version: 5.0.2", 3, environ) is None


def test_what_dpflow_sets_is_named_and_the_model_knows_what_runs():
    environ = dict(HYDRA_3_HOSTS)
    assert launcher.apply_mpich_settings(environ) == {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"}
    assert environ["MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM"] == "ring"
    assert launcher.allreduce_setting(environ) == ("ring", "dpflow")
    assert launcher.apply_mpich_settings(environ) == {}  # what it set, it does not set again
    # dpflow's own setting for 3 hosts does not pass for the user's at 2 or 4.
    mpich = "MPICH Version: 5.0.2"
    assert [launcher.allreduce_algorithm(mpich, p, environ) for p in (2, 3, 4, 5, 8)] == [
        "rabenseifner", "ring", "rabenseifner", "ring", "rabenseifner"]
    assert launcher.allreduce_algorithm(mpich, 1, environ) == "rabenseifner"  # one host: nothing crosses a link
    # Open MPI's tuned module runs Rabenseifner for a gradient, whatever MPICH's variables say.
    assert launcher.allreduce_algorithm("Open MPI v5.0.11", 3, environ) == "rabenseifner"
    assert launcher.allreduce_setting(HYDRA) == (None, None)
    environ = {**HYDRA_3_HOSTS, "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"}
    assert launcher.apply_mpich_settings(environ) == {} and launcher.allreduce_setting(environ) == ("ring", "user")
