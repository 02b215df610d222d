"""The standard cost model of allreduce, fitted to measurements and used to predict scaling.

With p ranks, a message of n bytes, a per-message latency alpha (s) and a per-byte time
beta (s/byte) (Thakur, Rabenseifner and Gropp, 2005):

    ring:               2 (p - 1) alpha + 2 (p - 1) / p * n * beta
    recursive doubling: log2(p) alpha + log2(p) * n * beta

Ring moves the least data per rank (bandwidth-optimal); recursive doubling takes the fewest
steps (latency-optimal). MPI libraries pick between such algorithms by message size; the
model takes the faster of the two for each case. Pure functions: no MPI here.
"""

import math

import numpy as np


def ring_seconds(p, n_bytes, alpha, beta):
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n_bytes * beta


def recursive_doubling_seconds(p, n_bytes, alpha, beta):
    if p <= 1:
        return 0.0
    steps = math.ceil(math.log2(p))
    return steps * alpha + steps * n_bytes * beta


def allreduce_seconds(p, n_bytes, alpha, beta):
    """(seconds, algorithm) of the faster algorithm."""
    ring = ring_seconds(p, n_bytes, alpha, beta)
    doubling = recursive_doubling_seconds(p, n_bytes, alpha, beta)
    return (ring, "ring") if ring <= doubling else (doubling, "recursive doubling")


def fit_alpha_beta(sizes_bytes, seconds, p=2):
    """alpha, beta from allreduce times measured on p ranks, fitted to the ring form
    t = 2 (p-1) alpha + 2 (p-1)/p n beta by least squares on the *relative* error, so
    that the microsecond times of small messages weigh as much as the large ones."""
    sizes = np.asarray(sizes_bytes, dtype=np.float64)
    times = np.asarray(seconds, dtype=np.float64)
    design = np.column_stack([np.full_like(sizes, 2 * (p - 1)), 2 * (p - 1) / p * sizes])
    (alpha, beta), *_ = np.linalg.lstsq(design / times[:, None], np.ones_like(times), rcond=None)
    return max(alpha, 0.0), max(beta, 0.0)


def predict(nodes, grad_bytes, compute_seconds, alpha, beta, overlap_fraction=0.0):
    """Step time and scaling efficiency for weak scaling: each node keeps its batch and its
    compute time, and adds one allreduce of the gradients, of which `overlap_fraction` hides
    behind backward."""
    comm, algorithm = allreduce_seconds(nodes, grad_bytes, alpha, beta)
    exposed = comm * (1 - overlap_fraction)
    step = compute_seconds + exposed
    return {"nodes": nodes, "step_s": step, "comm_s": comm, "efficiency": compute_seconds / step,
            "algorithm": algorithm}


def crossover_nodes(grad_bytes, compute_seconds, alpha, beta, limit=1 << 20):
    """The smallest power-of-two node count at which communication takes longer than compute."""
    p = 2
    while p <= limit:
        if allreduce_seconds(p, grad_bytes, alpha, beta)[0] >= compute_seconds:
            return p
        p *= 2
    return None


def line_rate_beta(gigabits_per_second, efficiency=0.9):
    """Seconds per byte of a network link running at `efficiency` of its line rate."""
    return 8.0 / (gigabits_per_second * 1e9 * efficiency)


def bulk_beta(sizes_bytes, seconds, p):
    """Seconds per byte at the largest measured message, counted as the ring moves it
    (2 (p-1)/p n bytes per rank): the bandwidth these hosts' own allreduce reaches, which no
    faster network link can improve on (on shared cores the TCP stack, not the link, was the
    limit: see BENCHMARKS.md)."""
    largest = int(np.argmax(sizes_bytes))
    return seconds[largest] / (2 * (p - 1) / p * sizes_bytes[largest]) if p > 1 else 0.0


def network_beta(gigabits_per_second, host_beta):
    """The slower of the link at 90% of its line rate and the hosts' own bandwidth."""
    return max(line_rate_beta(gigabits_per_second), host_beta)
