"""`dpflow launch`: run the MPI launcher, and when the job fails, restart it on the hosts
that are left, from the last checkpoint, on the same trajectory.

    dpflow launch --hostfile hosts --max-restarts 3 -- train --checkpoint-dir ckpt ...

One attempt is one `mpiexec` (MPICH) or `mpirun` (Open MPI) of `dpflow train`. When an
attempt fails, this supervisor asks every host of the hostfile (read again, so a repaired
host can come back) to run `true` through the same launcher, with a timeout; the hosts that
do not answer are dropped, and the job starts again with `--resume` on the others.

The global batch stays what was asked for: dpflow's `--batch-size` is already global, so a
smaller world only gives each rank a larger share. When that share would exceed what a rank
held on the first attempt (`--max-rank-rows`), the batch is split into micro-batches
(`--batch-size B/k --accumulate A*k`): the same rows are summed into the same update, and
the run continues the same trajectory (to rounding; bitwise where the world size is
unchanged). torchrun and Horovod Elastic change the global batch with the worker count.

It stops, with a summary, when the job succeeds, when the failure is bad input (exit 2: a
restart would fail the same way), when the ranks were stopped by a signal (a scheduler's
SIGTERM: the job wrote its checkpoint), when `--max-restarts` are spent, when fewer than
`--min-hosts` hosts answer, or when the same step fails twice with every host answering (a
deterministic crash, not a fault a restart survives). SIGTERM or SIGINT to this process is
passed to the job, which checkpoints and stops; no restart follows.

The ranks tell this process how far they got through a small file in the checkpoint
directory (rank 0 writes its step there, `DPFLOW_PROGRESS_FILE`); that is how it counts
the steps redone and tells a job that really finished from an Open MPI `mpirun` that
returned 0 after losing a host. The checkpoint directory must therefore be visible here
(a shared filesystem, or launch from rank 0's node, the first host).
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .errors import UsageError
from .launcher import launched_by_mpi

PROGRESS_VARIABLE = "DPFLOW_PROGRESS_FILE"
PROGRESS_NAME = ".progress"  # in the checkpoint directory
RANK_COMMAND_VARIABLE = "DPFLOW_LAUNCH_RANK_COMMAND"  # what each rank runs instead of python -m dpflow
BAD_INPUT = 2
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
CHECKPOINT_BEHIND = 3  # `dpflow train`: finished, but the last checkpoint writes failed
FAILED_RANK = re.compile(r"dpflow: rank (\d+) on (\S+?)[: ]")
KILLED_RANK = re.compile(r"RUNNING AT (\S+)")  # MPICH's "BAD TERMINATION" report


def log(message):
    print(f"dpflow launch: {message}", file=sys.stderr, flush=True)


# --- hosts ------------------------------------------------------------------------------

@dataclass
class Host:
    name: str
    slots: int | None = None  # ranks it takes; None: as many as --ranks-per-host or -n say


def parse_host(text, where):
    """`node1`, `node1:2` (MPICH) or `node1 slots=2` (Open MPI)."""
    words = text.split()
    name, slots = words[0], None
    if ":" in name:
        name, _, count = name.partition(":")
        slots = count
    for word in words[1:]:
        key, _, value = word.partition("=")
        if key == "slots":
            slots = value
        elif key not in ("max_slots", "max-slots"):  # Open MPI's cap: not a count to use
            raise UsageError(f"{where}: cannot read {text!r}; write one host per line as "
                             "`node1:2` (MPICH) or `node1 slots=2` (Open MPI)")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise UsageError(f"{where}: {name!r} is not a host name")
    if slots is not None:
        if not slots.isdigit() or int(slots) < 1:
            raise UsageError(f"{where}: the rank count of {name} must be a positive integer, got {slots!r}")
        slots = int(slots)
    return Host(name, slots)


def read_hostfile(path):
    from .config import read_text_file

    lines = read_text_file(path, f"--hostfile {path}").splitlines()
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(parse_host(line, f"--hostfile {path}:{number}"))
    return merge_hosts(hosts, f"--hostfile {path}")


def merge_hosts(hosts, where):
    seen = {}
    for host in hosts:
        if host.name in seen:
            raise UsageError(f"{where}: host {host.name} is listed twice; give it once with its rank count")
        seen[host.name] = host
    if not hosts:
        raise UsageError(f"{where} names no host")
    return hosts


def slurm_hosts(environ=os.environ):
    """The hosts of the Slurm allocation this runs in, or None outside one."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UsageError(f"in a Slurm allocation ({nodelist}) but `scontrol show hostnames` "
                         f"failed ({error}); pass --hosts or --hostfile") from None
    names = done.stdout.split()
    if done.returncode != 0 or not names:
        raise UsageError(f"`scontrol show hostnames {nodelist}` failed: {done.stderr.strip()}; "
                         "pass --hosts or --hostfile")
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    slots = int(per_node) if per_node.isdigit() else None
    return [Host(name, slots) for name in names]


# --- the MPI launcher -------------------------------------------------------------------

class MPILauncher:
    """How to start a job, and a probe, with MPICH's hydra or Open MPI's mpirun."""

    def __init__(self, path, extra_args):
        found = shutil.which(path)
        if found is None:
            raise UsageError(f"--mpiexec {path}: not found; `source scripts/_setup.sh` puts "
                             "MPICH's mpiexec on PATH, or give its full path")
        self.path = found
        self.extra = list(extra_args)
        try:
            version = subprocess.run([found, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as error:
            raise UsageError(f"--mpiexec {found}: `--version` failed ({error})") from None
        if "HYDRA" in version:
            self.flavor = "mpich"
        elif "Open MPI" in version or "OpenRTE" in version:
            self.flavor = "openmpi"
        else:
            raise UsageError(f"--mpiexec {found} is neither MPICH's mpiexec nor Open MPI's mpirun "
                             f"(--version says {version.strip()[:60]!r})")

    def write_hostfile(self, hosts, slots, path):
        with open(path, "w") as handle:
            for host in hosts:
                if self.flavor == "mpich":
                    handle.write(f"{host.name}:{slots[host.name]}\n")
                else:
                    handle.write(f"{host.name} slots={slots[host.name]}\n")

    def job(self, hostfile, ranks, command):
        if self.flavor == "mpich":
            where = ["-f", hostfile] if hostfile else []
            return [self.path, *self.extra, *where, "-n", str(ranks), *command]
        where = ["--hostfile", hostfile] if hostfile else []
        return [self.path, *self.extra, *where, "-n", str(ranks), "-x", PROGRESS_VARIABLE, *command]

    def probe(self, host):
        if self.flavor == "mpich":
            return [self.path, *self.extra, "-hosts", host, "-n", "1", "true"]
        return [self.path, *self.extra, "--host", f"{host}:1", "-n", "1", "true"]


def die_with_parent(signum):
    """preexec_fn: the child gets `signum` when this process dies, even by SIGKILL."""
    import ctypes

    PR_SET_PDEATHSIG = 1

    def set_it():
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signum))

    return set_it


def launcher_environment(environ=os.environ):
    """The environment for the launcher. Inside a Slurm allocation MPICH's mpiexec starts its
    agents with `srun`; a step of the failed attempt may still hold the nodes' CPUs while Slurm
    cleans it up, so the probes' and the next attempt's steps are allowed to overlap it."""
    if "SLURM_JOB_ID" in environ:
        return dict(environ, SLURM_OVERLAP="1")
    return dict(environ)


def probe_hosts(launcher, hosts, timeout, stopped):
    """The names of the hosts that run `true` through the launcher within `timeout`
    seconds, all probed at once."""
    running = {}
    for host in hosts:
        running[host.name] = subprocess.Popen(
            launcher.probe(host.name), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=launcher_environment(),
            preexec_fn=die_with_parent(signal.SIGKILL))
    deadline = time.monotonic() + timeout
    alive = set()
    for name, process in running.items():
        while process.poll() is None and time.monotonic() < deadline and not stopped():
            time.sleep(0.05)
        if process.poll() is None:
            kill_group(process, signal.SIGKILL)
            process.wait()
        elif process.returncode == 0:
            alive.add(name)
    return alive


def kill_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


# --- the global batch -------------------------------------------------------------------

def share(batch_size, world):
    """The most rows one rank holds of a global batch (ranks differ by at most one row)."""
    return math.ceil(batch_size / world)


def plan_batch(batch_size, accumulate, world, max_rows):
    """(batch size, accumulate) with the same product, splitting the batch into k
    micro-batches (k divides it) until no rank holds more than `max_rows` rows.

    Micro-batches of B/k rows group k by k into the batches of B rows (the last, partial
    one included), so every update sums exactly the same rows: the same trajectory.
    Returns the original pair when no split fits (the rank then holds more).
    """
    if share(batch_size, world) <= max_rows:
        return batch_size, accumulate
    for k in range(2, batch_size + 1):
        if batch_size % k == 0 and batch_size // k >= world and share(batch_size // k, world) <= max_rows:
            return batch_size // k, accumulate * k
    return batch_size, accumulate


# --- the train command ------------------------------------------------------------------

def read_train_config(train_args):
    """The run's resolved settings (flags over config file over defaults), checked here so
    that bad input is refused before any host is used."""
    from .cli import build_parser, train_config

    args = build_parser().parse_args(["train", *train_args])
    return train_config(args)


class ProgressFile:
    """Rank 0's side: its step, overwritten in place after every step (one pwrite into the
    page cache, no fsync: it must survive the process, not the machine), and `done` at the
    end. A no-op unless `dpflow launch` asked for it."""

    def __init__(self, environ=os.environ):
        path = environ.get(PROGRESS_VARIABLE)
        self.fd = None
        if path:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError:
                pass  # the supervisor then counts no steps redone; training goes on

    def write(self, word, step):
        if self.fd is not None:
            os.pwrite(self.fd, f"{word} {step}\n".ljust(32).encode(), 0)

    def step(self, step):
        self.write("step", step)

    def done(self, step):
        self.write("done", step)
        os.close(self.fd) if self.fd is not None else None
        self.fd = None


def read_progress(path):
    """(step, done) that rank 0 last wrote, or (None, False)."""
    try:
        with open(path) as handle:
            words = handle.read().split()
    except OSError:
        return None, False
    if len(words) >= 2 and words[1].isdigit() and words[0] in ("step", "done"):
        return int(words[1]), words[0] == "done"
    return None, False


def newest_checkpoint(directory):
    """(path, global step) of the checkpoint `--resume` will start from, or (None, 0)."""
    from .checkpoint import CheckpointError, load_latest_valid

    try:
        path, _, meta = load_latest_valid(directory, warn=lambda message: None)
    except CheckpointError:
        return None, 0
    return path, int(meta.get("global_step", 0))


# --- one attempt ------------------------------------------------------------------------

class OutputTail(threading.Thread):
    """Copies one of the job's output streams through as it comes, keeping its last lines
    to read the failing rank's report (dpflow's on stderr, MPICH's on stdout)."""

    def __init__(self, stream, out):
        super().__init__(name="dpflow-launch-output", daemon=True)
        self.stream, self.out = stream, out
        self.tail = b""

    def run(self):
        fd = self.stream.fileno()
        while chunk := os.read(fd, 65536):
            self.out.buffer.write(chunk)
            self.out.buffer.flush()
            self.tail = (self.tail + chunk)[-16384:]



def failed_rank(output):
    """(rank or None, host) named by the job's failure line (dpflow's own, or MPICH's
    report of a rank that died), or None."""
    text = output.decode(errors="replace")
    found = FAILED_RANK.findall(text)
    if found:
        return int(found[-1][0]), found[-1][1]
    died = KILLED_RANK.findall(text)
    return (None, died[-1]) if died else None


@dataclass
class Attempt:
    number: int
    world: int
    hosts: list
    batch_size: int
    accumulate: int
    resumed: str | None = None
    resumed_step: int = 0
    status: int | None = None
    reached_step: int | None = None
    done: bool = False
    failed_rank: tuple | None = None
    lost_hosts: list = field(default_factory=list)
    seconds: float = 0.0

    def steps_redone(self, next_step):
        if self.reached_step is None:  # it never reached its first step: nothing to redo
            return 0
        return max(0, self.reached_step - next_step)


class Supervisor:
    def __init__(self, options, train_args, config):
        self.options = options
        self.train_args = list(train_args)
        self.config = config
        self.directory = config.checkpoint_dir
        self.progress = os.path.join(self.directory, PROGRESS_NAME)
        self.launcher = MPILauncher(options.mpiexec, [word for arg in options.launcher_arg
                                                      for word in shlex.split(arg)])
        self.attempts = []
        self.stop_signal = None
        self.job = None
        self.workdir = tempfile.mkdtemp(prefix="dpflow-launch-")

    # signals: passed to the job, which checkpoints and stops; never restarted after
    def install_signal_handlers(self):
        def forward(signum, frame):
            self.stop_signal = self.stop_signal or signum
            job = self.job
            if job is not None and job.poll() is None:
                try:
                    os.kill(job.pid, signum)
                except ProcessLookupError:
                    pass

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)

    def hosts(self):
        """The hosts as the options say now (the hostfile is read again each time)."""
        if self.options.hostfile:
            return read_hostfile(self.options.hostfile)
        if self.options.hosts:
            return merge_hosts([parse_host(text, "--hosts") for text in self.options.hosts.split(",")
                                if text.strip()], "--hosts")
        return slurm_hosts()  # None: this machine only

    def slots(self, hosts):
        """Ranks per host: --ranks-per-host, else the hostfile's count, else an even share of -n."""
        options = self.options
        even = math.ceil(options.n / len(hosts)) if options.n else 1
        return {host.name: options.ranks_per_host or host.slots or even for host in hosts}

    def world(self, hosts, slots):
        total = sum(slots[host.name] for host in hosts)
        return min(total, self.options.n) if self.options.n else total

    def command(self, attempt):
        args = list(self.train_args)
        if (attempt.batch_size, attempt.accumulate) != (self.config.batch_size, self.config.accumulate):
            args += ["--batch-size", str(attempt.batch_size), "--accumulate", str(attempt.accumulate)]
        if attempt.resumed and "--resume" not in args:
            args.append("--resume")
        # Tests inject faults through this seam (tests/inject_fault.py wraps dpflow's main).
        ranks_run = shlex.split(os.environ.get(RANK_COMMAND_VARIABLE, "")) or [sys.executable, "-m", "dpflow"]
        return [*ranks_run, "train", *args]

    def run_attempt(self, attempt):
        hostfile = None
        if attempt.hosts:
            hostfile = os.path.join(self.workdir, f"hostfile-{attempt.number}")
            self.launcher.write_hostfile(attempt.hosts, self.slots(attempt.hosts), hostfile)
        try:
            os.unlink(self.progress)
        except OSError:
            pass
        command = self.launcher.job(hostfile, attempt.world, self.command(attempt))
        env = dict(launcher_environment(), **{PROGRESS_VARIABLE: os.path.abspath(self.progress)})
        started = time.monotonic()
        self.job = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True,
                                    preexec_fn=die_with_parent(signal.SIGTERM))
        tails = [OutputTail(self.job.stdout, sys.stdout), OutputTail(self.job.stderr, sys.stderr)]
        for tail in tails:
            tail.start()
        if self.stop_signal:  # a signal that came while the job was starting
            os.kill(self.job.pid, self.stop_signal)
        attempt.status = self.wait(self.job)
        for tail in tails:
            tail.join(timeout=10)
        self.job = None
        attempt.seconds = time.monotonic() - started
        attempt.reached_step, attempt.done = read_progress(self.progress)
        attempt.failed_rank = failed_rank(b"".join(tail.tail for tail in tails))

    def wait(self, job):
        """The job's exit status; a job whose ranks made no progress for far longer than
        their own --stall-timeout (a launcher that never ends after an abort) is killed."""
        bound = self.config.stall_timeout + 60 if self.config.stall_timeout else None
        while True:
            try:
                status = job.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if bound and not self.stop_signal:
                try:
                    quiet = time.time() - os.path.getmtime(self.progress)
                except OSError:
                    continue
                if quiet > bound:
                    log(f"the job made no progress for {quiet:.0f} s and did not end; killing it")
                    kill_group(job, signal.SIGKILL)
                    status = job.wait()
                    break
        return 128 - status if status < 0 else status

    # --- the loop --------------------------------------------------------------------

    def plan(self, number, hosts, first_world):
        slots = self.slots(hosts) if hosts else {}
        world = self.world(hosts, slots) if hosts else (self.options.n or 1)
        max_rows = self.options.max_rank_rows or share(self.config.batch_size, first_world or world)
        batch_size, accumulate = plan_batch(self.config.batch_size, self.config.accumulate, world, max_rows)
        return Attempt(number, world, hosts or [], batch_size, accumulate)

    def run(self):
        options = self.options
        hosts = self.hosts()
        if hosts and options.min_hosts > len(hosts):
            raise UsageError(f"--min-hosts {options.min_hosts} is more than the {len(hosts)} hosts given")
        if hosts:  # a host that is down already is left out from the start
            alive = probe_hosts(self.launcher, hosts, options.probe_timeout, lambda: self.stop_signal)
            if self.stop_signal:
                return 128 + self.stop_signal
            silent = [host.name for host in hosts if host.name not in alive]
            if silent:
                log(f"host{'s' if len(silent) > 1 else ''} {', '.join(silent)} did not answer the probe; "
                    "starting without")
            hosts = [host for host in hosts if host.name in alive]
            if len(hosts) < options.min_hosts or not hosts:
                raise UsageError(f"only {len(hosts)} host(s) answer through {self.launcher.path}, fewer "
                                 f"than --min-hosts {options.min_hosts}; check the hosts and --launcher-arg")
        attempt = self.plan(1, hosts, None)
        first_world = attempt.world
        if attempt.world > self.config.batch_size:
            raise UsageError(f"{attempt.world} ranks need a global batch of at least {attempt.world} "
                             f"rows (--batch-size is {self.config.batch_size})")
        log(f"attempt 1: {attempt.world} ranks" + (f" on {', '.join(h.name for h in hosts)}" if hosts else "")
            + f"; up to {options.max_restarts} restarts")
        while True:
            self.attempts.append(attempt)
            self.run_attempt(attempt)
            verdict = self.judge(attempt)
            if verdict is not None:
                return verdict
            attempt = self.next_attempt(attempt, first_world)
            if isinstance(attempt, int):
                return attempt

    def judge(self, attempt):
        """The exit status to stop with, or None to restart."""
        status = attempt.status
        if self.stop_signal:
            name = signal.Signals(self.stop_signal).name
            return self.finish(status if status else 128 + self.stop_signal,
                               f"stopped by {name} (passed to the job; no restart)")
        if status == 0 and (attempt.done or attempt.reached_step is None and not os.path.exists(self.progress)):
            return self.finish(0, "the job completed")
        if status == CHECKPOINT_BEHIND and attempt.done:
            return self.finish(status, "the job completed, but its last checkpoint writes failed")
        if status == BAD_INPUT:
            return self.finish(BAD_INPUT, "the job refused its input (exit 2): a restart would fail the same way")
        if status in STOPPED:
            return self.finish(status, f"the job was stopped by {signal.Signals(status - 128).name} "
                                       "(a scheduler?); it wrote its checkpoint; no restart")
        return None

    def next_attempt(self, failed, first_world):
        options = self.options
        restarts = len(self.attempts) - 1
        hosts = self.hosts()
        if hosts:
            # Probed even when no restart is left: the report then names the host that went
            # away, which MPICH's own message ("assert (!closed) failed") does not.
            alive = probe_hosts(self.launcher, hosts, options.probe_timeout, lambda: self.stop_signal)
            if self.stop_signal:
                return self.finish(128 + self.stop_signal,
                                   f"stopped by {signal.Signals(self.stop_signal).name} before a restart")
            failed.lost_hosts = [h.name for h in failed.hosts if h.name not in alive]
        what = self.describe_failure(failed)
        if restarts >= options.max_restarts:
            return self.finish(failed.status or 1, f"attempt {failed.number} failed ({what}) and "
                               f"--max-restarts {options.max_restarts} are spent")
        if hosts:
            hosts = [host for host in hosts if host.name in alive]
            if len(hosts) < max(options.min_hosts, 1):
                return self.finish(failed.status or 1, f"attempt {failed.number} failed ({what}); only "
                                   f"{len(hosts)} host(s) answer, fewer than --min-hosts {options.min_hosts}")
        previous = self.attempts[-2] if len(self.attempts) > 1 else None
        if (previous and not failed.lost_hosts and not previous.lost_hosts and failed.reached_step is not None
                and failed.reached_step == previous.reached_step and failed.status == previous.status):
            return self.finish(failed.status or 1, f"step {failed.reached_step + 1} failed twice on the same data "
                               f"({what}) with every host answering: a deterministic failure, not a fault "
                               "a restart survives")
        if not self.wait_for_lock():
            return self.finish(failed.status or 1, "the checkpoint directory is still locked by a process of "
                               "the failed attempt; stop it and run again with --resume")
        kept = self.keep_trace(failed)
        attempt = self.plan(failed.number + 1, hosts, first_world)
        attempt.resumed, attempt.resumed_step = newest_checkpoint(self.directory)
        redone = failed.steps_redone(attempt.resumed_step)
        log(f"restart {restarts + 1}/{options.max_restarts}: attempt {failed.number} failed ({what}); "
            + (f"resuming from {os.path.basename(attempt.resumed)} (step {attempt.resumed_step})"
               if attempt.resumed else "no checkpoint yet: starting again")
            + f"; {attempt.world} ranks" + (f" on {len(hosts)} hosts" if hosts else "")
            + (f", --batch-size {attempt.batch_size} --accumulate {attempt.accumulate}"
               if attempt.batch_size != self.config.batch_size else "")
            + f"; {redone} steps redone" + (f"; its trace kept as {kept}" if kept else ""))
        return attempt

    def keep_trace(self, failed):
        """The failed attempt's trace (what its ranks held when the job ended: where it crashed or
        hung), moved aside before the next attempt writes its own: the path it now has, or None."""
        path = self.config.trace
        if not path or not os.path.isfile(path):
            return None
        kept = f"{path}.attempt{failed.number}"
        os.replace(path, kept)
        return kept

    def describe_failure(self, attempt):
        parts = [f"exit status {attempt.status}"]
        if attempt.status == 0:
            parts = ["exit status 0 but the ranks never finished (Open MPI after losing a host)"]
        if attempt.lost_hosts:
            parts.append(f"host{'s' if len(attempt.lost_hosts) > 1 else ''} "
                         f"{', '.join(attempt.lost_hosts)} did not answer")
        elif attempt.failed_rank:
            rank, host = attempt.failed_rank
            parts.append(f"rank {rank} on {host} failed" if rank is not None else f"a rank on {host} died")
        if attempt.reached_step is not None:
            parts.append(f"at step {attempt.reached_step + 1}")
        return ", ".join(parts)

    def wait_for_lock(self):
        """A rank 0 of the failed attempt cut off from the others still holds the checkpoint
        directory until its own watchdog ends it; wait for that, within a bound."""
        from .lock import lock_holder

        bound = time.monotonic() + (self.config.stall_timeout or 60) + 30
        holder = lock_holder(self.directory)
        if holder:
            log(f"waiting for {holder} to release {self.directory}")
        while holder and time.monotonic() < bound and not self.stop_signal:
            time.sleep(0.5)
            holder = lock_holder(self.directory)
        return holder is None

    def finish(self, status, why):
        restarts = len(self.attempts) - 1
        redone = [a.steps_redone(b.resumed_step) for a, b in zip(self.attempts, self.attempts[1:])]
        lost = sorted({h for a in self.attempts for h in a.lost_hosts})
        log(f"{why}. {len(self.attempts)} attempt{'s' if len(self.attempts) > 1 else ''}, {restarts} "
            f"restart{'s' if restarts != 1 else ''}"
            + (f", hosts lost: {', '.join(lost)}" if lost else "")
            + (f", {sum(redone)} steps redone" if restarts else "")
            + f"; exit status {status}")
        if self.options.summary_json:
            summary = {"status": status, "why": why, "restarts": restarts, "hosts_lost": lost,
                       "steps_redone": sum(redone),
                       "attempts": [{**{k: v for k, v in vars(a).items() if k != "hosts"},
                                     "hosts": [h.name for h in a.hosts],
                                     "steps_redone": r}
                                    for a, r in zip(self.attempts, redone + [None])]}
            try:
                with open(self.options.summary_json, "w") as handle:
                    json.dump(summary, handle, indent=1)
            except OSError as error:  # the job's own status stands; the summary is lost, and said so
                log(f"warning: --summary-json {self.options.summary_json} could not be written ({error.strerror})")
        return status

    def close(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- command line -----------------------------------------------------------------------

def add_launch_arguments(parser):
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", metavar="FILE",
                       help="hosts, one a line: `node1:2` (MPICH) or `node1 slots=2` (Open MPI); "
                            "read again before each attempt (default: the Slurm allocation's "
                            "nodes, or this machine alone)")
    where.add_argument("--hosts", metavar="H1,H2", help="hosts, comma-separated (`node1:2` gives a rank count)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--ranks-per-host", type=int, metavar="R", help="ranks on each host")
    size.add_argument("-n", type=int, metavar="N", help="ranks in all while every host is up")
    parser.add_argument("--max-restarts", type=int, default=3, metavar="K",
                        help="restarts after failed attempts before giving up (default %(default)s)")
    parser.add_argument("--min-hosts", type=int, default=1, metavar="M",
                        help="give up when fewer hosts answer (default %(default)s)")
    parser.add_argument("--max-rank-rows", type=int, metavar="ROWS",
                        help="most rows of a batch one rank may hold; above it the batch is split "
                             "into micro-batches (--accumulate) (default: the first attempt's share)")
    parser.add_argument("--probe-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="how long a host may take to answer the probe (default %(default)s)")
    parser.add_argument("--mpiexec", default="mpiexec", metavar="PATH",
                        help="MPICH's mpiexec or Open MPI's mpirun (default: the one on PATH)")
    parser.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                        help="arguments for the launcher, split as a shell would, e.g. "
                             "--launcher-arg='-launcher ssh' (the = is needed when ARG starts "
                             "with a dash; repeatable)")
    parser.add_argument("--summary-json", metavar="PATH", help="write every attempt and the outcome as JSON")
    parser.add_argument("train", nargs=argparse.REMAINDER, metavar="-- train ARGS",
                        help="the dpflow train command to run")


def check_options(options):
    train = options.train[1:] if options.train[:1] == ["--"] else options.train
    if train[:1] != ["train"]:
        raise UsageError("give the job after --, e.g. `dpflow launch --hostfile hosts -- train "
                         "--checkpoint-dir ckpt`")
    for name in ("ranks_per_host", "n", "min_hosts", "max_rank_rows"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-') if len(name) > 1 else name} must be >= 1, got {value}")
    if options.max_restarts < 0:
        raise UsageError(f"--max-restarts must be >= 0, got {options.max_restarts}")
    if not 0 < options.probe_timeout < 86400:
        raise UsageError(f"--probe-timeout must be a positive number of seconds, got {options.probe_timeout}")
    words = [("--launcher-arg", arg) for arg in options.launcher_arg]
    for what, text in [*words, (RANK_COMMAND_VARIABLE, os.environ.get(RANK_COMMAND_VARIABLE, ""))]:
        try:
            shlex.split(text)
        except ValueError as error:
            raise UsageError(f"{what} {text!r} cannot be split as a shell would ({error}); close its "
                             "quotes, e.g. --launcher-arg='-launcher ssh'") from None
    if options.summary_json:  # checked now: the summary is written when the job is over
        from .run import check_output_path

        check_output_path("--summary-json", options.summary_json)
    for flag, value in (("--hosts", options.hosts), ("--hostfile", options.hostfile)):
        if value == "":  # `--hostfile $HOSTFILE` with the variable unset: not "this machine alone"
            raise UsageError(f"{flag} is empty; name the hosts, or leave {flag} out to use the Slurm allocation "
                             "or this machine alone")
    if launched_by_mpi():
        raise UsageError("dpflow launch starts the MPI launcher itself: run it directly, not under mpiexec")
    return train[1:]


def run_launch(options):
    """The `dpflow launch` command; returns the exit status."""
    train_args = check_options(options)
    config = read_train_config(train_args)
    if not config.checkpoint_dir:
        raise UsageError("dpflow launch restarts from checkpoints: give the job --checkpoint-dir DIR")
    supervisor = Supervisor(options, train_args, config)
    supervisor.install_signal_handlers()
    try:
        return supervisor.run()
    finally:
        supervisor.close()


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `dpflow launch --help`)")


def main(argv=None):
    parser = ArgumentParser(
        prog="dpflow launch", description="Run `dpflow train` under mpiexec or mpirun and restart it "
        "from its last checkpoint on the hosts that still answer when it fails, keeping the global batch.",
        epilog="example: dpflow launch --hostfile hosts --max-restarts 3 -- train --checkpoint-dir ckpt")
    add_launch_arguments(parser)
    try:
        return run_launch(parser.parse_args(argv))
    except UsageError as error:
        from .config import spell_flag

        print(f"dpflow launch: error: {error.render(spell_flag)}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
