"""The Model contract between a graph and the trainer, and the MLP. Wiring only: numpy, no MPI.

    model = Model(inputs, labels, logits, loss, params)

`inputs` and `labels` are the data Inputs, `logits` the layer whose value is the prediction,
`loss` a Loss layer, `params` a dict name -> parameter Input. The names fix the packing
order of the flat buffers (sorted), the checkpoint keys and the `--save` keys. Anything
MiniFlow can wire is a model; the contract only checks that the pieces connect.
"""

import numpy as np

from .graph import GraphError, Input, Layer, forward_pass, sort_layers
from .layers import Linear, Loss, ReLU, Sigmoid, SoftmaxCrossEntropy, Tanh
from .reshape import Flatten

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


def ancestors(layer):
    """Every layer `layer` reads from, directly or not, itself included (a set of ids)."""
    seen, stack = {id(layer)}, [layer]
    while stack:
        for inbound in stack.pop().inbound_layers:
            if id(inbound) not in seen:
                seen.add(id(inbound))
                stack.append(inbound)
    return seen


def named_parameters(params):
    """name -> Input from a dict, or from a list of Inputs that carry their names."""
    if isinstance(params, dict):
        return dict(params)
    if isinstance(params, (list, tuple)):
        unnamed = [index for index, param in enumerate(params) if getattr(param, "name", None) is None]
        if unnamed:
            raise GraphError(
                f"params entries {unnamed} have no name; give a dict name -> Input, or create "
                "each parameter as Input(value, name='...')"
            )
        named = {}
        for param in params:
            if param.name in named:
                raise GraphError(f"two parameters are named {param.name!r}; give each its own name")
            named[param.name] = param
        return named
    raise GraphError(f"params must be a dict name -> Input, got {type(params).__name__}")


class Model:
    """A trainable graph: its data Inputs, prediction, loss and named parameters.

    `graph` is the sorted list of the layers the loss depends on (the loss last);
    `predict_graph` those the logits depend on, which never read the labels. `state()`
    holds the non-trainable arrays a checkpoint keeps (BatchNorm's running statistics).
    """

    def __init__(self, inputs, labels, logits, loss, params):
        for role, value, kind in (("inputs", inputs, Input), ("labels", labels, Input),
                                  ("logits", logits, Layer), ("loss", loss, Loss)):
            if not isinstance(value, kind):
                raise GraphError(f"Model {role} must be a {kind.__name__} layer, got {type(value).__name__}")
        self.inputs, self.labels, self.logits, self.loss = inputs, labels, logits, loss
        self.params = self.check_parameters(named_parameters(params))
        self.graph, self.predict_graph = self.check_graph()
        # The data needs no gradient: the first layer then skips its largest multiply.
        inputs.requires_grad = labels.requires_grad = False

    def check_parameters(self, params):
        seen = {}
        for name, param in params.items():
            if not isinstance(name, str) or not name:
                raise GraphError(f"parameter names must be non-empty strings, got {name!r}")
            if not isinstance(param, Input):
                raise GraphError(f"parameter {name!r} is a {type(param).__name__}, not an Input; "
                                 "parameters are Input(value, name=...) layers")
            if param is self.inputs or param is self.labels:
                raise GraphError(f"parameter {name!r} is the model's data Input; list only trainable Inputs")
            if id(param) in seen:
                raise GraphError(f"one Input is listed as both {seen[id(param)]!r} and {name!r}; "
                                 "give each parameter one name")
            seen[id(param)] = name
            if param.name is None:
                param.name = name
            elif param.name != name:
                raise GraphError(f"the Input named {param.name!r} is listed as {name!r}; "
                                 "use one name (the dict key is the parameter's name)")
            if not isinstance(param.value, np.ndarray) or param.value.dtype.kind != "f":
                raise GraphError(f"parameter {name!r} has no floating-point array value "
                                 f"(got {type(param.value).__name__}); initialise it: Input(array, name=...)")
        return {name: params[name] for name in sorted(params)}

    def check_graph(self):
        feeds_loss = ancestors(self.loss)
        feeds_logits = ancestors(self.logits)
        for role, layer in (("inputs", self.inputs), ("logits", self.logits)):
            if id(layer) not in feeds_loss:
                raise GraphError(f"the loss is not reachable from the model's {role}: "
                                 f"{self.loss!r} does not depend on {layer!r}; wire the loss to the logits")
        if id(self.labels) not in feeds_loss:
            raise GraphError(f"the loss {self.loss!r} does not read the labels {self.labels!r}")
        if id(self.inputs) not in feeds_logits:
            raise GraphError(f"the logits {self.logits!r} do not depend on the inputs {self.inputs!r}")
        if id(self.labels) in feeds_logits:
            raise GraphError(f"the logits {self.logits!r} read the labels; a prediction must not need them")
        for name, param in self.params.items():
            if id(param) not in feeds_loss:
                raise GraphError(f"parameter {name!r} does not feed the loss, so it would never train; "
                                 "wire it into the graph or leave it out of params")
        ordered = sort_layers([self.inputs, self.labels, *self.params.values()])
        known = {id(self.inputs), id(self.labels), *map(id, self.params.values())}
        for layer in ordered:
            if (id(layer) in feeds_loss and isinstance(layer, Input) and id(layer) not in known
                    and layer.requires_grad):
                raise GraphError(
                    f"{layer!r} feeds the loss but is neither data nor a listed parameter; add it "
                    "to params to train it, or create it with requires_grad=False as a constant"
                )
        graph = [layer for layer in ordered if id(layer) in feeds_loss]
        predict_graph = [layer for layer in ordered if id(layer) in feeds_logits]
        return graph, predict_graph

    # --- what the trainer sets --------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (the default) or evaluation mode for every layer (Dropout, BatchNorm)."""
        for layer in self.graph:
            layer.training = mode
        return self

    def eval(self):
        return self.train(False)

    def set_reduction(self, reduce_sum):
        """Hand every layer that sums over the global batch (BatchNorm) the function that sums
        an array in place over all ranks."""
        for layer in self.graph:
            if hasattr(layer, "reduce_sum"):
                layer.reduce_sum = reduce_sum

    def set_batch_position(self, step, first_row):
        """Tell layers that draw per-row randomness (Dropout) the global step and the
        position of this rank's first row in the global batch."""
        for layer in self.graph:
            if hasattr(layer, "set_batch_position"):
                layer.set_batch_position(step, first_row)

    # --- what the trainer reads -------------------------------------------------------------

    def layer_names(self):
        """A name for every layer: its own, or its type and how many of that type came
        before it in the graph (`batchnorm0`, `relu1`): the same on every rank."""
        names, counts = {}, {}
        for layer in self.graph:
            kind = type(layer).__name__.lower()
            names[id(layer)] = layer.name or f"{kind}{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
        return names

    def state(self):
        """name -> live non-trainable array (BatchNorm running statistics), in sorted order."""
        names, state = self.layer_names(), {}
        for layer in self.graph:
            if hasattr(layer, "state_arrays"):
                for key, array in layer.state_arrays().items():
                    name = f"{names[id(layer)]}.{key}"
                    if name in state:
                        raise GraphError(f"two layers hold state named {name!r}; give the layers distinct names")
                    state[name] = array
        return {name: state[name] for name in sorted(state)}

    def parameter_count(self):
        return sum(p.value.size for p in self.params.values())

    def summary(self, input_shape, dtype=np.float32):
        """[(name, type, output shape or None, parameter count)] for every computing layer,
        from a forward pass of 0 rows in evaluation mode (which needs no collective)."""
        names = self.layer_names()
        shapes = {}
        modes = [layer.training for layer in self.graph]
        saved = self.inputs.value
        try:
            self.eval()
            self.inputs.value = np.zeros((0, *input_shape), dtype)
            for layer in self.predict_graph:
                layer.forward()
                shapes[id(layer)] = tuple(np.shape(layer.value)[1:])
        except Exception:  # noqa: BLE001 - a user layer that cannot take 0 rows: no shapes
            shapes = {}
        finally:
            for layer, mode in zip(self.graph, modes):
                layer.training = mode
            self.inputs.value = saved
        owner = {}
        for param in self.params.values():
            first = next((layer for layer in self.graph if param in layer.inbound_layers), None)
            if first is not None:
                owner[id(first)] = owner.get(id(first), 0) + param.value.size
        return [(names[id(layer)], type(layer).__name__, shapes.get(id(layer)), owner.get(id(layer), 0))
                for layer in self.graph if not isinstance(layer, Input)]

    def predict(self, x):
        """The logits for a batch of inputs, in evaluation mode; no labels needed."""
        training = [layer.training for layer in self.graph]
        self.eval()
        try:
            self.inputs.value = x
            forward_pass(self.predict_graph)
            return self.logits.value
        finally:
            for layer, mode in zip(self.graph, training):
                layer.training = mode


def init_weights(rng, fan_in, fan_out, activation):
    """He normal for ReLU, Glorot (Xavier) uniform otherwise; float64, cast by the caller."""
    if activation == "relu":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out))


class MLP(Model):
    """inputs -> [Linear -> activation] * len(hidden) -> Linear -> SoftmaxCrossEntropy.

    `params` maps names (`fc0.W`, `fc0.b`, ...) to the parameter Inputs, in sorted-name
    order; `graph` is the sorted layer list, whose last layer is the loss. The weights come
    from `rng`, or from a generator seeded with `seed`; `flatten` puts a Flatten first, for
    image-shaped inputs.
    """

    def __init__(self, n_inputs, hidden, n_classes, activation="relu", seed=0, dtype=np.float32, rng=None,
                 flatten=False):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.sizes = [int(n_inputs), *map(int, hidden), int(n_classes)]
        self.activation = activation
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed) if rng is None else rng
        data = Input(name="inputs", requires_grad=False)
        labels = Input(name="labels", requires_grad=False)
        params = {}
        layer = Flatten(data, name="flatten") if flatten else data  # images in, rows to the first Linear
        n_layers = len(self.sizes) - 1
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            W = Input(init_weights(rng, fan_in, fan_out, activation).astype(self.dtype), name=f"fc{i}.W")
            b = Input(np.zeros(fan_out, self.dtype), name=f"fc{i}.b")
            params[W.name], params[b.name] = W, b
            layer = Linear(layer, W, b, name=f"fc{i}")
            if i < n_layers - 1:
                layer = ACTIVATIONS[activation](layer, name=f"{activation}{i}")
        super().__init__(data, labels, layer, SoftmaxCrossEntropy(labels, layer, name="loss"), params)
        assert self.graph[-1] is self.loss
