#!/usr/bin/env python3
"""Run an MPI command on a throwaway cluster of isolated hosts on this machine.

    scripts/cluster --hosts 4 --ranks-per-host 1 -- dpflow train --dtype float64 --save p.npz

becomes, inside a "login" host of that cluster,

    mpiexec -f HOSTFILE -launcher ssh -launcher-exec LAUNCH -n 4 dpflow train ...

with MPICH's hydra, or, when the mpiexec found is Open MPI's,

    mpirun --hostfile HOSTFILE --prtemca plm_ssh_agent LAUNCH -n 4 dpflow train ...

Each host is a set of Linux namespaces with one process (its "init") holding them:
  net    its own eth0 (10.77.0.N), a veth whose other end is a port of a bridge living in
         a separate "switch" namespace: nothing touches the machine's own network;
  uts    its own hostname (node0, node1, ...);
  mount  its own /etc/hosts (/etc/netns/NAME/hosts, bound by `ip netns exec`), a private
         tmpfs on /tmp and /dev/shm, its own /proc; everything else (the repo, the
         working directory, the venv) is the machine's, so paths work as usual;
  ipc, pid
         so that MPICH's UCX cannot pass data between "hosts" through shared memory or
         cross-memory attach: with only a network namespace it does, and a cut link
         then changes nothing (measured: UCX used shared memory and cross-memory attach).
mpiexec runs in the login host (net, uts and mount only), which is not in the hostfile:
hydra starts the proxy for its own host itself, without the launcher, so running it on a
compute host would leave that host's ranks outside the host's namespaces. Every proxy
(or Open MPI daemon) is started by LAUNCH, an ssh stand-in that enters the target host's
namespaces.

Everything is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP: the hosts'
processes (killing a PID namespace's init kills every process in it), any other process
left in the run's network namespaces, the namespaces (their veths go with them),
/etc/netns/NAME and the run's state directory. If this
script itself is SIGKILLed, the hosts die with it (parent-death signal) and the names
left behind are removed by the next run, or by `scripts/cluster --cleanup-stale`.

Exit status: the job's (mpiexec's; MPICH's is 255 when its own MPIEXEC_TIMEOUT ends the
job); 124 if the job was still running 10 s after --timeout and had to be killed; 128+N
if a signal N stopped the run; 125 if the cluster could not be set up or the options are
bad.
"""

import argparse
import ctypes
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time

STATE_ROOT = "/run/dpflow-cluster"  # tmpfs: gone after a reboot, like the namespaces
NETNS_PREFIX = "dpc-"               # every namespace this script creates starts with it
SUBNET = "10.77.0"                  # only ever configured inside the run's own namespaces
LOGIN_ADDRESS = f"{SUBNET}.254"
SETUP_ERROR = 125

# The init of a compute host: PID 1 of the host's PID namespace. It names the host,
# gives it a private /tmp and /dev/shm (keeping any --share directory visible), says
# "ready", then reaps orphans until it is killed, which kills the whole host.
# argv: RUN_ID HOSTNAME [SHARED_DIR...]  (the run id is there so `ps` shows whose it is)
# It runs from the run's state directory, which is not under the private /tmp.
HOST_INIT = r"""
import ctypes, os, signal, socket, sys
run_id, hostname, shares = sys.argv[1], sys.argv[2], sys.argv[3:]
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384

def mount(source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        error = ctypes.get_errno()
        sys.exit(f"mount {source} on {target}: {os.strerror(error)}")

socket.sethostname(hostname)
# Open the shared directories before /tmp is covered, then bind them back on top through
# /proc/self/fd (the mount(8) command would resolve that path to the new, empty tmpfs).
fds = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in shares]
for top in ("/tmp", "/dev/shm"):
    mount(f"{run_id}-{hostname}", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
for d, fd in zip(shares, fds):
    os.makedirs(d, exist_ok=True)
    mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC, None)
    os.close(fd)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
print("ready", flush=True)
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    signal.sigwait({signal.SIGCHLD})
"""

# Runs in the login host: give it its hostname, then become mpiexec (or the command).
LOGIN_EXEC = r"""
import os, socket, sys
socket.sethostname(sys.argv[1])
os.execvp(sys.argv[2], sys.argv[2:])
"""

# hydra calls `LAUNCH -x HOST "proxy" ARGS...` as it would call ssh: ssh joins its
# arguments into one line for the remote shell, and so does this. Real ssh starts in
# $HOME; the proxy changes to mpiexec's working directory itself.
LAUNCH_TEMPLATE = """#!/bin/sh
# ssh stand-in for run {run_id}: enter HOST's namespaces and run the command there.
while [ $# -gt 0 ]; do
    case "$1" in -*) shift ;; *) break ;; esac
done
host="$1"; shift
case "$host" in
{cases}
    *) echo "cluster launcher: unknown host '$host' (hosts: {names})" >&2; exit 255 ;;
esac
exec nsenter --target "$pid" --mount --uts --ipc --net --pid -- /bin/sh -c "$*"
"""


class SetupError(Exception):
    """The cluster could not be built or the options are unusable."""


class Stopped(Exception):
    """A signal asked us to stop."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def log(message):
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def run(*command, check=True):
    """Run a setup command; a failure names the command and its error output."""
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SetupError(f"`{shlex.join(command)}` failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return done


_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent():
    """preexec_fn: SIGKILL this child when the cluster script dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper():
    """Orphans of the job (mpiexec's launchers once mpiexec is gone) become our children,
    so teardown can reap them instead of leaving them to the machine's init."""
    PR_SET_CHILD_SUBREAPER = 36
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)


def reap_orphans(timeout):
    """Wait for every remaining child (all of them have been killed) for up to TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (field 3 on), or None if the
    process is gone. The name may hold spaces and parentheses, hence the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid):
    """Field 22 of /proc/PID/stat, to tell a live process from a reused pid; None if gone."""
    fields = proc_stat(pid)
    return fields[19] if fields else None


def process_state(pid):
    """R, S, Z, ... (field 3 of /proc/PID/stat); None if gone."""
    fields = proc_stat(pid)
    return fields[0] if fields else None


class Cluster:
    """The namespaces, processes and files of one run; teardown() removes them all."""

    def __init__(self, run_id, n_hosts, shares):
        self.run_id = run_id
        self.names = [f"node{i}" for i in range(n_hosts)]
        self.shares = shares
        self.state_dir = os.path.join(STATE_ROOT, run_id)
        self.switch_ns = f"{NETNS_PREFIX}{run_id}-switch"
        self.login_ns = f"{NETNS_PREFIX}{run_id}-login"
        self.host_ns = {name: f"{NETNS_PREFIX}{run_id}-{name}" for name in self.names}
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.port = {name: f"p{i}" for i, name in enumerate(self.names)}  # switch side
        self.port["login"] = "plogin"
        self.inits = {}   # host name -> Popen of `ip netns exec ... unshare ... init`
        self.init_pid = {}  # host name -> pid of the init (PID 1 inside the host)
        self.hostfile = os.path.join(self.state_dir, "hostfile")  # MPICH's format
        self.hostfile_openmpi = os.path.join(self.state_dir, "hostfile.openmpi")
        self.launcher = os.path.join(self.state_dir, "launch")
        self.init_script = os.path.join(self.state_dir, "host_init.py")

    @property
    def all_ns(self):
        return [self.switch_ns, self.login_ns, *self.host_ns.values()]

    def write_state(self):
        """Record what exists so that a later run can remove it if this one is killed."""
        state = {
            "run_id": self.run_id,
            "owner_pid": os.getpid(),
            "owner_start": process_start_time(os.getpid()),
            "netns": self.all_ns,
            "hosts": {name: {"netns": self.host_ns[name], "address": self.address[name],
                             "switch_port": self.port[name],
                             "init_pid": self.init_pid.get(name),
                             "init_start": process_start_time(self.init_pid[name])
                             if name in self.init_pid else None}
                      for name in self.names},
            "switch_netns": self.switch_ns,
            "login_netns": self.login_ns,
        }
        tmp = os.path.join(self.state_dir, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, os.path.join(self.state_dir, "state.json"))

    def create(self, ranks_per_host):
        os.makedirs(self.state_dir)
        self.write_state()  # before anything exists, so nothing can be left unrecorded
        with open(self.init_script, "w") as f:
            f.write(HOST_INIT)
        hosts_file = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        hosts_file += "".join(f"{self.address[n]} {n}\n" for n in self.names)
        hosts_file += f"{LOGIN_ADDRESS} login\n"

        run("ip", "netns", "add", self.switch_ns)
        run("ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch_ns, "link", "set", "br0", "up")
        for name, ns, address in [*((n, self.host_ns[n], self.address[n]) for n in self.names),
                                  ("login", self.login_ns, LOGIN_ADDRESS)]:
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(hosts_file)
            run("ip", "netns", "add", ns)
            # Both ends are created inside namespaces: the root namespace never sees them.
            run("ip", "-n", self.switch_ns, "link", "add", self.port[name], "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", self.switch_ns, "link", "set", self.port[name], "master", "br0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

        for name in self.names:
            self.inits[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.host_ns[name],
                 "unshare", "--uts", "--ipc", "--pid", "--mount", "--mount-proc",
                 "--fork", "--kill-child", "--",
                 sys.executable, self.init_script, self.run_id, name, *self.shares],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, preexec_fn=die_with_parent)
        for name, proc in self.inits.items():
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            line = proc.stdout.readline() if ready else b""
            if line.strip() != b"ready":
                proc.kill()
                error = proc.stderr.read().decode(errors="replace").strip()
                raise SetupError(f"host {name} did not start: {error or 'no answer in 20 s'}")
            self.init_pid[name] = self.find_init_pid(proc.pid)
        self.write_state()

        with open(self.hostfile, "w") as f:
            f.writelines(f"{name}:{ranks_per_host}\n" for name in self.names)
        with open(self.hostfile_openmpi, "w") as f:
            f.writelines(f"{name} slots={ranks_per_host}\n" for name in self.names)
        cases = "\n".join(f"    {n}) pid={self.init_pid[n]} ;;" for n in self.names)
        with open(self.launcher, "w") as f:
            f.write(LAUNCH_TEMPLATE.format(run_id=self.run_id, cases=cases,
                                           names=" ".join(self.names)))
        os.chmod(self.launcher, 0o755)

    @staticmethod
    def find_init_pid(unshare_pid):
        """The forked child of `unshare --fork` is the init (PID 1 inside the host)."""
        with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
            children = f.read().split()
        if len(children) != 1:
            raise SetupError(f"expected one child of unshare {unshare_pid}, got {children}")
        return int(children[0])

    def login_command(self, command):
        """Argv that runs COMMAND in the login host (its own net, uts and mount only)."""
        return ["ip", "netns", "exec", self.login_ns, "unshare", "--uts", "--",
                sys.executable, "-c", LOGIN_EXEC, "login", *command]

    def host_of(self, spec):
        """A host given as node2 or 2."""
        name = f"node{spec}" if spec.isdigit() else spec
        if name not in self.names:
            raise SetupError(f"unknown host {spec!r}: this cluster has {', '.join(self.names)}")
        return name

    def shape_links(self, rate, delay):
        """Both ends of every host's veth: what a host sends and what it receives each pass
        one shaper, as on a full-duplex link. tbf for a rate alone; netem for a delay."""
        for name in self.names:
            for ns, dev in ((self.host_ns[name], "eth0"), (self.switch_ns, self.port[name])):
                if delay:
                    qdisc = ["netem", "delay", delay] + (["rate", rate] if rate else [])
                else:
                    # A bucket of 1 ms at the rate, at least 1 MiB: with 64 KiB, TCP over
                    # the veth stalled (a 2 MB allreduce at 1gbit took 4x its line-rate
                    # time); from 1 MiB to 16 MiB it took the line-rate time.
                    burst = max(int(link_rate_bytes(rate) * 1e-3), 1 << 20)
                    qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
                done = run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                           *qdisc, check=False)
                if done.returncode != 0:
                    hint = (" (this kernel has no sch_netem: shape the rate alone with --link-rate)"
                            if delay and "unknown" in done.stderr else "")
                    raise SetupError(f"tc {' '.join(qdisc)} on {name}'s link failed: "
                                     f"{done.stderr.strip()}{hint}")

    def cut_link(self, name):
        # The switch side goes down: the host sees its carrier drop, as with a pulled cable.
        run("ip", "-n", self.switch_ns, "link", "set", self.port[name], "down")

    def kill_host(self, name):
        # SIGKILL to PID 1 of a PID namespace kills every process in it: a power-off.
        os.kill(self.init_pid[name], signal.SIGKILL)

    def traffic(self):
        """Bytes each host sent and received on its link, read at the switch ports."""
        done = run("ip", "-n", self.switch_ns, "-s", "-j", "link", "show", check=False)
        if done.returncode != 0:
            return {}
        by_port = {link["ifname"]: link.get("stats64", {}) for link in json.loads(done.stdout)}
        report = {}
        for name, port in self.port.items():
            stats = by_port.get(port)
            if stats:  # what the port received the host sent, and the other way round
                report[name] = {"sent_bytes": stats["rx"]["bytes"],
                                "received_bytes": stats["tx"]["bytes"]}
        return report

    def processes(self):
        """{host: [command line, ...]} of what still runs on each live host, init aside."""
        spaces = {}
        for name, pid in self.init_pid.items():
            try:
                spaces[os.readlink(f"/proc/{pid}/ns/pid")] = (name, pid)
            except OSError:
                pass  # the host is down
        found = {name: [] for name, _ in spaces.values()}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                host = spaces.get(os.readlink(f"/proc/{entry}/ns/pid"))
                if host is None or int(entry) == host[1]:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue  # exited meanwhile
            if command:  # zombies have none
                found[host[0]].append(command)
        return found

    def left_running(self, grace):
        """What still runs on the hosts GRACE seconds after the job ended (hydra kills the
        ranks it can reach; a host cut off keeps its processes, as a real one would)."""
        deadline = time.monotonic() + grace
        while True:
            found = {name: commands for name, commands in self.processes().items() if commands}
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def teardown(self):
        """Remove everything this run made; safe to call on a half-built cluster."""
        for name, proc in self.inits.items():
            pid = self.init_pid.get(name)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.kill()  # unshare's --kill-child then kills the init as well
        for proc in self.inits.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"warning: process {proc.pid} did not exit")
        # Anything else still inside the run's network namespaces: the login host has no
        # PID namespace, and a process there that left the job's process group (srun,
        # daemons) would survive the group's SIGKILL.
        kill_members(self.all_ns)
        remove_names(self.all_ns)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def kill_members(namespaces, timeout=5):
    """SIGKILL every process whose network namespace is one of NAMESPACES, until none."""
    inodes = set()
    for ns in namespaces:
        try:
            inodes.add(f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while inodes:
        members = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/net") in inodes:
                    members.append(int(entry))
            except OSError:
                pass  # exited meanwhile, or a kernel thread
        members = [pid for pid in members if process_state(pid) not in (None, "Z")]
        if not members:
            return
        if time.monotonic() > deadline:
            log(f"warning: processes {members} are still in the run's namespaces")
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_names(namespaces):
    for ns in namespaces:
        if os.path.exists(f"/run/netns/{ns}"):
            run("ip", "netns", "delete", ns, check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def cleanup_stale(verbose):
    """Remove what runs whose owner is gone left behind (only those: runs can overlap)."""
    removed = 0
    for run_id in sorted(os.listdir(STATE_ROOT)) if os.path.isdir(STATE_ROOT) else []:
        path = os.path.join(STATE_ROOT, run_id, "state.json")
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
        if state and process_start_time(state["owner_pid"]) == state["owner_start"]:
            continue  # still running
        if state is None and time.time() - os.path.getmtime(os.path.dirname(path)) < 60:
            continue  # a run that is writing its first state right now
        if state:
            for host in state["hosts"].values():
                pid, start = host.get("init_pid"), host.get("init_start")
                if pid and start and process_start_time(pid) == start:
                    os.kill(pid, signal.SIGKILL)
            kill_members(state["netns"])
            remove_names(state["netns"])
        shutil.rmtree(os.path.join(STATE_ROOT, run_id), ignore_errors=True)
        removed += 1
        if verbose:
            log(f"removed stale run {run_id}")
    # Namespaces whose run left no state (killed between two steps of `create`).
    live = set(os.listdir(STATE_ROOT)) if os.path.isdir(STATE_ROOT) else set()
    listed = run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listed:
        ns = line.split(" ")[0]
        match = re.fullmatch(rf"{NETNS_PREFIX}([a-z0-9]+)-\w+", ns)
        if match and match.group(1) not in live:
            kill_members([ns])
            remove_names([ns])
            removed += 1
            if verbose:
                log(f"removed stale namespace {ns}")
    return removed


SLURM_SCRIPT = os.path.join(os.path.dirname(os.path.realpath(__file__)), "cluster_slurm.py")


def install_slurm():
    """Debian's slurm-wlm and munge, installed when missing (as root, before any host)."""
    if os.geteuid() != 0:
        raise SetupError("--slurm needs root: run scripts/cluster as root (sudo)")
    sys.path.insert(0, os.path.dirname(SLURM_SCRIPT))
    import cluster_slurm
    try:
        cluster_slurm.install()
    except cluster_slurm.SlurmSetupError as error:
        raise SetupError(f"slurm set-up failed: {error}") from None


def check_prerequisites(mpiexec):
    """Fail early with the fix; return (path, "mpich" or "openmpi") of the launcher."""
    if os.geteuid() != 0:
        raise SetupError("network namespaces need root: run scripts/cluster as root (sudo)")
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            raise SetupError(f"`{tool}` not found: apt-get install iproute2 util-linux mount")
    if mpiexec is None:
        return None, None
    path = shutil.which(mpiexec)
    if path is None:
        raise SetupError(f"mpiexec {mpiexec!r} not found: `source scripts/_setup.sh` puts "
                         "MPICH's mpiexec on PATH, or pass --mpiexec PATH")
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    if "HYDRA" in version:
        return path, "mpich"
    if "Open MPI" in version:
        return path, "openmpi"
    raise SetupError(f"{path} is neither MPICH's hydra mpiexec nor Open MPI's mpirun "
                     f"(--version says {version.strip()[:60]!r}); pass --mpiexec PATH, or "
                     "--no-mpiexec and launch it yourself with $CLUSTER_HOSTFILE and "
                     "$CLUSTER_LAUNCHER")


class ExitWith125(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(SETUP_ERROR)


RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def link_rate_bytes(rate):
    """Bytes per second of a tc rate such as 10gbit; None if it is not one."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?bit)", rate.lower())
    if not match or float(match.group(1)) <= 0:
        return None
    return float(match.group(1)) * RATE_UNITS[match.group(2)] / 8


def parse_args(argv):
    parser = ExitWith125(
        prog="scripts/cluster",
        description="Run COMMAND under mpiexec (MPICH or Open MPI) on H isolated hosts made "
                    "of Linux namespaces on this machine (root needed). Exit status: the "
                    "job's; 124 after a hard kill at --timeout; 125 if the cluster could "
                    "not be built.",
        epilog="example: scripts/cluster --hosts 4 --ranks-per-host 1 -- "
               "dpflow train --dtype float64 --save p.npz")
    parser.add_argument("--hosts", type=int, default=2, metavar="H",
                        help="number of hosts, node0..node{H-1} (default 2)")
    parser.add_argument("--ranks-per-host", type=int, default=1, metavar="R",
                        help="MPI ranks on each host (default 1)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="end the job after this long: MPIEXEC_TIMEOUT (MPICH) or "
                             "--timeout (Open MPI), and a hard kill 10 s later (exit 124)")
    parser.add_argument("--share", action="append", default=[], metavar="DIR",
                        help="keep DIR (under /tmp or /dev/shm) visible in every host; the "
                             "working directory and mpiexec's venv are shared automatically")
    parser.add_argument("--cut-link-after", nargs=2, action="append", default=[],
                        metavar=("SECONDS", "HOST"),
                        help="take HOST's link down SECONDS after the job started")
    parser.add_argument("--kill-host-after", nargs=2, action="append", default=[],
                        metavar=("SECONDS", "HOST"),
                        help="SIGKILL every process on HOST SECONDS after the job started")
    parser.add_argument("--link-rate", metavar="RATE",
                        help="shape every host's link to RATE each way (tc tbf on both ends of "
                             "its veth), e.g. 1gbit or 10gbit: a real NIC's line rate")
    parser.add_argument("--link-delay", metavar="DELAY",
                        help="add DELAY each way on every host's link (tc netem; needs the "
                             "kernel's sch_netem), e.g. 50us")
    parser.add_argument("--report-traffic", action="store_true",
                        help="print the bytes each host sent and received on its link")
    parser.add_argument("--report-json", metavar="PATH",
                        help="write the job's status, the faults injected, each host's byte "
                             "counts and the processes still running on each host after the "
                             "job ended, as JSON to PATH")
    parser.add_argument("--run-id", metavar="ID",
                        help="name of this run (lowercase letters and digits, at most 12); "
                             "default: random")
    parser.add_argument("--mpiexec", default="mpiexec", metavar="PATH",
                        help="MPICH's (hydra) or Open MPI's mpiexec/mpirun; which one is "
                             "read from its --version (default: the one on PATH)")
    parser.add_argument("--no-mpiexec", action="store_true",
                        help="run COMMAND itself on the login host, with CLUSTER_HOSTFILE "
                             "(MPICH format), CLUSTER_HOSTFILE_OPENMPI, CLUSTER_LAUNCHER (an "
                             "ssh stand-in) and CLUSTER_HOSTS set")
    parser.add_argument("--slurm", action="store_true",
                        help="start Slurm on the hosts (munge, slurmctld on the login host, "
                             "slurmd on each host; scripts/cluster_slurm.py) and run COMMAND "
                             "on the login host, where sinfo, srun, sbatch, squeue and scancel "
                             "work; installs slurm-wlm and munge from apt when missing")
    parser.add_argument("--cleanup-stale", action="store_true",
                        help="only remove what killed runs left behind, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command each rank runs")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.cleanup_stale:
        return args
    if not args.command:
        parser.error("no command: put it after --, e.g. -- dpflow train --epochs 1")
    if not 1 <= args.hosts <= 200:
        parser.error(f"--hosts must be between 1 and 200, got {args.hosts}")
    if args.ranks_per_host < 1:
        parser.error(f"--ranks-per-host must be >= 1, got {args.ranks_per_host}")
    if args.run_id is not None and not re.fullmatch(r"[a-z0-9]{1,12}", args.run_id):
        parser.error(f"--run-id must be 1-12 lowercase letters or digits, got {args.run_id!r}")
    if args.link_rate is not None and link_rate_bytes(args.link_rate) is None:
        parser.error(f"--link-rate takes a rate such as 100mbit, 1gbit or 10gbit, got {args.link_rate!r}")
    if args.link_delay is not None and not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", args.link_delay):
        parser.error(f"--link-delay takes a time such as 50us or 1ms, got {args.link_delay!r}")
    for option, pairs in (("--cut-link-after", args.cut_link_after),
                          ("--kill-host-after", args.kill_host_after)):
        for seconds, _ in pairs:
            try:
                float(seconds)
            except ValueError:
                parser.error(f"{option} takes SECONDS HOST, got {seconds!r} for SECONDS")
    return args


def shared_dirs(requested, mpiexec):
    """Directories to keep visible under the hosts' private /tmp and /dev/shm: the ones
    asked for, the working directory, this repository (an editable install of dpflow
    imports from it), and the venv (or prefix) mpiexec comes from."""
    shares = []
    automatic = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.realpath(__file__)))]
    if mpiexec:
        automatic.append(os.path.dirname(os.path.dirname(os.path.realpath(mpiexec))))
    for d in [*requested, *automatic]:
        d = os.path.realpath(d)
        if d in ("/tmp", "/dev/shm"):
            raise SetupError(f"--share {d} would undo the hosts' private {d}; share a "
                             "directory under it instead")
        if d.startswith(("/tmp/", "/dev/shm/")) and d not in shares:
            if not os.path.isdir(d):
                raise SetupError(f"--share {d}: not a directory")
            shares.append(d)
    return sorted(shares)  # parents before children when bound one over the other


def prepare(args):
    """Check what the run needs and remove stale runs; (mpiexec, flavor, shared dirs)."""
    if args.slurm:
        install_slurm()
    mpiexec, flavor = check_prerequisites(None if args.no_mpiexec else args.mpiexec)
    cleanup_stale(verbose=True)
    return mpiexec, flavor, shared_dirs(args.share, mpiexec or shutil.which("mpiexec"))


def scheduled_faults(args, cluster):
    """[(seconds after the job started, what, host, action)], soonest first."""
    faults = [(float(seconds), "cut the link of", cluster.host_of(host), cluster.cut_link)
              for seconds, host in args.cut_link_after]
    faults += [(float(seconds), "killed every process on", cluster.host_of(host), cluster.kill_host)
               for seconds, host in args.kill_host_after]
    return sorted(faults, key=lambda fault: fault[0])


def bring_up(args, cluster):
    started = time.monotonic()
    cluster.create(args.ranks_per_host)
    if args.link_rate or args.link_delay:
        cluster.shape_links(args.link_rate, args.link_delay)
        log(f"links shaped: {' '.join(filter(None, (args.link_rate, args.link_delay)))} each way")
    log(f"run {cluster.run_id}: {args.hosts} hosts x {args.ranks_per_host} ranks up in "
        f"{time.monotonic() - started:.1f} s; state in {cluster.state_dir}/state.json")
    for name in cluster.names:
        log(f"host {name} {cluster.address[name]} netns {cluster.host_ns[name]} "
            f"init pid {cluster.init_pid[name]}")


def job_command(args, cluster, mpiexec, flavor):
    """(command, environment) of the job, run on the login host."""
    env = dict(os.environ)
    env.update(CLUSTER_RUN_ID=cluster.run_id, CLUSTER_HOSTFILE=cluster.hostfile,
               CLUSTER_HOSTFILE_OPENMPI=cluster.hostfile_openmpi,
               CLUSTER_LAUNCHER=cluster.launcher, CLUSTER_HOSTS=",".join(cluster.names),
               CLUSTER_STATE=os.path.join(cluster.state_dir, "state.json"))
    # UCX over TCP only: with private /dev/shm there is no shared memory between hosts
    # anyway, and this keeps ranks of one host on TCP too, so every rank takes the
    # same path. A UCX_TLS set by the caller wins.
    env.setdefault("UCX_TLS", "tcp,self")
    ranks = str(args.hosts * args.ranks_per_host)
    timeout = str(max(1, round(args.timeout))) if args.timeout else None
    if flavor == "openmpi" and not args.no_mpiexec:
        # Open MPI (PRRTE) starts its prted daemons through the same ssh stand-in.
        # This script runs as root only, which Open MPI refuses unless told twice.
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        return [mpiexec, "--hostfile", cluster.hostfile_openmpi, "--prtemca", "plm_ssh_agent",
                cluster.launcher, "-n", ranks, *(["--timeout", timeout] if timeout else []),
                *args.command], env
    if timeout:
        env["MPIEXEC_TIMEOUT"] = timeout
    if args.no_mpiexec:
        return args.command, env
    return [mpiexec, "-f", cluster.hostfile, "-launcher", "ssh", "-launcher-exec", cluster.launcher,
            "-n", ranks, *args.command], env


def supervise(job, faults, timeout):
    """Wait for the job, injecting each fault at its time; (exit status, faults fired).
    A job still running 10 s after `timeout` is killed: status 124."""
    started = time.monotonic()
    hard_stop = started + timeout + 10 if timeout else None
    fired = []
    while True:
        try:
            status = job.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - started
        while faults and faults[0][0] <= elapsed:
            _, what, host, act = faults.pop(0)
            act(host)
            log(f"{what} {host} at {elapsed:.1f} s")
            fired.append({"what": what, "host": host, "seconds": round(elapsed, 2)})
        if hard_stop and time.monotonic() > hard_stop:
            # mpiexec's own timeout did not end it (Open MPI's mpirun waits forever
            # for a daemon on a cut-off host, even after MPI_Abort).
            log(f"error: the job outlived --timeout {timeout:g} s; killing it")
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            status = 124
            break
    if status < 0:  # killed by a signal: report it as a shell would
        status = 128 - status
    log(f"job exited with status {status} after {time.monotonic() - started:.1f} s")
    if status == 0 and fired:
        log("warning: status 0 although a fault was injected (Open MPI's mpirun does "
            "this after losing a host): judge the job by its ranks' results")
    return status, fired


def report(args, cluster, status, fired, left):
    """--report-traffic lines and the --report-json file."""
    traffic = cluster.traffic() if args.report_traffic or args.report_json else {}
    if args.report_traffic:
        for name, counts in traffic.items():
            log(f"traffic {name}: sent {counts['sent_bytes']} bytes, "
                f"received {counts['received_bytes']} bytes")
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump({"run_id": cluster.run_id, "status": status, "faults": fired,
                       "traffic": traffic, "left_running": left}, f, indent=1)


def kill_job(job):
    """mpiexec's group: mpiexec itself and the launchers it started."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def main(argv):
    args = parse_args(argv)
    if args.slurm:
        # Slurm starts the ranks (srun), not mpiexec: the command runs on the login host.
        args.no_mpiexec = True
        args.command = [sys.executable, SLURM_SCRIPT, "--", *args.command]
    try:
        if args.cleanup_stale:
            check_prerequisites(None)
            log(f"removed {cleanup_stale(verbose=True)} stale run(s) or namespace(s)")
            return 0
        mpiexec, flavor, shares = prepare(args)
    except SetupError as error:
        log(f"error: {error}")
        return SETUP_ERROR
    run_id = args.run_id or secrets.token_hex(3)
    if os.path.exists(os.path.join(STATE_ROOT, run_id)):
        log(f"error: run {run_id} exists already; choose another --run-id")
        return SETUP_ERROR
    cluster = Cluster(run_id, args.hosts, shares)
    become_subreaper()

    def stop(signum, frame):
        raise Stopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    status, job, fired, left = SETUP_ERROR, None, [], {}
    try:
        faults = scheduled_faults(args, cluster)
        bring_up(args, cluster)
        command, env = job_command(args, cluster, mpiexec, flavor)
        job = subprocess.Popen(cluster.login_command(command), env=env,
                               start_new_session=True, preexec_fn=die_with_parent)
        status, fired = supervise(job, faults, args.timeout)
        # What the job left on the hosts is its ranks' fate: a launcher's status alone can
        # hide ranks that never ended (Open MPI has returned 0 after losing a host).
        left = cluster.left_running(grace=2)
        for name, commands in left.items():
            log(f"still running on {name} after the job ended (removed now): "
                + "; ".join(c[:100] for c in commands))
    except SetupError as error:
        log(f"error: {error}")
        status = SETUP_ERROR
    except Stopped as stopped:
        log(f"stopped by {stopped}; removing the cluster")
        status = 128 + stopped.signum
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # teardown must not be interrupted
        if job is not None:
            kill_job(job)
        report(args, cluster, status, fired, left)
        cluster.teardown()
        if not reap_orphans(timeout=10):
            log("warning: some of the job's processes did not exit within 10 s")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
