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


def load_sweep():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_sweep.py")
    spec = importlib.util.spec_from_file_location("bench_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cost_model_section_reads_its_figures_from_the_run():
    """The message sizes of the fit, the cores and the rows per node come from the run, not
    from prose (which said 16 MB for a fit that ended at 8.4 MB, and a 2-core node anywhere)."""
    sweep = load_sweep()
    row = {"model": "MLP 784-512-256-10", "params_mb": 2.1, "gbps": 10.0, "nodes": 8, "compute_ms": 3.0,
           "comm_s": 0.002, "step_s": 0.005, "efficiency": 0.6, "algorithm": "rabenseifner", "crossover_nodes": 4}
    prediction = {"measured": {"world_size": 4, "alpha_us": 2.0, "beta_gb_s": 5.0, "hosts": 1,
                               "curve": [[32, 1e-6], [2048, 2e-6], [524288, 1e-4]]},
                  "network_alpha_us": 25.0, "link_efficiency": 0.94, "per_node_batch": 512, "predictions": [row]}
    text = sweep.format_prediction_section(prediction, None, cores=8)
    assert "over messages of 32 B to 524 kB" in text, text
    assert "each node keeps 512 samples per step" in text and "this 8-core node" in text, text
    assert "16 MB" not in text and "2-core" not in text and "256 samples" not in text


def test_the_overlap_verdict_names_dpflows_own_default(monkeypatch):
    """The sentence on `--bucket-mb` names the default the settings hold, and weighs it against
    the measurements, whichever way they fall."""
    from dpflow.config import FIELDS

    sweep = load_sweep()
    assert sweep.default_bucket_verdict(0, 8) == "dpflow's default is `--bucket-mb 0`, which these measurements support."
    assert sweep.default_bucket_verdict(6, 8).endswith("although these measurements favour overlap.")
    monkeypatch.setattr(FIELDS["bucket_mb"], "default", 2.0)
    assert sweep.default_bucket_verdict(6, 8) == "dpflow's default is `--bucket-mb 2`, which these measurements support."
    assert sweep.default_bucket_verdict(1, 8).endswith("although these measurements favour no overlap.")


def test_the_sentences_on_threads_and_delay_say_what_the_run_found():
    sweep = load_sweep()
    own = {"threads": None, "blas_threads": 8, "samples_per_sec": 1234.0}
    assert sweep.alone_line(own, 8) == ("One rank with the threads dpflow chooses: 8 BLAS thread(s), read from the "
                                        "library, on 8 cores: 1,234 samples/s.")
    assert "2 threads set in the environment: 2 BLAS" in sweep.alone_line({**own, "threads": 2, "blas_threads": 2}, 8)
    assert "has no netem" in sweep.delay_sentence(False) and "has netem" in sweep.delay_sentence(True)
    assert "netem" not in sweep.delay_sentence(None)  # an older run that did not look


@pytest.mark.parametrize("flag,value", [("--network-alpha-us", "-5"), ("--network-alpha-us", "nan"),
                                        ("--network-gbps", "nan"), ("--network-gbps", "10,inf"),
                                        ("--host-gbs", "inf"), ("--nodes", "0")])
def test_predict_refuses_a_network_that_cannot_be(dpflow, flag, value):
    """A negative latency or a rate that is not a finite number printed a table of negative or
    nan times with exit status 0."""
    result = dpflow("bench", "--features", "20", "--hidden", "16", "--classes", "3", "--batch-size", "16",
                    "--predict", flag, value, ranks=2, timeout=60)
    assert result.returncode == 2, result
    assert flag in result.stderr and value in result.stderr and "Traceback" not in result.stderr, result


def test_bench_help_builds_no_environment(tmp_path):
    """`./scripts/bench --help` printed its usage only after building an Open MPI venv (and, with
    --peers, installing PyTorch); it built .venv too, which failed where the checkout has none and
    nothing can be installed (the suite inside the container image)."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DPFLOW_VENV": str(tmp_path / "venv"), "DPFLOW_OPENMPI_VENV": str(tmp_path / "openmpi"),
           "DPFLOW_PEERS_VENV": str(tmp_path / "peers")}
    for args in (["--help"], ["--peers", "-h"]):
        result = subprocess.run([os.path.join(root, "scripts", "bench"), *args], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0 and "--peers" in result.stdout and "--quick" in result.stdout, result
    assert os.listdir(tmp_path) == []


def test_predict_says_the_rows_that_the_measured_node_computes():
    """Across hosts each node computes its ranks' shards of the global batch: on 2 hosts of one
    rank, 128 of 256 rows (the report said 256 samples per node whatever the hosts)."""
    from dpflow.bench import rows_on_first_node

    assert rows_on_first_node(256, ["vm", "vm"]) == 256
    assert rows_on_first_node(256, ["node0", "node1"]) == 128
    assert rows_on_first_node(256, ["node0", "node1", "node2"]) == 86
    assert rows_on_first_node(256, ["node0", "node0", "node1", "node1"]) == 128


def test_the_cluster_section_says_when_hosts_outnumber_the_cores():
    sweep = load_sweep()
    cluster = {"shaped": [{"hosts": 2}, {"hosts": 3}, {"hosts": 4}]}
    assert sweep.sharing_sentence(cluster, 2).endswith("so with 3 and 4 hosts each rank also waits for a core.")
    assert sweep.sharing_sentence(cluster, 8) == "All hosts share this machine's 8 cores."
    assert sweep.sharing_sentence({"shaped": []}, 1).endswith("so with 2 hosts each rank also waits for a core.")
