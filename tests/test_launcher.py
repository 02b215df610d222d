"""What dpflow reads from, and adds to, the environment a launcher gives it (pure functions)."""

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
