"""Fixtures shared by the test files; plain helpers live in helpers.py."""

import pytest

from helpers import dpflow_command, run


@pytest.fixture
def dpflow():
    """Run `dpflow ARGS...` (optionally under mpiexec) with a timeout."""

    def runner(*args, ranks=None, timeout=120, env=None, cwd=None):
        return run([*dpflow_command(), *map(str, args)], timeout=timeout, ranks=ranks, env=env, cwd=cwd)

    return runner
