"""Slurm on the hosts of scripts/cluster: `scripts/cluster --slurm -- COMMAND`.

scripts/cluster builds the hosts and runs this file on its login host (as it runs any
--no-mpiexec command, with $CLUSTER_HOSTS, $CLUSTER_LAUNCHER and $CLUSTER_STATE set). It
  1. starts munged (a fresh key) on the login host: every daemon and client of the run
     talks to it through one socket in the run's state directory (a socket path crosses
     network namespaces), so authentication is real munge, not auth/none;
  2. writes slurm.conf: one partition with every host, each with the machine's real CPU
     count, MpiDefault=pmi2, ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
     (neither needs systemd nor cgroups), state, spool and logs under the run's state
     directory, which scripts/cluster removes;
  3. starts slurmctld on the login host and slurmd on each compute host (through the
     cluster's ssh stand-in, so each lives in its host's namespaces), waits until sinfo
     shows every node idle;
  4. runs COMMAND on the login host with SLURM_CONF set (sinfo, srun, sbatch, squeue and
     scancel work there), and returns its exit status.
Stopping is scripts/cluster's job: its teardown kills every process of the run's hosts
and namespaces, and removes the state directory with the spool and state files in it.

Exit status: COMMAND's; 125 (with "slurm set-up failed" and the daemons' logs) when Slurm
could not be brought up, so that a set-up failure is never mistaken for the job's.
"""

import ctypes
import os
import shlex
import shutil
import subprocess
import sys
import time

SETUP_ERROR = 125
PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")
CONTROLLER = ("login", "10.77.0.254")  # scripts/cluster's login host
READY_SECONDS = 60


class SlurmSetupError(Exception):
    pass


def log(message):
    print(f"cluster: slurm: {message}", file=sys.stderr, flush=True)


def die_with_this_script():
    """preexec_fn: SIGKILL the daemon when this script dies, even by SIGKILL. This script
    dies with scripts/cluster (its parent-death signal), so a killed cluster takes munged
    and slurmctld with it instead of leaving them for --cleanup-stale."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 9)


def missing_programs():
    return [p for p in PROGRAMS if shutil.which(p) is None]


def install():
    """Install Debian's slurm-wlm and munge when a program is missing (root only). apt's
    package lists may be absent on a fresh machine: update them once and retry then."""
    if not missing_programs():
        return
    if shutil.which("apt-get") is None:
        raise SlurmSetupError(f"{', '.join(missing_programs())} not found and no apt-get "
                              f"here: install {' and '.join(PACKAGES)} by hand")
    log(f"installing {' '.join(PACKAGES)} from apt (missing: {', '.join(missing_programs())})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install_command = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                       "-o", "DPkg::Lock::Timeout=600", *PACKAGES]
    started = time.monotonic()
    done = subprocess.run(install_command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        log("apt-get install failed; updating the package lists and trying again")
        update = subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"],
                                env=env, capture_output=True, text=True)
        done = subprocess.run(install_command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((update.stderr + done.stdout + done.stderr).splitlines()[-15:])
            raise SlurmSetupError(f"`{shlex.join(install_command)}` failed:\n{tail}")
    if missing_programs():
        raise SlurmSetupError(f"still missing after installing {' '.join(PACKAGES)}: "
                              f"{', '.join(missing_programs())}")
    log(f"installed in {time.monotonic() - started:.0f} s")


def slurm_conf(directory, hosts, addresses, cpus, munge_socket):
    nodes = "".join(f"NodeName={h} NodeAddr={addresses[h]} CPUs={cpus} State=UNKNOWN\n"
                    for h in hosts)
    name, address = CONTROLLER
    return f"""\
# Written by scripts/cluster --slurm for one run; removed with the run.
ClusterName=dpflow
SlurmctldHost={name}({address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
# Every rank gets PMI-2 from slurmstepd unless srun asks for another --mpi.
MpiDefault=pmi2
# Neither needs systemd nor cgroups, which these hosts do not have.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A dead host is declared DOWN (and its job ended) after this many seconds.
SlurmdTimeout=20
InactiveLimit=0
MinJobAge=600
StateSaveLocation={directory}/ctld
SlurmdSpoolDir={directory}/spool/%n
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/spool/%n/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd-%n.log
PlugStackConfig={directory}/plugstack.conf
{nodes}PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def host_addresses(hosts):
    """{host: address} from the cluster's /etc/hosts, which the login host sees."""
    found = {}
    with open("/etc/hosts") as f:
        for line in f:
            fields = line.split()
            for name in fields[1:]:
                if name in hosts:
                    found[name] = fields[0]
    missing = [h for h in hosts if h not in found]
    if missing:
        raise SlurmSetupError(f"no address for {', '.join(missing)} in /etc/hosts")
    return found


def logs_tail(directory, lines=15):
    """The last lines of every daemon's log, for a set-up failure."""
    out = []
    log_dir = os.path.join(directory, "log")
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
        out.append(f"--- {name}\n" + "\n".join(tail))
    return "\n".join(out)


def wait_for(condition, seconds, what, procs):
    """Poll CONDITION until true; fail naming WHAT if SECONDS pass or a daemon exits."""
    deadline = time.monotonic() + seconds
    while not condition():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SlurmSetupError(f"{name} exited with status {proc.returncode} "
                                      f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise SlurmSetupError(f"{what}: not within {seconds} s")
        time.sleep(0.2)


def start(directory, hosts, launcher, run_id):
    """Bring munge and Slurm up; return (environment for COMMAND, daemon processes)."""
    for sub in ("ctld", "log", "munge", *(f"spool/{h}" for h in hosts)):
        os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    procs = {}

    # munge: a key of this run only; munged refuses keys others can read.
    munge_dir = os.path.join(directory, "munge")
    key = os.path.join(munge_dir, "munge.key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
        f.write(os.urandom(1024))
    socket = os.path.join(munge_dir, "munge.socket")
    procs["munged"] = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--socket={socket}", f"--key-file={key}",
         f"--log-file={directory}/log/munged.log", f"--pid-file={munge_dir}/munged.pid",
         f"--seed-file={munge_dir}/munged.seed"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        preexec_fn=die_with_this_script)

    def munge_works():
        encoded = subprocess.run(["munge", "-n", "-S", socket], capture_output=True)
        return encoded.returncode == 0 and subprocess.run(
            ["unmunge", "-S", socket], input=encoded.stdout, capture_output=True
        ).returncode == 0

    wait_for(munge_works, 20, "munged to answer on its socket", procs)

    cpus = os.cpu_count()
    conf = os.path.join(directory, "slurm.conf")
    with open(os.path.join(directory, "plugstack.conf"), "w"):
        pass  # no SPANK plugins: the machine's own /etc/slurm/plugstack.conf is not ours
    with open(conf, "w") as f:
        f.write(slurm_conf(directory, hosts, host_addresses(hosts), cpus, socket))
    env = dict(os.environ, SLURM_CONF=conf)
    for name in ("SLURM_JOB_ID", "SLURM_JOBID"):  # never inherit an outer allocation
        env.pop(name, None)

    procs["slurmctld"] = subprocess.Popen(
        ["slurmctld", "-D", "-f", conf], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_this_script)
    for host in hosts:
        # slurmd 22.05 loads its cgroup plugin even when no plugin uses cgroups, and
        # gives up unless /sys/fs/cgroup/systemd is a cgroup file system (`ip netns exec`
        # mounts a fresh /sys without any). A tmpfs there with a new, empty, named cgroup
        # hierarchy of this run, in this host's mount namespace only, satisfies it and
        # gives Slurm no access to the machine's real cgroups; the kernel drops the
        # hierarchy when the host's last mount of it goes.
        # The ssh stand-in joins its arguments into one shell line, as ssh does.
        on_host = " && ".join([
            "mount -t tmpfs -o size=1m,mode=755 slurm-no-cgroups /sys/fs/cgroup",
            "mkdir /sys/fs/cgroup/systemd",
            f"mount -t cgroup -o none,name=dpflow-{run_id} slurm-no-cgroups "
            "/sys/fs/cgroup/systemd",
            "exec " + shlex.join(["env", f"SLURM_CONF={conf}", "slurmd", "-D", "-f", conf,
                                  "-N", host])])
        procs[f"slurmd on {host}"] = subprocess.Popen(
            [launcher, host, on_host], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT)

    def all_idle():
        shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                               capture_output=True, text=True)
        states = dict(line.split() for line in shown.stdout.splitlines() if line.strip())
        return shown.returncode == 0 and all(states.get(h) == "idle" for h in hosts)

    wait_for(all_idle, READY_SECONDS, f"every node ({', '.join(hosts)}) idle in sinfo", procs)
    return env, procs


def main(argv):
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        log("error: no command after --")
        return SETUP_ERROR
    hosts = os.environ["CLUSTER_HOSTS"].split(",")
    directory = os.path.join(os.path.dirname(os.environ["CLUSTER_STATE"]), "slurm")
    started = time.monotonic()
    try:
        env, procs = start(directory, hosts, os.environ["CLUSTER_LAUNCHER"],
                           os.environ["CLUSTER_RUN_ID"])
    except (SlurmSetupError, OSError) as error:
        log(f"error: slurm set-up failed: {error}\n{logs_tail(directory)}")
        return SETUP_ERROR
    version = subprocess.run(["sinfo", "--version"], env=env, capture_output=True,
                             text=True).stdout.strip()
    log(f"{version}: slurmctld on login, slurmd on {', '.join(hosts)}, up in "
        f"{time.monotonic() - started:.1f} s; SLURM_CONF={env['SLURM_CONF']}")
    env["CLUSTER_SLURM_LOGS"] = os.path.join(directory, "log")
    try:
        status = subprocess.run(command, env=env).returncode
    finally:
        stop(env, procs)
    return 128 - status if status < 0 else status


def stop(env, procs, seconds=10):
    """Shut the daemons down the way an administrator would, so that what scripts/cluster
    finds still running on a host afterwards is the job's, not Slurm's. Whatever does not
    stop in time dies with the cluster (its teardown kills every process of the run)."""
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=seconds)
    deadline = time.monotonic() + seconds
    for name, proc in procs.items():
        if name == "munged":
            continue
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"warning: {name} did not stop within {seconds} s")
    procs["munged"].terminate()
    procs["munged"].wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
