"""PyTorch on the same training step as `dpflow bench`: MLP 784-512-256-10, ReLU, softmax
cross-entropy, plain SGD, the same random global batch, float32, on the CPU.

    python scripts/peers/torch_peer.py --threads 2                 # one process
    torchrun --standalone --nproc-per-node 2 scripts/peers/torch_peer.py --ddp   # DDP, gloo

Written as a PyTorch user would (nn.Sequential, DistributedDataParallel, optimizer.step);
prints one JSON line from rank 0. Run by scripts/bench --peers in its own virtual
environment: PyTorch is never a dependency of dpflow.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch_setup import add_common_arguments, start_peer


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    add_common_arguments(parser)
    args = parser.parse_args()
    rank, size, threads = start_peer(args)

    rng = np.random.default_rng(1234)  # the same global batch as dpflow bench
    x = rng.standard_normal((args.batch_size, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.batch_size)
    first, last = rank * args.batch_size // size, (rank + 1) * args.batch_size // size
    X = torch.from_numpy(np.ascontiguousarray(x[first:last]))
    labels = torch.from_numpy(y[first:last])

    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    times = np.empty(args.steps)
    for step in range(args.warmup + args.steps):
        if step == args.warmup and args.ddp:
            dist.barrier()
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(X), labels)  # the local mean; DDP averages over ranks
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times[step - args.warmup] = time.perf_counter() - started
    slowest = torch.tensor([times.mean()], dtype=torch.float64)
    if args.ddp:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"peer": f"PyTorch {'DDP (gloo)' if args.ddp else 'one process'}",
                          "torch": torch.__version__, "world_size": size, "threads": threads,
                          "batch_size": args.batch_size, "step_ms": 1e3 * slowest.item(),
                          "samples_per_sec": args.batch_size / slowest.item()}))
    if args.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
