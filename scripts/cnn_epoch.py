#!/usr/bin/env python3
"""An epoch of Fashion-MNIST with `--model cnn`, dpflow beside PyTorch, into BENCHMARKS.md.

    ./scripts/cnn-epoch              # needs the peers' venv (scripts/bench --peers makes it)

Runs, one after the other on this machine: `dpflow train --dataset fashion-mnist --model
cnn --epochs 1` on 1 and 2 ranks (the training part of the epoch, from the metrics file),
`dpflow bench --model cnn` on 2 ranks (the step split and the GEMM-only limit), and the same
network in PyTorch (scripts/peers/torch_cnn.py): one process with 2 threads and DDP over gloo
on 2 processes. Writes its own section of BENCHMARKS.md and cnn-epoch.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from doc_section import loadavg, machine_facts, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv", "bin")
PEERS = os.environ.get("DPFLOW_PEERS_VENV", os.path.join(ROOT, ".venv-peers"))
BEGIN, END = "<!-- begin cnn-epoch -->", "<!-- end cnn-epoch -->"


def run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, **kwargs)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def dpflow_epoch(ranks, dataset, extra):
    with tempfile.TemporaryDirectory(prefix="dpflow-cnn-epoch-") as scratch:
        metrics = os.path.join(scratch, "m.jsonl")
        run([os.path.join(VENV, "mpiexec"), "-n", str(ranks), os.path.join(VENV, "dpflow"), "train",
             "--dataset", dataset, "--model", "cnn", "--epochs", "1", "--metrics", metrics, "--quiet", *extra])
        with open(metrics) as handle:
            record = [json.loads(line) for line in handle if '"epoch"' in line][-1]
    return {"who": f"dpflow, {ranks} rank{'s' if ranks > 1 else ''}", "seconds": record["seconds"],
            "test_accuracy": record["test_accuracy"]}


def torch_epoch(ddp):
    script = os.path.join(ROOT, "scripts", "peers", "torch_cnn.py")
    if ddp:
        command = [os.path.join(PEERS, "bin", "torchrun"), "--standalone", "--nproc-per-node", "2", script, "--ddp"]
    else:
        command = [os.path.join(PEERS, "bin", "python"), script, "--threads", "2"]
    result = json.loads(run(command).strip().splitlines()[-1])
    who = "PyTorch DDP (gloo), 2 processes" if ddp else "PyTorch, one process, 2 threads"
    return {"who": who, "seconds": result["epoch_seconds"], "torch": result["torch"]}


def section(rows, bench, facts):
    torch_one = next(row["seconds"] for row in rows if row["who"].startswith("PyTorch, one"))
    ours = next(row["seconds"] for row in rows if row["who"] == "dpflow, 2 ranks")
    verdict = "met" if ours <= torch_one else "not met"
    lines = [BEGIN, "## The cnn on Fashion-MNIST: an epoch beside PyTorch", "",
             f"Measured by `scripts/cnn-epoch` on {facts['date']}: {facts['machine']}; load average "
             f"{facts['load_before']} before, {facts['load_after']} after; BLAS {facts['blas']} "
             f"(OPENBLAS_CORETYPE {facts['coretype']}). The network of "
             "`--model cnn` (conv 3x3 32, pool, conv 3x3 64, pool, both with same padding, dense 128, "
             "dropout, dense 10), "
             "global batch 64, momentum SGD, float32, 60,000 training rows; the training part of "
             "one epoch (no evaluation).", "",
             "| run | epoch s |", "| --- | ---: |"]
    lines += [f"| {row['who']} | {row['seconds']:.1f} |" for row in rows]
    lines += ["", f"Target: dpflow on 2 ranks no slower than PyTorch's one process with 2 threads: "
              f"{ours:.1f} s against {torch_one:.1f} s, **{verdict}** ({torch_one / ours:.2f}x).", "",
              "`dpflow bench --model cnn` on 2 ranks (random data, the same network and batch):", "",
              "```", *bench.rstrip().splitlines(), "```", END]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "cnn-epoch.json"))
    args, extra = parser.parse_known_args()
    if not os.path.exists(os.path.join(PEERS, "bin", "torchrun")):
        sys.exit(f"no PyTorch venv at {PEERS}: `./scripts/bench --peers` creates it "
                 "(or set DPFLOW_PEERS_VENV)")
    load_before = loadavg()
    rows = [dpflow_epoch(1, args.dataset, extra), dpflow_epoch(2, args.dataset, extra),
            torch_epoch(ddp=False), torch_epoch(ddp=True)]
    bench = run([os.path.join(VENV, "mpiexec"), "-n", "2", os.path.join(VENV, "dpflow"), "bench",
                 "--model", "cnn", "--batch-size", "64"])
    kernel = run([os.path.join(VENV, "python"), "-c", "import numpy; from threadpoolctl import threadpool_info; "
                  "print(', '.join(f\"{i['internal_api']} {i.get('architecture', '?')}\" for i in threadpool_info()))"])
    facts = {**machine_facts(load_before), "blas": kernel.strip(),
             "coretype": os.environ.get("OPENBLAS_CORETYPE", "unset")}
    with open(args.json, "w") as handle:
        json.dump({"facts": facts, "rows": rows, "bench": bench}, handle, indent=1)
    new = section(rows, bench, facts)
    write_section(args.output, BEGIN, END, new)
    print(new)


if __name__ == "__main__":
    main()
