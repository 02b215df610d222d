"""The memory-bound passes of a training step, each timed against its alternatives in one
process with one BLAS thread: what dpflow does, what it replaced, and what a compiled
kernel (numba) or scipy's BLAS wrappers would buy. Run by scripts/bench (numba and scipy
only in the --peers environment, where they are installed); prints one JSON list.

    python scripts/peers/kernels.py --rows 128
"""

import argparse
import json
import math
import time

import numpy as np

PARAMETERS = 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10


def median_us(function, repeats=300, warmup=30):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e6


def relu_variants(rows, rng):
    x = rng.standard_normal((rows, 512)).astype(np.float32)
    grad = rng.standard_normal((rows, 512)).astype(np.float32)
    out = np.empty_like(x)
    bool_mask, float_mask = np.empty(x.shape, bool), np.empty_like(x)

    def bool_forward():
        np.greater(x, 0, out=bool_mask)
        np.multiply(x, bool_mask, out=out)

    def float_forward():
        np.greater(x, 0, out=float_mask, casting="unsafe")
        np.multiply(x, float_mask, out=out)

    bool_forward(), float_forward()
    return [
        ("ReLU forward, 512 wide", "x * (x > 0), bool mask (before)", median_us(bool_forward)),
        ("ReLU forward, 512 wide", "x * (x > 0), mask in x's float type (dpflow)", median_us(float_forward)),
        ("ReLU forward, 512 wide", "np.maximum(x, 0)", median_us(lambda: np.maximum(x, 0, out=out))),
        ("ReLU backward, 512 wide", "grad * bool mask (before)", median_us(lambda: np.multiply(grad, bool_mask, out=out))),
        ("ReLU backward, 512 wide", "grad * float mask (dpflow)", median_us(lambda: np.multiply(grad, float_mask, out=out))),
    ]


def check_and_update_variants(rng, numba_module, blas):
    from dpflow.flat import all_finite

    params = rng.standard_normal(PARAMETERS).astype(np.float32)
    grads = (rng.standard_normal(PARAMETERS) * 1e-3).astype(np.float32)
    scratch = np.empty_like(params)
    lr = np.float32(1e-3)

    def numpy_update():
        np.multiply(grads, lr, out=scratch)
        params.__isub__(scratch)

    rows = [
        ("non-finite check, 2.1 MB", "max and min (before)",
         median_us(lambda: math.isfinite(float(grads.max())) and math.isfinite(float(grads.min())))),
        ("non-finite check, 2.1 MB", "one BLAS dot, max/min only if not finite (dpflow)",
         median_us(lambda: all_finite(grads))),
        ("SGD update, 2.1 MB", "g * lr, then p -= that: two passes (dpflow)", median_us(numpy_update)),
        ("check + update, 2.1 MB", "dpflow: the check, then the update",
         median_us(lambda: (all_finite(grads), numpy_update()))),
    ]
    if numba_module is not None:
        @numba_module.njit(cache=False, fastmath=False)
        def fused(p, g, lr):  # one pass: finite check and update together
            ok = True
            for i in range(g.size):
                if not math.isfinite(g[i]):
                    ok = False
            if ok:
                for i in range(g.size):
                    p[i] -= g[i] * lr
            return ok

        @numba_module.njit(cache=False, fastmath=False)
        def update(p, g, lr):
            for i in range(g.size):
                p[i] -= g[i] * lr

        fused(params, grads, lr), update(params, grads, lr)
        rows += [("SGD update, 2.1 MB", f"numba {numba_module.__version__}: one loop",
                  median_us(lambda: update(params, grads, lr))),
                 ("check + update, 2.1 MB", f"numba {numba_module.__version__}: check loop, update loop",
                  median_us(lambda: fused(params, grads, lr)))]
    if blas is not None:
        rows.append(("SGD update, 2.1 MB", "scipy saxpy: p += (-lr) g, one pass (may fuse multiply-add: "
                     "not bitwise the two-pass result)", median_us(lambda: blas.saxpy(grads, params, a=-lr))))
    return rows


def bias_variants(rows, rng, blas):
    X = rng.standard_normal((rows, 784)).astype(np.float32)
    W = rng.standard_normal((784, 512)).astype(np.float32)
    b = rng.standard_normal(512).astype(np.float32)
    z = np.empty((rows, 512), np.float32)

    def numpy_bias():
        np.matmul(X, W, out=z)
        z.__iadd__(b)

    result = [("first layer: X @ W + b", "matmul, then z += b (dpflow)", median_us(numpy_bias)),
              ("first layer: X @ W + b", "matmul alone (no bias)", median_us(lambda: np.matmul(X, W, out=z)))]
    if blas is not None:
        zf = np.empty((512, rows), np.float32, order="F")  # z.T in Fortran order = z in C order

        def gemm_beta_one():
            zf[...] = b[:, None]
            # (X @ W).T = W.T @ X.T; with beta=1 the GEMM adds onto the bias already in C.
            blas.sgemm(1.0, W, X, beta=1.0, c=zf, trans_a=True, trans_b=True, overwrite_c=True)

        result.append(("first layer: X @ W + b", "scipy sgemm with beta=1 onto the bias", median_us(gemm_beta_one)))
    return result


def gather_variants(rows, rng):
    data = rng.standard_normal((60000, 784)).astype(np.float32)
    index = rng.permutation(len(data))[:rows]
    out = np.empty((rows, 784), np.float32)
    return [("row gather", "np.take of the shuffled rows into a reused buffer (dpflow)",
             median_us(lambda: np.take(data, index, axis=0, out=out))),
            ("row gather", "pre-sharded contiguous rows, a view (the minimal loop: no shuffling)",
             median_us(lambda: data[:rows]))]


def framework_overhead():
    """A whole dpflow step of a 4-4-4-3 model on 2 rows: what the graph's Python costs."""
    from dpflow.bench import bench_config, bench_trainer
    from dpflow.comm import LocalCommunicator

    config = bench_config(argparse.Namespace(), batch_size=2, features=4, classes=3, hidden=[4, 4])
    trainer = bench_trainer(config, LocalCommunicator(), (4,))
    permutation, batch = np.arange(2), [(0, 2)]
    return [("per-step Python work", "a whole dpflow step of a 4-4-4-3 model on 2 rows (dpflow)",
             median_us(lambda: trainer.train_step(permutation, batch), repeats=2000, warmup=200))]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=128, help="rows per rank")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    try:
        import numba
    except ImportError:
        numba = None
    try:
        from scipy.linalg import blas
    except ImportError:
        blas = None
    rng = np.random.default_rng(0)
    rows = (relu_variants(args.rows, rng) + check_and_update_variants(rng, numba, blas)
            + bias_variants(args.rows, rng, blas) + gather_variants(args.rows, rng) + framework_overhead())
    print(json.dumps([{"pass": name, "variant": variant, "us": us, "rows": args.rows} for name, variant, us in rows]))


if __name__ == "__main__":
    main()
