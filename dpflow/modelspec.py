"""`model` SPEC: find a model's builder, call it, and check what it gives back.

SPEC is a built-in name (`mlp`, `cnn`), `path/to/file.py:function` or `package.module:function`.
The builder is called as `function(input_shape, n_classes, rng, dtype, **model_args)` and
must return a `Model`. Everything that can go wrong with a user's builder (a file that does
not import, a function that raises or returns something else, a graph that does not fit the
data) becomes one UsageError that names the SPEC and what is wrong; the builder's traceback
is printed only with DPFLOW_DEBUG=1. numpy only: the agreement across ranks is the caller's.
"""

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import tomllib
import traceback

import numpy as np

from .errors import GraphError, UsageError
from .launcher import launcher_rank
from .model import Model
from .zoo import BUILDERS

LAYOUTS = ("rows", "images")


def spec_error(spec, message):
    return UsageError(f"`model` {spec}: {message}")


def debug_hint(error):
    """Print the traceback on rank 0 with DPFLOW_DEBUG=1; otherwise say how to see it."""
    if os.environ.get("DPFLOW_DEBUG"):
        if launcher_rank() == 0:
            traceback.print_exception(error)
        return ""
    return " (DPFLOW_DEBUG=1 shows the traceback)"


def failure_of(error):
    """How the user's code failed, for a message. A sys.exit() there is a failure too: passed
    through, it would end only the ranks that called it while the others wait forever."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r}) (the model's code must return or raise, never exit)"
    return f"raised {type(error).__name__}: {error}"


def import_file(spec, path):
    if not os.path.isfile(path):
        raise spec_error(spec, f"no such file {path!r}; give path/to/file.py:function")
    # One module per file, named after its absolute path: a builder file imported twice (a
    # rebuild for eval) is the same module, and two files called model.py do not collide.
    absolute = os.path.abspath(path)
    name = "dpflow_model_" + hashlib.sha1(absolute.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, absolute)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:  # noqa: BLE001 - any failure of the user's file is bad input
        del sys.modules[name]
        if isinstance(error, KeyboardInterrupt):
            raise
        raise spec_error(spec, f"{path}, when imported, {failure_of(error)}" + debug_hint(error)) from None
    return module


def spec_file(spec):
    """The file a `path/to/file.py:function` SPEC names, else None."""
    if not isinstance(spec, str) or spec in BUILDERS or ":" not in spec:
        return None
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") or os.sep in target or os.path.isfile(target) else None


def resolve_builder(spec):
    """The builder function a SPEC names."""
    if not isinstance(spec, str) or not spec:
        raise spec_error(spec, "give a built-in model name or path/to/file.py:function")
    if spec in BUILDERS:
        return BUILDERS[spec]
    target, colon, function = spec.rpartition(":")
    if not colon or not target or not function:
        raise spec_error(spec, f"not a built-in model ({', '.join(BUILDERS)}); a builder of your own is "
                               "path/to/file.py:function or package.module:function")
    if spec_file(spec):
        module = import_file(spec, target)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as error:
            raise spec_error(spec, f"no module named {error.name!r}; check the name, or give "
                                   "path/to/file.py:function") from None
        except Exception as error:  # noqa: BLE001 - the module's own code failed
            raise spec_error(spec, f"importing {target} failed: {type(error).__name__}: {error}"
                             + debug_hint(error)) from None
    builder = getattr(module, function, None)
    if builder is None:
        defined = sorted(name for name, value in vars(module).items()
                         if inspect.isfunction(value) and not name.startswith("_"))
        raise spec_error(spec, f"{target} has no {function!r}"
                               + (f" (its functions: {', '.join(defined)})" if defined else ""))
    if not callable(builder):
        raise spec_error(spec, f"{function!r} in {target} is a {type(builder).__name__}, not a function")
    return builder


def input_layout(builder):
    """How the builder wants its examples: as flat `rows` (the default) or as (C, H, W)
    `images`; a builder says so with `builder.input_layout = "images"`."""
    return getattr(builder, "input_layout", "rows")


def parse_model_args(items):
    """["KEY=VALUE", ...] from `--model-arg` into a dict; VALUE is read as a TOML value
    (3, 0.5, true, [32, 64], "text") and otherwise kept as the string written."""
    args = {}
    for item in items or ():
        key, equals, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r}: write KEY=VALUE, e.g. --model-arg dropout=0.25")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        args[key] = value
    return args


def builder_arguments(config):
    """The builder's keyword arguments: `model_args`, and for mlp `hidden` and `activation`."""
    if config.model == "mlp":
        return {"hidden": list(config.hidden), "activation": config.activation, **config.model_args}
    return dict(config.model_args)


def check_arguments(spec, builder, model_args):
    """Keyword arguments the builder does not take are refused before it runs."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name, p in list(parameters.items())[4:]
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(model_args) - set(accepted))
    if unknown:
        raise spec_error(spec, f"takes no argument {', '.join(map(repr, unknown))}; its arguments: "
                               f"{', '.join(accepted) or 'none'}")


def build_model(spec, model_args, input_shape, n_classes, seed, dtype, builder=None):
    """Call SPEC's builder (or `builder`, named by `spec`) with a generator seeded from `seed`
    (the same on every rank) and check the Model it returns against the data: one example
    through it in evaluation mode."""
    builder = builder or resolve_builder(spec)
    dtype = np.dtype(dtype)
    model_args = dict(model_args or {})
    check_arguments(spec, builder, model_args)
    try:
        model = builder(tuple(int(size) for size in input_shape), int(n_classes),
                        np.random.default_rng(seed), dtype, **model_args)
    except GraphError as error:
        raise spec_error(spec, f"builds an invalid model: {error}" + debug_hint(error)) from None
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - the user's builder failed: bad input
        raise spec_error(spec, f"the builder {failure_of(error)}" + debug_hint(error)) from None
    if not isinstance(model, Model):
        raise spec_error(spec, f"the builder returned a {type(model).__name__}, not a dpflow Model; "
                               "end it with `return Model(inputs, labels, logits, loss, params)`")
    check_model(spec, model, input_shape, n_classes, dtype)
    return model


def check_model(spec, model, input_shape, n_classes, dtype):
    """Parameters in the training dtype, and one example through the graph (evaluation mode,
    so no layer talks to other ranks) giving one logit per class."""
    for name, param in model.params.items():
        if param.value.dtype != dtype:
            raise spec_error(spec, f"parameter {name!r} is {param.value.dtype} but the run trains in {dtype}; "
                                   "create parameters with the builder's `dtype` argument")
    saved = [layer.training for layer in model.graph]
    model.eval()
    try:
        model.inputs.value = np.zeros((1, *input_shape), dtype)
        model.labels.value = np.zeros(1, np.int64)
        for layer in model.graph:
            layer.forward()
    except Exception as error:  # noqa: BLE001 - a graph that cannot take this data
        raise spec_error(spec, f"does not fit examples of shape {tuple(input_shape)}: "
                               f"{type(error).__name__}: {error}" + debug_hint(error)) from None
    finally:
        for layer, mode in zip(model.graph, saved):
            layer.training = mode
    logits = np.shape(model.logits.value)
    if logits != (1, n_classes):
        raise spec_error(spec, f"its logits have shape {logits[1:]} per example but the data has "
                               f"{n_classes} classes; give the last layer {n_classes} outputs (use `n_classes`)")
    if not hasattr(model.loss, "loss_sum"):
        raise spec_error(spec, f"its loss {model.loss!r} sets no `loss_sum`; a Loss must set it to the "
                               "sum of its rows' losses in forward()")


def describe(model):
    """What must be the same on every rank: each layer's type and name, each parameter's
    shape, the state's names."""
    names = model.layer_names()
    return {"layers": [(type(layer).__name__, names[id(layer)]) for layer in model.graph],
            "params": [(name, tuple(param.value.shape)) for name, param in model.params.items()],
            "state": list(model.state())}
