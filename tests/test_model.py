"""The Model contract (what it accepts, what it refuses and how it says so), modes, state,
prediction without labels, and the built-in builders `mlp` and `cnn`."""

import numpy as np
import pytest

from dpflow import (
    MLP, MSE, Add, BatchNorm, Dropout, GraphError, Input, Linear, Model, ReLU, SoftmaxCrossEntropy,
    forward_and_backward,
)
from dpflow.zoo import BUILDERS, cnn, mlp


def tiny(params_as=dict, with_bn=False):
    """inputs (4 features) -> Linear -> [BatchNorm] -> ReLU -> Dropout -> Linear -> loss."""
    r = np.random.default_rng(0)
    X, labels = Input(name="x"), Input(name="y")
    W0, b0 = Input(r.normal(size=(4, 5)), name="W0"), Input(np.zeros(5), name="b0")
    W1, b1 = Input(r.normal(size=(5, 3)), name="W1"), Input(np.zeros(3), name="b1")
    hidden = Linear(X, W0, b0, name="fc0")
    params = [W0, b0, W1, b1]
    if with_bn:
        gamma, beta = Input(np.ones(5), name="gamma"), Input(np.zeros(5), name="beta")
        hidden = BatchNorm(hidden, gamma, beta, name="bn")
        params += [gamma, beta]
    hidden = Dropout(ReLU(hidden), 0.5, seed=1, name="drop")
    logits = Linear(hidden, W1, b1, name="fc1")
    loss = SoftmaxCrossEntropy(labels, logits, name="loss")
    if params_as is dict:
        params = {p.name: p for p in params}
    return Model(X, labels, logits, loss, params)


def test_a_model_sorts_its_graph_and_names_its_parameters():
    model = tiny(with_bn=True)
    assert list(model.params) == sorted(model.params)
    assert model.graph[-1] is model.loss
    assert model.labels not in model.predict_graph and model.logits in model.predict_graph
    assert model.parameter_count() == 4 * 5 + 5 + 5 * 3 + 3 + 10
    assert list(model.state()) == ["bn.running_mean", "bn.running_var"]
    assert not model.inputs.requires_grad  # the first Linear skips its largest multiply
    assert tiny(params_as=list).params.keys() == tiny().params.keys()


def test_modes_reduction_and_batch_position_reach_the_layers_that_need_them():
    model = tiny(with_bn=True)
    bn = next(layer for layer in model.graph if isinstance(layer, BatchNorm))
    drop = next(layer for layer in model.graph if isinstance(layer, Dropout))
    model.eval()
    assert not bn.training and not drop.training
    model.train()
    assert bn.training and drop.training
    calls = []
    model.set_reduction(lambda array: calls.append(array.size) or array)
    model.set_batch_position(7, 12)
    assert drop.position == (7, 12)
    model.inputs.value, model.labels.value = np.ones((3, 4)), np.array([0, 1, 2])
    forward_and_backward(model.graph)
    assert calls == [1 + 2 * 5, 2 * 5]  # forward: count, sums, squares; backward: two sums


def test_predict_needs_no_labels_and_runs_in_evaluation_mode():
    model = tiny(with_bn=True)
    model.labels.value = None
    x = np.random.default_rng(1).normal(size=(6, 4))
    first = model.predict(x).copy()
    assert first.shape == (6, 3)
    assert np.array_equal(model.predict(x), first)  # no dropout, running statistics
    assert all(layer.training for layer in model.graph)  # the mode is restored


def test_summary_lists_shapes_and_parameters():
    rows = tiny().summary((4,))
    assert rows[0] == ("fc0", "Linear", (5,), 25)
    assert [name for name, *_ in rows] == ["fc0", "relu0", "drop", "fc1", "loss"]


def refuse(pattern, **changes):
    r = np.random.default_rng(0)
    X, labels = Input(name="x"), Input(name="y")
    W, b = Input(r.normal(size=(4, 3)), name="W"), Input(np.zeros(3), name="b")
    logits = Linear(X, W, b)
    parts = dict(inputs=X, labels=labels, logits=logits, loss=SoftmaxCrossEntropy(labels, logits),
                 params={"W": W, "b": b})
    for key, value in changes.items():
        parts[key] = value(parts) if callable(value) else value
    with pytest.raises(GraphError, match=pattern):
        Model(**parts)


def test_refused_models_say_what_is_wrong():
    refuse(r"params entries \[0\] have no name", params=lambda p: [Input(np.ones(3)), p["params"]["W"]])
    refuse(r"one Input is listed as both 'W' and 'W2'", params=lambda p: {**p["params"], "W2": p["params"]["W"]})
    refuse(r"two parameters are named 'W'", params=lambda p: [p["params"]["W"], p["params"]["W"]])
    refuse(r"parameter 'act' is a ReLU, not an Input", params=lambda p: {**p["params"], "act": ReLU(p["logits"])})
    refuse(r"parameter 'x' is the model's data Input", params=lambda p: {**p["params"], "x": p["inputs"]})
    refuse(r"parameter 'extra' does not feed the loss", params=lambda p: {**p["params"], "extra": Input(np.ones(2))})
    refuse(r"Input named 'W' is listed as 'weights'", params=lambda p: {"weights": p["params"]["W"], "b": p["params"]["b"]})
    refuse(r"parameter 'W' has no floating-point array value",
           params=lambda p: {"W": Input(name="W"), "b": p["params"]["b"]})
    refuse(r"Model loss must be a Loss layer, got ReLU", loss=lambda p: ReLU(p["logits"]))
    refuse(r"the loss is not reachable from the model's inputs",
           loss=lambda p: MSE(p["labels"], Input(np.ones((2, 3)), requires_grad=False)))
    refuse(r"the logits <Add> read the labels; a prediction must not need them",
           logits=lambda p: Add(p["logits"], p["labels"]),
           loss=lambda p: SoftmaxCrossEntropy(p["labels"], p["logits"]))
    refuse(r"params must be a dict name -> Input, got int", params=3)


def test_an_unlisted_trainable_input_is_refused():
    X, labels = Input(name="x"), Input(name="y")
    W, b = Input(np.ones((4, 3)), name="W"), Input(np.zeros(3))  # b forgotten in params
    logits = Linear(X, W, b)
    with pytest.raises(GraphError, match=r"neither data nor a listed parameter.*requires_grad=False"):
        Model(X, labels, logits, SoftmaxCrossEntropy(labels, logits), {"W": W})
    constant = Input(np.zeros(3), requires_grad=False)
    logits = Linear(X, W, constant)
    Model(X, labels, logits, SoftmaxCrossEntropy(labels, logits), {"W": W})  # a constant is fine


def test_the_mlp_builder_is_todays_model_parameter_for_parameter():
    built = mlp((64,), 10, np.random.default_rng(5), np.float32, hidden=[32, 16], activation="tanh")
    legacy = MLP(64, [32, 16], 10, "tanh", seed=5, dtype=np.float32)
    assert built.params.keys() == legacy.params.keys()
    for name in legacy.params:
        assert np.array_equal(built.params[name].value, legacy.params[name].value)
    images = mlp((1, 8, 8), 10, np.random.default_rng(5), np.float32, hidden="32,16", activation="tanh")
    assert images.summary((1, 8, 8))[0][:3] == ("flatten", "Flatten", (64,))
    assert np.array_equal(images.params["fc0.W"].value, legacy.params["fc0.W"].value)


# "Same" padding: each block halves the image (28 -> 14 -> 7; 8 -> 4 -> 2; 16 -> 8 -> 4).
@pytest.mark.parametrize("input_shape,flat_features", [((1, 28, 28), 64 * 7 * 7), ((1, 8, 8), 64 * 2 * 2),
                                                       ((64,), 64 * 2 * 2), ((3, 16, 16), 64 * 4 * 4)])
def test_cnn_builder_fits_the_image_sizes_it_is_given(input_shape, flat_features):
    model = cnn(input_shape, 10, np.random.default_rng(0), np.float32)
    assert model.params["fc0.W"].value.shape == (flat_features, 128)
    assert model.predict(np.zeros((2, *input_shape), np.float32)).shape == (2, 10)
    assert all(p.value.dtype == np.float32 for p in model.params.values())


def test_cnn_builder_arguments_and_refusals():
    model = cnn((1, 12, 12), 4, np.random.default_rng(0), np.float64, channels="8", dense=16,
                dropout=0, batch_norm="true")
    assert sorted(model.params) == ["bn0.beta", "bn0.gamma", "conv0.W", "conv0.b", "fc0.W", "fc0.b", "fc1.W", "fc1.b"]
    assert list(model.state()) == ["bn0.running_mean", "bn0.running_var"]
    with pytest.raises(GraphError, match=r"needs images .* got examples of shape \(20,\).*`model` mlp"):
        cnn((20,), 3, np.random.default_rng(0), np.float32)
    with pytest.raises(GraphError, match=r"feature map vanishes after block 4 of 4"):
        cnn((1, 8, 8), 3, np.random.default_rng(0), np.float32, channels=[4, 4, 4, 4])
    assert set(BUILDERS) == {"mlp", "cnn"}
