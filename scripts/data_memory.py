"""Per-rank resident memory of `dpflow train` on a real dataset at 1, 2 and 4 ranks, and the
data's share of it; writes its section of BENCHMARKS.md. Run it through scripts/data-memory.

While each job trains, every rank's /proc/PID/smaps is sampled: its RSS, its anonymous RSS
(private memory: the interpreter, the model, batch buffers), and the resident pages of the
dataset cache files it maps, both as RSS (pages this rank touched) and as PSS (each shared
page divided by the number of processes mapping it). The ranks of a node map one cache, so
the data's PSS summed over the ranks is the physical memory the data costs the node.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import proc_stat  # noqa: E402 - scripts/cluster.py: the one /proc/PID/stat reader
from doc_section import loadavg, machine_facts, write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- begin data-memory -->", "<!-- end data-memory -->"
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def smaps(pid, data_marker):
    """{rss, anon, data_rss, data_pss} in MB for one process (zeros if it is gone)."""
    totals = dict(rss=0, anon=0, data_rss=0, data_pss=0)
    in_data = False
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                match = MAPPING.match(line)
                if match:
                    in_data = data_marker in match.group(1)
                    continue
                key, _, value = line.partition(":")
                if key not in ("Rss", "Pss", "Anonymous"):
                    continue
                kb = int(value.split()[0])
                if key == "Rss":
                    totals["rss"] += kb
                    if in_data:
                        totals["data_rss"] += kb
                elif key == "Anonymous":
                    totals["anon"] += kb
                elif in_data:
                    totals["data_pss"] += kb
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return {key: value / 1024 for key, value in totals.items()}


def rank_pids(root_pid):
    """{rank: pid} of the dpflow processes below `root_pid` (MPICH sets PMI_RANK)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(entry)
            if fields:  # field 4, the parent's pid
                children.setdefault(int(fields[1]), []).append(int(entry))
    ranks, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if any(part.endswith(b"dpflow") for part in command) and b"PMI_RANK" in environ:
            ranks[int(environ[b"PMI_RANK"])] = pid
    return ranks


def measure(ranks, dataset, epochs, data_home, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", DPFLOW_DATA=data_home)
    command = [os.path.join(ROOT, ".venv", "bin", "mpiexec"), "-n", str(ranks),
               os.path.join(ROOT, ".venv", "bin", "dpflow"), "train", "--dataset", dataset,
               "--epochs", str(epochs), "--progress", "plain", *extra]
    started = time.monotonic()
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {}
    marker = os.path.join(data_home, "cache") + os.sep
    while job.poll() is None:
        for rank, pid in rank_pids(job.pid).items():
            sample = smaps(pid, marker)
            best = peaks.setdefault(rank, dict.fromkeys(sample, 0.0))
            for key, value in sample.items():
                best[key] = max(best[key], value)
        time.sleep(0.2)
    output = job.stdout.read()
    if job.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({job.returncode}):\n{output}")
    accuracy = re.search(r"done: test accuracy ([\d.]+)%", output)
    return {"ranks": ranks, "command": " ".join(command).replace(ROOT + "/.venv/bin/", ""),
            "seconds": time.monotonic() - started, "per_rank": [peaks[r] for r in sorted(peaks)],
            "test_accuracy": float(accuracy.group(1)) if accuracy else None}


def section(results, facts):
    lines = [BEGIN, "## Memory per rank on real data (Fashion-MNIST, float32)", "",
             f"Measured by `scripts/data-memory` on {facts['date']}: {facts['machine']}; load average "
             f"{facts['load_before']} before and {facts['load_after']} after (other jobs shared the "
             "machine). Each rank's peak over the run, sampled from /proc/PID/smaps every 0.2 s.", "",
             "| ranks | RSS MB (each rank) | anonymous MB | data RSS MB | data PSS MB | data PSS, all ranks MB | test acc | wall s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        per_rank = result["per_rank"]

        def spread(key):
            values = [rank[key] for rank in per_rank]
            low, high = min(values), max(values)
            return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"

        total = sum(rank["data_pss"] for rank in per_rank)
        accuracy = f"{result['test_accuracy']:.2f}%" if result["test_accuracy"] is not None else "-"
        lines.append(f"| {result['ranks']} | {spread('rss')} | {spread('anon')} | {spread('data_rss')} | "
                     f"{spread('data_pss')} | {total:.0f} | {accuracy} | {result['seconds']:.1f} |")
    others = ", ".join(f"-n {result['ranks']}" for result in results[1:])
    lines += ["", f"Command: `{results[0]['command']}`" + (f", and the same with {others}." if others else "."), "",
              "*data RSS* is the cache pages a rank has touched; they are the node's page cache, shared, "
              "so *data PSS* divides each page by the ranks that map it and its sum over the ranks is "
              "what the data costs the node. The data is not in the anonymous (private) memory at all.",
              END]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "data-memory.json"))
    args, extra = parser.parse_known_args()
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="dpflow-data-memory-") as data_home:
        # Build the cache first, so that no measured run pays for it.
        subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "-c",
                        f"from dpflow.data import load_dataset; load_dataset({args.dataset!r})"],
                       env=dict(os.environ, DPFLOW_DATA=data_home), check=True)
        results = [measure(ranks, args.dataset, args.epochs, data_home, extra) for ranks in args.ranks]
    facts = machine_facts(load_before)
    with open(args.json, "w") as handle:
        json.dump({"facts": facts, "results": results}, handle, indent=1)
    new = section(results, facts)
    write_section(args.output, BEGIN, END, new)
    print(new)


if __name__ == "__main__":
    main()
