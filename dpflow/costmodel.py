"""The standard cost model of allreduce, fitted to measurements and used to predict scaling.

With p ranks, a message of n bytes, a per-message latency alpha (s) and a per-byte time
beta (s/byte), each algorithm takes a alpha + b n beta (Thakur, Rabenseifner and Gropp, 2005):

    ring:               a = 2 (p - 1)                 b = 2 (p - 1) / p
    recursive doubling: a = ceil(log2 p)              b = ceil(log2 p)
    rabenseifner:       a = 2 log2 q (+ 2)            b = 2 (q - 1) / q (+ 2)
                        q = 2^floor(log2 p), the largest power of two <= p; (+ 2) when p != q

Ring reduce-scatters and then allgathers chunks of n/p around a ring: the fewest bytes per
rank, in the most steps. Recursive doubling exchanges whole vectors: the fewest steps.
Rabenseifner reduce-scatters by recursive halving and allgathers by recursive doubling: ring's
bytes in 2 log2 p steps, but only on a power of two. Otherwise it first folds the p - q extra
ranks into neighbours, which carry their whole vector (MPICH sends it in one piece, Open MPI in
halves) and hand the whole result back at the end: two more n on the critical path, so at p = 3
it takes 3 n beta where ring takes 1.33 n beta. MPICH and Open MPI both run Rabenseifner for a
gradient-sized message (MPICH for every message over 8 bytes with a built-in op; Open MPI's
tuned module from 256 KB on 2-3 ranks, 8 KB on 4-15); `dpflow.launcher` says which one runs
when dpflow starts MPI. Pure functions: no MPI here.
"""

import math

import numpy as np


def coefficients(algorithm, p):
    """(a, b) of `algorithm` on p ranks: it takes a alpha + b n beta."""
    if p <= 1:
        return 0.0, 0.0
    if algorithm == "ring":
        return 2 * (p - 1), 2 * (p - 1) / p
    if algorithm == "recursive doubling":
        steps = math.ceil(math.log2(p))
        return steps, steps
    if algorithm == "rabenseifner":
        q = 1 << (p.bit_length() - 1)
        fold = 0 if q == p else 2  # the extra ranks' whole vectors in, whole results out
        return 2 * math.log2(q) + fold, 2 * (q - 1) / q + fold
    raise ValueError(f"unknown allreduce algorithm {algorithm!r}; the model knows {', '.join(ALGORITHMS)}")


ALGORITHMS = ("ring", "recursive doubling", "rabenseifner")


def ring_seconds(p, n_bytes, alpha, beta):
    return allreduce_seconds(p, n_bytes, alpha, beta, "ring")[0]


def recursive_doubling_seconds(p, n_bytes, alpha, beta):
    return allreduce_seconds(p, n_bytes, alpha, beta, "recursive doubling")[0]


def rabenseifner_seconds(p, n_bytes, alpha, beta):
    return allreduce_seconds(p, n_bytes, alpha, beta, "rabenseifner")[0]


def allreduce_seconds(p, n_bytes, alpha, beta, algorithm=None):
    """(seconds, algorithm): `algorithm`'s time, or without one the fastest the model knows."""
    if algorithm is not None:
        a, b = coefficients(algorithm, p)
        return a * alpha + b * n_bytes * beta, algorithm
    return min((allreduce_seconds(p, n_bytes, alpha, beta, name) for name in ALGORITHMS), key=lambda t: t[0])


def fit_alpha_beta(sizes_bytes, seconds, p=2, algorithm="ring"):
    """alpha, beta from allreduce times measured on p ranks running `algorithm`, fitted to its
    a alpha + b n beta by least squares on the *relative* error, so that the microsecond times
    of small messages weigh as much as the large ones."""
    sizes = np.asarray(sizes_bytes, dtype=np.float64)
    times = np.asarray(seconds, dtype=np.float64)
    a, b = coefficients(algorithm, p)
    design = np.column_stack([np.full_like(sizes, a), b * sizes])
    (alpha, beta), *_ = np.linalg.lstsq(design / times[:, None], np.ones_like(times), rcond=None)
    return max(alpha, 0.0), max(beta, 0.0)


def predict(nodes, grad_bytes, compute_seconds, alpha, beta, overlap_fraction=0.0, algorithm=None):
    """Step time and scaling efficiency for weak scaling: each node keeps its batch and its
    compute time, and adds one allreduce of the gradients (by `algorithm`, or the fastest the
    model knows), of which `overlap_fraction` hides behind backward."""
    comm, algorithm = allreduce_seconds(nodes, grad_bytes, alpha, beta, algorithm)
    exposed = comm * (1 - overlap_fraction)
    step = compute_seconds + exposed
    return {"nodes": nodes, "step_s": step, "comm_s": comm, "efficiency": compute_seconds / step,
            "algorithm": algorithm}


def crossover_nodes(grad_bytes, compute_seconds, alpha, beta, algorithm=None, limit=1 << 20):
    """The smallest power-of-two node count at which communication takes longer than compute."""
    p = 2
    while p <= limit:
        if allreduce_seconds(p, grad_bytes, alpha, beta, algorithm)[0] >= compute_seconds:
            return p
        p *= 2
    return None


# TCP over Ethernet with a 1500-byte MTU carries 1448 payload bytes (after IP and TCP headers
# with timestamps) in 1538 bytes on the wire (frame, preamble and gap): 94% of the line rate. The
# shaped links of scripts/cluster delivered 96-99% in raw allreduces (their token bucket counts
# frames, not preamble and gap).
LINK_EFFICIENCY = 1448 / 1538


def line_rate_beta(gigabits_per_second, efficiency=LINK_EFFICIENCY):
    """Seconds per byte of a network link carrying payload at `efficiency` of its line rate."""
    return 8.0 / (gigabits_per_second * 1e9 * efficiency)


def bulk_beta(sizes_bytes, seconds, p, algorithm="ring"):
    """Seconds per byte at the largest measured message, counted as `algorithm` moves it
    (b n bytes on the busiest path): the bandwidth these hosts' own allreduce reaches, which no
    faster network link can improve on (on shared cores the TCP stack, not the link, was the
    limit: see BENCHMARKS.md)."""
    largest = int(np.argmax(sizes_bytes))
    _, b = coefficients(algorithm, p)
    return seconds[largest] / (b * sizes_bytes[largest]) if p > 1 else 0.0


def network_beta(gigabits_per_second, host_beta):
    """The slower of the link (`line_rate_beta`) and the hosts' own bandwidth."""
    return max(line_rate_beta(gigabits_per_second), host_beta)
