"""dpflow under a real Slurm: `scripts/cluster --slurm` on two namespace hosts.

Each test brings a fresh cluster up (munged and slurmctld on the login host, slurmd on
node0 and node1, Debian's Slurm 22.05, installed by the script when missing), runs a bash
driver on the login host (sinfo, srun, sbatch, scontrol, scancel), lets the cluster
remove itself, and checks that nothing was left behind. The driver writes what it saw
(job records, the jobs' output) into the test's directory, which every host shares; the
assertions are made here, afterwards.

A cluster that could not be brought up (exit 125, "slurm set-up failed") fails the test
as a Slurm set-up failure, with the daemons' logs, and a start-up that Slurm's mpi/pmi2
plugin broke (its errors in a job's output) as that: never as a dpflow result. Skipped
(with the reason, `pytest -rs`) only where the cluster cannot run at all: not root, or no
`ip netns`.
"""

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_cluster import (CLUSTER, assert_nothing_left, environment, finish, processes_mentioning,
                          tool, why_no_cluster)

ROOT = Path(__file__).resolve().parents[1]
NO_CLUSTER = why_no_cluster()
pytestmark = pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or "")

# Small (the 128,64 mlp, not the default 256,128) and float64: runs are short, and results
# compare exactly.
TRAIN = "--dtype float64 --hidden 128,64"

# Sourced by every driver: fail fast, and wait for conditions, never for fixed times.
PRELUDE = r"""
set -euo pipefail
say() { echo "driver: $*" >&2; }
wait_for() {  # SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@"; do
        if [ "$SECONDS" -ge "$end" ]; then say "TIMEOUT after $limit s waiting for $what"; diagnose; exit 3; fi
        sleep 0.2
    done
}
diagnose() {  # what Slurm thought, for the failure message
    { squeue -a -l; sinfo -N -l; scontrol show job -o; tail -n 25 "$CLUSTER_SLURM_LOGS/slurmctld.log"; } >&2 || true
}
job_field() { scontrol show job -o "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
job_ended() {
    case "$(job_field "$1" JobState)" in
        COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE) return 0 ;;
    esac
    return 1
}
kill_host() {  # power HOST off: SIGKILL to the init of its PID namespace kills everything on it
    python3 -c 'import json, os, signal, sys
state = json.load(open(os.environ["CLUSTER_STATE"]))
os.kill(state["hosts"][sys.argv[1]]["init_pid"], signal.SIGKILL)' "$1"
    say "powered $1 off"
}
record() { scontrol show job -o "$1" > "$2"; say "job $1: $(job_field "$1" JobState) exit $(job_field "$1" ExitCode) restarts $(job_field "$1" Restarts)"; }
"""


def readme_batch_script(runs):
    """The README's batch script that RUNS ("srun --mpi=pmi2 dpflow train", "dpflow
    launch"), exactly as written there."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(#!/bin/bash\n.*?)```", text, flags=re.S)
    scripts = [b for b in blocks if "#SBATCH" in b and runs in b]
    assert len(scripts) == 1, f"expected one batch script running {runs!r} in README.md, " \
                              f"found {len(scripts)}"
    return scripts[0]


def slurm_session(tmp_path, driver, timeout, hosts=2):
    """Run DRIVER (bash) on the login host of a fresh Slurm cluster of HOSTS, in tmp_path.
    Returns (stdout, stderr) of the session; fails the test, as a Slurm set-up failure,
    when the cluster could not be brought up."""
    run_id = "s" + secrets.token_hex(4)
    (tmp_path / "driver.sh").write_text(PRELUDE + driver)
    process = subprocess.Popen(
        [sys.executable, str(CLUSTER), "--slurm", "--hosts", str(hosts), "--run-id", run_id,
         "--", "bash", "driver.sh"],
        cwd=tmp_path, env=environment(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status, out, err, seconds = finish(process, timeout)
    transcript = f"exit {status} after {seconds:.0f} s\n--- stdout\n{out}\n--- stderr\n{err}"
    try:
        assert_nothing_left(run_id, err)
    except AssertionError as left:
        transcript += f"\n--- and the cluster left this behind: {left}"
        if status != 125:
            raise
    if status == 125:
        pytest.fail(f"Slurm set-up failed (scripts/cluster --slurm), not a dpflow result:\n"
                    f"{transcript}")
    if status != 0:
        cut = sorted({line for log in tmp_path.glob("*.out") for line in re.findall(
            r"error: mpi/pmi2: [^\n]*", log.read_text(errors="replace"))})
        if cut:  # the start-up failure of launcher.mpich_settings, not dpflow's
            pytest.fail("MPI start-up under Slurm's mpi/pmi2 plugin failed, not a dpflow "
                        "result:\n" + "\n".join(cut) + f"\n{transcript}")
    assert status == 0, f"the driver failed:\n{transcript}"
    return out, err


def stops(output):
    """[(step, checkpoint path)] of every "stopped by SIGTERM" line in a job's output."""
    return [(int(step), path) for step, path in re.findall(
        r"stopped by SIGTERM at step (\d+) \(epoch \d+\); checkpoint written to (\S+);", output)]


def resumes(output):
    """[(checkpoint path, step)] of every "resumed from" line in a job's output."""
    return [(path, int(step)) for path, step in re.findall(
        r"resumed from (\S+) at epoch \d+, step (\d+)", output)]


def assert_as_one_process(saved, epochs):
    """The float64 parameters in SAVED are those one process trains in EPOCHS (1e-10)."""
    single = saved.parent / "one-process.npz"
    one = subprocess.run([tool("dpflow"), "train", *TRAIN.split(), "--epochs", str(epochs),
                          "--save", str(single)], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    got, expected = np.load(saved), np.load(single)
    assert sorted(got.files) == sorted(expected.files)
    for name in expected.files:
        assert got[name].dtype == np.float64
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-10, err_msg=name)


def checkpoint_step(path):
    return int(re.search(r"ckpt-(\d+)", str(path)).group(1))


def test_srun_pmi2_on_two_hosts_gives_the_parameters_of_one_process(tmp_path):
    out, err = slurm_session(tmp_path, f"""
sinfo -h -N -o "%N %c %t" > sinfo.txt
srun --mpi=pmi2 -N 2 -n 4 dpflow train {TRAIN} --epochs 2 --save p4.npz > srun.out 2>&1
""", timeout=600)
    nodes = (tmp_path / "sinfo.txt").read_text().split("\n")
    assert sorted(filter(None, nodes)) == [f"node{i} {os.cpu_count()} idle" for i in range(2)]
    log = (tmp_path / "srun.out").read_text()
    assert "4 ranks on node0 (2 ranks), node1 (2 ranks)" in log, log
    # Started by Slurm's PMI, dpflow chose MPICH's OFI netmod (launcher.mpich_settings).
    assert "(netmod ofi)" in log, log
    # 2 ranks on each host: each gets half the host's cores for BLAS, as under mpiexec.
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"BLAS threads per rank: {expected}" in log, log
    assert_as_one_process(tmp_path / "p4.npz", epochs=2)


def test_readme_sbatch_script_is_stopped_by_slurm_requeued_resumed_and_ends_bitwise(tmp_path):
    """The README's script with a 1-minute limit and --signal=TERM@55: Slurm's warning
    signal stops the run (checkpoint, 143), the script requeues the job, the requeued job
    resumes; scancel stops it again (checkpoint), a resubmission finishes it; the result is
    bitwise that of one uninterrupted run with the same ranks on the same hosts."""
    (tmp_path / "dpflow.sbatch").write_text(readme_batch_script("srun --mpi=pmi2 dpflow train"))
    out, err = slurm_session(tmp_path, f"""
# slurmctld sends --signal's warning from a check it makes every 30 s, counted from its
# start (measured: jobs submitted 9 s and 19 s after it were both signalled at 30 s). A job
# submitted 15-22 s into a period, eligible 5 s after it starts (TERM@55 of 1 minute), is
# signalled at the period's end: 8-15 s of training instead of up to 35, and as much less
# for the uninterrupted run that checks it. Outside that window it is signalled a period
# later: slower, never wrong.
started=$(stat -c %Y "$(dirname "$SLURM_CONF")/slurmctld.pid")
phase() {{ echo $(( ($(date +%s) - started) % 30 )); }}
in_window() {{ [ "$(phase)" -ge 15 ] && [ "$(phase)" -le 22 ]; }}
wait_for 40 "15-22 s into slurmctld's 30-s period" in_window
jid=$(sbatch --parsable --time=1 --signal=TERM@55 dpflow.sbatch {TRAIN} --epochs 1000)
log=dpflow-$jid.out
held() {{ [ "$(job_field $jid Restarts)" -ge 1 ] && [ "$(job_field $jid Reason)" = BeginTime ]; }}
wait_for 300 "Slurm's signal to stop the job and the script to requeue it" held
record $jid requeued.txt
cp $log first.out
# Slurm holds a requeued job for two minutes before starting it again (BeginTime, set once
# the job has finished completing): not worth waiting for here. But released at once, it
# was started again within the second its first run's credential was revoked, and slurmd
# refused it for good ("Killing non-startable batch JobId=1: Job credential revoked",
# JobState=FAILED): release it only once its nodes are idle and a later second has begun.
requeued_at=$(date +%s)
settled() {{ [ "$(date +%s)" -ge $((requeued_at + 2)) ] && [ -z "$(sinfo -h -N -t alloc,comp,mix -o %N)" ]; }}
wait_for 120 "the first run to finish completing" settled
scontrol update JobId=$jid StartTime=now
first=$(cat ckpt/latest)
moved_on() {{ [ -e ckpt/latest ] && [ "$(cat ckpt/latest)" != "$first" ]; }}
# BeginTime may be set only after the update above (once the job finished completing):
# while the job is still pending, release it again every few seconds.
released_and_moved_on() {{
    case "$(job_field $jid JobState)" in
        PENDING) if [ $((SECONDS % 5)) -eq 0 ]; then
                     scontrol update JobId=$jid StartTime=now >/dev/null 2>&1 || true
                 fi ;;
        RUNNING|CONFIGURING|COMPLETING) ;;
        *) say "job $jid ended instead of resuming"; diagnose; exit 4 ;;
    esac
    moved_on
}}
wait_for 300 "the requeued job to resume and write a newer checkpoint" released_and_moved_on
scancel $jid
wait_for 90 "scancel to end the job" job_ended $jid
record $jid cancelled.txt
cp $log second.out
epoch=$(sed -n 's/.*stopped by SIGTERM at step [0-9]* (epoch \\([0-9]*\\)).*/\\1/p' $log | tail -n 1)
final=$(sbatch --parsable --wait dpflow.sbatch {TRAIN} --epochs $((epoch + 1))) || true
record $final final.txt
cp dpflow-$final.out final.out
# The same run without interruption: the same ranks on the same hosts, one step.
srun --ntasks-per-node=2 -N 2 dpflow train {TRAIN} --epochs $((epoch + 1)) \\
    --checkpoint-dir uninterrupted --save uninterrupted.npz > uninterrupted.out 2>&1
""", timeout=900)
    requeued = (tmp_path / "requeued.txt").read_text()
    first = (tmp_path / "first.out").read_text()
    second = (tmp_path / "second.out").read_text()[len(first):]
    final = (tmp_path / "final.out").read_text()
    # 1. Slurm's warning signal: every rank stopped at one step, checkpoint written, 143.
    assert len(stops(first)) == 1, first
    step1, path1 = stops(first)[0]
    assert checkpoint_step(path1) == step1
    assert re.search(r"srun: error: node0: tasks? 0.*Exited with exit code 143", first), first
    assert "Restarts=1" in requeued, requeued
    # 2. The requeued job resumed from exactly that checkpoint, went on, and scancel
    #    stopped it with a checkpoint again.
    assert resumes(second)[:1] == [(path1, step1)], second
    assert len(stops(second)) == 1, second
    step2, path2 = stops(second)[0]
    assert step2 > step1 and checkpoint_step(path2) == step2
    assert "JobState=CANCELLED" in (tmp_path / "cancelled.txt").read_text()
    assert (tmp_path / "ckpt" / "latest").exists()
    # 3. Resubmitted: resumed from the scancel checkpoint, finished, bitwise equal.
    assert resumes(final) == [(path2, step2)], final
    assert "JobState=COMPLETED" in (tmp_path / "final.txt").read_text(), final
    done, reference = np.load(tmp_path / "params.npz"), np.load(tmp_path / "uninterrupted.npz")
    assert sorted(done.files) == sorted(reference.files)
    for name in reference.files:
        assert done[name].dtype == np.float64
        assert np.array_equal(done[name], reference[name]), name


def test_a_compute_host_killed_under_slurm_ends_the_job_in_bounded_time_with_a_loadable_checkpoint(tmp_path):
    out, err = slurm_session(tmp_path, f"""
srun -N 2 --ntasks-per-node=2 dpflow train {TRAIN} --epochs 1000 --checkpoint-dir ckpt \\
    --stall-timeout 10 > srun.out 2>&1 &
job=$!
wait_for 90 "the first checkpoint" test -e ckpt/latest
kill_host node1
killed=$SECONDS
status=0; wait $job || status=$?
echo "srun exit $status after $((SECONDS - killed)) s" > ended.txt
sinfo -h -N -o "%N %t" > sinfo.txt
""", timeout=600)
    ended = (tmp_path / "ended.txt").read_text()
    status, seconds = map(int, re.fullmatch(r"srun exit (\d+) after (\d+) s\n", ended).groups())
    log = (tmp_path / "srun.out").read_text()
    assert status != 0, log
    # Bounded: the stall watchdog (10 s) or MPI ends the ranks left on node0, and srun
    # returns; Slurm's KillWait (30 s) is the slack.
    assert seconds < 60, (ended, log)
    loaded = subprocess.run([tool("dpflow"), "eval", "--checkpoint", "ckpt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert re.search(r"accuracy", loaded.stdout + loaded.stderr), loaded


def launch_available():
    done = subprocess.run([tool("dpflow"), "launch", "--help"], capture_output=True)
    return done.returncode == 0


# A batch job that may outlive one of its nodes (--no-kill), with `dpflow launch` in it.
LAUNCH_SCRIPT = """#!/bin/bash
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --no-kill
#SBATCH --output=job.out
dpflow launch --max-restarts 3 --min-hosts 2 -- train "$@"
"""


@pytest.mark.skipif(not launch_available(), reason="`dpflow launch` is not in this checkout")
def test_dpflow_launch_in_an_allocation_goes_on_with_the_hosts_left_when_one_dies(tmp_path):
    """`dpflow launch` in a 3-node --no-kill batch job, one rank a node: node1 powered off
    after the first checkpoint; the job restarts from it on node0 and node2 with the same
    global batch, completes, and ends where one process ends (float64, 1e-10)."""
    (tmp_path / "launch.sbatch").write_text(LAUNCH_SCRIPT)
    out, err = slurm_session(tmp_path, f"""
jid=$(sbatch --parsable launch.sbatch {TRAIN} --epochs 6 --checkpoint-dir ckpt --save params.npz)
wait_for 120 "the first checkpoint" test -e ckpt/latest
kill_host node1
killed=$SECONDS
wait_for 240 "the job to end" job_ended $jid
echo "ended $((SECONDS - killed)) s after node1 was powered off" > ended.txt
record $jid job.txt
""", timeout=900, hosts=3)
    log = (tmp_path / "job.out").read_text()
    assert "JobState=COMPLETED" in (tmp_path / "job.txt").read_text(), log
    assert "3 ranks on node0 (1 rank), node1 (1 rank), node2 (1 rank)" in log, log
    # hydra's ranks speak PMI to hydra, not to Slurm: dpflow leaves MPICH's netmod alone.
    assert "(netmod" not in log, log
    assert re.search(r"dpflow launch: restart 1/\d+: attempt 1 failed .*host node1 did not "
                     r"answer.*2 ranks on 2 hosts", log), log
    assert "2 ranks on node0 (1 rank), node2 (1 rank)" in log, log
    assert "dpflow launch: the job completed" in log, log
    assert_as_one_process(tmp_path / "params.npz", epochs=6)


def start_step_and_wait(tmp_path, run_id):
    """scripts/cluster --slurm with `srun -N 2 sleep 600` running on both hosts."""
    (tmp_path / "driver.sh").write_text(PRELUDE + """
rm -f running
srun -N 2 sleep 600 &
running() { [ -n "$(squeue -h -t RUNNING)" ]; }
wait_for 120 "the step to run" running
touch running
wait
""")
    process = subprocess.Popen(
        [sys.executable, str(CLUSTER), "--slurm", "--hosts", "2", "--run-id", run_id,
         "--", "bash", "driver.sh"],
        cwd=tmp_path, env=environment(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / "running").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the step did not start within 180 s:\n{process.communicate()}")
        time.sleep(0.2)
    return process


def test_ctrl_c_or_a_kill_during_a_job_step_leaves_no_slurm_behind(tmp_path):
    """SIGINT (Ctrl-C) to scripts/cluster --slurm while a step runs on both hosts: exit 130,
    and no daemon, step, namespace, mount or spool directory of the run is left. SIGKILL:
    every process of the run dies with it (munged and slurmctld too), and --cleanup-stale
    removes the names."""
    run_id = "s" + secrets.token_hex(4)
    process = start_step_and_wait(tmp_path, run_id)
    process.send_signal(signal.SIGINT)
    status, out, err, seconds = finish(process, timeout=60)
    assert status == 128 + signal.SIGINT, err
    assert "stopped by SIGINT; removing the cluster" in err, err
    assert_nothing_left(run_id, err)

    run_id = "s" + secrets.token_hex(4)
    process = start_step_and_wait(tmp_path, run_id)
    process.kill()
    _, _, err, _ = finish(process, timeout=10)
    deadline = time.monotonic() + 10
    while processes_mentioning(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(run_id) == []  # slurmctld and munged name the run's files
    cleanup = subprocess.run([sys.executable, str(CLUSTER), "--cleanup-stale"],
                             capture_output=True, text=True, timeout=30)
    assert cleanup.returncode == 0, cleanup.stderr
    assert_nothing_left(run_id, err)
