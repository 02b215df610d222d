"""The honest lower bound of "no framework": the same training step as `dpflow bench`,
written by hand in numpy + mpi4py.

MLP 784-512-256-10, ReLU, softmax cross-entropy, plain SGD, the rows pre-sharded and
contiguous, every gradient a view into one flat buffer, one in-place Allreduce, one update.
No graph, no checks, no shuffling: what a user could write in an afternoon. Run by
scripts/bench --peers; prints one JSON line (rank 0):

    mpiexec -n 2 python scripts/peers/minimal_loop.py --steps 200
"""

import argparse
import json
import time

import numpy as np
from mpi4py import MPI


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes, dtype, lr = [784, 512, 256, 10], np.float32, 1e-3

    # Every rank draws the same global batch, then keeps its contiguous block of rows.
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((args.batch_size, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], args.batch_size)
    first = rank * args.batch_size // size
    last = (rank + 1) * args.batch_size // size
    X, labels = np.ascontiguousarray(x[first:last]), y[first:last]
    rows = last - first

    # Parameters and gradients: views into one buffer each (the last gradient slot: the loss).
    shapes = [s for a, b in zip(sizes[:-1], sizes[1:]) for s in ((a, b), (b,))]
    counts = [int(np.prod(s)) for s in shapes]
    params, grads = np.empty(sum(counts), dtype), np.zeros(sum(counts) + 1, dtype)
    offsets = np.cumsum([0] + counts)
    P = [params[o:o + c].reshape(s) for o, c, s in zip(offsets, counts, shapes)]
    G = [grads[o:o + c].reshape(s) for o, c, s in zip(offsets, counts, shapes)]
    for W, (fan_in, _) in zip(P[0::2], shapes[0::2]):
        W[...] = rng.normal(0.0, np.sqrt(2.0 / fan_in), W.shape)
    for b in P[1::2]:
        b[...] = 0
    comm.Bcast(params)

    acts = [X] + [np.empty((rows, n), dtype) for n in sizes[1:]]  # post-activation values
    masks = [np.empty((rows, n), dtype) for n in sizes[1:-1]]
    deltas = [np.empty((rows, n), dtype) for n in sizes[1:]]
    scratch = np.empty_like(params)
    index = np.arange(rows)

    phases = np.zeros(4)  # forward, backward, allreduce, update: seconds, summed

    def step():
        n_layers = len(sizes) - 1
        t0 = time.perf_counter()
        for i in range(n_layers):
            np.matmul(acts[i], P[2 * i], out=acts[i + 1])
            acts[i + 1] += P[2 * i + 1]
            if i < n_layers - 1:
                np.greater(acts[i + 1], 0, out=masks[i], casting="unsafe")
                acts[i + 1] *= masks[i]
        z = acts[-1]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=deltas[-1])
        sums = deltas[-1].sum(axis=1, keepdims=True)
        grads[-1] = np.log(sums).sum() - z[index, labels].sum()  # this rank's loss sum
        deltas[-1] /= sums
        t1 = time.perf_counter()
        deltas[-1][index, labels] -= 1
        deltas[-1] /= args.batch_size
        for i in reversed(range(n_layers)):
            np.matmul(acts[i].T, deltas[i], out=G[2 * i])
            np.sum(deltas[i], axis=0, out=G[2 * i + 1])
            if i > 0:
                np.matmul(deltas[i], P[2 * i].T, out=deltas[i - 1])
                deltas[i - 1] *= masks[i - 1]
        t2 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        t3 = time.perf_counter()
        np.multiply(grads[:-1], lr, out=scratch)
        np.subtract(params, scratch, out=params)
        phases[:] += (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)

    times = np.empty(args.steps)
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            comm.Barrier()
            phases[:] = 0
        started = time.perf_counter()
        step()
        if s >= args.warmup:
            times[s - args.warmup] = time.perf_counter() - started
    slowest = np.array([times.mean(), *(phases / args.steps)])  # each the slowest rank's
    comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
    step_s, forward_s, backward_s, sync_s, update_s = slowest
    if rank == 0:
        print(json.dumps({"peer": "numpy + mpi4py loop", "world_size": size, "batch_size": args.batch_size,
                          "step_ms": 1e3 * step_s, "samples_per_sec": args.batch_size / step_s,
                          "forward_ms": 1e3 * forward_s, "backward_ms": 1e3 * backward_s,
                          "sync_ms": 1e3 * sync_s, "update_ms": 1e3 * update_s}))


if __name__ == "__main__":
    main()
