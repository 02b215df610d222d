"""The batch study behind SCALING.md: how far the global batch goes on Fashion-MNIST.

Run it through scripts/batch-study. Every (rule, global batch) pair is one `dpflow train`
run with the same model, epoch budget and cosine schedule; the rules are

    sgd    momentum SGD with the lr tuned at batch 64, unchanged
    goyal  the same lr scaled linearly with the batch, with warmup (Goyal et al. 2017)
    lars   LARS (You et al. 2017), lr scaled by the square root of the batch, warmup
    lamb   LAMB (You et al. 2019), lr scaled by the square root of the batch, warmup

Each run is one process accumulating two micro-batches (`--accumulate 2`): the same update
as two ranks, and the two micro-batch gradients give the gradient noise scale for free.
`--jobs` runs go at once. Every figure in SCALING.md, scaling.json and scaling.png comes
from the runs of the invocation that writes them.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from doc_section import loadavg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # as scripts/bench_sweep.py
BASE_BATCH = 64
# The rules: optimizer flags, and a label. The lrs were tuned at batch 64 for the 128-64 mlp
# (sgd's 0.05 was dpflow's default lr then; LARS and LAMB's give the same accuracy as SGD
# there) and are never retuned per batch: a rule is a recipe for a batch nobody has tuned for.
RULES = {
    "sgd": ("momentum SGD, lr of batch 64", ["--optimizer", "momentum", "--lr", "0.05"]),
    "goyal": ("linear scaling + warmup", ["--optimizer", "momentum", "--lr", "0.05", "--lr-scaling", "linear",
                                          "--warmup-epochs", "3"]),
    "lars": ("LARS, sqrt scaling + warmup", ["--optimizer", "lars", "--lr", "0.9", "--lr-scaling", "sqrt",
                                              "--warmup-epochs", "3"]),
    "lamb": ("LAMB, sqrt scaling + warmup", ["--optimizer", "lamb", "--lr", "0.002", "--lr-scaling", "sqrt",
                                              "--warmup-epochs", "3"]),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="a name or path as for `dpflow train --dataset` (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=40, help="the budget of every run (default %(default)s)")
    parser.add_argument("--batches", default="64,256,1024,4096,8192,16384", help="global batches")
    parser.add_argument("--rules", default=",".join(RULES), help="rules to run (default %(default)s)")
    parser.add_argument("--hidden", default="128,64", help="the MLP's hidden sizes (default %(default)s)")
    parser.add_argument("--target", type=float, default=0.85,
                        help="test accuracy whose first epoch counts the steps to target (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s, the cores here)")
    parser.add_argument("--out", default=ROOT, help="where SCALING.md, scaling.json, scaling.png go")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, ".batch-study"),
                        help="metrics files of the runs (default %(default)s)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite SCALING.md and scaling.png from the scaling.json in --out, without training")
    return parser.parse_args()


def run_environment():
    env = {name: value for name, value in os.environ.items() if name not in SLOW_BLAS_VARIABLES}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def train_command(args, rule, batch, metrics):
    """One run: the global batch as 2 accumulated micro-batches in one process."""
    return [sys.executable, "-m", "dpflow", "train", "--dataset", args.dataset, "--hidden", args.hidden,
            "--epochs", str(args.epochs), "--batch-size", str(batch // 2), "--accumulate", "2",
            "--base-batch-size", str(BASE_BATCH), "--lr-schedule", "cosine", *RULES[rule][1],
            "--noise-scale", "on", "--consistency-every", "0", "--progress", "plain", "--quiet",
            "--seed", "0", "--metrics", metrics]


def train(args, rule, batch):
    metrics = os.path.join(args.runs_dir, f"{rule}-{batch}.jsonl")
    command = train_command(args, rule, batch, metrics)
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, env=run_environment(), cwd=ROOT)
    seconds = time.monotonic() - started
    if completed.returncode != 0:
        print(f"  {rule:6} batch {batch:6,}: stopped with exit {completed.returncode}: "
              f"{(completed.stderr.strip().splitlines() or [''])[-1][:160]}", flush=True)
        return {"rule": rule, "batch": batch, "failed": completed.stderr.strip()[-2000:],
                "command": command, "seconds": seconds}
    with open(metrics) as handle:
        epochs = [json.loads(line) for line in handle if line.strip()]
    result = summarise(args, rule, batch, epochs)
    result.update(command=command, seconds=seconds)
    print(f"  {rule:6} batch {batch:6,}: test accuracy {result['final_accuracy']:.2%} "
          f"after {result['steps']} steps, {seconds:.0f} s", flush=True)
    return result


def summarise(args, rule, batch, epochs):
    reached = next((r for r in epochs if r["test_accuracy"] >= args.target), None)
    noise = [r.get("noise_scale") for r in epochs]
    return {"rule": rule, "batch": batch, "final_accuracy": epochs[-1]["test_accuracy"],
            "best_accuracy": max(r["test_accuracy"] for r in epochs), "steps": epochs[-1]["step"],
            "steps_to_target": reached["step"] if reached else None,
            "epoch_to_target": reached["epoch"] if reached else None,
            "accuracy_per_epoch": [r["test_accuracy"] for r in epochs], "noise_scale_per_epoch": noise,
            "peak_lr": max(lr for r in epochs for lr in r["lrs"])}


def machine():
    facts = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        facts["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                             if line.startswith("Model name")), "unknown")
    except OSError:
        facts["cpu"] = "unknown"
    probe = ("import json, numpy\ntry:\n import threadpoolctl\n info = threadpoolctl.threadpool_info()\n"
             " kernel = ', '.join(f\"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}\" for i in info)\n"
             "except ImportError:\n kernel = 'unknown (threadpoolctl not installed)'\n"
             "print(json.dumps({'numpy': numpy.__version__, 'blas': kernel}))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_environment())
    if completed.returncode == 0:
        facts.update(json.loads(completed.stdout))
    return facts


def noise_cost():
    """The noise scale's added work per measured step against the step itself, at several
    rows per rank: the two squared norms and the bookkeeping the trainer adds, timed on the
    trainer's own buffers, interleaved with steps so both see the same machine load."""
    code = r"""
import json, time, numpy as np
from dpflow.comm import LocalCommunicator
from dpflow.config import TrainConfig
from dpflow.data import Dataset
from dpflow.noise import local_term, step_estimate
from dpflow.sharding import shard_bounds
from dpflow.trainer import NOISE_ROWS, Trainer
rng, out = np.random.default_rng(0), []
for rows in (32, 64, 128, 256, 512):
    x = rng.standard_normal((rows, 784)).astype(np.float32); y = rng.integers(0, 10, rows)
    t = Trainer(TrainConfig(dataset="r", hidden=[128, 64], batch_size=rows, noise_scale="off",
                            consistency_every=0, stall_timeout=0), LocalCommunicator(), Dataset("r", x, y, x[:1], y[:1], 10))
    perm, g = np.arange(rows), t.flat.param_grads
    def added():
        term = local_term(float(np.dot(g, g)), rows // 2, rows)
        pieces = [len(range(*shard_bounds(rows, r, 2))) for r in range(2)]
        step_estimate(term, pieces, float(np.dot(g, g)), rows)
    for _ in range(10): t.train_step(perm, [(0, rows)])
    ratios = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(30): t.train_step(perm, [(0, rows)])
        step = (time.perf_counter() - t0) / 30
        t0 = time.perf_counter()
        for _ in range(300): added()
        ratios.append((time.perf_counter() - t0) / 300 / step)
    ratio = sorted(ratios)[len(ratios) // 2]
    every = -(-NOISE_ROWS // rows)
    out.append({"rows_per_rank": rows, "step_ms": step * 1e3, "measured_step_cost": ratio,
                "auto_every": every, "auto_cost": ratio / every})
print(json.dumps(out))
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=run_environment(), cwd=ROOT)
    if completed.returncode != 0:
        sys.exit(f"the noise-cost measurement failed:\n{completed.stderr}")
    return json.loads(completed.stdout)


# --- reading the results ---------------------------------------------------------------------

def by_rule(results):
    table = {}
    for r in results:
        if "failed" not in r:
            table.setdefault(r["rule"], {})[r["batch"]] = r
    return table


def outcome(failure):
    """What a run that stopped with an error did: 'diverged' (NaN or inf) or 'failed'."""
    return "diverged" if "NaN or infinite" in failure["failed"] else "failed"


def keeps_accuracy_up_to(runs, baseline, failed=(), tolerance=0.01):
    """The largest batch up to which every batch of the rule is within `tolerance` of baseline
    (a run that stopped with an error ends the streak)."""
    kept = None
    for batch in sorted(set(runs) | set(failed)):
        if batch in failed or runs[batch]["final_accuracy"] < baseline - tolerance:
            break
        kept = batch
    return kept


def fit_critical_batch(points):
    """Least squares S = S_min (1 + B_crit / B) over (B, steps to target): McCandlish et al.'s
    model; linear in 1/B. None with fewer than 3 points or a non-positive fit."""
    if len(points) < 3:
        return None
    xs = [1.0 / b for b, _ in points]
    ys = [float(s) for _, s in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    s_min = mean_y - slope * mean_x
    if s_min <= 0 or slope <= 0:
        return None
    return {"s_min": s_min, "b_crit": slope / s_min}


def chart(table, baseline, args, noise, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, steps_axis, noise_axis) = plt.subplots(1, 3, figsize=(16, 4.6))
    for rule, runs in table.items():
        batches = sorted(runs)
        accuracy_axis.plot(batches, [100 * runs[b]["final_accuracy"] for b in batches], "o-", label=RULES[rule][0])
        reached = [(b, runs[b]["steps_to_target"]) for b in batches if runs[b]["steps_to_target"]]
        if reached:
            steps_axis.plot(*zip(*reached), "o-", label=RULES[rule][0])
    accuracy_axis.axhspan(100 * baseline - 1, 100 * baseline, color="grey", alpha=0.2,
                          label="within 1 point of batch 64")
    late = late_noise_scale(table["sgd"][min(table["sgd"])]["noise_scale_per_epoch"])
    if late:
        accuracy_axis.axvline(late, color="black", linestyle=":", label=f"late noise scale {late:,.0f}")
    accuracy_axis.set(xscale="log", xlabel="global batch", ylabel="test accuracy after the budget (%)",
                      title=f"{args.epochs} epochs, cosine schedule")
    accuracy_axis.set_ylim(max(10, 100 * baseline - 15), 100 * baseline + 2)
    accuracy_axis.legend(fontsize=8)
    steps_axis.set(xscale="log", yscale="log", xlabel="global batch",
                   ylabel=f"steps to {args.target:.0%} test accuracy", title="steps to target (missing: never)")
    if noise:
        steps_axis.axvline(noise, color="black", linestyle=":", label=f"noise scale at {args.target:.0%}: {noise:,.0f}")
    steps_axis.legend(fontsize=8)
    sgd = table.get("sgd", {}).get(min(table.get("sgd", {BASE_BATCH: None})))
    if sgd:
        epochs = range(1, len(sgd["noise_scale_per_epoch"]) + 1)
        noise_axis.plot(epochs, sgd["noise_scale_per_epoch"], "o-", label=f"sgd, batch {sgd['batch']}")
    for rule in ("lamb", "lars"):
        run = table.get(rule, {}).get(max(table.get(rule, {0: None}) or [0]))
        if run:
            noise_axis.plot(range(1, len(run["noise_scale_per_epoch"]) + 1), run["noise_scale_per_epoch"],
                            "s-", label=f"{rule}, batch {run['batch']}")
    noise_axis.set(yscale="log", xlabel="epoch", ylabel="B_simple (rows)", title="gradient noise scale")
    noise_axis.legend(fontsize=8)
    for axis in (accuracy_axis, steps_axis, noise_axis):
        axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def late_noise_scale(series):
    """The median noise scale over the last third of the epochs: late in a decaying schedule
    |G|^2 nears 0 and single epochs swing widely, the median does not."""
    late = sorted(v for v in series[len(series) - max(1, len(series) // 3):] if v)
    return late[len(late) // 2] if late else None


def fmt_batch(batch):
    return f"{batch:,}" if batch else "none"


def report(args, results, table, facts, timing, cost, path_png):
    """SCALING.md: every number from this invocation's runs."""
    baseline_run = table["sgd"][min(table["sgd"])]
    baseline = baseline_run["final_accuracy"]
    batches = sorted({r["batch"] for r in results})
    failures = {(r["rule"], r["batch"]): r for r in results if "failed" in r}
    failed_batches = {rule: [b for (r, b) in failures if r == rule] for rule in table}
    kept = {rule: keeps_accuracy_up_to(runs, baseline, failed_batches[rule]) for rule, runs in table.items()}
    command = "./scripts/batch-study " + " ".join(shlex.quote(a) for a in facts.get("argv", []))
    lines = [
        "# How far the global batch goes: the batch study",
        "",
        "Generated by `scripts/batch-study` from the runs it made; nothing here is typed by hand.",
        "",
        f"- Command: `{command.strip()}`",
        f"- Machine: {facts.get('cpu')}, {facts.get('cores')} cores; Python {facts.get('python')}, numpy "
        f"{facts.get('numpy')}, BLAS {facts.get('blas')} (one thread per process; OPENBLAS_CORETYPE and "
        "OPENBLAS_L2_SIZE unset for the runs)",
        f"- Date: {facts['date']}; wall time {timing['seconds'] / 60:.1f} min for "
        f"{sum('same_run_as' not in r for r in results)} runs, "
        f"{args.jobs} at a time",
        f"- Load average (1, 5, 15 min) at the start: {timing['load_start']}; at the end: {timing['load_end']}. "
        "The machine was shared with other work, so the seconds are an upper bound of what it takes alone.",
        f"- Data: `{args.dataset}`; model: MLP with hidden layers {args.hidden.replace(',', '-')}, ReLU, float32; "
        f"{args.epochs} epochs for every run, cosine decay to 0 after any warmup, seed 0.",
        "- Each run is one process accumulating 2 micro-batches of half the global batch "
        "(`--batch-size B/2 --accumulate 2`): the update of two ranks, and the two micro-batch gradients "
        "give the gradient noise scale.",
        "",
        "## The rules",
        "",
        "| rule | what | flags (besides the batch) |",
        "| --- | --- | --- |",
    ]
    for rule in table:
        lines.append(f"| {rule} | {RULES[rule][0]} | `{' '.join(RULES[rule][1])}` |")
    lines += ["", f"Learning rates were set at batch {BASE_BATCH} and never retuned per batch.", "",
              "## Test accuracy after the budget", "",
              "| global batch | steps | " + " | ".join(table) + " |",
              "| ---: | ---: | " + " | ".join("---:" for _ in table) + " |"]
    for batch in batches:
        steps = next((table[rule][batch]["steps"] for rule in table if batch in table[rule]), "")
        cells = []
        for rule in table:
            run = table[rule].get(batch)
            cells.append(f"{100 * run['final_accuracy']:.2f}" if run
                         else outcome(failures[rule, batch]) if (rule, batch) in failures else "")
        lines.append(f"| {batch:,} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", f"Steps to {args.target:.0%} test accuracy (the step count at the end of the first epoch "
              "that reached it; - for never):", "",
              "| global batch | " + " | ".join(table) + " |", "| ---: | " + " | ".join("---:" for _ in table) + " |"]
    for batch in batches:
        cells = [str(table[rule][batch]["steps_to_target"] or "-") if batch in table[rule]
                 else outcome(failures[rule, batch]) if (rule, batch) in failures else "" for rule in table]
        lines.append(f"| {batch:,} | " + " | ".join(cells) + " |")
    lines += ["", f"![test accuracy and steps to target against the global batch, and the noise scale]({path_png})", ""]

    # The target of the issue: LARS or LAMB within 1 point of batch 64 at >= 8,192.
    lines += ["## Reading", "",
              f"The baseline is momentum SGD at batch {baseline_run['batch']}: {100 * baseline:.2f}% "
              f"after {args.epochs} epochs. Within 1 point of it means at least {100 * baseline - 1:.2f}%.", ""]
    for rule in table:
        runs = table[rule]
        limit = kept[rule]
        worst = min(runs, key=lambda b: runs[b]["final_accuracy"])
        text = (f"- **{rule}** keeps accuracy within 1 point up to batch {fmt_batch(limit)}"
                if limit else f"- **{rule}** is more than 1 point below the baseline already at batch {min(runs):,}")
        beyond = [b for b in sorted(set(runs) | set(failed_batches[rule])) if limit and b > limit]
        if beyond and beyond[0] in failed_batches[rule]:
            text += f"; at {beyond[0]:,} it {outcome(failures[rule, beyond[0]])} (the loss became NaN or infinite)"
        elif beyond:
            b = beyond[0]
            text += (f"; at {b:,} it reaches {100 * runs[b]['final_accuracy']:.2f}% "
                     f"({100 * (runs[b]['final_accuracy'] - baseline):+.2f} points) in {runs[b]['steps']} steps")
        text += f". Lowest: {100 * runs[worst]['final_accuracy']:.2f}% at batch {worst:,}."
        lines.append(text)
    late = late_noise_scale(baseline_run["noise_scale_per_epoch"])

    def why(rule, batch):
        """Why `rule` loses accuracy at `batch` against the batch below it, from the runs."""
        runs = table[rule]
        below = max((b for b in runs if b < batch), default=None)
        if not (below and late):
            return ""

        def effective(b):  # McCandlish et al.: a step of B rows does B / (B + B_noise) of a noise-free step
            return runs[b]["steps"] * b / (b + late)

        return (f" Why, measured: the budget gives {runs[batch]['steps']} steps at {batch:,} against "
                f"{runs[below]['steps']} at {below:,}, and late in training the noise scale is about "
                f"{late:,.0f} rows. A step of B rows then does B / (B + {late:,.0f}) of the work of a "
                f"noise-free step, so the {batch:,} run's steps add up to about {effective(batch):,.0f} "
                f"noise-free steps against {effective(below):,.0f} at {below:,} "
                f"({100 * runs[below]['final_accuracy']:.2f}%): past the noise scale, more rows per step "
                "do not make up for fewer steps within a fixed number of epochs.")

    layerwise = [(rule, b, r["final_accuracy"]) for rule in ("lars", "lamb") for b, r in table.get(rule, {}).items()
                 if b >= 8192]
    met = [(rule, b, acc) for rule, b, acc in layerwise if acc >= baseline - 0.01]
    lines.append("")
    if met:
        best = max(met, key=lambda m: (m[1], m[2]))
        lines.append(f"**Target met**: {best[0].upper()} at global batch {best[1]:,} reaches {100 * best[2]:.2f}%, "
                     f"{100 * (best[2] - baseline):+.2f} points from the batch-{BASE_BATCH} baseline, with the same "
                     f"{args.epochs}-epoch budget.")
        breaks = [b for b in sorted(table[best[0]]) if b > best[1]
                  and table[best[0]][b]["final_accuracy"] < baseline - 0.01]
        if breaks:
            acc = table[best[0]][breaks[0]]["final_accuracy"]
            lines.append(f"It breaks at {breaks[0]:,}: {100 * acc:.2f}% ({100 * (acc - baseline):+.2f} points)."
                         + why(best[0], breaks[0]))
    elif layerwise:
        best = max(layerwise, key=lambda m: m[2])
        lines.append(f"**Target not met**: the best of LARS and LAMB at a batch of 8,192 or more is "
                     f"{best[0].upper()} at {best[1]:,} with {100 * best[2]:.2f}% "
                     f"({100 * (best[2] - baseline):+.2f} points).{why(best[0], best[1])}")
    else:
        lines.append("**Target not measured**: no LARS or LAMB run at a batch of 8,192 or more completed.")

    # The noise scale and the knee.
    noise_series = baseline_run["noise_scale_per_epoch"]
    at_target = (noise_series[baseline_run["epoch_to_target"] - 1]
                 if baseline_run["epoch_to_target"] else None)
    final_noise = late_noise_scale(noise_series)
    best_steps = []
    for batch in batches:
        reached = [table[rule][batch]["steps_to_target"] for rule in table
                   if batch in table[rule] and table[rule][batch]["steps_to_target"]]
        if reached:
            best_steps.append((batch, min(reached)))
    fit = fit_critical_batch(best_steps)
    lines += ["", "### The gradient noise scale", "",
              "B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), measured in every run from the two "
              "micro-batch gradients and the whole batch's, averaged over each epoch. Training makes "
              "progress per step roughly in proportion to the batch while the batch is well below it, and "
              "a batch far above it buys little per step.", "",
              f"In the baseline run (batch {baseline_run['batch']}), by epoch:", "",
              "| epoch | " + " | ".join(str(e) for e in range(1, len(noise_series) + 1)) + " |",
              "| --- | " + " | ".join("---:" for _ in noise_series) + " |",
              "| B_simple | " + " | ".join(f"{v:,.0f}" if v else "-" for v in noise_series) + " |", ""]
    if at_target:
        lines.append(f"When the baseline first reached {args.target:.0%} (epoch {baseline_run['epoch_to_target']}) "
                     f"the noise scale was {at_target:,.0f}; over the last third of the epochs its median "
                     f"was {final_noise:,.0f}. (Steps to target are counted at epoch ends, which favours "
                     "the large batches: a batch-64 epoch is 938 steps.)")
    if fit:
        lines.append(f"Fitting S = S_min (1 + B_crit / B) to the fewest steps any rule needed to reach "
                     f"{args.target:.0%} at each batch gives S_min = {fit['s_min']:,.0f} steps and a critical batch "
                     f"B_crit = {fit['b_crit']:,.0f}.")
    if at_target and fit:
        ratio = fit["b_crit"] / at_target
        lines.append(f"The noise scale predicted the knee {'well' if 0.5 <= ratio <= 2 else 'only roughly'}: "
                     f"B_crit / B_simple = {ratio:.2f} (McCandlish et al. find B_crit ~ B_simple).")
    best_kept = max((kept[rule] or 0) for rule in table)
    if final_noise:
        lines.append(f"The largest batch any rule kept within 1 point is {fmt_batch(best_kept)}, "
                     f"{best_kept / final_noise:.1f} times the late noise scale: "
                     + ("beyond the noise scale the same epoch budget gives too few useful steps, which is why "
                        "accuracy falls there." if best_kept >= final_noise else
                        "accuracy fell before the noise scale, so the limit there is the optimizer rule, "
                        "not the noise."))
    lines += ["", "### What measuring it costs", "",
              "The added work per measured step (two squared norms and the bookkeeping) against the "
              "step itself, timed on the trainer's buffers (784-128-64-10 MLP, float32), interleaved so "
              "both see the same load. `--noise-scale auto` measures one step in "
              "ceil(256 / rows per rank).", "",
              "| rows per rank | step (ms) | cost of a measured step | auto: one step in | auto's cost |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for row in cost:
        lines.append(f"| {row['rows_per_rank']} | {row['step_ms']:.2f} | {100 * row['measured_step_cost']:.2f}% | "
                     f"{row['auto_every']} | {100 * row['auto_cost']:.2f}% |")
    failed = [r for r in results if "failed" in r]
    if failed:
        lines += ["", "## Runs that stopped with an error", ""]
        for r in failed:
            lines.append(f"- {r['rule']} at batch {r['batch']:,} ({outcome(r)}): `{r['failed'].splitlines()[-1]}`")
    lines += ["", "Each run's command is in scaling.json (`command`), its per-epoch metrics in "
              "`.batch-study/RULE-BATCH.jsonl` of the run that wrote this file.", ""]
    return "\n".join(lines)


def write_outputs(args, study):
    """SCALING.md, scaling.json and scaling.png in --out, from the study's record."""
    results = study["runs"]
    table = by_rule(results)
    table = {rule: table[rule] for rule in RULES if rule in table}
    if "sgd" not in table or BASE_BATCH not in table["sgd"]:
        sys.exit("the baseline run (sgd at batch 64) failed: " + str([r for r in results if "failed" in r]))
    png = "scaling.png"
    baseline_run = table["sgd"][BASE_BATCH]
    noise_at_target = (baseline_run["noise_scale_per_epoch"][baseline_run["epoch_to_target"] - 1]
                       if baseline_run["epoch_to_target"] else None)
    chart(table, baseline_run["final_accuracy"], args, noise_at_target, os.path.join(args.out, png))
    with open(os.path.join(args.out, "scaling.json"), "w") as handle:
        json.dump(study, handle, indent=1)
    text = report(args, results, table, study["machine"], study["timing"], study["noise_cost"], png)
    with open(os.path.join(args.out, "SCALING.md"), "w") as handle:
        handle.write(text)
    print(f"wrote SCALING.md, scaling.json and {png} in {args.out}")


def main():
    args = parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "scaling.json")) as handle:
            study = json.load(handle)
        # The settings of the run that made the record, not of this invocation.
        args.epochs, args.dataset, args.target = study["epochs"], study["dataset"], study["target"]
        args.hidden = study.get("hidden") or study["runs"][0]["command"][study["runs"][0]["command"].index("--hidden") + 1]
        args.jobs = study.get("jobs", args.jobs)
        study["machine"].setdefault("argv", [])
        write_outputs(args, study)
        return
    os.makedirs(args.runs_dir, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    rules = [rule for rule in args.rules.split(",") if rule]
    unknown = [rule for rule in rules if rule not in RULES]
    if unknown or "sgd" not in rules:
        sys.exit(f"--rules must include sgd (the baseline) and name only {', '.join(RULES)}; got {args.rules}")
    # The smallest batches take longest: start them first, so the pool's tail is short.
    jobs = [(rule, batch) for batch in sorted(batches) for rule in rules
            if not (rule == "goyal" and batch == BASE_BATCH)]  # at batch 64 goyal is sgd: run once
    facts = machine()
    facts["argv"] = sys.argv[1:]
    load_start, started = loadavg(), time.monotonic()
    print(f"batch study: {len(jobs)} runs, {args.jobs} at a time, {args.epochs} epochs each, on {args.dataset}",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train(args, *job), jobs))
    if "goyal" in rules:  # at the base batch, linear scaling and warmup leave sgd's run unchanged
        base = next((r for r in results if r["rule"] == "sgd" and r["batch"] == BASE_BATCH), None)
        if base and "failed" not in base:
            results.append({**base, "rule": "goyal", "same_run_as": "sgd"})
    print("measuring what the noise scale costs", flush=True)
    cost = noise_cost()
    timing = {"seconds": time.monotonic() - started, "load_start": load_start, "load_end": loadavg()}
    write_outputs(args, {"machine": facts, "timing": timing, "epochs": args.epochs, "dataset": args.dataset,
                         "hidden": args.hidden, "jobs": args.jobs, "target": args.target,
                         "noise_cost": cost, "runs": results})
    print(f"the study took {timing['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
