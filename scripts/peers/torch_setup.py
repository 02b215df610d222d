"""What both PyTorch peers do before their loop: the flags they share, the process group
under torchrun, and intra-op threads that split the cores between the node's processes."""

import os

import torch
import torch.distributed as dist


def add_common_arguments(parser):
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: the cores divided by the local ranks)")
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel over gloo (under torchrun)")


def start_peer(args):
    """(rank, world size, threads), with the gloo group joined under --ddp."""
    if args.ddp:
        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    else:
        rank, size, local = 0, 1, 1
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return rank, size, threads
