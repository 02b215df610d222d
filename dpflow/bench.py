"""`dpflow bench`: where a training step's time goes, measured in one run.

It times the real training step (the same `Trainer.train_step` path `dpflow train` runs)
split into forward, backward, gradient sync and update, and beside it the two limits a step
cannot beat: one raw `Allreduce` of the same bytes, and the model's matrix multiplies alone
at the per-rank batch.
"""

import json
import resource
import time

import numpy as np

from .config import parse_hidden
from .data import shard_bounds
from .flat import FlatParameters
from .graph import backward_pass, forward_pass
from .model import MLP
from .optim import create_optimizer


def add_bench_arguments(parser):
    parser.add_argument("--features", type=int, default=784, help="input features (default %(default)s)")
    parser.add_argument("--hidden", default="512,256", help="hidden sizes (default %(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="classes (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch (default %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="sgd")
    parser.add_argument("--reducer", choices=("flat", "naive"), default="flat",
                        help="flat: one fused allreduce; naive: one per parameter")
    parser.add_argument("--no-sync", action="store_true",
                        help="skip the gradient allreduce: the compute-only ceiling")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def time_raw_allreduce(comm, n_values, dtype, repeats):
    """Seconds per in-place Allreduce of `n_values` elements, the best of `repeats`. Collective."""
    buffer = np.ones(n_values, dtype)
    times = []
    for _ in range(repeats):
        comm.barrier()
        started = time.perf_counter()
        comm.allreduce_sum(buffer)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def time_gemms(sizes, rows, dtype, repeats, rng):
    """Seconds for the matrix multiplies of one training step at `rows` rows per rank:
    forward X @ W per layer, backward X.T @ grad per layer and grad @ W.T past the first."""
    weights = [rng.standard_normal((a, b)).astype(dtype) for a, b in zip(sizes[:-1], sizes[1:])]
    acts = [rng.standard_normal((rows, n)).astype(dtype) for n in sizes]
    grads_w = [np.empty_like(w) for w in weights]
    grads_x = [np.empty((rows, n), dtype) for n in sizes]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i, W in enumerate(weights):
            np.matmul(acts[i], W, out=acts[i + 1])
        for i in reversed(range(len(weights))):
            np.matmul(acts[i].T, acts[i + 1], out=grads_w[i])
            if i > 0:
                np.matmul(acts[i + 1], weights[i].T, out=grads_x[i])
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def run_bench(args, comm):
    dtype = np.dtype(args.dtype)
    hidden = parse_hidden(args.hidden)
    rng = np.random.default_rng(1234 + comm.rank)
    first, last = shard_bounds(args.batch_size, comm.rank, comm.size)
    rows = last - first
    model = MLP(args.features, hidden, args.classes, "relu", seed=0, dtype=dtype)
    flat = FlatParameters(model.params, dtype)
    optimizer = create_optimizer(args.optimizer, flat.size, dtype, lr=1e-3)
    model.inputs.value = rng.standard_normal((rows, args.features)).astype(dtype)
    model.labels.value = rng.integers(0, args.classes, rows)
    model.loss.normaliser = args.batch_size
    comm.broadcast(flat.values)

    phases = np.zeros((args.steps, 4))  # forward, backward, sync, update
    step_times = np.zeros(args.steps)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.barrier()
        t0 = time.perf_counter()
        forward_pass(model.graph)
        t1 = time.perf_counter()
        backward_pass(model.graph)
        t2 = time.perf_counter()
        if not args.no_sync:
            if args.reducer == "naive":
                comm.allreduce_sum_each(flat.grad_views())
            else:
                comm.allreduce_sum(flat.grads)
        t3 = time.perf_counter()
        optimizer.step(flat.values, flat.param_grads)
        t4 = time.perf_counter()
        if step >= args.warmup:
            phases[step - args.warmup] = (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
            step_times[step - args.warmup] = t4 - t0
    rss_after_steps = peak_rss_mb()

    raw_allreduce = time_raw_allreduce(comm, flat.grads.size, dtype, max(20, args.steps // 2)) if comm.size > 1 else 0.0
    gemm_only = time_gemms(model.sizes, rows, dtype, max(20, args.steps // 2), rng)

    # Each rank's mean; the job runs at the pace of the slowest rank.
    local = np.array([step_times.mean(), *phases.mean(axis=0), gemm_only, rss_after_steps])
    slowest = local.copy()
    comm.allreduce_max(slowest)
    step_s, forward_s, backward_s, sync_s, update_s, gemm_s, rss = slowest
    grad_bytes = flat.grads.nbytes
    result = {
        "world_size": comm.size,
        "batch_size": args.batch_size,
        "rows_per_rank_max": int(np.ceil(args.batch_size / comm.size)),
        "dtype": dtype.name,
        "sizes": model.sizes,
        "reducer": "none" if args.no_sync else args.reducer,
        "samples_per_sec": args.batch_size / step_s,
        "step_ms": 1e3 * step_s,
        "forward_ms": 1e3 * forward_s,
        "backward_ms": 1e3 * backward_s,
        "sync_ms": 1e3 * sync_s,
        "update_ms": 1e3 * update_s,
        "raw_allreduce_ms": 1e3 * raw_allreduce,
        "gemm_only_ms": 1e3 * gemm_s,
        "gradient_bytes": grad_bytes,
        "sync_bandwidth_gb_s": (grad_bytes / sync_s / 1e9) if sync_s > 0 and not args.no_sync else None,
        "peak_rss_mb": rss,
        "parameters": flat.size,
    }
    if comm.is_root:
        if args.json:
            print(json.dumps(result))
        else:
            print(format_report(result))
    return 0


def format_report(r):
    lines = [
        f"dpflow bench: MLP {'-'.join(map(str, r['sizes']))}, global batch {r['batch_size']}, "
        f"{r['dtype']}, {r['world_size']} rank(s), reducer {r['reducer']}",
        f"  samples/s        {r['samples_per_sec']:>12,.0f}",
        f"  step             {r['step_ms']:>12.3f} ms",
        f"    forward        {r['forward_ms']:>12.3f} ms",
        f"    backward       {r['backward_ms']:>12.3f} ms",
        f"    gradient sync  {r['sync_ms']:>12.3f} ms",
        f"    update         {r['update_ms']:>12.3f} ms",
        f"  raw Allreduce    {r['raw_allreduce_ms']:>12.3f} ms of {r['gradient_bytes'] / 1e6:.2f} MB",
        f"  GEMMs alone      {r['gemm_only_ms']:>12.3f} ms (the compute limit at this per-rank batch)",
        f"  peak RSS         {r['peak_rss_mb']:>12.1f} MB per rank (max)",
    ]
    if r["sync_bandwidth_gb_s"]:
        lines.insert(7, f"  sync bandwidth   {r['sync_bandwidth_gb_s']:>12.2f} GB/s")
    return "\n".join(lines)
