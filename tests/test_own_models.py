"""Your own model in the whole trainer: `dpflow train --model file.py:build` for a residual MLP
with batch norm and dropout and for a small CNN; N ranks save the parameters one process
saves (float64, 1e-10) with a batch that does not divide by N and a last batch that leaves a
rank empty; resume is bitwise; eval, predict and load_model rebuild the model from the
checkpoint; every kind of bad model is one message and exit status 2."""

import os

import numpy as np
import pytest

from helpers import ROOT, dpflow_command, load, run

MODELS = os.path.join(ROOT, "tests", "model_files")
# 41 training rows in batches of 13: the last batch has 2 rows, so 3 or 4 ranks leave one empty.
DATA = ["--dataset", "synthetic", "--samples", "51", "--features", "16", "--classes", "3"]
RUN = [*DATA, "--batch-size", "13", "--lr", "0.1", "--dtype", "float64", "--quiet"]


def spec(name):
    return f"{os.path.join(MODELS, name)}.py:build"


def one_line_error(result, *fragments):
    """Exit status 2 and one message naming what is wrong: no traceback."""
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Each model file trained by one process: the reference for N ranks."""

    directory = tmp_path_factory.mktemp("reference")
    saved = {}
    for name in ("residual_mlp", "small_cnn"):
        path = directory / f"{name}.npz"
        result = run([*dpflow_command(), "train", "--model", spec(name), *RUN, "--epochs", "3", "--save", str(path)])
        assert result.returncode == 0, result
        saved[name] = load(path)
    return saved


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("name", ["residual_mlp", "small_cnn"])
def test_n_ranks_save_what_one_process_saves(dpflow, tmp_path, one_process, name, ranks):
    result = dpflow("train", "--model", spec(name), *RUN, "--epochs", "3", "--save", tmp_path / "n.npz",
                    ranks=ranks)
    assert result.returncode == 0, result
    parallel, reference = load(tmp_path / "n.npz"), one_process[name]
    assert sorted(parallel) == sorted(reference)
    assert "bn.running_mean" in reference  # batch norm's statistics are saved beside the parameters
    for key in reference:
        assert np.max(np.abs(parallel[key] - reference[key])) < 1e-10, key
    from dpflow.modelspec import build_model

    initial = build_model(spec(name), {}, (16,), 3, 0, np.float64)  # what training started from
    assert max(np.max(np.abs(p.value - reference[key])) for key, p in initial.params.items()) > 1e-3


@pytest.mark.parametrize("name", ["residual_mlp", "small_cnn"])
def test_resume_is_bitwise_on_the_same_world_size(dpflow, tmp_path, name):
    straight, resumed = tmp_path / "straight.npz", tmp_path / "resumed.npz"
    common = ["train", "--model", spec(name), *RUN]
    assert dpflow(*common, "--epochs", "3", "--save", straight, ranks=3).returncode == 0
    first = dpflow(*common, "--epochs", "2", "--checkpoint-dir", tmp_path / "ck", ranks=3)
    assert first.returncode == 0, first
    second = dpflow(*common, "--epochs", "3", "--checkpoint-dir", tmp_path / "ck", "--resume",
                    "--save", resumed, ranks=3)
    assert second.returncode == 0, second
    a, b = load(straight), load(resumed)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_checkpoint_rebuilds_the_model_for_eval_predict_and_load_model(dpflow, tmp_path):
    checkpoint = tmp_path / "ck"
    trained = dpflow("train", "--model", "cnn", "--model-arg", "channels=[8, 16]", "--model-arg", "dense=32",
                     "--epochs", "2", "--checkpoint-dir", checkpoint, "--quiet", ranks=2)
    assert trained.returncode == 0, trained
    evaluated = dpflow("eval", "--checkpoint", checkpoint, "--confusion", ranks=2)
    assert evaluated.returncode == 0, evaluated
    lines = evaluated.stdout.splitlines()
    accuracy = float(lines[0].split("test_accuracy ")[1].split("%")[0]) / 100
    assert accuracy > 0.5
    matrix = np.array([[int(n.replace(",", "")) for n in line.split()[1:11]] for line in lines[3:13]])
    assert matrix.sum() == 360 and abs(np.trace(matrix) / 360 - accuracy) < 1e-4

    from dpflow import load_model
    from dpflow.data import load_dataset
    from dpflow.predict import predict

    x = load_dataset("digits", layout="images").x_test[:20]  # raw pixels, as the cnn takes them
    np.save(tmp_path / "x.npy", x)
    model = load_model(str(checkpoint))
    assert model.params["conv0.W"].value.shape == (3, 3, 1, 8)
    model.labels.value = None  # a forward pass needs no labels
    logits = model.predict(np.asarray(x, np.float32))
    assert logits.shape == (20, 10)
    expected = predict(model, x)
    printed = dpflow("predict", "--checkpoint", checkpoint, "--input", tmp_path / "x.npy")
    assert printed.returncode == 0, printed
    assert [int(v) for v in printed.stdout.split()] == expected.tolist()
    written = dpflow("predict", "--checkpoint", checkpoint, "--input", tmp_path / "x.npy", "--probabilities",
                     "--output", tmp_path / "p.npy")
    assert written.returncode == 0, written
    probabilities = np.load(tmp_path / "p.npy")
    assert probabilities.shape == (20, 10) and np.allclose(probabilities.sum(axis=1), 1)
    assert np.array_equal(probabilities.argmax(axis=1), expected)


def test_resume_refuses_a_different_model(dpflow, tmp_path):
    checkpoint = tmp_path / "ck"
    assert dpflow("train", "--model", "cnn", "--model-arg", "dense=16", "--epochs", "1",
                  "--checkpoint-dir", checkpoint, "--quiet").returncode == 0
    other = dpflow("train", "--model", "cnn", "--model-arg", "dense=32", "--epochs", "2",
                   "--checkpoint-dir", checkpoint, "--resume", "--quiet")
    one_line_error(other, "from a different model (cnn dense=16", "--model-arg {'dense': 16} (now {'dense': 32})")
    mlp = dpflow("train", "--epochs", "2", "--checkpoint-dir", checkpoint, "--resume", "--quiet")
    one_line_error(mlp, "--model 'cnn' (now 'mlp')")
    evaluated = dpflow("eval", "--checkpoint", checkpoint, "--dataset", "synthetic")
    one_line_error(evaluated, "--model cnn", "needs images", "(20,)")


def test_a_config_file_model_table(dpflow, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\n[model]\nspec = "cnn"\nchannels = [4, 8]\ndense = 16\ndropout = 0.0\n')
    result = dpflow("train", "--config", config, "--model-arg", "dense=24")
    assert result.returncode == 0, result
    assert "model: cnn (channels=[4, 8], dense=24, dropout=0.0)" in result.stdout
    assert "fc0            Linear                         24" in result.stdout


BAD_FILES = {
    "syntax.py": "def build(:\n",
    "raises.py": "def build(input_shape, n_classes, rng, dtype):\n    raise RuntimeError('no GPU found')\n",
    "returns.py": "def build(input_shape, n_classes, rng, dtype):\n    return {'W': 1}\n",
    "unnamed.py": (
        "import numpy as np\nfrom dpflow import Input, Linear, Model, SoftmaxCrossEntropy\n"
        "def build(input_shape, n_classes, rng, dtype):\n"
        "    x, y = Input(), Input()\n"
        "    W, b = Input(np.zeros((input_shape[0], n_classes), dtype)), Input(np.zeros(n_classes, dtype))\n"
        "    logits = Linear(x, W, b)\n"
        "    return Model(x, y, logits, SoftmaxCrossEntropy(y, logits), [W, b])\n"),
    "duplicate.py": (
        "import numpy as np\nfrom dpflow import Input, Linear, Model, SoftmaxCrossEntropy\n"
        "def build(input_shape, n_classes, rng, dtype):\n"
        "    x, y = Input(), Input()\n"
        "    W = Input(np.zeros((input_shape[0], n_classes), dtype), name='W')\n"
        "    b = Input(np.zeros(n_classes, dtype), name='W')\n"
        "    logits = Linear(x, W, b)\n"
        "    return Model(x, y, logits, SoftmaxCrossEntropy(y, logits), [W, b])\n"),
    "unreachable.py": (
        "import numpy as np\nfrom dpflow import Input, Linear, Model, SoftmaxCrossEntropy\n"
        "def build(input_shape, n_classes, rng, dtype):\n"
        "    x, y, other = Input(), Input(), Input(np.zeros((1, input_shape[0]), dtype), requires_grad=False)\n"
        "    W = Input(np.zeros((input_shape[0], n_classes), dtype), name='W')\n"
        "    b = Input(np.zeros(n_classes, dtype), name='b')\n"
        "    logits = Linear(other, W, b)\n"
        "    return Model(x, y, logits, SoftmaxCrossEntropy(y, logits), {'W': W, 'b': b})\n"),
    "misfit.py": (
        "import numpy as np\nfrom dpflow import Input, Linear, Model, SoftmaxCrossEntropy\n"
        "def build(input_shape, n_classes, rng, dtype):\n"
        "    x, y = Input(), Input()\n"
        "    W, b = Input(np.zeros((7, n_classes), dtype), name='W'), Input(np.zeros(n_classes, dtype), name='b')\n"
        "    logits = Linear(x, W, b, name='head')\n"
        "    return Model(x, y, logits, SoftmaxCrossEntropy(y, logits), {'W': W, 'b': b})\n"),
    "by_rank.py": (
        "import os\nfrom dpflow.zoo import mlp\n"
        "def build(input_shape, n_classes, rng, dtype):\n"
        "    rank = int(os.environ.get('PMI_RANK', os.environ.get('OMPI_COMM_WORLD_RANK', '0')))\n"
        "    return mlp(input_shape, n_classes, rng, dtype, hidden=[8 + rank])\n"),
}


@pytest.mark.parametrize("spec_of,fragments", [
    (lambda d: f"{d}/syntax.py:build", ["syntax.py:build", "when imported", "SyntaxError"]),
    (lambda d: f"{d}/missing.py:build", ["missing.py:build", "no such file"]),
    (lambda d: "no_such_package.models:build", ["no_such_package.models:build", "no module named 'no_such_package'"]),
    (lambda d: f"{d}/raises.py:nothing", ["raises.py:nothing", "has no 'nothing'", "its functions: build"]),
    (lambda d: f"{d}/raises.py:build", ["raises.py:build", "the builder raised RuntimeError: no GPU found",
                                        "DPFLOW_DEBUG=1"]),
    (lambda d: f"{d}/returns.py:build", ["returns.py:build", "returned a dict, not a dpflow Model"]),
    (lambda d: f"{d}/unnamed.py:build", ["unnamed.py:build", "params entries [0, 1] have no name"]),
    (lambda d: f"{d}/duplicate.py:build", ["duplicate.py:build", "two parameters are named 'W'"]),
    (lambda d: f"{d}/unreachable.py:build", ["unreachable.py:build", "the loss is not reachable from the model's inputs"]),
    (lambda d: f"{d}/misfit.py:build", ["misfit.py:build", "does not fit examples of shape (64,)", "'head'"]),
    (lambda d: "resnet", ["--model resnet", "not a built-in model (mlp, cnn)"]),
])
def test_bad_models_are_one_message_and_exit_2(dpflow, tmp_path, spec_of, fragments):
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    one_line_error(dpflow("train", "--model", spec_of(tmp_path), "--epochs", "1"), *fragments)


def test_debug_shows_the_builders_traceback(dpflow, tmp_path):
    (tmp_path / "raises.py").write_text(BAD_FILES["raises.py"])
    result = dpflow("train", "--model", f"{tmp_path}/raises.py:build", env={"DPFLOW_DEBUG": "1"})
    assert result.returncode == 2
    assert "Traceback" in result.stderr and 'raise RuntimeError' in result.stderr


def test_bad_model_arguments(dpflow):
    one_line_error(dpflow("train", "--model", "cnn", "--model-arg", "width=3"),
                   "--model cnn", "takes no argument 'width'", "channels")
    one_line_error(dpflow("train", "--model", "cnn", "--model-arg", "dense"), "--model-arg 'dense'", "KEY=VALUE")
    one_line_error(dpflow("train", "--model", "cnn", "--dataset", "synthetic"),
                   "--model cnn", "needs images", "(20,)", "--model mlp")


def test_a_graph_that_differs_between_ranks_is_refused(dpflow, tmp_path):
    (tmp_path / "by_rank.py").write_text(BAD_FILES["by_rank.py"])
    result = dpflow("train", "--model", f"{tmp_path}/by_rank.py:build", ranks=2)
    one_line_error(result, "by_rank.py:build", "builds a different graph on rank 1 than on rank 0",
                   "fc0.W", "rng")
