"""`DataParallel` for a loop of one's own: the README's program, copied as written, trains the
same parameters on 2 ranks as in one process; what DataParallel refuses; `dpflow.fit` on a
model defined in a script, under mpiexec, equal to one process."""

import ast
import os
import re
import sys

import numpy as np
import pytest

from helpers import ROOT, dpflow_command, run
from dpflow import Input, Linear
from dpflow.comm import LocalCommunicator
from dpflow.errors import UsageError
from dpflow.parallel import DataParallel


def readme_loop():
    """The first python block of the README's "Your own loop" section."""
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    section = text[text.index("## Your own loop"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_loop_trains_the_same_on_two_ranks(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(readme_loop())
    one = run([sys.executable, str(script)], timeout=120)
    two = run([sys.executable, str(script)], ranks=2, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, (one, two)
    serial, parallel = ast.literal_eval(one.stdout.strip()), ast.literal_eval(two.stdout.strip())
    assert sorted(serial) == ["W1", "W2", "b1", "b2"]
    for name in serial:
        assert np.allclose(parallel[name], serial[name], atol=2e-6), name
    assert np.abs(np.array(serial["W2"])).max() > 0


def parameters():
    return [Input(np.ones((3, 2)), name="W"), Input(np.zeros(2), name="b")]


@pytest.mark.parametrize("make,pattern", [
    (lambda W, b: {None: b}, r"<Input 'b'> has no name .*\{t\.name: t for t in trainables\}.*pass the list"),
    (lambda W, b: {"W": W, "W2": W}, r"one Input is listed as both 'W' and 'W2'"),
    (lambda W, b: {"W": W, "fc": Linear(Input(), W, b)}, r"'fc' is a Linear, not a parameter Input"),
    (lambda W, b: {"W": W, "x": Input(np.ones(2), requires_grad=False)}, r"'x' is an Input with requires_grad=False"),
    (lambda W, b: {"W": W, "empty": Input()}, r"'empty' has no floating-point array value"),
    (lambda W, b: W, r"takes a dict name -> parameter Input, or a list of them; got Input"),
])
def test_data_parallel_refuses_what_is_not_a_named_parameter(make, pattern):
    with pytest.raises(UsageError, match=pattern):
        DataParallel(make(*parameters()), comm=LocalCommunicator())


def test_data_parallel_names_a_list_by_position_and_checks_consistency():
    W, b = parameters()
    dp = DataParallel([W, b], comm=LocalCommunicator(), consistency_every=1)
    assert dp.flat.names == ["0", "1"] and W.value.base is not None  # a view into the flat buffer
    dp.allreduce_gradients()  # one process always agrees with itself
    assert dp.reductions == 1


def test_fit_trains_a_model_defined_in_a_script_on_two_ranks_as_one_process(tmp_path):
    example = os.path.join(ROOT, "examples", "fit_own_model.py")
    args = [sys.executable, example, "--epochs", "2", "--dtype", "float64"]
    one = run([*args, "--save", str(tmp_path / "one.npz"), "--checkpoint-dir", str(tmp_path / "ck")])
    two = run([*args, "--save", str(tmp_path / "two.npz")], ranks=2)
    assert one.returncode == 0 and two.returncode == 0, (one, two)
    assert "2 ranks" in two.stdout and "fit_own_model.py:build" in two.stdout
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert "bn.running_var" in a.files
    for key in a.files:
        assert np.max(np.abs(a[key] - b[key])) < 1e-10, key
    # The checkpoint names the script's builder: `dpflow eval` rebuilds the model from it.
    evaluated = run([*dpflow_command(), "eval", "--checkpoint", str(tmp_path / "ck")])
    assert evaluated.returncode == 0 and "test_accuracy" in evaluated.stdout, evaluated


def test_fit_refuses_unknown_settings():
    from dpflow import fit
    from dpflow.zoo import mlp

    with pytest.raises(UsageError, match=r"unknown settings epoch; .*epochs"):
        fit(mlp, "digits", epoch=3)


def test_the_readme_model_file_trains(dpflow, tmp_path):
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    section = text[text.index("## Your own model"):]
    (tmp_path / "my_model.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    result = dpflow("train", "--model", f"{tmp_path}/my_model.py:build", "--model-arg", "width=32",
                    "--epochs", "3", ranks=2)
    assert result.returncode == 0, result
    assert "model: " in result.stdout and "(width=32)" in result.stdout
    accuracy = float(result.stdout.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 85
