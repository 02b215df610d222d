"""`dpflow bench`: where a training step's time goes, measured in one run.

It times the real training step (the same `Trainer.train_step` path `dpflow train` runs)
split into forward, backward, gradient sync and update, and beside it the two limits a step
cannot beat: one raw `Allreduce` of the same bytes, and the model's matrix multiplies alone
at the per-rank batch.
"""

import json
import math
import os
import resource
import time

import numpy as np

from . import _threads, launcher
from .agreement import agree
from .config import MAX_COUNT, add_setting_arguments, build_config, given_settings
from .data import Dataset, available_memory
from .errors import UsageError
from .modelspec import input_layout, resolve_builder
from .run import build_run_model, check_output_path
from .sharding import shard_bounds
from .trainer import Trainer, check_model_fits


PREDICT_NODES = (8, 16, 32, 64, 128, 256, 512, 1024)
NETWORKS_GBPS = (10, 25, 100)


def positive_list(text, option, kind):
    """`2,3,4` -> [2, 3, 4]; every value finite, > 0 and a count at most MAX_COUNT, else a usage
    error naming the option."""
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0 < v < math.inf or v > MAX_COUNT for v in values):
        raise UsageError(f"{option} takes a comma-separated list of positive numbers up to {MAX_COUNT}, got {text!r}")
    return values


def check_bench_options(args):
    """The flags that are not training settings: counts within range, rates and latencies finite."""
    if not 1 <= args.steps <= MAX_COUNT or not 0 <= args.warmup <= MAX_COUNT:
        raise UsageError(f"--steps must be in 1..{MAX_COUNT} and --warmup in 0..{MAX_COUNT}, got {args.steps} "
                         f"and {args.warmup}")
    if args.host_gbs is not None and not 0 < args.host_gbs < math.inf:
        raise UsageError(f"--host-gbs must be a bandwidth > 0 in GB/s, got {args.host_gbs}")
    if args.network_alpha_us is not None and not 0 <= args.network_alpha_us < math.inf:
        raise UsageError(f"--network-alpha-us must be a latency >= 0 in microseconds, got {args.network_alpha_us} "
                         "(25 is a usual cluster's)")
    positive_list(args.nodes, "--nodes", int)
    positive_list(args.network_gbps, "--network-gbps", float)


def check_bench_fits(config, shape):
    """The global batch of random examples, and an mlp's parameters, must fit in memory (a typo
    in --features, --input-shape or --hidden would otherwise end in a MemoryError)."""
    need = config.batch_size * math.prod(shape) * (4 + np.dtype(config.dtype).itemsize)  # drawn as float32, then cast
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(f"a batch of {config.batch_size} examples of shape {shape} needs {need / 2**30:.1f} GiB, "
                         f"more than the {free / 2**30:.1f} GiB free here; lower `batch_size`, `features` or "
                         "--input-shape")
    if config.model == "mlp":
        check_model_fits([math.prod(shape), *config.hidden, config.classes], config.dtype, config.batch_size)


# The training settings bench takes, with its own defaults: the model and batch of BENCHMARKS.md.
BENCH_SETTINGS = ("model", "model_args", "features", "hidden", "classes", "batch_size", "dtype", "optimizer",
                  "noise_scale", "reducer", "bucket_mb", "trace")
BENCH_DEFAULTS = {"features": 784, "hidden": [512, 256], "classes": 10, "batch_size": 256, "optimizer": "sgd"}
BENCH_HELP = {"features": "input features of an mlp", "classes": "classes",
              "model": "mlp, cnn, or path/to/file.py:function (as for train)",
              "model_args": "a keyword argument of the model's builder, e.g. dropout=0.25; repeatable",
              "noise_scale": "measure the gradient noise scale as `dpflow train` does",
              "trace": "write the timed steps' timeline to this file (Chrome trace JSON: ui.perfetto.dev)"}
# No cross-rank checks and no watchdog inside the timed steps; the lr does not matter here.
BENCH_FIXED = {"dataset": "bench", "lr": 1e-3, "consistency_every": 0, "stall_timeout": 0}


def add_bench_arguments(parser):
    add_setting_arguments(parser, BENCH_SETTINGS, BENCH_DEFAULTS, BENCH_HELP)
    parser.add_argument("--input-shape", metavar="C,H,W",
                        help="one example's shape (default: --features values, or 1,28,28 for a "
                             "model that takes images)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default %(default)s)")
    parser.add_argument("--no-sync", action="store_true",
                        help="skip the gradient allreduce: the compute-only ceiling")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--predict", action="store_true",
                        help="measure allreduce latency and bandwidth here, fit the cost model of the "
                             "allreduce algorithm that runs, and predict step time at 8 to 1,024 nodes")
    parser.add_argument("--nodes", default=",".join(map(str, PREDICT_NODES)),
                        help="node counts --predict predicts for (default %(default)s)")
    parser.add_argument("--network-gbps", default=",".join(map(str, NETWORKS_GBPS)),
                        help="link rates in Gbit/s --predict predicts for (default %(default)s)")
    parser.add_argument("--host-gbs", type=float, default=None, metavar="GB/S",
                        help="for --predict: the bandwidth the hosts' own network stack reaches, in GB/s (the "
                             "host_gb_s --predict --json reports on an unshaped link); a link faster than it "
                             "is modelled at it (default: the links' line rate, less TCP's and Ethernet's 6%%, alone)")
    parser.add_argument("--network-alpha-us", type=float, default=None,
                        help="per-message latency of the cluster network for --predict, in "
                             "microseconds (default: the value measured here, at least 25)")


def bench_config(args, **changes):
    """The training settings of this bench run: bench's defaults, then its flags, then `changes`."""
    return build_config({**BENCH_DEFAULTS, **BENCH_FIXED}, {**given_settings(args, BENCH_SETTINGS), **changes})


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def time_raw_allreduce(comm, n_values, dtype, repeats):
    """Seconds per in-place Allreduce of `n_values` elements, the median of `repeats`. Collective."""
    buffer = np.ones(n_values, dtype)
    times = []
    for _ in range(repeats):
        comm.barrier()
        started = time.perf_counter()
        comm.allreduce_sum(buffer)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def time_trainer_sync(trainer, comm, repeats):
    """Seconds per `allreduce_gradients()` of the trainer, the median after barriers. Collective."""
    times = []
    for _ in range(repeats):
        comm.barrier()
        started = time.perf_counter()
        trainer.parallel.allreduce_gradients()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def record_matmuls(trainer, permutation, batch):
    """[(layer, phase, a, b)] for every np.matmul one training step calls, `phase` forward or
    backward, with operands shaped and laid out as in the step (layers call `np.matmul`,
    which this swaps for a recorder during one step)."""
    calls, current = [], [None, None]
    real = np.matmul

    def recorder(a, b, *args, **kwargs):
        calls.append((*current, np.empty_like(a), np.empty_like(b)))
        return real(a, b, *args, **kwargs)

    wrapped = []
    for layer in trainer.model.graph:
        for method in ("forward", "backward"):
            original = getattr(layer, method)

            def traced(*args, _layer=layer, _phase=method, _original=original, **kwargs):
                current[:] = [_layer, _phase]
                return _original(*args, **kwargs)

            wrapped.append((layer, method))
            setattr(layer, method, traced)
    np.matmul = recorder
    try:
        trainer.train_step(permutation, batch)
    finally:
        np.matmul = real
        for layer, method in wrapped:
            delattr(layer, method)  # the class's method again
    return calls


def time_gemms(calls, repeats):
    """The recorded matrix multiplies replayed alone on operands of the same shapes and
    layouts, the compute limit of the step's GEMMs: seconds (total, forward, backward) and
    {layer type: seconds}, each the median of `repeats`."""
    for _, _, a, b in calls:
        a[...] = 1.0
        b[...] = 1.0
    outputs = [np.matmul(a, b) for _, _, a, b in calls]
    keys = sorted({type(layer).__name__ for layer, _, _, _ in calls}) + ["forward", "backward"]
    times = {key: [] for key in keys}
    for _ in range(repeats):
        spent = dict.fromkeys(keys, 0.0)
        for (layer, phase, a, b), out in zip(calls, outputs):
            started = time.perf_counter()
            np.matmul(a, b, out=out)
            seconds = time.perf_counter() - started
            spent[type(layer).__name__] += seconds
            spent[phase] += seconds
        for key in keys:
            times[key].append(spent[key])
    median = {key: float(np.median(values)) for key, values in times.items()}
    total = float(np.median(np.add(times["forward"], times["backward"])))
    by_layer = {key: value for key, value in median.items() if key not in ("forward", "backward")}
    return (total, median["forward"], median["backward"]), by_layer


def tracer_seconds_per_span(samples=20000):
    """What one span costs the traced loop: a Tracer.add, timed in a loop of its own."""
    from .trace import Tracer

    tracer = Tracer()
    started = time.perf_counter()
    for _ in range(samples):
        tracer.add("forward", 0.0, 1.0)
    return (time.perf_counter() - started) / samples


def bench_trainer(config, comm, shape, sync=True):
    """A Trainer on random data of exactly one global batch of examples of `shape`: every
    step is the real `train_step` of `dpflow train`, on the same rows."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((config.batch_size, *shape), dtype=np.float32).astype(config.dtype)
    y = rng.integers(0, config.classes, config.batch_size)
    data = Dataset("bench", x, y, x[:1], y[:1], config.classes)
    # As `dpflow train` builds it: a builder that fails on one rank, or builds another graph
    # there, stops every rank with one message instead of leaving the others in a collective.
    trainer = Trainer(config, comm, data, model=build_run_model(comm, config, data))
    trainer.sync = sync
    return trainer


def example_shape(args, config):
    """--input-shape, else 1x28x28 for a model that takes images, else `features`."""
    if args.input_shape:
        try:
            shape = tuple(int(part) for part in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            raise UsageError(f"--input-shape must be sizes like 1,28,28, got {args.input_shape!r}") from None
        if not shape or min(shape) < 1:
            raise UsageError(f"--input-shape sizes must be >= 1, got {args.input_shape!r}")
        return shape
    if input_layout(resolve_builder(config.model)) == "images":
        return (1, 28, 28)
    return (config.features,)


def proportional_mb():
    """This process's proportional set size (PSS): each shared page counted as 1/N in each of the N
    processes that map it. The gradients of a one-node job live in a window every rank maps
    (dpflow/nodesum.py): RSS counts its pages whole in every rank, PSS shares them out. None
    where the kernel does not say."""
    try:
        with open("/proc/self/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def run_bench(args, comm):
    check_bench_options(args)
    config = bench_config(args)
    if config.batch_size < comm.size:
        raise UsageError(f"--batch-size {config.batch_size} must be >= the number of ranks ({comm.size})")
    shape = example_shape(args, config)
    agree(comm, lambda: check_bench_fits(config, shape))  # free memory may differ between nodes
    if config.trace:  # before the steps, so that a bad path costs no run and overwrites no device
        agree(comm, lambda: check_output_path("trace", config.trace) if comm.is_root else None)
    if args.predict:
        return run_predict(args, config, shape, comm)
    rss_before_model = current_rss_mb()  # the interpreter, numpy and MPI: not dpflow's doing
    pss_before_model = proportional_mb()
    trainer = bench_trainer(config, comm, shape, sync=not args.no_sync)
    dtype, flat = trainer.dtype, trainer.flat
    permutation = np.arange(config.batch_size)
    batch = [(0, config.batch_size)]
    step_times = np.zeros(args.steps)
    rss_after_warmup = 0.0
    tracer = None
    if config.trace:
        from .trace import Tracer

        tracer = Tracer(comm.rank)
        tracer.align_clocks(comm)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.barrier()
            trainer.phase_seconds[:] = 0
            rss_after_warmup = peak_rss_mb()
            trainer.tracer = tracer  # the timed steps only
        started = time.perf_counter()
        trainer.train_step(permutation, batch)
        if step >= args.warmup:
            stopped = time.perf_counter()
            step_times[step - args.warmup] = stopped - started
            if tracer:
                tracer.add("step", started, stopped, step=step - args.warmup)
    trainer.tracer = None
    rss_after_steps = peak_rss_mb()
    pss_after_steps = proportional_mb()
    pss_known = None not in (pss_before_model, pss_after_steps)
    pss_growth = pss_after_steps - pss_before_model if pss_known else 0.0
    phases = trainer.phase_seconds / args.steps

    repeats = max(20, args.steps // 2)
    raw_allreduce = time_raw_allreduce(comm, flat.grads.size, dtype, repeats) if comm.size > 1 else 0.0
    # The trainer's own reduction, timed like the raw one (after a barrier): what the sync
    # costs without the wait for a slower rank that the in-step "sync" includes.
    sync_alone = time_trainer_sync(trainer, comm, repeats) if comm.size > 1 and not args.no_sync else 0.0
    gemms, gemms_by_layer = time_gemms(record_matmuls(trainer, permutation, batch), repeats)

    # Each rank's mean; the job runs at the pace of the slowest rank.
    slowest = np.array([step_times.mean(), *phases, *gemms, rss_after_warmup, rss_after_steps,
                        rss_after_steps - rss_before_model, pss_growth, 0.0 if pss_known else 1.0])
    comm.allreduce_max(slowest)
    (step_s, forward_s, backward_s, sync_s, update_s, gemm_s, gemm_forward_s, gemm_backward_s,
     rss_warm, rss, rss_growth, pss_growth, pss_unknown) = slowest  # unknown on any rank: not reported
    spans_per_step = len(tracer.spans) / args.steps if tracer else 0.0
    if tracer:
        tracer.gather_and_write(comm, config.trace)
    grad_bytes = flat.param_grads.nbytes
    result = {
        "world_size": comm.size,
        "batch_size": config.batch_size,
        "rows_per_rank_max": -(-config.batch_size // comm.size),
        "dtype": dtype.name,
        "model": model_name(trainer),
        "gemm_ms_by_layer": {kind: 1e3 * seconds for kind, seconds in gemms_by_layer.items()},
        "reducer": "none" if args.no_sync else config.reducer,
        "sum_path": trainer.parallel.sum_path(),
        "bucket_mb": config.bucket_mb,
        "buckets": len(trainer.parallel.buckets) if trainer.overlap else 0,
        "samples_per_sec": config.batch_size / step_s,
        "step_ms": 1e3 * step_s,
        "forward_ms": 1e3 * forward_s,
        "backward_ms": 1e3 * backward_s,
        "sync_ms": 1e3 * sync_s,
        "update_ms": 1e3 * update_s,
        "raw_allreduce_ms": 1e3 * raw_allreduce,
        "sync_alone_ms": 1e3 * sync_alone,
        "gemm_only_ms": 1e3 * gemm_s,
        "gemm_forward_ms": 1e3 * gemm_forward_s,
        "gemm_backward_ms": 1e3 * gemm_backward_s,
        "blas_threads": _threads.blas_threads_in_use(),
        "trace": config.trace,
        "trace_spans_per_step": spans_per_step,
        "trace_cost_ms_per_step": 1e3 * spans_per_step * tracer_seconds_per_span() if tracer else 0.0,
        "gradient_bytes": grad_bytes,
        "sync_bandwidth_gb_s": (grad_bytes / sync_s / 1e9) if sync_s > 0 and not args.no_sync and comm.size > 1 else None,
        "peak_rss_mb": rss,
        "peak_rss_after_warmup_mb": rss_warm,
        "rss_added_by_training_mb": rss_growth,
        "pss_added_by_training_mb": None if pss_unknown else pss_growth,
        "parameters": flat.size,
        "state_mb": state_megabytes(trainer),
    }
    if comm.is_root:
        print(json.dumps(result) if args.json else format_report(result))
    return 0


def state_megabytes(trainer):
    """Parameters + gradients + optimizer state + activations and their gradients, in MB."""
    arrays = [trainer.flat.values, trainer.flat.grads]
    arrays += [v for v in trainer.optimizer.state_dict().values() if isinstance(v, np.ndarray)]
    arrays += [a for layer in trainer.model.graph for a in layer._scratch.values()]
    return sum(a.nbytes for a in arrays) / 2**20


def model_name(trainer):
    """'MLP 784-512-256-10' or 'cnn (dense=64)': what the bench ran."""
    model, config = trainer.model, trainer.config
    if config.model == "mlp" and hasattr(model, "sizes"):
        return "MLP " + "-".join(map(str, model.sizes))
    args = ", ".join(f"{key}={value}" for key, value in config.model_args.items())
    shape = "x".join(map(str, trainer.data.input_shape))
    return f"{config.model}{f' ({args})' if args else ''} on {shape} examples, {model.parameter_count():,} parameters"


def format_report(r):
    lines = [
        f"dpflow bench: {r['model']}, global batch {r['batch_size']}, "
        f"{r['dtype']}, {r['world_size']} rank(s), reducer {r['reducer']} ({r['sum_path']})",
        f"  samples/s        {r['samples_per_sec']:>12,.0f}",
        f"  step             {r['step_ms']:>12.3f} ms",
        f"    forward        {r['forward_ms']:>12.3f} ms",
        f"    backward       {r['backward_ms']:>12.3f} ms",
        f"    gradient sync  {r['sync_ms']:>12.3f} ms",
        f"    update         {r['update_ms']:>12.3f} ms",
        f"  sync alone       {r['sync_alone_ms']:>12.3f} ms (the step's allreduce after a barrier: no waiting for a slower rank)",
        f"  raw Allreduce    {r['raw_allreduce_ms']:>12.3f} ms of {r['gradient_bytes'] / 1e6:.2f} MB",
        f"  GEMMs alone      {r['gemm_only_ms']:>12.3f} ms (the step's matrix multiplies replayed alone: "
        "the compute limit at this per-rank batch)",
        *[f"    {kind:<14} {ms:>12.3f} ms" for kind, ms in r["gemm_ms_by_layer"].items()],
        f"  peak RSS         {r['peak_rss_mb']:>12.1f} MB per rank (max; {r['peak_rss_after_warmup_mb']:.1f} after warmup)",
        f"  added by dpflow  {r['rss_added_by_training_mb']:>12.1f} MB per rank (peak RSS minus the RSS before the model)",
        *([f"  PSS added        {r['pss_added_by_training_mb']:>12.1f} MB per rank (shared pages shared out)"]
          if r.get("pss_added_by_training_mb") is not None else []),
        f"  training state   {r['state_mb']:>12.1f} MB (parameters, gradients, optimizer, activations)",
    ]
    if r["sync_bandwidth_gb_s"]:
        lines.insert(7, f"  sync bandwidth   {r['sync_bandwidth_gb_s']:>12.2f} GB/s")
    return "\n".join(lines)


# --- the cost model, from measured alpha and beta --------------------------------------------

def measure_allreduce_curve(comm, dtype, repeats=30):
    """[(bytes, seconds)] of in-place Allreduce from 8 bytes to 8 MiB, by factors of 4. Collective."""
    curve = []
    for exponent in range(3, 25, 2):
        n_values = max(1, (1 << exponent) // np.dtype(dtype).itemsize)
        curve.append((n_values * np.dtype(dtype).itemsize, time_raw_allreduce(comm, n_values, dtype, repeats)))
    return curve


def compute_seconds(config, comm, shape):
    """Forward + backward + update at this run's per-rank batch, without any allreduce: what one
    node spends per step when its ranks run side by side, as they do here. Collective."""
    trainer = bench_trainer(config, comm, shape, sync=False)
    permutation, batch = np.arange(config.batch_size), [(0, config.batch_size)]
    for _ in range(5):
        trainer.train_step(permutation, batch)
    comm.barrier()
    started = time.perf_counter()
    steps = 60  # with 20, a loaded machine's noise swung the compute time by a third
    for _ in range(steps):
        trainer.train_step(permutation, batch)
    elapsed = np.array([(time.perf_counter() - started) / steps])
    comm.allreduce_max(elapsed)
    return float(elapsed[0]), trainer.flat.param_grads.nbytes


def rows_on_first_node(batch_size, hostnames):
    """The rows of a global batch that rank 0's node computes: its ranks' shards (`hostnames`:
    every rank's host). The prediction's compute time is that node's."""
    return sum(stop - start for start, stop in (shard_bounds(batch_size, rank, len(hostnames))
                                                for rank, host in enumerate(hostnames) if host == hostnames[0]))


def run_predict(args, config, shape, comm):
    from . import costmodel

    if comm.size < 2:
        raise UsageError("dpflow bench --predict measures an allreduce: run it under mpiexec -n 2 (or more)")
    node_counts = positive_list(args.nodes, "--nodes", int)
    networks = positive_list(args.network_gbps, "--network-gbps", float)
    curve = measure_allreduce_curve(comm, np.float32)
    # The algorithm this run's allreduce took; on one host the ranks share memory, where ring's
    # form fits as well as any. Across hosts MPICH reduces within each host first: the hosts
    # are the ranks of the allreduce that crosses the links.
    hostnames = comm.allgather_object(comm.hostname())
    hosts = len(set(hostnames))
    running = (launcher.allreduce_algorithm(comm.library(), hosts, os.environ) if hosts > 1 else None) or "ring"
    fitted_p = hosts if hosts > 1 else comm.size
    alpha, beta = costmodel.fit_alpha_beta([b for b, _ in curve], [t for _, t in curve], p=fitted_p, algorithm=running)
    host_beta = costmodel.bulk_beta([b for b, _ in curve], [t for _, t in curve], p=fitted_p, algorithm=running)
    network_alpha = (args.network_alpha_us * 1e-6 if args.network_alpha_us is not None
                     else max(alpha, 25e-6))
    # The model asked for, and for an mlp one with hidden layers 5x as wide (about 10x the
    # parameters for the default 784-512-256-10; each label gives the real sizes).
    configs = [bench_config(args, bucket_mb=0.0)]
    if config.model == "mlp":
        configs.append(bench_config(args, hidden=[5 * h for h in config.hidden], bucket_mb=0.0))
    rows = []
    for each in configs:
        label = "MLP " + "-".join(map(str, [*shape, *each.hidden, each.classes])) if each.model == "mlp" else each.model
        seconds, grad_bytes = compute_seconds(each, comm, shape)
        for gbps in networks:
            net_beta = costmodel.network_beta(gbps, 1e-9 / args.host_gbs if args.host_gbs else 0.0)
            crossover = costmodel.crossover_nodes(grad_bytes, seconds, network_alpha, net_beta,
                                                  launcher.allreduce_algorithm(comm.library(), 2, os.environ))
            for nodes in node_counts:
                prediction = costmodel.predict(nodes, grad_bytes, seconds, network_alpha, net_beta,
                                               algorithm=launcher.allreduce_algorithm(comm.library(), nodes, os.environ))
                rows.append({"model": label, "params_mb": grad_bytes / 1e6, "compute_ms": 1e3 * seconds,
                             "gbps": gbps, "beta_gb_s": 1e-9 / net_beta, "host_bound": net_beta > costmodel.line_rate_beta(gbps),
                             "crossover_nodes": crossover, **prediction})
    if comm.is_root:
        report = {"measured": {"world_size": comm.size, "hosts": hosts, "library": comm.library(), "algorithm": running,
                               "alpha_us": alpha * 1e6, "beta_gb_s": 1e-9 / beta if beta else None,
                               "curve": curve, "host_gb_s": 1e-9 / host_beta if host_beta else None},
                  "network_alpha_us": network_alpha * 1e6, "link_efficiency": costmodel.LINK_EFFICIENCY,
                  "host_gbs": args.host_gbs, "per_node_batch": rows_on_first_node(config.batch_size, hostnames),
                  "predictions": rows}
        if args.json:
            print(json.dumps(report))
        else:
            print(format_prediction(report))
    return 0


def format_prediction(report):
    measured = report["measured"]
    lines = [
        f"allreduce measured here on {measured['world_size']} ranks ({measured['hosts']} host(s), fitted to "
        f"{measured['algorithm']}'s form): alpha {measured['alpha_us']:.2f} us, "
        f"bandwidth 1/beta {measured['beta_gb_s']:.2f} GB/s "
        f"(at its largest message, {measured['host_gb_s']:.2f} GB/s)",
        f"network model: alpha {report['network_alpha_us']:.1f} us per message, beta at "
        f"{report['link_efficiency']:.0%} of line rate (TCP over Ethernet)"
        + (f" or the hosts' own {report['host_gbs']:g} GB/s, whichever is slower; " if report["host_gbs"] else "; ")
        + f"weak scaling, {report['per_node_batch']} samples per node per step, no overlap",
        "",
        f"{'model':<22} {'grad MB':>8} {'Gb/s':>5} {'nodes':>6} {'compute ms':>11} {'allreduce ms':>13} "
        f"{'step ms':>9} {'efficiency':>10}  algorithm",
    ]
    for row in report["predictions"]:
        lines.append(
            f"{row['model']:<22} {row['params_mb']:>8.2f} {row['gbps']:>5g} {row['nodes']:>6} "
            f"{row['compute_ms']:>11.2f} {1e3 * row['comm_s']:>13.2f} {1e3 * row['step_s']:>9.2f} "
            f"{row['efficiency']:>10.1%}  {row['algorithm']}")
    lines.append("")
    seen = set()
    for row in report["predictions"]:
        key = (row["model"], row["gbps"])
        if key not in seen:
            seen.add(key)
            where = f"{row['crossover_nodes']} nodes" if row["crossover_nodes"] else "beyond 1M nodes"
            lines.append(f"communication outweighs compute: {row['model']} at {row['gbps']:g} Gb/s from {where}")
    return "\n".join(lines)
