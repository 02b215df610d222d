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


MB = f"{PARAMETERS * 4 / 1e6:.1f} MB"


def median_us(function, repeats=300, warmup=30, setup=None):
    """Median microseconds of `function()`; `setup()`, if given, runs before each call, untimed."""
    for _ in range(warmup):
        setup and setup()
        function()
    times = []
    for _ in range(repeats):
        setup and setup()
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
    reduced = (rng.standard_normal(PARAMETERS) * 1e-3).astype(np.float32)
    grads, scratch = reduced.copy(), np.empty_like(params)
    lr = np.float32(1e-3)

    def fresh_gradient():  # the update consumes it; untimed
        np.copyto(grads, reduced)

    def scratch_update():
        np.multiply(grads, lr, out=scratch)
        params.__isub__(scratch)

    def numpy_update():
        np.multiply(grads, lr, out=grads)
        params.__isub__(grads)

    rows = [
        (f"non-finite check, {MB}", "max and min (before)",
         median_us(lambda: math.isfinite(float(grads.max())) and math.isfinite(float(grads.min())))),
        (f"non-finite check, {MB}", "one BLAS dot, max/min only if not finite (dpflow)",
         median_us(lambda: all_finite(grads))),
        (f"SGD update, {MB}", "g * lr into a third buffer, then p -= that (before)", median_us(scratch_update)),
        (f"SGD update, {MB}", "g *= lr over the spent gradient, then p -= g (dpflow)",
         median_us(numpy_update, setup=fresh_gradient)),
        (f"check + update, {MB}", "dpflow: the check, then the update",
         median_us(lambda: (all_finite(grads), numpy_update()), setup=fresh_gradient)),
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
        rows += [(f"SGD update, {MB}", f"numba {numba_module.__version__}: one loop",
                  median_us(lambda: update(params, grads, lr))),
                 (f"check + update, {MB}", f"numba {numba_module.__version__}: check loop, update loop",
                  median_us(lambda: fused(params, grads, lr)))]
    if blas is not None:
        rows.append((f"SGD update, {MB}", "scipy saxpy: p += (-lr) g, one pass (may fuse multiply-add: "
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

    grad, ones, b_grad = np.ones((rows, 512), np.float32), np.ones(rows, np.float32), np.empty(512, np.float32)
    result = [("first layer: X @ W + b", "matmul, then z += b (dpflow)", median_us(numpy_bias)),
              ("first layer: X @ W + b", "matmul alone (no bias)", median_us(lambda: np.matmul(X, W, out=z))),
              ("bias gradient, 512 wide", "grad.sum(axis=0) (before)", median_us(lambda: grad.sum(axis=0, out=b_grad))),
              ("bias gradient, 512 wide", "ones @ grad, one BLAS pass (dpflow)",
               median_us(lambda: np.matmul(ones, grad, out=b_grad)))]
    if blas is not None:
        zf = z.T  # z in C order is z.T in Fortran order, which the Fortran BLAS writes in place

        def gemm_beta_one():
            zf[...] = b[:, None]
            # z.T = W.T @ X.T, every operand a Fortran-order view (no copies); with beta=1 the
            # GEMM adds onto the bias already in C.
            blas.sgemm(1.0, W.T, X.T, beta=1.0, c=zf, overwrite_c=True)

        result.append(("first layer: X @ W + b", "scipy sgemm with beta=1 onto the bias", median_us(gemm_beta_one)))
    return result


def gather_variants(rows, rng):
    data = rng.standard_normal((60000, 784)).astype(np.float32)
    index = rng.permutation(len(data))[:rows]
    out = np.empty((rows, 784), np.float32)
    return [("row gather", "np.take of the shuffled rows into a reused buffer, mode=raise (before)",
             median_us(lambda: np.take(data, index, axis=0, out=out))),
            ("row gather", "np.take, mode=clip: no temporary (dpflow)",
             median_us(lambda: np.take(data, index, axis=0, out=out, mode="clip"))),
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

    try:
        import numba
    except ImportError:
        numba = None
    try:
        from scipy.linalg import blas
    except ImportError:
        blas = None
    threadpool_limits(1)  # after the imports: scipy brings a BLAS of its own
    rng = np.random.default_rng(0)
    rows = (relu_variants(args.rows, rng) + check_and_update_variants(rng, numba, blas)
            + bias_variants(args.rows, rng, blas) + gather_variants(args.rows, rng) + framework_overhead())
    print(json.dumps([{"pass": name, "variant": variant, "us": us, "rows": args.rows} for name, variant, us in rows]))


if __name__ == "__main__":
    main()
