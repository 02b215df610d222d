#!/usr/bin/env python3
"""How often MPICH's start-up under `srun --mpi=pmi2` fails, per MPICH netmod.

    sudo .venv/bin/python scripts/slurm_start_study.py --starts 25

brings up `scripts/cluster --slurm --hosts 2` and, on its login host, starts
`srun --mpi=pmi2 -N 2 -n 4 dpflow train --dtype float64 --epochs 1` STARTS times per netmod
(UCX and OFI in turn, MPIR_CVAR_CH4_NETMOD set explicitly), each with a timeout, and with
PMI_DEBUG=1 so that every PMI request the ranks send shows in their output. Each start adds
an environment variable of a different length (0-4000 bytes; --same-environment: none),
which moves the ranks' heap a little. It prints one line per start (status, seconds, the
longest PMI request in bytes, Slurm's mpi/pmi2 errors) and a summary per netmod.

Slurm's mpi/pmi2 plugin reads a PMI-1 request with one read() of at most 1024 bytes: a
longer one is cut, and the start fails or hangs (`dpflow.launcher.mpich_settings`).
"""

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_LIMIT = 1024  # slurmstepd's one read() of a PMI-1 request
REQUEST = re.compile(r"pmi: (cmd=[^\n]*)")  # PMI_DEBUG's "send to fd=N pmi: cmd=..."
SLURM_ERROR = re.compile(r"error: mpi/pmi2: [^\n]*")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=25, help="starts per netmod (25)")
    parser.add_argument("--netmod", action="append", choices=("ucx", "ofi"),
                        help="netmods to compare (default: ucx and ofi)")
    parser.add_argument("--timeout", type=float, default=60,
                        help="seconds before a start counts as hung (60)")
    parser.add_argument("--same-environment", action="store_true",
                        help="do not vary the environment between starts")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*",
                        default=["dpflow", "train", "--dtype", "float64", "--epochs", "1"],
                        help="what srun starts (default: dpflow train --dtype float64 --epochs 1)")
    args = parser.parse_args(argv)
    args.netmod = args.netmod or ["ucx", "ofi"]
    return args


def start(netmod, padding, command, timeout):
    """One `srun --mpi=pmi2 -N 2 -n 4 COMMAND`: (status, seconds, longest request, errors)."""
    env = dict(os.environ, PMI_DEBUG="1", MPIR_CVAR_CH4_NETMOD=netmod,
               DPFLOW_STUDY_PADDING="x" * padding)
    started = time.monotonic()
    try:
        done = subprocess.run(["srun", "--mpi=pmi2", "-N", "2", "-n", "4", *command], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = "hung"
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (expired.stdout, expired.stderr))
        release_the_nodes()
    longest = max((len(r) + 1 for r in REQUEST.findall(output)), default=0)  # + its newline
    return status, time.monotonic() - started, longest, sorted(set(SLURM_ERROR.findall(output)))


def release_the_nodes(seconds=60):
    """Cancel the hung step's job (srun was killed, its ranks were not) and wait until it is
    gone, so that the next start gets the nodes. Only this study's jobs run on its cluster."""
    subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
        if not queued.strip():
            return
        time.sleep(0.5)


def study(args):
    results = {netmod: [] for netmod in args.netmod}
    for i in range(args.starts):
        padding = 0 if args.same_environment else (i * 397) % 4001
        for netmod in args.netmod:  # interleaved: both see the same load
            status, seconds, longest, errors = start(netmod, padding, args.command, args.timeout)
            results[netmod].append((status, longest))
            print(f"{netmod} start {i + 1}: status {status} after {seconds:.1f} s, longest PMI "
                  f"request {longest} bytes" + (f"; {'; '.join(errors)}" if errors else ""),
                  flush=True)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{subprocess.run(['sinfo', '--version'], capture_output=True, text=True).stdout.strip()}")
    for netmod, runs in results.items():
        failed = sum(status != 0 for status, _ in runs)
        hung = sum(status == "hung" for status, _ in runs)
        over = sum(longest > READ_LIMIT for _, longest in runs)
        print(f"{netmod}: {failed} of {len(runs)} starts failed ({hung} hung); longest PMI request "
              f"{min(l for _, l in runs)}-{max(l for _, l in runs)} bytes, over {READ_LIMIT} in "
              f"{over} starts")
    return 0


def main(argv):
    args = parse_args(argv)
    if args.inside:
        return study(args)
    # Bring the cluster up around this script, with this Python's venv first on PATH.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cluster"), "--slurm",
                           "--hosts", "2", "--", sys.executable, os.path.abspath(__file__),
                           "--inside", *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
