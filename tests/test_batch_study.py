"""scripts/batch-study end to end on the bundled digits, tiny: the runs happen, and every
figure of the report comes from them."""

import json
import os
import sys

import pytest

from helpers import ROOT, run


def test_study_writes_its_report_from_its_runs(tmp_path):
    pytest.importorskip("matplotlib")
    result = run([sys.executable, os.path.join(ROOT, "scripts", "batch_study.py"), "--dataset", "digits",
                  "--epochs", "2", "--batches", "64,256", "--rules", "sgd,goyal,lamb", "--target", "0.5",
                  "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")], timeout=300)
    assert result.returncode == 0, result
    study = json.loads((tmp_path / "scaling.json").read_text())
    runs = {(r["rule"], r["batch"]): r for r in study["runs"]}
    assert set(runs) == {(rule, batch) for rule in ("sgd", "goyal", "lamb") for batch in (64, 256)}
    assert runs[("goyal", 64)]["same_run_as"] == "sgd"  # linear scaling changes nothing at batch 64
    assert 0.05 < runs[("goyal", 256)]["peak_lr"] < 0.2  # warming up to 0.05 x 256 / 64
    assert all(len(r["accuracy_per_epoch"]) == 2 for r in runs.values())
    assert all(v > 0 for v in runs[("sgd", 64)]["noise_scale_per_epoch"])
    report = (tmp_path / "SCALING.md").read_text()
    sgd = runs[("sgd", 64)]
    assert f"momentum SGD at batch 64: {100 * sgd['final_accuracy']:.2f}%" in report
    assert f"| 256 | {runs[('sgd', 256)]['steps']} | {100 * runs[('sgd', 256)]['final_accuracy']:.2f} |" in report
    assert "Load average" in report and (tmp_path / "scaling.png").stat().st_size > 10_000
    # The report can be rewritten from the record alone, identically.
    again = run([sys.executable, os.path.join(ROOT, "scripts", "batch_study.py"), "--report-only",
                 "--out", str(tmp_path)], timeout=120)
    assert again.returncode == 0, again
    assert (tmp_path / "SCALING.md").read_text() == report
