"""The short fault soak (scripts/soak --short): `dpflow launch` on the namespace cluster
survives a killed rank, a killed host and a scheduler's SIGTERM (then a resubmission),
and ends with the parameters of an uninterrupted run (1e-10). The long soak is a script;
its last result is in the README."""

import json
import os
import subprocess
import sys

import pytest

from test_cluster import NO_CLUSTER, ROOT

pytestmark = pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or "")


def test_short_soak_survives_every_fault_on_the_same_trajectory(tmp_path):
    report = tmp_path / "soak.json"
    try:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak"), "--short", "--report", str(report)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={k: v for k, v in os.environ.items() if k not in ("MPIEXEC_TIMEOUT", "UCX_TLS")})
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the soak did not end within 300 s\n{error.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["passed"] and result["max_abs_difference"] <= 1e-10, result
    assert sorted(f["kind"] for f in result["faults"] if f["target"]) == ["kill-host", "kill-rank", "sigterm"], result
    assert result["restarts"] >= 2 and result["submissions"] == 2, result
    assert "PASSED: 3 faults injected" in done.stderr
