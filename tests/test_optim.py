"""Optimizers over flat buffers against the textbook formulas, step by step."""

import numpy as np
import pytest

from dpflow.flat import FlatParameters
from dpflow.graph import Input
from dpflow.optim import create_optimizer


def run(name, steps=5, **kwargs):
    rng = np.random.default_rng(0)
    params = rng.normal(size=50)
    grads = [rng.normal(size=50) for _ in range(steps)]
    optimizer = create_optimizer(name, 50, np.float64, lr=0.1, **kwargs)
    values = params.copy()
    for g in grads:
        optimizer.step(values, g.copy())
    return params, grads, values


def test_sgd():
    p, grads, values = run("sgd", weight_decay=0.01)
    for g in grads:
        p = p - 0.1 * (g + 0.01 * p)
    assert np.allclose(values, p, atol=1e-14)


def test_momentum():
    p, grads, values = run("momentum", momentum=0.9)
    v = np.zeros_like(p)
    for g in grads:
        v = 0.9 * v + g
        p = p - 0.1 * v
    assert np.allclose(values, p, atol=1e-14)


def test_adam():
    p, grads, values = run("adam")
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert np.allclose(values, p, atol=1e-12)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="sgd, momentum, adam, lars, lamb, got 'rmsprop'"):
        create_optimizer("rmsprop", 3, np.float64, 0.1)


def test_flat_buffers_are_views_in_sorted_name_order():
    params = {name: Input(np.full(shape, i, np.float64), name=name)
              for i, (name, shape) in enumerate([("b", (2,)), ("a", (2, 3)), ("c", (1,))])}
    flat = FlatParameters(params, np.float64, extra_slots=2)
    assert flat.names == ["a", "b", "c"]
    assert np.array_equal(flat.values, [1] * 6 + [0] * 2 + [2])
    params["b"].value[...] = 9  # the parameter's value IS the buffer
    assert np.array_equal(flat.values[6:8], [9, 9])
    flat.grads[:] = np.arange(11)
    assert np.array_equal(params["c"].gradients[params["c"]], [8])
    assert flat.grads.size == flat.size + 2 and np.array_equal(flat.extra, [9, 10])


# --- layer-wise optimizers against plain per-parameter references -------------------------

SHAPES = {"fc0.W": (6, 5), "fc0.b": (5,), "fc1.W": (5, 3), "fc1.b": (3,), "bn0.gamma": (5,)}


def named_problem(steps=6, seed=1):
    """Parameters by name, their flat packing, and a gradient per step for each."""
    rng = np.random.default_rng(seed)
    params = {name: Input(rng.normal(size=shape), name=name) for name, shape in SHAPES.items()}
    params["fc1.b"].value[...] = 0.0  # a zero-norm parameter (fresh biases are zero)
    flat = FlatParameters(params, np.float64)
    initial = {name: np.array(value) for name, value in flat.as_dict().items()}
    grads = [{name: rng.normal(scale=0.1 * (i + 1), size=shape) for name, shape in SHAPES.items()}
             for i in range(steps)]
    grads[2]["fc1.W"][...] = 0.0  # a zero gradient: the trust ratio falls back to 1
    return flat, initial, grads


def run_flat(flat, grads, name, lrs, **kwargs):
    optimizer = create_optimizer(name, flat.size, np.float64, lr=lrs[0], slices=flat.slices, **kwargs)
    buffer = np.empty(flat.size)
    for lr, step_grads in zip(lrs, grads):
        for key, g in step_grads.items():
            flat.view(buffer, key)[...] = g
        optimizer.lr = lr
        optimizer.step(flat.values, buffer)
    return optimizer, flat.as_dict()


def excluded(name):
    return name.endswith(".b") or "bn" in name


def lars_reference(params, grads, lrs, eta, wd, mu):
    """You et al. 2017, Algorithm 1 with the trust coefficient, one parameter at a time."""
    params = {k: v.copy() for k, v in params.items()}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    for lr, step_grads in zip(lrs, grads):
        for k, w in params.items():
            g = step_grads[k]
            if excluded(k):
                local_lr, d = lr, g
            else:
                w_norm, g_norm = np.sqrt(np.sum(w ** 2)), np.sqrt(np.sum(g ** 2))
                trust = eta * w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
                local_lr, d = lr * trust, g + wd * w
            velocity[k] = mu * velocity[k] + local_lr * d
            params[k] = w - velocity[k]
    return params


def lamb_reference(params, grads, lrs, eta, wd, b1=0.9, b2=0.999, eps=1e-6):
    """You et al. 2019, Algorithm 2 (phi = identity), one parameter at a time."""
    params = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(w) for k, w in params.items()}
    for t, (lr, step_grads) in enumerate(zip(lrs, grads), 1):
        for k, w in params.items():
            g = step_grads[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            r = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            if excluded(k):
                params[k] = w - lr * r
                continue
            u = r + wd * w
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
            trust = eta * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            params[k] = w - lr * trust * u
    return params


LRS = [0.5, 1.0, 2.0, 2.0, 1.2, 0.3]  # a warmup and a decay: the lr changes between steps


@pytest.mark.parametrize("wd", [0.0, 5e-4])
@pytest.mark.parametrize("eta", [0.001, 0.02])
def test_lars_matches_the_reference(wd, eta):
    flat, initial, grads = named_problem()
    optimizer, got = run_flat(flat, grads, "lars", LRS, momentum=0.9, weight_decay=wd, trust_coefficient=eta)
    want = lars_reference(initial, grads, LRS, eta, wd, 0.9)
    for name in SHAPES:
        assert np.allclose(got[name], want[name], rtol=0, atol=1e-13), name
        assert not np.allclose(got[name], initial[name])  # every parameter moved
    adapted = dict(zip(flat.names, optimizer.ratios))
    assert adapted["fc0.b"] == adapted["bn0.gamma"] == 1.0 and adapted["fc0.W"] != 1.0


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_lamb_matches_the_reference(wd, eta):
    flat, initial, grads = named_problem()
    optimizer, got = run_flat(flat, grads, "lamb", LRS, weight_decay=wd, trust_coefficient=eta)
    want = lamb_reference(initial, grads, LRS, eta, wd)
    for name in SHAPES:
        assert np.allclose(got[name], want[name], rtol=0, atol=1e-13), name
        assert not np.allclose(got[name], initial[name])
    assert optimizer.steps == len(LRS)


def test_exclusion_pattern_decides_which_parameters_adapt():
    flat, initial, grads = named_problem()
    # Nothing excluded: the biases and bn0.gamma now adapt and decay too (fc1.b has norm 0:
    # its trust ratio stays 1, but it decays from its second step on).
    _, everything = run_flat(flat, grads, "lars", LRS, weight_decay=0.1, exclude="")
    flat2, _, _ = named_problem()
    _, default = run_flat(flat2, grads, "lars", LRS, weight_decay=0.1)
    assert not np.allclose(everything["fc0.b"], default["fc0.b"])
    assert not np.allclose(everything["bn0.gamma"], default["bn0.gamma"])
    assert np.array_equal(everything["fc0.W"], default["fc0.W"])  # adapted in both


def test_layerwise_optimizers_need_the_slices():
    with pytest.raises(ValueError, match="needs the parameter slices"):
        create_optimizer("lars", 3, np.float64, 0.1)


def test_trust_ratio_and_state_round_trip():
    """The optimizer state is its live arrays: copying them into a fresh optimizer continues
    the run bitwise (what resume relies on)."""
    for name in ("lars", "lamb"):
        flat, initial, grads = named_problem()
        whole, _ = run_flat(flat, grads, name, LRS)
        expected = flat.values.copy()
        flat2, _, _ = named_problem()
        first, _ = run_flat(flat2, grads[:3], name, LRS[:3])
        second = create_optimizer(name, flat2.size, np.float64, lr=LRS[3], slices=flat2.slices)
        for key, value in first.state_dict().items():
            if isinstance(value, np.ndarray):
                second.state_dict()[key][...] = value
        second.steps = first.steps
        buffer = np.empty(flat2.size)
        for lr, step_grads in zip(LRS[3:], grads[3:]):
            for key, g in step_grads.items():
                flat2.view(buffer, key)[...] = g
            second.lr = lr
            second.step(flat2.values, buffer)
        assert np.array_equal(flat2.values, expected), name
