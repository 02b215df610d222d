"""`dpflow bench` smoke test: it runs on a tiny model and prints valid JSON. Speed itself is
measured by scripts/bench into BENCHMARKS.md, never asserted here."""

import json

import pytest

KEYS = ("samples_per_sec", "step_ms", "forward_ms", "backward_ms", "sync_ms", "update_ms",
        "raw_allreduce_ms", "sync_alone_ms", "gemm_only_ms", "world_size", "peak_rss_mb")


@pytest.mark.parametrize("ranks,extra", [(None, []), (2, []), (2, ["--bucket-mb", "0.0001"]), (2, ["--no-sync"])])
def test_bench_prints_valid_json(dpflow, ranks, extra):
    result = dpflow("bench", "--features", "20", "--hidden", "16,8", "--classes", "3", "--batch-size", "32",
                    "--steps", "5", "--warmup", "2", "--json", *extra, ranks=ranks, timeout=60)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    for key in KEYS:
        assert key in report, key
    assert report["world_size"] == (ranks or 1)
    assert report["samples_per_sec"] > 0 and report["step_ms"] > 0 and report["gemm_only_ms"] > 0
    assert report["reducer"] == ("none" if "--no-sync" in extra else "flat")
    assert (report["buckets"] > 1) == ("--bucket-mb" in extra)  # 0.0001 MB splits this model


def test_bench_text_report(dpflow):
    result = dpflow("bench", "--features", "20", "--hidden", "16", "--classes", "3", "--batch-size", "16",
                    "--steps", "3", "--warmup", "1", timeout=60)
    assert result.returncode == 0 and "samples/s" in result.stdout and "GEMMs alone" in result.stdout


def test_predict_times_the_algorithm_that_runs_at_each_node_count(dpflow):
    result = dpflow("bench", "--features", "20", "--hidden", "16", "--classes", "3", "--batch-size", "16",
                    "--predict", "--nodes", "2,3,4", "--network-gbps", "1", "--json", ranks=2, timeout=120)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["measured"]["hosts"] == 1 and report["measured"]["algorithm"] == "ring"  # shared memory: ring's form
    mpich = report["measured"]["library"].startswith("MPICH")
    algorithms = {row["nodes"]: row["algorithm"] for row in report["predictions"]}
    # MPICH runs Rabenseifner on a power of two; on 3 hosts dpflow asks it for ring, whose time
    # is the one predicted. Open MPI runs Rabenseifner, folding the third host in.
    assert algorithms == {2: "rabenseifner", 3: "ring" if mpich else "rabenseifner", 4: "rabenseifner"}


@pytest.mark.parametrize("readings,expected", [((100.0, 90.0), -10.0), ((None, 90.0), None), ((80.0, None), None)])
def test_pss_added_is_what_was_read_and_missing_when_it_could_not_be_read(monkeypatch, capsys, readings, expected):
    # A fall in PSS is a figure like any other; only a reading that failed is left out.
    from dpflow import bench
    from dpflow.cli import build_parser
    from dpflow.comm import LocalCommunicator

    args = build_parser().parse_args(["bench", "--features", "20", "--hidden", "16", "--classes", "3",
                                      "--batch-size", "16", "--steps", "2", "--warmup", "1", "--json"])
    values = iter(readings)
    monkeypatch.setattr(bench, "proportional_mb", lambda: next(values))
    assert bench.run_bench(args, LocalCommunicator()) == 0
    assert json.loads(capsys.readouterr().out)["pss_added_by_training_mb"] == expected
