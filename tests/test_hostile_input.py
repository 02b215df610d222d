"""Every value a user can type and every byte a file can hold: exit 2 and one message naming
it, never a traceback, a hang, or a crash report. One case per class of hostile input found
by a generated campaign over flags, TOML files, data files and metrics files (numbers past
what the arrays can hold, models larger than memory, devices and binary files where text
is expected, output paths that cannot be created, data whose contents break arithmetic)."""

import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from helpers import run

TIMEOUT = 60
SMALL = ["--dataset", "synthetic", "--samples", "200", "--features", "4", "--classes", "3", "--epochs", "1",
         "--hidden", "8", "--quiet"]
METRICS = '{"epoch": 1, "step": 1, "train_loss": 1, "test_loss": 1, "test_accuracy": 0.5}\n'
CNN = ["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--quiet"]
BENCH = ["--steps", "2", "--warmup", "0", "--features", "4", "--hidden", "8", "--batch-size", "8"]


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def npy(path, array):
    np.save(path, array)
    return str(path)


def truncated(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def checkpoint(directory):
    """A checkpoint of a 4-feature mlp, trained here."""
    subprocess.run([sys.executable, "-m", "dpflow", "train", *SMALL, "--checkpoint-dir", str(directory / "ck")],
                   check=True, timeout=TIMEOUT, cwd=directory)
    return str(directory / "ck")


def latest_a_directory(directory):
    os.remove(os.path.join(directory, "latest"))
    os.mkdir(os.path.join(directory, "latest"))
    return directory


def lock_a_directory(directory):
    os.mkdir(os.path.join(directory, ".lock"))
    return directory


def with_meta(directory, **changes):
    """`directory`'s newest checkpoint rewritten (checksum and all) with metadata `changes`."""
    from dpflow.checkpoint import decode, encode, list_checkpoints

    path = list_checkpoints(directory)[0]
    arrays, meta = decode(open(path, "rb").read())
    open(path, "wb").write(encode(arrays, {**meta, **changes}))
    return directory


def model_file(directory, source):
    """The SPEC of `build` in a model file holding `source`."""
    return write(directory / "model.py", source) + ":build"


def labels(n=40):
    return np.arange(n) % 3


CASES = {
    # numbers past what the arrays and the clock can hold
    "epochs past any count": (lambda d: ["train", *SMALL, "--epochs", "1" + "0" * 30], "--epochs must be at most"),
    "a 400-digit number": (lambda d: ["train", *SMALL, "--keep-checkpoints", "9" * 400], "--keep-checkpoints must be at most"),
    "a config that is a FIFO (a read would block)": (lambda d: ["train", *SMALL, "--config", fifo(d)],
                                                     "is not a regular file"),
    "a bucket size past any memory": (lambda d: ["train", *SMALL, "--bucket-mb", "1e308"], "--bucket-mb must be <= 1048576"),
    "a bench bucket size past any memory": (lambda d: ["bench", *BENCH, "--bucket-mb", "1e300"], "--bucket-mb must be <= 1048576"),
    "bench steps past any count": (lambda d: ["bench", *BENCH, "--steps", "9" * 20], "--steps must be in 1.."),
    "a bench batch larger than memory": (lambda d: ["bench", *BENCH, "--features", "2147483647"], "GiB free here"),
    "bench images larger than memory": (lambda d: ["bench", *BENCH, "--input-shape", "1,100000,100000"], "GiB free here"),
    "an infinite host bandwidth": (lambda d: ["bench", *BENCH, "--host-gbs", "inf"], "--host-gbs must be"),
    "a network latency that is not a number": (lambda d: ["bench", *BENCH, "--network-alpha-us", "nan"],
                                               "--network-alpha-us must be"),
    "a negative network latency": (lambda d: ["bench", *BENCH, "--network-alpha-us", "-5"], "--network-alpha-us must be"),
    "an infinite link rate": (lambda d: ["bench", *BENCH, "--network-gbps", "10,inf"], "--network-gbps takes"),
    "a link rate that is not a number": (lambda d: ["bench", *BENCH, "--network-gbps", "nan"], "--network-gbps takes"),
    "a node count past any count": (lambda d: ["bench", *BENCH, "--nodes", "8," + "9" * 23], "--nodes takes"),
    "a negative seed": (lambda d: ["train", *SMALL, "--seed", "-1"], "--seed must be >= 0"),
    "a toml integer past any count": (lambda d: ["train", *SMALL, "--config", write(d / "c.toml", "log-every = 9223372036854775807\n")],
                                      "--log-every must be at most"),
    # models and data larger than memory
    "a hidden layer larger than memory": (lambda d: ["train", *SMALL, "--hidden", "2000000000"],
                                          "more than the"),
    "a batch of logits larger than memory (it failed in the first step)": (
        lambda d: ["train", "--dataset", "synthetic", "--samples", "10000", "--features", "4", "--classes", "1000000",
                   "--hidden", "1", "--batch-size", "8192", "--epochs", "1"], "and a batch of 8000 rows, more than the"),
    "labels that are ids, not classes": (lambda d: ["train", "--epochs", "1", "--batch-size", "4", "--dataset",
                                                    npz(d / "d.npz", x_train=np.ones((40, 4)), y_train=labels() + 10**9,
                                                        x_test=np.ones((40, 4)), y_test=labels())],
                                         "labels must be class indices 0..K-1"),
    "more synthetic rows than memory (drawing them took minutes)": (
        lambda d: ["train", *SMALL, "--samples", "2147483647"], "does not fit in this machine's memory"),
    "more spiral rows than memory": (lambda d: ["train", *SMALL, "--dataset", "spirals", "--samples", "2147483647"],
                                     "does not fit in this machine's memory"),
    "more synthetic classes than memory": (lambda d: ["train", *SMALL, "--features", "100", "--classes", "100000000"],
                                           "does not fit in this machine's memory"),
    # model arguments out of range
    "a dropout rate that is not a number (it turned dropout off)": (
        lambda d: ["train", *CNN, "--model-arg", "dropout=nan"], "dropout must be a rate in [0, 1)"),
    "a negative dropout rate": (lambda d: ["train", *CNN, "--model-arg", "dropout=-0.5"], "dropout must be a rate"),
    "a convolution of no channels": (lambda d: ["train", *CNN, "--model-arg", "channels=[0]"], "channels must be integers >= 1"),
    "a negative kernel": (lambda d: ["train", *CNN, "--model-arg", "kernel=-1"], "kernel must be integers >= 1"),
    "a negative padding": (lambda d: ["train", *CNN, "--model-arg", "padding=-1"], "padding must be integers >= 0"),
    "an mlp layer of no units": (lambda d: ["train", *SMALL, "--model-arg", "hidden=[0]"], "hidden must be integers >= 1"),
    "a builder that calls sys.exit": (lambda d: ["train", *SMALL, "--model", model_file(d, "import sys\n\n\ndef build(*args, **kwargs):\n    sys.exit(5)\n")],
                                      "the builder called sys.exit(5)"),
    "a model file that calls sys.exit": (lambda d: ["train", *SMALL, "--model", model_file(d, "import sys\nsys.exit(4)\n")],
                                         "when imported, called sys.exit(4)"),
    # devices, binary and huge files where a text file is expected
    "an empty config path (an unset variable)": (lambda d: ["train", *SMALL, "--config", ""], "--config is empty"),
    "settings inside and outside [train]": (lambda d: ["train", *SMALL, "--config",
                                                       write(d / "c.toml", "seed = 1\n[train]\nlr = 0.1\n")],
                                            "seed outside its [train] table"),
    "a config that is a device": (lambda d: ["train", *SMALL, "--config", "/dev/zero"], "is not a regular file"),
    "a config that is not text": (lambda d: ["train", *SMALL, "--config", write(d / "c.toml", b"\xff\xfe\x00epochs")],
                                  "is not UTF-8 text"),
    "a hostfile that is a device": (lambda d: ["launch", "--hostfile", "/dev/zero", "--", "train", "--checkpoint-dir", "ck"],
                                    "is not a regular file"),
    "a metrics file that is not text": (lambda d: ["plot", write(d / "m.jsonl", b"\xff\xfe"), "-o", str(d / "c.png")],
                                        "is not UTF-8 text"),
    # output paths that cannot be created
    "a save path through a file": (lambda d: ["train", *SMALL, "--save", str(d / "file" / "p.npz")],
                                   "does not exist or is not writable"),
    "a save name too long": (lambda d: ["train", *SMALL, "--save", str(d / ("x" * 300))], "is longer than"),
    "a trace path that is a directory": (lambda d: ["train", *SMALL, "--trace", str(d)], "is a directory"),
    "a trace path through a missing directory": (lambda d: ["train", *SMALL, "--trace", str(d / "no" / "t.json")],
                                                 "does not exist or is not writable"),
    "a bench trace path that is a directory": (lambda d: ["bench", *BENCH, "--trace", str(d)], "is a directory"),
    "a bench trace path through a file": (lambda d: ["bench", *BENCH, "--trace", str(d / "file" / "t.json")],
                                          "does not exist or is not writable"),
    "metrics to a FIFO (a write would block)": (lambda d: ["train", *SMALL, "--metrics", fifo(d)],
                                                "is not a regular file"),
    "a plot written into a file": (lambda d: ["plot", write(d / "m.jsonl", '{"epoch": 1, "step": 1, "train_loss": 1, '
                                                                            '"test_loss": 1, "test_accuracy": 0.5}\n'),
                                              "-o", str(d / "file" / "c.png")], "cannot write it"),
    "a launcher argument with an open quote": (lambda d: ["launch", "--launcher-arg='-launcher ssh", "--", "train",
                                                          "--checkpoint-dir", "ck"], "cannot be split as a shell would"),
    "an empty hostfile path (an unset variable; it ran on this machine alone)": (
        lambda d: ["launch", "--hostfile", "", "--", "train", "--checkpoint-dir", "ck"], "--hostfile is empty"),
    "an empty host list": (lambda d: ["launch", "--hosts", "", "--", "train", "--checkpoint-dir", "ck"], "--hosts is empty"),
    "a launch summary written into a directory": (lambda d: ["launch", "--summary-json", str(d), "--", "train",
                                                             "--checkpoint-dir", "ck"], "--summary-json {} is a directory"),
    "a launch summary through a missing directory": (lambda d: ["launch", "--summary-json", str(d / "no" / "s.json"),
                                                                "--", "train", "--checkpoint-dir", "ck"],
                                                     "does not exist or is not writable"),
    # an output that is an input, or another output: the write would replace it
    "parameters saved over the dataset": (lambda d: ["train", "--epochs", "1", "--batch-size", "4", "--dataset",
                                                     npz(d / "d.npz", x_train=np.ones((40, 4)), y_train=labels(),
                                                         x_test=np.ones((40, 4)), y_test=labels()),
                                                     "--save", str(d / "d.npz")], "is the file --dataset names too"),
    "metrics written over the config file": (lambda d: ["train", *SMALL, "--config", write(d / "c.toml", "seed = 1\n"),
                                                        "--metrics", str(d / "c.toml")], "is the file --config names too"),
    "a trace written over the metrics": (lambda d: ["train", *SMALL, "--metrics", str(d / "m"), "--trace", str(d / "m")],
                                         "is the file --metrics names too"),
    "predictions written over the examples": (lambda d: ["predict", "--checkpoint", checkpoint(d), "--input",
                                                         npy(d / "x.npy", np.ones((2, 4))), "--output", str(d / "x.npy")],
                                              "is the file --input names too"),
    # data whose contents break the arithmetic
    "no feature columns": (lambda d: ["train", "--epochs", "1", "--batch-size", "4", "--dataset",
                                      npz(d / "d.npz", x_train=np.ones((40, 0)), y_train=labels(),
                                          x_test=np.ones((40, 0)), y_test=labels())], "0 features"),
    "an IDX file with impossible sizes": (lambda d: ["train", "--epochs", "1", "--dataset", idx_dir(d)], "holds 0 images but"),
    # checkpoints and prediction files
    "a checkpoint that is a device (a read never ends)": (lambda d: ["eval", "--checkpoint", "/dev/zero"],
                                                          "is not a regular file"),
    "a checkpoint to predict with that is a device": (lambda d: ["predict", "--checkpoint", "/dev/zero", "--input",
                                                                 npy(d / "x.npy", np.ones((2, 4)))], "is not a regular file"),
    "a checkpoint directory whose latest is a directory (every write failed)": (
        lambda d: ["train", *SMALL, "--checkpoint-dir", latest_a_directory(checkpoint(d)), "--resume", "--epochs", "2"],
        "holds latest, which is not a file"),
    "a checkpoint directory whose lock file is a directory": (
        lambda d: ["train", *SMALL, "--checkpoint-dir", lock_a_directory(checkpoint(d)), "--resume", "--epochs", "2"],
        "its lock file {}/ck/.lock cannot be used (Is a directory); remove it"),
    "a checkpoint whose normaliser is not one": (lambda d: ["eval", "--checkpoint", with_meta(checkpoint(d), normalizer={
        "kind": "bogus"})], "is not a normaliser's state. Give another checkpoint"),
    "examples in a truncated .npz": (lambda d: ["predict", "--checkpoint", checkpoint(d), "--input",
                                                truncated(npz(d / "x.npz", x=np.ones((5, 4))))], "--input"),
    "predictions written into a directory": (lambda d: ["predict", "--checkpoint", checkpoint(d), "--input",
                                                        npy(d / "x.npy", np.ones((2, 4))), "--output", str(d)],
                                             "--output {} is a directory"),
    "predictions written through a file": (lambda d: ["predict", "--checkpoint", checkpoint(d), "--input",
                                                      npy(d / "x.npy", np.ones((2, 4))), "--output",
                                                      str(d / "file" / "p.npy")], "does not exist or is not writable"),
    # metrics records that are not records
    "a plot over its own metrics file": (lambda d: ["plot", write(d / "m.jsonl", METRICS), "-o", str(d / "m.jsonl")],
                                         "is the metrics file itself"),
    "a plot in a format matplotlib does not write": (lambda d: ["plot", write(d / "m.jsonl", METRICS), "-o",
                                                                str(d / "c.jsonl")], "matplotlib cannot write .jsonl"),
    "a metrics line that is a list": (lambda d: ["plot", write(d / "m.jsonl", "[1, 2]\n"), "-o", str(d / "c.png")],
                                      "is not a metrics record"),
    "a metrics value that is text": (lambda d: ["plot", write(d / "m.jsonl", '{"epoch": 1, "step": "one", "test_loss": 1, '
                                                                               '"train_loss": 1, "test_accuracy": 1}\n'),
                                                "-o", str(d / "c.png")], "is not a metrics record"),
}


def fifo(directory):
    path = directory / "pipe"
    os.mkfifo(path)
    return str(path)


def idx_dir(directory):
    path = directory / "idx"
    path.mkdir()
    header = b"\x00\x00\x08\x03" + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (path / name).write_bytes(header)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (path / name).write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5))
    return str(path)


# name: (environment variables, what the message says, the command: `train` unless given)
LAUNCH = ["launch", "--", "train", "--checkpoint-dir", "ck"]
ENVIRONMENTS = {
    "a launch rank command with an open quote": ({"DPFLOW_LAUNCH_RANK_COMMAND": "'python -m dpflow"},
                                                 "cannot be split as a shell would", LAUNCH),
    "a communicator dpflow does not have": ({"DPFLOW_COMM": "nccl"}, "DPFLOW_COMM must be auto, mpi or local"),
    "a thread count that is a word": ({"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS='abc' is not a thread count"),
    "a negative thread count": ({"OPENBLAS_NUM_THREADS": "-1"}, "OPENBLAS_NUM_THREADS='-1' is not a thread count"),
    "a fractional thread count": ({"MKL_NUM_THREADS": "1.5"}, "MKL_NUM_THREADS='1.5' is not a thread count"),
}


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_a_hostile_environment_exits_2_with_one_message(tmp_path, name):
    variables, message, *command = ENVIRONMENTS[name]
    argv = command[0] if command else ["train", *SMALL]
    done = subprocess.run([sys.executable, "-m", "dpflow", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=tmp_path, env={**os.environ, "DPFLOW_DEBUG": "", **variables})
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr, done.stderr


DRAWN = ("a plot written into a file", "a plot in a format matplotlib does not write")  # cases that get as far as drawing


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_exits_2_with_one_message(tmp_path, name):
    build, message = CASES[name]
    (tmp_path / "file").write_text("a file, not a directory")
    argv = build(tmp_path)
    if name in DRAWN:
        pytest.importorskip("matplotlib", reason="dpflow plot needs the plot extra (matplotlib), which "
                            "the container image, like a plain install, does not have")
    saved = files_and_contents(tmp_path)
    done = subprocess.run([sys.executable, "-m", "dpflow", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=tmp_path, env={**os.environ, "DPFLOW_DEBUG": ""})
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr, done.stderr
    assert message.format(tmp_path) in done.stderr, done.stderr
    now = files_and_contents(tmp_path)
    assert {path: now.get(path) for path in saved} == saved, "bad input changed or removed a file already saved"


def files_and_contents(directory):
    """{path: bytes} of the regular files under `directory`."""
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file() and not path.is_symlink()}


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
@pytest.mark.parametrize("command, option", [(["train", *SMALL], "--trace"), (["train", *SMALL], "--metrics"),
                                             (["train", *SMALL], "--save"), (["bench", *BENCH], "--trace")])
def test_an_output_path_on_a_device_leaves_the_device(tmp_path, command, option):
    """As root, a write-then-rename over /dev/null would replace the system's /dev/null with a
    regular file: a device given as an output path is refused before anything is written.
    (A node of our own stands in for /dev/null: the test must not risk the real one.)"""
    device = tmp_path / "null"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    done = subprocess.run([sys.executable, "-m", "dpflow", *command, option, str(device)], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=tmp_path, env={**os.environ, "DPFLOW_DEBUG": ""})
    assert stat.S_ISCHR(os.stat(device).st_mode), "the device node was replaced by a file"
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("error:") == 1 and "is not a regular file" in done.stderr, done.stderr


def test_outputs_may_go_into_the_checkpoint_directory_the_run_creates(tmp_path):
    """The output paths are checked once the checkpoint directory exists: `--checkpoint-dir run
    --save run/final.npz` is one run's folder, not a missing directory."""
    run = tmp_path / "run"
    outputs = {"--save": run / "final.npz", "--metrics": run / "metrics.jsonl", "--trace": run / "trace.json"}
    done = subprocess.run([sys.executable, "-m", "dpflow", "train", *SMALL, "--checkpoint-dir", str(run),
                           *[str(part) for pair in outputs.items() for part in pair]],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert all(path.is_file() for path in outputs.values()), sorted(os.listdir(run))


def test_a_model_table_beside_the_train_table_gives_the_builder_its_arguments(tmp_path):
    """`[train]` holds the settings and `[model]` the builder's arguments, as without `[train]`
    (the `[model]` table beside it was refused as an unknown key 'train')."""
    config = write(tmp_path / "c.toml", '[train]\nmodel = "cnn"\nepochs = 1\n[model]\ndropout = 0.1\n')
    done = subprocess.run([sys.executable, "-m", "dpflow", "train", "--dataset", "digits", "--config", config],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model: cnn (dropout=0.1)" in done.stdout + done.stderr, done.stdout


def test_the_banner_names_the_activation_the_mlp_was_built_with(tmp_path):
    """A [model] table's activation reaches the builder (it overrides `activation`), and the
    banner says so (it printed the setting's relu beside a tanh network)."""
    config = write(tmp_path / "c.toml", '[model]\nactivation = "tanh"\n')
    done = subprocess.run([sys.executable, "-m", "dpflow", "train", *SMALL[:-1], "--config", config],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model: MLP 4-8-3 tanh" in done.stdout, done.stdout


ON_RANK_1 = "import sys\n\nfrom dpflow.launcher import launcher_rank\nfrom dpflow.zoo import mlp\n\n\n" \
            "def build(*args, **kwargs):\n    if launcher_rank() == 1:\n        {}\n    return mlp(*args, **kwargs)\n"


@pytest.mark.parametrize("command, failure, message", [
    # sys.exit() on rank 1 alone ended rank 1 while rank 0 waited for its verdict until the stall timeout
    (["train", *SMALL], "sys.exit(5)", "sys.exit(5)"),
    # bench built its model outside the shared verdicts, with no stall timeout: rank 0 waited forever
    (["bench", *BENCH], "raise RuntimeError('no GPU on this node')", "no GPU on this node"),
], ids=["train: sys.exit", "bench: an exception"])
def test_a_builder_that_fails_on_one_rank_ends_the_job_with_one_message(tmp_path, command, failure, message):
    spec = model_file(tmp_path, ON_RANK_1.format(failure))
    done = run([sys.executable, "-m", "dpflow", *command, "--model", spec], ranks=2, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.count("error:") == 1 and "on rank 1:" in done.stderr and message in done.stderr, done


EXITS_MID_RUN = """import sys

from dpflow.launcher import launcher_rank
from dpflow.zoo import mlp


def build(*args, **kwargs):
    model = mlp(*args, **kwargs)
    if launcher_rank() == 1:  # rank 1's output layer calls sys.exit() in its 5th forward
        layer, forward, calls = model.logits, model.logits.forward, []

        def exiting_forward():
            calls.append(1)
            if len(calls) == 5:
                sys.exit(7)
            return forward()

        layer.forward = exiting_forward
    return model
"""


@pytest.mark.parametrize("how", ["dpflow train", "fit()"])
def test_a_layer_that_calls_sys_exit_on_one_rank_mid_run_ends_the_job(tmp_path, how):
    # Passed through, the SystemExit ended rank 1 alone; rank 0 waited in the allreduce until
    # the stall timeout (300 s by default; 120 here, far above the test's bound).
    spec = model_file(tmp_path, EXITS_MID_RUN)
    if how == "fit()":
        script = write(tmp_path / "script.py", "import dpflow\n\nif __name__ == '__main__':\n"
                       f"    dpflow.fit({spec!r}, dataset='synthetic', samples=200, features=4, classes=3, "
                       "epochs=3, hidden=[8], stall_timeout=120)\n")
        command = [sys.executable, script]
    else:
        command = [sys.executable, "-m", "dpflow", "train", *SMALL, "--epochs", "3", "--model", spec,
                   "--stall-timeout", "120"]
    done = run(command, ranks=2, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode not in (0, 2) and done.seconds < 30, done
    assert "rank 1 on" in done.stderr and "sys.exit(7) was called during the run" in done.stderr, done


@pytest.mark.parametrize("command, option", [(["train", *SMALL], "--save"), (["train", *SMALL], "--metrics"),
                                             (["bench", *BENCH], "--trace")])
def test_a_read_only_output_file_is_kept(tmp_path, command, option):
    """A file made read-only is one its owner means to keep: the write-then-rename would
    replace it all the same (only the directory's permission counts), so it is refused."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root reads permissions only without CAP_DAC_OVERRIDE, which setpriv drops")
    as_owner = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    kept = tmp_path / "kept"
    kept.write_bytes(b"results of last week")
    kept.chmod(0o444)
    done = subprocess.run([*as_owner, sys.executable, "-m", "dpflow", *command, option, str(kept)],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert kept.read_bytes() == b"results of last week"
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("error:") == 1 and "is read-only: it is kept" in done.stderr, done.stderr


def test_a_checkpoints_builder_that_fails_on_one_rank_ends_eval_with_one_message(tmp_path):
    """eval built the checkpoint's model outside the shared verdicts: a builder file that
    fails on one node (missing there, another version) left rank 0 in the broadcast."""
    spec = model_file(tmp_path, "from dpflow.zoo import mlp\n\n\ndef build(*args, **kwargs):\n    return mlp(*args, **kwargs)\n")
    trained = run([sys.executable, "-m", "dpflow", "train", *SMALL, "--model", spec, "--checkpoint-dir", "ck"],
                  timeout=TIMEOUT, cwd=tmp_path)
    assert trained.returncode == 0, trained
    model_file(tmp_path, ON_RANK_1.format("raise RuntimeError('an older model.py on this node')"))
    done = run([sys.executable, "-m", "dpflow", "eval", "--checkpoint", "ck"], ranks=2, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.count("error:") == 1 and "on rank 1:" in done.stderr and "an older model.py" in done.stderr, done
