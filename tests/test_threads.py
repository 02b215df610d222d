"""BLAS thread pools are sized when the communicator is created, whatever the import order,
and importing dpflow leaves the caller's environment alone. Counts are read from the BLAS
library itself (threadpoolctl), never inferred from timing."""

import json
import os
import sys
import textwrap

import pytest
from helpers import run

from dpflow import _threads
from dpflow.errors import UsageError

UNSET = {name: None for name in _threads.THREAD_VARIABLES}

# A user's own loop: numpy (and so its BLAS, with a thread per core) first, dpflow after.
NUMPY_FIRST = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from threadpoolctl import threadpool_info

    def blas_threads():
        return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")

    environ = dict(os.environ)
    at_start = blas_threads()
    import dpflow
    from dpflow import Input
    from dpflow.parallel import DataParallel
    after_import = blas_threads()
    dp = DataParallel({"W": Input(np.ones((3, 2)), name="W")})
    report = json.dumps({"rank": dp.rank, "local": dp.comm.local_size, "at_start": at_start,
                      "after_import": after_import, "after_comm": blas_threads(),
                      "environ_unchanged": dict(os.environ) == environ})
    with open(f"{sys.argv[1]}.{dp.rank}", "w") as handle:  # one file per rank: no interleaving
        handle.write(report)
""")


def launch(tmp_path, ranks, env):
    script = tmp_path / "numpy_first.py"
    script.write_text(NUMPY_FIRST)
    result = run([sys.executable, str(script), str(tmp_path / "report")], ranks=ranks, env=env, timeout=120)
    assert result.returncode == 0, result
    return [json.loads((tmp_path / f"report.{rank}").read_text()) for rank in range(ranks)]


def test_a_numpy_first_script_gets_the_cores_per_rank(tmp_path):
    cores = len(os.sched_getaffinity(0))
    reports = launch(tmp_path, 2, UNSET)
    for report in reports:
        assert report["local"] == 2
        assert report["after_import"] == report["at_start"], "importing dpflow must not resize pools"
        assert report["after_comm"] == max(1, cores // 2), report
        assert report["environ_unchanged"], report


def test_the_users_thread_count_wins(tmp_path):
    for report in launch(tmp_path, 2, {**UNSET, "OPENBLAS_NUM_THREADS": "3"}):
        assert report["after_comm"] == 3, report


def test_importing_dpflow_changes_no_environment_variable():
    probe = ("import os; before = dict(os.environ)\n"
             "import dpflow, dpflow.cli, dpflow.trainer, dpflow.parallel\n"
             "print(dict(os.environ) == before)")
    result = run([sys.executable, "-c", probe], env=UNSET, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "True", result


def test_threads_per_rank_divides_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert _threads.threads_per_rank(1, {}) == cores
    assert _threads.threads_per_rank(cores * 2, {}) == 1
    assert _threads.threads_per_rank(4, {"OMP_NUM_THREADS": "5"}) == 5
    assert _threads.threads_per_rank(4, {"OMP_NUM_THREADS": "0"}) == max(1, cores // 4)
    assert _threads.threads_per_rank(4, {"OMP_NUM_THREADS": ""}) == max(1, cores // 4)
    assert _threads.threads_per_rank(4, {"OMP_NUM_THREADS": "3,2"}) == 3  # nested OpenMP levels
    for value in ("abc", "-1", "1.5", "²"):
        with pytest.raises(UsageError, match="is not a thread count"):
            _threads.threads_per_rank(4, {"OPENBLAS_NUM_THREADS": value})
    # Each variable is checked, not only the first one set: a typo behind a valid count is
    # still a typo.
    with pytest.raises(UsageError, match="OPENBLAS_NUM_THREADS='abc' is not a thread count"):
        _threads.check_thread_variables({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "abc"})


def test_sizing_the_pools_changes_no_environment_variable(tmp_path):
    """threadpoolctl sets KMP_DUPLICATE_LIB_OK=True in os.environ when imported (a flag that lets
    two OpenMP runtimes run side by side, which Intel warns may give wrong results), and every
    process the script starts would inherit it: dpflow imports it without leaving that behind."""
    probe = ("import os, sys; import numpy as np; before = dict(os.environ)\n"
             "from dpflow import Input; from dpflow.parallel import DataParallel\n"
             "dp = DataParallel({'W': Input(np.ones(3), name='W')})\n"
             "changed = {k: os.environ.get(k) for k in {*before, *os.environ} if os.environ.get(k) != before.get(k)}\n"
             "open(f'{sys.argv[1]}.{dp.rank}', 'w').write(repr(changed))")
    result = run([sys.executable, "-c", probe, str(tmp_path / "changed")], ranks=2,
                 env={**UNSET, "KMP_DUPLICATE_LIB_OK": None}, timeout=60)
    assert result.returncode == 0, result
    assert [(tmp_path / f"changed.{rank}").read_text() for rank in range(2)] == ["{}", "{}"]


def test_each_library_keeps_the_count_its_own_variable_asks_for(tmp_path):
    """OpenBLAS reads OPENBLAS_NUM_THREADS before OMP_NUM_THREADS (MKL: MKL_NUM_THREADS first):
    a site's OMP_NUM_THREADS=1 must not undo a user's OPENBLAS_NUM_THREADS=2."""
    for report in launch(tmp_path, 2, {**UNSET, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "2"}):
        assert report["at_start"] == 2, report  # what OpenBLAS itself took from the environment
        assert report["after_comm"] == 2, report
    environ = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "3"}
    assert [_threads.threads_per_rank(2, environ, library) for library in ("openblas", "mkl", "openmp", "blis")] \
        == [2, 3, 1, 1]
