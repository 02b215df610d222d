"""PyTorch on the network of `dpflow train --model cnn`: one epoch of Fashion-MNIST's shape.

    python scripts/peers/torch_cnn.py --threads 2                         # one process
    torchrun --standalone --nproc-per-node 2 scripts/peers/torch_cnn.py --ddp   # DDP, gloo

conv 3x3 (32, same padding) -> ReLU -> max pool 2 -> conv 3x3 (64, same) -> ReLU -> max pool 2 -> dense 128 ->
ReLU -> dropout 0.5 -> dense 10, softmax cross-entropy, momentum SGD, global batch 64, float32,
60,000 random 1x28x28 examples (the time of a step does not depend on the pixel values).
Written as a PyTorch user would; prints one JSON line from rank 0. Run by scripts/cnn-epoch
in the peers' own virtual environment: PyTorch is never a dependency of dpflow.
"""

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch_setup import add_common_arguments, start_peer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--rows", type=int, default=60_000)
    add_common_arguments(parser)
    args = parser.parse_args()
    rank, size, threads = start_peer(args)
    x = torch.rand(args.rows, 1, 28, 28)
    y = torch.randint(0, 10, (args.rows,))
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    share = args.batch_size // size
    if args.ddp:
        dist.barrier()
    started = time.perf_counter()
    for start in range(0, args.rows - args.batch_size + 1, args.batch_size):
        first = start + rank * share
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[first:first + share]), y[first:first + share])
        loss.backward()
        optimizer.step()
    seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    if args.ddp:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"peer": f"PyTorch {'DDP (gloo)' if args.ddp else 'one process'}",
                          "torch": torch.__version__, "world_size": size, "threads": threads,
                          "batch_size": args.batch_size, "epoch_seconds": seconds.item()}))
    if args.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
